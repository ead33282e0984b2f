"""What a worker's batch needs in memory, what its device has, and the largest batch that fits.

Two ways to know what a batch needs:

- Estimates (`estimate_steering_memory`, `estimate_eval_memory`): formulas of the architecture, without weights
  or compilation, for the planner and `runner validate`. Resident weights (the model in the dtype it is held in
  on the platform, the SAEs in float32) plus, per program, a part that does not depend on the batch and a part
  per batch row, calibrated against XLA's compiled memory analysis of the same programs (CPU backend, Gemma2-2B
  shapes; `tests/plan/test_memory.py` holds them to it within 25%).
- The compiled programs themselves (`program_need`), which a worker measures at a few batch sizes on its own
  devices and fits (`fit_batch`) against what those devices have free (`device_free_bytes`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from runner.errors import PlanError
from runner.model.architecture import Gemma2Architecture

if TYPE_CHECKING:
    from runner.config.schema import ModelConfig

#: Fraction of what a device has free that a batch may plan to use (the rest: the runtime, fragmentation, and
#: on CPU what other processes take meanwhile).
USABLE_FRACTION = 0.9
#: Bytes of a float32 value (SAEs, logits statistics, the sampler's sampling arrays).
F32 = 4
#: Float32 vocabulary-sized buffers per row of the sampler's decode step (logits, their sampling copies, the
#: random bits and the sort of the top-k/top-p filter).
SAMPLER_VOCAB_BUFFERS = 5
#: MLP-sized buffers per prefill position of the sampler (gating and value); they reuse the decode step's room.
PREFILL_MLP_BUFFERS = 2
#: Float32 chunk-sized buffers of a teacher-forced pass's logits (base and steered logits and their statistics).
TEACHER_FORCED_VOCAB_BUFFERS = 3
#: Rows of the embedding the logit lens scores at once (`runner.steering.metrics.LENS_VOCAB_CHUNK`).
LENS_ROWS = 4096


@dataclasses.dataclass(frozen=True)
class BatchMemory:
    """Bytes a worker's batch needs: what is resident, and what its largest program adds for a batch.

    Attributes:
      weights: Resident bytes: the model's parameters (as held on the device) and the SAEs.
      per_row: Bytes each batch row adds.
      sae_weights: The SAEs' part of `weights`.
      fixed: Bytes the program adds whatever the batch (on CPU mostly re-laid-out copies of attention weights).
    """

    weights: int
    per_row: int
    sae_weights: int = 0
    fixed: int = 0

    def need(self, batch_size: int) -> int:
        """Bytes beyond the resident weights for `batch_size` rows."""
        return self.fixed + batch_size * self.per_row

    def total(self, batch_size: int) -> int:
        """Estimated peak bytes for `batch_size` rows: resident weights plus `need`."""
        return self.weights + self.need(batch_size)

    def largest_batch(self, available_bytes: int, at_most: int) -> int:
        """The largest batch up to `at_most` whose `need` fits the usable part of `available_bytes` (the bytes
        free beyond the weights); 0 when not even one row does."""
        room = available_bytes * USABLE_FRACTION - self.fixed
        if room < self.per_row:
            return 0
        return int(min(at_most, room // max(self.per_row, 1)))


def sae_bytes(d_in: int, width: int) -> int:
    """Resident bytes of one SAE reading `d_in`-wide activations into `width` latents: its float32 encoder and
    decoder."""
    return 2 * d_in * width * F32


def held_value_bytes(dtype: str, platform: str, upcast_activations: bool) -> tuple[int, int]:
    """Bytes of one parameter and of one activation as a worker on `platform` holds them: `dtype`, except
    bfloat16 on CPU, held in float32 (`runner.model.loading.held_parameter_dtype`); float32 activations with
    `upcast_activations`."""
    parameter = 4 if dtype == "float32" or platform == "cpu" else 2
    return parameter, 4 if upcast_activations else parameter


def value_bytes(model: ModelConfig, stored_dtype: str, platform: str = "cpu") -> tuple[int, int]:
    """`held_value_bytes` of the configured model: `model.dtype`, with `auto` the checkpoint's `stored_dtype`."""
    dtype = stored_dtype if model.dtype == "auto" else model.dtype
    return held_value_bytes(dtype, platform, model.upcast_activations)


def _attention_weight_copies(arch: Gemma2Architecture, parameter_bytes: int) -> int:
    """XLA's CPU backend lays the query and output projections of every block out again for its dot kernels,
    once per program (hoisted out of the decode loop)."""
    return arch.num_layers * 2 * arch.num_query_heads * arch.embedding_dim * arch.head_dim * parameter_bytes


def estimate_sampler_memory(
    arch: Gemma2Architecture, *, prompt_len: int, max_new_tokens: int, parameter_bytes: int, activation_bytes: int
) -> BatchMemory:
    """The sampler program beyond the weights: the re-laid-out attention weights, and per row its KV cache and
    the larger of a decode step's float32 vocabulary buffers and the prefill's MLP activations."""
    cache_len = prompt_len + max_new_tokens
    per_row = arch.kv_cache_bytes(1, cache_len, activation_bytes) + max(
        SAMPLER_VOCAB_BUFFERS * arch.vocab_size * F32,
        PREFILL_MLP_BUFFERS * prompt_len * arch.mlp_hidden_dim * activation_bytes,
    )
    return BatchMemory(weights=0, per_row=per_row, fixed=_attention_weight_copies(arch, parameter_bytes))


def estimate_metrics_memory(
    arch: Gemma2Architecture, *, seq_len: int, parameter_bytes: int, activation_bytes: int, logit_positions: int = 32
) -> BatchMemory:
    """The steering-metrics program beyond the weights: the re-laid-out attention weights, or (when larger) the
    logits of `logit_positions` positions at a time (`runner.lm_stats.LOGIT_POSITIONS`) and the logit lens's
    embedding rows beside the last blocks' copies (XLA's analysis at 2, 6 and 26 blocks: the chunks come after
    the blocks); per row the MLP activations of the teacher-forced passes and their final hidden states."""
    chunks = (TEACHER_FORCED_VOCAB_BUFFERS * logit_positions * arch.vocab_size + LENS_ROWS * arch.embedding_dim) * F32
    copies = _attention_weight_copies(arch, parameter_bytes)
    last_blocks = copies * min(2, arch.num_layers) // max(arch.num_layers, 1)
    per_row = 2 * seq_len * (arch.mlp_hidden_dim + arch.embedding_dim) * activation_bytes
    return BatchMemory(weights=0, per_row=per_row, fixed=max(copies, last_blocks + chunks))


def estimate_steering_memory(
    arch: Gemma2Architecture,
    *,
    prompt_len: int,
    max_new_tokens: int,
    parameter_bytes: int,
    activation_bytes: int,
    sae_widths: Sequence[int],
) -> BatchMemory:
    """A steering worker: resident model and SAEs, and the larger of its two programs (the sampler and the
    steering metrics) at each batch size (bounded by the larger fixed part and the larger part per row)."""
    sampler = estimate_sampler_memory(arch, prompt_len=prompt_len, max_new_tokens=max_new_tokens,
                                      parameter_bytes=parameter_bytes, activation_bytes=activation_bytes)
    metrics = estimate_metrics_memory(arch, seq_len=prompt_len + max_new_tokens, parameter_bytes=parameter_bytes,
                                      activation_bytes=activation_bytes)
    saes = sum(sae_bytes(arch.embedding_dim, width) for width in sae_widths)
    return BatchMemory(
        weights=arch.parameter_count() * parameter_bytes + saes,
        per_row=max(sampler.per_row, metrics.per_row),
        sae_weights=saes,
        fixed=max(sampler.fixed, metrics.fixed),
    )


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
    """An SAE evaluation worker: resident model and the job's SAEs; the re-laid-out attention weights and the
    teacher-forced logit chunks; per sequence the clean logits kept for every SAE (the one `[batch, seq,
    vocabulary]` array), the captured activations, the MLP and attention transients and the SAE latents."""
    saes = sum(sae_bytes(site_width, width) for width in sae_widths)
    fixed = (
        _attention_weight_copies(arch, parameter_bytes)
        + TEACHER_FORCED_VOCAB_BUFFERS * 32 * arch.vocab_size * F32
    )
    logits = context_length * arch.vocab_size * activation_bytes
    activations = captures * context_length * max(site_width, arch.embedding_dim) * activation_bytes
    mlp = context_length * PREFILL_MLP_BUFFERS * arch.mlp_hidden_dim * activation_bytes
    attention = arch.num_query_heads * context_length * context_length * F32
    latents = context_length * max(sae_widths, default=0) * F32 * 2
    return BatchMemory(
        weights=arch.parameter_count() * parameter_bytes + saes,
        per_row=logits + activations + mlp + attention + latents,
        sae_weights=saes,
        fixed=fixed,
    )


# ---------------------------------------------------------------------------------------------------------------
# What compiled programs need, and what devices have


def leaf_device_bytes(leaf: Any) -> int:
    """Bytes of one array (or `jax.ShapeDtypeStruct`) on each device it lives on: a shard's, when sharded."""
    shape = tuple(getattr(leaf, "shape", ()))
    sharding = getattr(leaf, "sharding", None)
    if sharding is not None:
        shape = tuple(sharding.shard_shape(shape))
    return int(math.prod(shape)) * np.dtype(leaf.dtype).itemsize


def argument_bytes(*trees: Any) -> int:
    """Per-device bytes of the arrays in `trees` as a compiled program's `argument_size_in_bytes` counts them:
    every leaf, so an array that appears twice (Gemma2's tied embedding, read by the lookup and the unembedding)
    counts twice."""
    return sum(leaf_device_bytes(leaf) for leaf in jax.tree.leaves(trees) if hasattr(leaf, "dtype"))


def unique_bytes(*trees: Any) -> int:
    """Per-device bytes of the distinct arrays in `trees`: what they hold resident (a shared array counts once)."""
    seen: dict[int, Any] = {}
    for leaf in jax.tree.leaves(trees):
        if hasattr(leaf, "dtype"):
            seen.setdefault(id(leaf), leaf)
    return sum(leaf_device_bytes(leaf) for leaf in seen.values())


def program_need(analysis: Any, weight_argument_bytes: int) -> int:
    """Per-device bytes a compiled program needs beyond the resident weights it reads: its temporaries, its
    outputs and its other arguments (XLA's `memory_analysis()`; `weight_argument_bytes` from `argument_bytes` of
    the weights it is called with)."""
    others = analysis.argument_size_in_bytes - weight_argument_bytes
    return max(0, int(analysis.temp_size_in_bytes + analysis.output_size_in_bytes - analysis.alias_size_in_bytes
                      + max(others, 0)))


def device_free_bytes(devices: Iterable[jax.Device] | None = None) -> int:
    """What the devices can still give a program: on GPU/TPU the least any of them has free (`memory_stats()`:
    `bytes_limit - bytes_in_use`), on CPU the host's available memory."""
    devices = list(devices) if devices is not None else jax.local_devices()
    if devices[0].platform != "cpu":
        free = []
        for device in devices:
            stats = device.memory_stats() or {}
            if "bytes_limit" in stats:
                free.append(int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)))
        if free:
            return min(free)
    import psutil

    return int(psutil.virtual_memory().available)


def device_memory_bytes(device: jax.Device | None = None) -> int:
    """What the device can hold: the accelerator's memory limit, or the host's available RAM on CPU."""
    device = device or jax.local_devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    import psutil

    return int(psutil.virtual_memory().available)


def peak_memory_bytes(devices: Iterable[jax.Device] | None = None) -> int:
    """The most this process has held: on GPU/TPU the largest `peak_bytes_in_use` of its devices, on CPU its
    peak resident set."""
    devices = list(devices) if devices is not None else jax.local_devices()
    if devices[0].platform != "cpu":
        peaks = [int((device.memory_stats() or {}).get("peak_bytes_in_use", 0)) for device in devices]
        return max(peaks)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def gib(num_bytes: float) -> str:
    """`num_bytes` in GiB, one decimal (two below 1 GiB)."""
    value = num_bytes / 2**30
    return f"{value:.2f} GiB" if value < 1 else f"{value:.1f} GiB"


@dataclasses.dataclass(frozen=True)
class BatchFit:
    """The batch a worker chose and what it measured.

    Attributes:
      batch_size: Rows of its programs.
      need: Bytes its largest program needs at that batch beyond the resident weights (compiled analysis).
      budget: The usable bytes it was fitted against.
      measured: Every batch size compiled on the way, with its need.
    """

    batch_size: int
    need: int
    budget: int
    measured: dict[int, int]


class DoesNotFit(Exception):
    """Not even a batch of 1 fits: carries the need at 1 and the budget."""

    def __init__(self, need: int, budget: int):
        super().__init__(f"a batch of 1 needs {gib(need)} beyond the weights; {gib(budget)} usable")
        self.need, self.budget = need, budget


def fit_batch(need: Callable[[int], int], budget: int, at_most: int, guess: int) -> BatchFit:
    """The largest batch up to `at_most` whose `need(batch)` (a compiled program's analysis: each call may
    compile) fits `budget`, measured at few sizes: at `guess` (an estimate's answer) and, if that fits, at
    `at_most`; else at half of it. The line through the two measurements is solved for the budget, and the
    solution measured, stepping down until it fits.

    Raises:
      DoesNotFit: not even a batch of 1 fits.
    """
    measured: dict[int, int] = {}

    def fits(batch: int) -> bool:
        if batch not in measured:
            measured[batch] = int(need(batch))
        return measured[batch] <= budget

    at_most = max(1, at_most)
    first = min(max(1, guess), at_most)
    if fits(first):
        if first == at_most or fits(at_most):
            return _fit(at_most, budget, measured)
        low, high = first, at_most
    elif first == 1:
        raise DoesNotFit(measured[1], budget)
    else:
        low, high = max(1, first // 2), first
        fits(low)
    slope = max((measured[high] - measured[low]) / (high - low), 1.0)
    batch = int(min(high - 1, max(1, low + (budget - measured[low]) // slope)))
    while not fits(batch):
        if batch == 1:
            raise DoesNotFit(measured[1], budget)
        batch = max(1, min(batch - 1, int(batch * budget / measured[batch])))
    return _fit(max(b for b, n in measured.items() if n <= budget), budget, measured)


def _fit(batch: int, budget: int, measured: dict[int, int]) -> BatchFit:
    return BatchFit(batch, measured[batch], budget, dict(measured))


def check_fits(memory: BatchMemory, available_bytes: int, *, model: str, dtype: str, platform: str) -> None:
    """Refuses, before anything runs, a model whose estimate does not fit one row in `available_bytes`, naming
    the bytes and, for float32 weights on an accelerator, suggesting `model.dtype: bfloat16` (on CPU bfloat16
    weights are held in float32 anyway).

    Raises:
      PlanError: not even one row fits.
    """
    if memory.largest_batch(available_bytes - memory.weights, 1) >= 1:
        return
    hint = "; model.dtype: bfloat16 halves the weights" if dtype == "float32" and platform != "cpu" else ""
    raise PlanError(
        f"model {model} ({dtype}): a batch of 1 needs about {gib(memory.total(1))} (weights "
        f"{gib(memory.weights)}) but the device has {gib(available_bytes * USABLE_FRACTION)} usable; use a larger "
        f"host, shard over more devices, or shorten prompts / sampling.max_new_tokens{hint}"
    )
