"""Memory estimate of a sampling batch, and the largest batch that fits a device.

The estimate is deliberately simple and conservative: resident weights (model + SAEs) plus, per batch row, the
KV cache and the largest transient buffers of the prefill (the logits over the vocabulary, the MLP activations,
the attention scores, and the SAE latents of every steering site), times a safety margin.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from runner.errors import PlanError
from runner.model.architecture import Gemma2Architecture, default_parameter_dtype

if TYPE_CHECKING:
    from runner.config.schema import ModelConfig

SAFETY_MARGIN = 1.25
#: Fraction of a device's reported capacity the sampler may plan to use (the rest: runtime, fragmentation).
USABLE_FRACTION = 0.9


@dataclasses.dataclass(frozen=True)
class BatchMemory:
    """Bytes a batch needs, split into what is resident and what grows with each row.

    Attributes:
      weights: Resident bytes: the model's parameters and the SAEs.
      per_row: Bytes each batch row adds.
      sae_weights: The SAEs' part of `weights`.
    """

    weights: int
    per_row: int
    sae_weights: int = 0

    def total(self, batch_size: int) -> int:
        """Estimated peak bytes for `batch_size` rows, safety margin included."""
        return int((self.weights + batch_size * self.per_row) * SAFETY_MARGIN)


def sae_bytes(d_in: int, width: int) -> int:
    """Resident bytes of one SAE reading `d_in`-wide activations into `width` latents: its float32 encoder and
    decoder."""
    return 2 * d_in * width * 4


def value_bytes(model: ModelConfig, is_synthetic: bool) -> tuple[int, int]:
    """Bytes of one parameter and of one activation of the configured model: `model.dtype`, where `auto` is the
    model package's `default_parameter_dtype` (float32 for synthetic checkpoints, bfloat16 otherwise), and
    float32 activations when `upcast_activations`."""
    dtype = default_parameter_dtype(is_synthetic) if model.dtype == "auto" else model.dtype
    parameter = jnp.dtype(dtype).itemsize
    return parameter, 4 if model.upcast_activations else parameter


def estimate_batch_memory(
    arch: Gemma2Architecture,
    *,
    prompt_len: int,
    max_new_tokens: int,
    parameter_bytes: int,
    activation_bytes: int,
    sae_widths: Sequence[int],
) -> BatchMemory:
    """Estimates the memory of patched sampling (see the module docstring for what is counted)."""
    cache_len = prompt_len + max_new_tokens
    saes = sum(sae_bytes(arch.embedding_dim, width) for width in sae_widths)
    weights = arch.parameter_count() * parameter_bytes + saes
    kv_cache = arch.kv_cache_bytes(1, cache_len, activation_bytes)
    logits = prompt_len * arch.vocab_size * 4
    mlp = prompt_len * 3 * arch.mlp_hidden_dim * activation_bytes
    attention = arch.num_query_heads * prompt_len * cache_len * 4
    residual = prompt_len * arch.embedding_dim * 8 * activation_bytes
    latents = prompt_len * max(sae_widths, default=0) * 4 * 2
    per_row = kv_cache + logits + mlp + attention + residual + latents
    return BatchMemory(weights=weights, per_row=per_row, sae_weights=saes)


def estimate_eval_memory(
    arch: Gemma2Architecture,
    *,
    context_length: int,
    parameter_bytes: int,
    activation_bytes: int,
    sae_widths: Sequence[int],
    site_width: int,
    captures: int,
) -> BatchMemory:
    """Estimates the memory of an SAE evaluation batch: resident weights (model + the job's SAEs) plus, per
    sequence, the clean logits kept for every SAE, one patched pass's logits and float32 vocabulary chunk, the
    captured activations, the MLP and attention transients and the SAE latents."""
    saes = sum(sae_bytes(site_width, width) for width in sae_widths)
    weights = arch.parameter_count() * parameter_bytes + saes
    logits = context_length * arch.vocab_size * activation_bytes * 2 + context_length * 32768 * 4 * 3
    activations = captures * context_length * max(site_width, arch.embedding_dim) * activation_bytes
    mlp = context_length * 3 * arch.mlp_hidden_dim * activation_bytes
    attention = arch.num_query_heads * context_length * context_length * 4
    latents = context_length * max(sae_widths, default=0) * 4 * 2
    return BatchMemory(weights=weights, per_row=logits + activations + mlp + attention + latents, sae_weights=saes)


def device_memory_bytes(device: jax.Device | None = None) -> int:
    """What the device can hold: the accelerator's memory limit, or the host's available RAM on CPU."""
    device = device or jax.local_devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) * len(jax.local_devices())
    import psutil

    return int(psutil.virtual_memory().available)


def largest_fitting_batch(memory: BatchMemory, available_bytes: int, at_most: int) -> int:
    """The largest batch size up to `at_most` whose estimate fits in `available_bytes` (usable fraction).

    Raises:
      PlanError: not even one row fits.
    """
    budget = available_bytes * USABLE_FRACTION
    if memory.total(1) > budget:
        raise PlanError(
            f"a batch of 1 needs about {memory.total(1) / 2**30:.1f} GiB but the device has "
            f"{budget / 2**30:.1f} GiB usable; use a larger host, shard over more devices, or shorten "
            "prompts / sampling.max_new_tokens"
        )
    batch = 1
    while batch < at_most and memory.total(batch + 1) <= budget:
        batch += 1
    return batch
