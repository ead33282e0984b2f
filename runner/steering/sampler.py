"""Batched, fully jitted steering sampler over Penzai's KV-caching Gemma2.

One XLA program per (batch size, prompt bucket, max_new_tokens) runs the prefill and every decode step
(`lax.while_loop`, early exit once every row has produced EOS). Each batch row carries its own steering point
(layer, feature, value, mode), sampling settings (temperature, top-k, top-p) and random stream; none of these
are compile-time constants, so a whole sweep reuses one program.

Randomness: a row's key is `fold_in(key(seed), stream)`, folded with the decode step, where `stream` is chosen by
the caller from the point's identity (the prompt). A point therefore samples the same tokens alone, in a batch of
64, or on another host.

Measurements (fixed-shape `{batch}` accumulators inside the program, see `steering.SteeringSite`): over the
generated tokens that are neither EOS, BOS nor padding, the SAE L0 at the steering layer and the steered feature's
activation and firing count, measured on the residual stream after steering.

Penzai's KV cache and why the decoder is built this way: `docs/penzai-gemma2.md#kv-cache-and-sampling`; what
recompiles: `docs/penzai-gemma2.md#recompilation`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from penzai import pz
from penzai.models.transformer import model_parts, sampling_mode

from runner.model.tokenizer import BOS_ID, EOS_ID, PAD_ID
from runner.nn import sites
from runner.nn import steering as steering_lib
from runner.nn.jumprelu import JumpReLUSAE
from runner.program_cache import LoweredProgram, ProgramCache

MIN_PROMPT_BUCKET = 16
#: `SamplingBatch.sampled_vocab` of a row that may sample any id.
NO_VOCAB_LIMIT = np.iinfo(np.int32).max


def prompt_bucket(length: int) -> int:
    """The padded prompt length for a prompt of `length` tokens: the next power of two, at least 16."""
    bucket = MIN_PROMPT_BUCKET
    while bucket < length:
        bucket *= 2
    return bucket


@dataclasses.dataclass(frozen=True)
class SamplingBatch:
    """Host-side inputs of one batch; every array has the batch size as its first dimension.

    Attributes:
      prompt_tokens: `[B, P]` int32, left-padded with PAD to the bucket length P (BOS first after padding).
      target_layer, feature, value, mode: `[B, K]` interventions of each row (see `SteeringInputs`; unused
        slots at `NO_LAYER`; `[B]` is read as K = 1).
      steer_from: `[B]` first position each row is steered at.
      temperature: `[B]` float; 0 means greedy.
      top_k: `[B]` int; 0 means no top-k filter.
      top_p: `[B]` float; 1 means no nucleus filter.
      seed: `[B]` uint32 seed of the row's point.
      stream: `[B]` uint32 stream id of the row's point (derived from its identity, not its row).
      probe_features: `[num_probes]` latents measured at every site on unsteered rows (not per row: the
        sweep's features, so that one baseline generation serves every (layer, feature) at scale 0).
      sampled_vocab: `[B]` int; the row samples only ids below it (`sampling.exclude_unknown_tokens`: the
        tokenizer's piece count); `NO_VOCAB_LIMIT` lets it sample every embedding row.
    """

    prompt_tokens: np.ndarray
    target_layer: np.ndarray
    feature: np.ndarray
    value: np.ndarray
    mode: np.ndarray
    steer_from: np.ndarray
    temperature: np.ndarray
    top_k: np.ndarray
    top_p: np.ndarray
    seed: np.ndarray
    stream: np.ndarray
    probe_features: np.ndarray
    sampled_vocab: np.ndarray | None = None

    def __post_init__(self) -> None:
        # One intervention per row may be given as `[B]`.
        for name in ("target_layer", "feature", "value", "mode"):
            array = np.asarray(getattr(self, name))
            object.__setattr__(self, name, array[:, None] if array.ndim == 1 else array)
        if self.sampled_vocab is None:
            object.__setattr__(self, "sampled_vocab", np.full(self.batch_size, NO_VOCAB_LIMIT, np.int32))

    @property
    def batch_size(self) -> int:
        """Rows in the batch."""
        return int(self.prompt_tokens.shape[0])

    @classmethod
    def zeros(cls, batch_size: int, prompt_len: int, num_probes: int, num_interventions: int = 1) -> SamplingBatch:
        """A batch of the given shape holding zeros (what a program is compiled for)."""
        rows = np.zeros(batch_size, np.int32)
        slots = np.zeros((batch_size, num_interventions), np.int32)
        return cls(
            prompt_tokens=np.zeros((batch_size, prompt_len), np.int32), target_layer=slots, feature=slots,
            value=slots.astype(np.float32), mode=slots, steer_from=rows, temperature=rows.astype(np.float32),
            top_k=rows, top_p=np.ones(batch_size, np.float32), seed=rows.astype(np.uint32),
            stream=rows.astype(np.uint32), probe_features=np.zeros(num_probes, np.int32),
        )


@dataclasses.dataclass(frozen=True)
class SamplingOutput:
    """What one batch produced.

    Attributes:
      tokens: `[B, T]` sampled token ids; PAD after a row's EOS (the EOS itself is kept).
      totals: `[B, K]` sums of `steering.TOTAL_NAMES` of each row's interventions, each at its layer.
      baseline: By layer, the sums of `steering.BASELINE_TOTAL_NAMES` of the unsteered rows at that layer's site.
      decode_steps: Decode steps actually run (fewer than T when every row hit EOS early).
    """

    tokens: np.ndarray
    totals: dict[str, np.ndarray]
    baseline: dict[int, dict[str, np.ndarray]]
    decode_steps: int


def sample_next_tokens(
    logits: jax.Array,
    keys: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    pad_id: int = PAD_ID,
    sampled_vocab: jax.Array | None = None,
) -> jax.Array:
    """Samples one token per row from `[B, V]` logits with per-row temperature, top-k and top-p.

    Temperature 0 is argmax. The pad token is never produced, nor, with `sampled_vocab` (`[B]`), an id at or
    above the row's limit. Filters run only when some row asks for one.
    """
    logits = logits.astype(jnp.float32).at[:, pad_id].set(-jnp.inf)
    if sampled_vocab is not None:
        ids = jnp.arange(logits.shape[-1], dtype=jnp.int32)[None, :]
        logits = jnp.where(ids < sampled_vocab[:, None], logits, -jnp.inf)
    greedy = jnp.argmax(logits, axis=-1)
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]

    def filtered(scaled: jax.Array) -> jax.Array:
        descending = -jnp.sort(-scaled, axis=-1)
        vocab = scaled.shape[-1]
        kth_value = jnp.take_along_axis(descending, (jnp.clip(top_k, 1, vocab) - 1)[:, None], axis=-1)
        in_top_k = (top_k[:, None] <= 0) | (descending >= kth_value)
        probs = jax.nn.softmax(jnp.where(in_top_k, descending, -jnp.inf), axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        kept = in_top_k & (mass_before < top_p[:, None])  # the most likely token is always kept
        cutoff = jnp.min(jnp.where(kept, descending, jnp.inf), axis=-1, keepdims=True)
        return jnp.where(scaled >= cutoff, scaled, -jnp.inf)

    needs_filter = jnp.any(top_k > 0) | jnp.any(top_p < 1.0)
    scaled = jax.lax.cond(needs_filter, filtered, lambda s: s, scaled)
    sampled = jax.vmap(jax.random.categorical)(keys, scaled)
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


class SteeringSampler:
    """Patched sampling of a fixed (batch size, prompt bucket, max_new_tokens) as one compiled program.

    Build one per shape and keep it: calling it again with other prompts, steering points, seeds or sampling
    settings reuses the compiled program (`compilations` stays 1). With `mesh` (the model's, `LoadedModel.mesh`)
    the batch and the outputs are replicated over it, which a slice replica under `jax.distributed` needs: every
    process passes the same batch (checked) and reads the whole output. With `program_cache` (a worker's) the
    traced program is kept on disk, so the next worker of this shape skips tracing.
    """

    def __init__(
        self,
        model: model_parts.TransformerLM,
        saes: Mapping[int, JumpReLUSAE],
        *,
        batch_size: int,
        prompt_len: int,
        max_new_tokens: int,
        num_probes: int = 1,
        num_interventions: int = 1,
        eos_id: int = EOS_ID,
        pad_id: int = PAD_ID,
        mesh: Mesh | None = None,
        program_cache: ProgramCache | None = None,
    ):
        self.batch_size = batch_size
        self.prompt_len = prompt_len
        self.max_new_tokens = max_new_tokens
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.layers = tuple(sorted(saes))
        self.num_probes = num_probes
        self.num_interventions = num_interventions
        self.compilations = 0

        patched = steering_lib.add_steering_sites(model, saes, batch_size=batch_size, num_probes=num_probes,
                                                  num_interventions=num_interventions)
        patched = sites.logits_of_last_position(patched)  # the prefill reads the last prompt position's logits only
        caching = sampling_mode.KVCachingTransformerLM.from_uncached(
            patched, cache_len=prompt_len + max_new_tokens, batch_axes={"batch": batch_size}, pad_id=pad_id
        )
        pure_model, state_values = pz.unbind_state_vars(pz.freeze_params(caching), freeze=True)
        self._pure_model = pure_model
        # Only shapes are kept: the program allocates its KV cache and accumulators itself.
        self._state_template = jax.tree.map(
            lambda leaf: jax.ShapeDtypeStruct(jnp.shape(leaf), jnp.asarray(leaf).dtype), list(state_values)
        )
        # On a mesh, inputs and outputs are replicated over it: under `jax.distributed` every process gives the
        # same batch and reads the whole output locally.
        self._replicated = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None
        self._program_cache = program_cache if program_cache is not None else ProgramCache(None)
        self._lowered: LoweredProgram | None = None
        self._compiled: Callable[..., Any] | None = None

    def lower(self) -> None:
        """Traces the program (Python work, holding the GIL) or reads its trace from the program cache, ahead of
        `compile`."""
        if self._lowered is None and self._compiled is None:
            batch = SamplingBatch.zeros(self.batch_size, self.prompt_len, self.num_probes, self.num_interventions)
            host = {field.name: getattr(batch, field.name) for field in dataclasses.fields(SamplingBatch)}
            static = {
                "batch_size": self.batch_size, "prompt_len": self.prompt_len, "max_new_tokens": self.max_new_tokens,
                "eos_id": self.eos_id, "pad_id": self.pad_id, "layers": self.layers, "num_probes": self.num_probes,
                "num_interventions": self.num_interventions,
                "state": str(self._state_template), "replicated": str(self._replicated),
            }
            self._lowered = self._program_cache.lower(
                "sampler", self._generate, (self._pure_model, self._device_inputs(host)), static=static,
                out_shardings=self._replicated,
            )

    def compile(self) -> None:
        """Compiles the program now, ahead of the first batch (else the first batch does); XLA's part releases
        the GIL, so another thread can trace meanwhile."""
        if self._compiled is None:
            self.lower()
            self._compiled = self._lowered.compile()
            self._lowered = None
            self.compilations += 1

    def memory_analysis(self) -> Any:
        """XLA's compiled memory analysis of the program, per device (compiles it first if needed)."""
        self.compile()
        return self._compiled.memory_analysis()

    @property
    def weights(self) -> Any:
        """The weights the program is called with (the frozen model, its steering sites' SAEs included)."""
        return self._pure_model

    def __call__(self, batch: SamplingBatch) -> SamplingOutput:
        """Runs one batch (its shape must match the sampler's)."""
        if batch.prompt_tokens.shape != (self.batch_size, self.prompt_len) or batch.probe_features.shape != (
            self.num_probes,
        ) or batch.target_layer.shape != (self.batch_size, self.num_interventions):
            raise ValueError(
                f"batch of shape {batch.prompt_tokens.shape} with {batch.probe_features.shape} probes and "
                f"interventions {batch.target_layer.shape} given to a sampler for "
                f"{(self.batch_size, self.prompt_len)} with {self.num_probes} and {self.num_interventions}"
            )
        host = {field.name: np.asarray(getattr(batch, field.name)) for field in dataclasses.fields(SamplingBatch)}
        self.compile()
        tokens, totals, steps = self._compiled(self._pure_model, self._device_inputs(host))
        totals_by_layer = {layer: totals[i] for i, layer in enumerate(self.layers)}
        return SamplingOutput(
            tokens=np.asarray(tokens),
            totals=steering_lib.combine_totals(totals_by_layer),
            baseline={layer: steering_lib.baseline_totals(t) for layer, t in totals_by_layer.items()},
            decode_steps=int(steps),
        )

    def _device_inputs(self, host: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        if self._replicated is None or jax.process_count() == 1:
            return {name: jnp.asarray(value) for name, value in host.items()}
        # Processes that disagree on the batch would compute garbage or hang in a collective: check first.
        digest = hashlib.sha256(b"".join(np.ascontiguousarray(host[name]).tobytes() for name in sorted(host)))
        multihost_utils.assert_equal(np.frombuffer(digest.digest(), np.uint32), "the batch differs between processes")
        return {name: jax.make_array_from_process_local_data(self._replicated, value) for name, value in host.items()}

    def _generate(
        self, pure_model: sampling_mode.KVCachingTransformerLM, arrays: dict[str, jax.Array]
    ) -> tuple[jax.Array, list, jax.Array]:
        batch_size, max_new = self.batch_size, self.max_new_tokens
        steering_inputs = steering_lib.SteeringInputs.from_rows(
            arrays["target_layer"], arrays["feature"], arrays["value"], arrays["mode"], arrays["steer_from"]
        )
        row_keys = jax.vmap(lambda seed, stream: jax.random.fold_in(jax.random.key(seed), stream))(
            arrays["seed"].astype(jnp.uint32), arrays["stream"].astype(jnp.uint32)
        )

        def run_model(states: list, tokens: jax.Array, measure_mask: jax.Array) -> tuple[list, jax.Array]:
            variables = [state.unfreeze_as_copy() for state in states]
            model = pz.bind_variables(pure_model, variables)
            logits = model(
                pz.nx.wrap(tokens).tag("batch", "seq"),
                steering=steering_inputs,
                measure_mask=pz.nx.wrap(measure_mask).tag("batch", "seq"),
                probe_features=pz.nx.wrap(arrays["probe_features"].astype(jnp.int32)).tag("probe"),
            )
            last_logits = logits[{"seq": -1}].unwrap("batch", "vocabulary")
            return [variable.freeze() for variable in variables], last_logits

        initial_states = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self._state_template)
        prompt = arrays["prompt_tokens"].astype(jnp.int32)
        states, logits = run_model(initial_states, prompt, jnp.zeros(prompt.shape, bool))

        def keep_going(carry: tuple) -> jax.Array:
            _, _, step, done, _ = carry
            return (step < max_new) & ~jnp.all(done)

        def decode_step(carry: tuple) -> tuple:
            states, logits, step, done, out_tokens = carry
            keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, step)
            token = sample_next_tokens(
                logits, keys, arrays["temperature"], arrays["top_k"], arrays["top_p"], self.pad_id,
                arrays["sampled_vocab"].astype(jnp.int32),
            )
            token = jnp.where(done, self.pad_id, token)
            out_tokens = jax.lax.dynamic_update_slice(out_tokens, token[:, None], (0, step))
            measured = ~done & (token != self.eos_id) & (token != BOS_ID)  # special tokens never enter a metric
            states, logits = run_model(states, token[:, None], measured[:, None])
            return states, logits, step + 1, done | (token == self.eos_id), out_tokens

        carry = (
            states,
            logits,
            jnp.zeros((), jnp.int32),
            jnp.zeros((batch_size,), bool),
            jnp.full((batch_size, max_new), self.pad_id, jnp.int32),
        )
        states, _, steps, _, out_tokens = jax.lax.while_loop(keep_going, decode_step, carry)
        totals = [self._site_totals(states, layer) for layer in self.layers]
        return out_tokens, totals, steps

    @staticmethod
    def _site_totals(states: list, layer: int) -> dict[str, jax.Array]:
        """A site's totals as plain arrays (`[batch, intervention]`, `[batch]`, or `[batch, probe]`)."""
        label = f"steering/totals_{layer}"
        totals = next(state.value for state in states if state.label == label)
        return {
            name: value.unwrap("batch", *(axis for axis in (steering_lib.INTERVENTION_AXIS, "probe")
                                          if axis in value.named_shape))
            for name, value in totals.items()
        }


def left_pad(token_lists: list[list[int]], length: int, pad_id: int = PAD_ID) -> np.ndarray:
    """`[len(token_lists), length]` int32 array of the sequences right-aligned (padding on the left)."""
    out = np.full((len(token_lists), length), pad_id, np.int32)
    for row, tokens in enumerate(token_lists):
        if len(tokens) > length:
            raise ValueError(f"sequence of {len(tokens)} tokens does not fit in {length}")
        out[row, length - len(tokens) :] = tokens
    return out
