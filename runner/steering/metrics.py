"""Judge-free metrics of steered generations: those computed batched after sampling by teacher forcing, and the
per-point means of the sampler's own measurements.

Conventions (`docs/metrics.md#steering-metrics`):

- Layout: `prompt_tokens [B, P]` left-padded with PAD (BOS first after the padding) and `generated_tokens [B, G]`
  right-padded (PAD after the row's EOS), exactly as `runner.steering.sampler.SteeringSampler` takes and returns them.
  The teacher-forced sequence is `concat(prompt, generation)`; padding gets position -1 and is never attended to
  (Penzai's KV-cache rule, see `runner.lm_stats.token_positions`), so a row reads as if it were unpadded.
- Generated tokens measured: those before the row's first EOS that are not special (PAD, EOS, BOS). Token j of
  the generation sits at sequence position `P + j` and is predicted from position `P + j - 1`.
- Distribution metrics (NLL, KL, entropy, logit-lens mass) are per-row means over the positions that predict a
  measured token; concept metrics are per-row means over the measured tokens' own positions. Sums are float64 on
  the host, divided once per row. All in nats. Logits are the model's (soft-capped), cast to float32.
- A mean is omitted from a row's metrics when it is undefined (no measured token).
- Everything a batch needs (both teacher-forced passes, every per-position statistic, the logit lens) is one
  compiled program per batch shape, so a sweep compiles it once.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz
from penzai.models.transformer import model_parts

from runner.lm_stats import (
    DEFAULT_VOCAB_CHUNK,
    cross_entropy_from_partition,
    logit_pair_statistics,
    named_tokens,
    over_sequence_chunks,
    seq_chunk_for,
    special_token_mask,
)
from runner.model.tokenizer import EOS_ID, PAD_ID
from runner.nn import measurement, sites, steering
from runner.nn.jumprelu import LATENT_AXIS, JumpReLUSAE
from runner.program_cache import ProgramCache

DEFAULT_LOGIT_LENS_K = 10


def steering_point_metrics(
    tokens: float, l0_total: float, activation_total: float, fires_total: float
) -> dict[str, float]:
    """Per-point metrics from the sampler's sums for the point (ratios omitted when no token was measured).

    - `steer/l0`: mean SAE L0 at the steering layer over the generated tokens (EOS, BOS and padding excluded), on the
      residual stream after steering.
    - `steer/feature_activation`: the steered feature's mean activation over those tokens.
    - `steer/feature_firing_rate`: fraction of those tokens on which the steered feature fires.
    - `gen/measured_tokens`: how many tokens the means are over.
    """
    metrics = {"gen/measured_tokens": float(tokens)}
    if tokens > 0:
        metrics["steer/l0"] = float(l0_total) / tokens
        metrics["steer/feature_activation"] = float(activation_total) / tokens
        metrics["steer/feature_firing_rate"] = float(fires_total) / tokens
    return metrics


def unembedding_matrix(model: model_parts.TransformerLM) -> pz.nx.NamedArray:
    """The raw `{vocabulary, embedding}` unembedding (Gemma2 ties it to the input embedding table)."""
    decoder = pz.select(model).at_instances_of(pz.nn.EmbeddingDecode).get_sequence()[0]
    embeddings = decoder.table.embeddings
    if isinstance(embeddings, pz.Parameter | pz.ParameterValue):  # unfrozen, or frozen by `pz.freeze_params`
        return embeddings.value
    return embeddings


#: Vocabulary rows the logit lens scores at once (their float32 copy is all the lens adds to the embedding).
LENS_VOCAB_CHUNK = 4096


@functools.partial(jax.jit, static_argnames=("k", "vocab_chunk"))
def _logit_lens_top_k(
    unembedding: jax.Array, directions: jax.Array, k: int, vocab_chunk: int = LENS_VOCAB_CHUNK
) -> jax.Array:
    """`[R, k]` token ids with the largest `direction @ W_E^T` (float32 products; ties: lower id first).

    The vocabulary is scored `vocab_chunk` rows at a time with a running top-k, so a bfloat16 embedding is never
    copied to float32 as a whole.
    """
    vocab = unembedding.shape[0]
    chunk = min(vocab_chunk, vocab)
    steps = -(-vocab // chunk)
    directions = directions.astype(jnp.float32)

    def step(best: tuple[jax.Array, jax.Array], index: jax.Array) -> tuple[tuple[jax.Array, jax.Array], None]:
        # The last chunk is shifted back to fit; the rows it repeats are masked out.
        start = jnp.minimum(index * chunk, vocab - chunk)
        rows = jax.lax.dynamic_slice_in_dim(unembedding, start, chunk, axis=0).astype(jnp.float32)
        ids = start + jnp.arange(chunk, dtype=jnp.int32)
        scores = jnp.where(ids >= index * chunk, directions @ rows.T, -jnp.inf)
        values = jnp.concatenate([best[0], scores], axis=1)
        candidates = jnp.concatenate([best[1], jnp.broadcast_to(ids, scores.shape)], axis=1)
        top_values, top_at = jax.lax.top_k(values, k)
        return (top_values, jnp.take_along_axis(candidates, top_at, axis=1)), None

    first = (jnp.full((directions.shape[0], k), -jnp.inf, jnp.float32),
             jnp.full((directions.shape[0], k), vocab, jnp.int32))
    (_, ids), _ = jax.lax.scan(step, first, jnp.arange(steps, dtype=jnp.int32))
    return ids


def top_logit_lens_tokens(
    model: model_parts.TransformerLM, sae: JumpReLUSAE, feature: int, k: int = DEFAULT_LOGIT_LENS_K
) -> list[int]:
    """The `k` token ids with the largest `W_dec[feature] @ W_E^T`, largest first.

    Raw unembedding: no final norm, no soft-cap (`docs/metrics.md#logit-lens`).
    """
    unembedding = unembedding_matrix(model).unwrap("vocabulary", "embedding")
    direction = sae.decoder.w_dec.unwrap(LATENT_AXIS, "embedding")[feature][None]
    return [int(token) for token in np.asarray(_logit_lens_top_k(unembedding, direction, k=k))[0]]


def generated_token_mask(generated_tokens: np.ndarray) -> np.ndarray:
    """`[B, G]` True at generated tokens that count: before the row's first EOS and not PAD/EOS/BOS."""
    generated_tokens = np.asarray(generated_tokens)
    before_eos = np.cumsum(generated_tokens == EOS_ID, axis=-1) == 0
    return before_eos & special_token_mask(generated_tokens)


def measured_tokens(generated_row: Sequence[int]) -> list[int]:
    """The generated tokens of one row that the metrics read (see `generated_token_mask`)."""
    row = np.asarray(generated_row)[None]
    return [int(token) for token in row[0][generated_token_mask(row)[0]]]


def longest_repeated_span(tokens: Sequence[int]) -> int:
    """Length of the longest contiguous token span that occurs at least twice (occurrences may overlap)."""
    array = np.asarray(tokens)
    longest = 0
    for shift in range(1, array.size):
        equal = array[:-shift] == array[shift:]
        run = 0
        for same in equal:  # longest run of matches at this shift
            run = run + 1 if same else 0
            longest = max(longest, run)
    return longest


def repetition_metrics(tokens: Sequence[int]) -> dict[str, float]:
    """`gen/distinct_1`, `gen/distinct_2` (unique n-grams / n-grams; omitted without any n-gram) and
    `gen/longest_repeat` (`longest_repeated_span`) of a generation's measured tokens.

    Convention: `docs/metrics.md#repetition` (distinct-n = unique / total; seq-rep-n would be `1 - distinct_n`).
    """
    tokens = [int(token) for token in tokens]
    metrics = {"gen/longest_repeat": float(longest_repeated_span(tokens))}
    for n in (1, 2):
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        if grams:
            metrics[f"gen/distinct_{n}"] = len(set(grams)) / len(grams)
    return metrics


@functools.partial(jax.jit, static_argnames=("logit_lens_k", "vocab_chunk"))
def _per_position_statistics(
    base_model: model_parts.TransformerLM,
    inputs: steering.SteeringInputs,
    saes: dict[int, JumpReLUSAE],
    tokens: jax.Array,
    point_rows: jax.Array,
    layers: jax.Array,
    features: jax.Array,
    logit_lens_k: int,
    vocab_chunk: int,
) -> dict[str, jax.Array]:
    """One program: the base and steered teacher-forced passes over `G` generations, and every per-position
    statistic, for `P` points that each read one generation (`point_rows`) with their own layer and feature.

    The steered model is the base model with a steering site after every SAE's block, made here: both passes read
    the one copy of the weights that the program receives.

    Both passes stop at the final hidden states; the logits over the vocabulary are made a few positions at a
    time (`runner.lm_stats.seq_chunk_for`) and reduced there (`runner.lm_stats.over_sequence_chunks`), so the
    program never holds a `[G, S, vocabulary]` array.

    Returns `[G, S]` `nll` (of the next token under base), `kl_steered_base`, `kl_base_steered`, `entropy_base`,
    `entropy_steered`; `[P, S]` `logit_lens_mass` (base probability of the point's lens tokens) and `concept`
    (JumpReLU activation of the point's feature at its layer when the base model reads its generation); and
    `[P, k]` `lens_tokens`.
    """
    named, positions = named_tokens(tokens)
    layer_list = sorted(saes)
    base_hidden, residuals = measurement.capture_hidden(
        base_model, named, [(layer, "res") for layer in layer_list], token_positions=positions
    )
    steered_trunk, _ = sites.split_at_unembedding(steering.add_steering_sites(base_model, saes))
    steered_hidden = steered_trunk(named, token_positions=positions, steering=inputs)
    _, head = sites.split_at_unembedding(base_model)

    unembedding = unembedding_matrix(base_model).unwrap("vocabulary", "embedding")
    points, seq = point_rows.shape[0], tokens.shape[1]
    concept = jnp.zeros((points, seq), jnp.float32)
    directions = jnp.zeros((points, unembedding.shape[1]), jnp.float32)
    point_rows_named, point_features = pz.nx.wrap(point_rows).tag("point"), pz.nx.wrap(features).tag("point")
    for layer in layer_list:  # each point reads its own layer's SAE; points of other layers are masked out
        on_layer = layers == layer
        resid = residuals[(layer, "res")][{"batch": point_rows_named}]  # {point, seq, embedding}: its generation
        activation = saes[layer].encoder.selected_activations(resid, point_features).unwrap("point", "seq")
        concept = jnp.where(on_layer[:, None], activation, concept)
        w_dec = saes[layer].decoder.w_dec.unwrap(LATENT_AXIS, "embedding")
        directions = jnp.where(on_layer[:, None], w_dec[features], directions)
    lens_tokens = _logit_lens_top_k(unembedding, directions, k=logit_lens_k)
    targets = jnp.concatenate([tokens[:, 1:], jnp.full((tokens.shape[0], 1), PAD_ID, tokens.dtype)], axis=1)

    def chunk_statistics(base: jax.Array, steered: jax.Array, chunk_targets: jax.Array) -> dict[str, jax.Array]:
        def logits(hidden: jax.Array) -> jax.Array:
            return head(pz.nx.wrap(hidden).tag("batch", "seq", "embedding")).unwrap("batch", "seq", "vocabulary")

        base_logits, steered_logits = logits(base), logits(steered)
        pair = logit_pair_statistics(steered_logits, base_logits, vocab_chunk)
        base_lse = pair["log_partition_q"]
        # [P, c, k] base logits at each point's lens tokens, gathered without a [P, c, V] copy.
        lens_logits = base_logits[point_rows[:, None, None], jnp.arange(base.shape[1])[None, :, None],
                                  lens_tokens[:, None, :]]
        return {
            "nll": cross_entropy_from_partition(base_logits, base_lse, chunk_targets),
            "kl_steered_base": pair["kl_pq"],
            "kl_base_steered": pair["kl_qp"],
            "entropy_steered": pair["entropy_p"],
            "entropy_base": pair["entropy_q"],
            "logit_lens_mass": jnp.sum(
                jnp.exp(lens_logits.astype(jnp.float32) - base_lse[point_rows][..., None]), axis=-1
            ),
        }

    statistics = over_sequence_chunks(
        chunk_statistics,
        [base_hidden.unwrap("batch", "seq", "embedding"), steered_hidden.unwrap("batch", "seq", "embedding"),
         targets],
        seq_chunk_for(*tokens.shape),
    )
    return {**statistics, "concept": concept, "lens_tokens": lens_tokens}


@dataclasses.dataclass(frozen=True)
class GenerationMetrics:
    """The steering metrics of one point.

    Attributes:
      metrics: MLflow metrics (see `steering_generation_metrics`).
      logit_lens_tokens: The feature's top logit-lens token ids, largest first.
    """

    metrics: dict[str, float]
    logit_lens_tokens: tuple[int, ...]


def point_bucket(num_points: int, num_generations: int) -> int:
    """Point rows of the metrics program: the generations' count times a power of two, so that a sweep (whose
    baselines each serve many points) compiles it only a few times."""
    bucket = num_generations
    while bucket < num_points:
        bucket *= 2
    return bucket


class SteeringMetricsProgram:
    """The steering metrics of batches of one shape as one compiled program (see `steering_generation_metrics`).

    Args:
      base_model: The unsteered model (the steered one is made from it, with a steering site after every SAE's
        block).
      saes: `{layer: SAE}` of every layer points may read or steer (one width).
      num_generations: Generation rows per batch (`G`).
      seq_len: Prompt bucket plus generated tokens (`S`).
      num_points: Point rows per batch (`P`); a batch may hold fewer points (the rest is padding).
      num_interventions: Interventions per generation row (`K`, the sweep's largest combination).
      logit_lens_k: Size of a feature's logit-lens token set.
      vocab_chunk: Vocabulary chunk of the KL/entropy sums.
      program_cache: Where the traced program is kept between worker starts (`runner.program_cache`).
    """

    def __init__(
        self,
        base_model: model_parts.TransformerLM,
        saes: Mapping[int, JumpReLUSAE],
        *,
        num_generations: int,
        seq_len: int,
        num_points: int,
        num_interventions: int = 1,
        logit_lens_k: int = DEFAULT_LOGIT_LENS_K,
        vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
        program_cache: ProgramCache | None = None,
    ):
        self.num_generations, self.seq_len, self.num_points = num_generations, seq_len, num_points
        self.num_interventions = num_interventions
        self._program_cache = program_cache if program_cache is not None else ProgramCache(None)
        self._static = {"logit_lens_k": logit_lens_k, "vocab_chunk": vocab_chunk}
        self._model = pz.freeze_params(base_model)
        self._saes = dict(saes)
        self._compiled: Callable[..., Any] | None = None
        self._compiling = threading.Lock()

    def compile(self) -> None:
        """Compiles the program now, ahead of the first batch. Thread-safe: a worker compiles it on a second
        thread while its sampler compiles, and a batch that comes first waits for it."""
        with self._compiling:
            if self._compiled is not None:
                return
            zeros = np.zeros(self.num_generations, np.int32)
            slots = np.zeros((self.num_generations, self.num_interventions), np.int32)
            inputs = steering.SteeringInputs.from_rows(slots, slots, slots.astype(np.float32), slots, zeros)
            points = jnp.zeros(self.num_points, jnp.int32)
            layer = jnp.full(self.num_points, min(self._saes), jnp.int32)
            tokens = jnp.zeros((self.num_generations, self.seq_len), jnp.int32)
            self._compiled = self._program_cache.lower(
                "steering-metrics",
                functools.partial(_per_position_statistics, **self._static),
                (self._model, inputs, self._saes, tokens, points, layer, points),
                static=self._static,
            ).compile()

    def memory_analysis(self) -> Any:
        """XLA's compiled memory analysis of the program, per device (compiles it first if needed)."""
        self.compile()
        return self._compiled.memory_analysis()

    @property
    def weights(self) -> tuple[Any, ...]:
        """The weights the program is called with: the frozen model and the SAEs."""
        return (self._model, self._saes)

    def __call__(
        self,
        inputs: steering.SteeringInputs,
        prompt_tokens: np.ndarray,
        generated_tokens: np.ndarray,
        layers: Sequence[int],
        features: Sequence[int],
        point_rows: Sequence[int] | None = None,
    ) -> list[GenerationMetrics]:
        """The metrics of each point (arguments as for `steering_generation_metrics`)."""
        prompt_tokens = np.asarray(prompt_tokens, np.int32)
        generated_tokens = np.asarray(generated_tokens, np.int32)
        batch, prompt_len = prompt_tokens.shape
        layers = [int(layer) for layer in layers]
        features = [int(feature) for feature in features]
        rows = list(range(len(layers))) if point_rows is None else [int(row) for row in point_rows]
        if generated_tokens.shape[0] != batch or not (len(layers) == len(features) == len(rows)):
            raise ValueError("prompt_tokens and generated_tokens, and layers, features and point_rows, must match")
        if (batch, prompt_len + generated_tokens.shape[1]) != (self.num_generations, self.seq_len) or \
                len(rows) > self.num_points:
            raise ValueError(f"a batch of {batch} generations of {prompt_len + generated_tokens.shape[1]} tokens "
                             f"and {len(rows)} points given to a program for {self.num_generations} of "
                             f"{self.seq_len} and at most {self.num_points}")
        missing = sorted(set(layers) - set(self._saes))
        if missing:
            raise ValueError(f"no SAE for layer(s) {missing}")

        tokens = np.concatenate([prompt_tokens, generated_tokens], axis=1)
        padding = self.num_points - len(rows)  # repeats of the last point, dropped below
        arrays = (
            inputs,
            self._saes,
            jnp.asarray(tokens),
            jnp.asarray(rows + rows[-1:] * padding, jnp.int32),
            jnp.asarray(layers + layers[-1:] * padding, jnp.int32),
            jnp.asarray(features + features[-1:] * padding, jnp.int32),
        )
        self.compile()
        outputs = self._compiled(self._model, *arrays)
        return _point_metrics(jax.device_get(outputs), prompt_len, generated_tokens, rows)


def _point_metrics(
    per_position: Mapping[str, np.ndarray], prompt_len: int, generated_tokens: np.ndarray, rows: Sequence[int]
) -> list[GenerationMetrics]:
    """Per-point means of the program's per-position statistics (float64 host sums, divided once)."""
    batch, seq_len = generated_tokens.shape[0], prompt_len + generated_tokens.shape[1]
    measured = generated_token_mask(generated_tokens)
    predicts_measured = np.zeros((batch, seq_len), bool)
    predicts_measured[:, prompt_len - 1 : seq_len - 1] = measured
    at_measured = np.zeros((batch, seq_len), bool)
    at_measured[:, prompt_len:] = measured
    results = []
    for point, row in enumerate(rows):
        metrics = repetition_metrics(generated_tokens[row][measured[row]])
        count = float(measured[row].sum())
        if count > 0:
            weight = predicts_measured[row].astype(np.float64)

            def mean(values: np.ndarray, weight: np.ndarray = weight, count: float = count) -> float:
                return float(np.sum(np.asarray(values, np.float64) * weight) / count)

            metrics["steer/nll"] = mean(per_position["nll"][row])
            metrics["steer/perplexity"] = float(np.exp(metrics["steer/nll"]))
            for name in ("kl_steered_base", "kl_base_steered", "entropy_base", "entropy_steered"):
                metrics[f"steer/{name}"] = mean(per_position[name][row])
                if name.startswith("kl_"):  # a KL is never negative: float32 rounding of a zero KL is clamped
                    metrics[f"steer/{name}"] = max(metrics[f"steer/{name}"], 0.0)
            metrics["steer/logit_lens_mass"] = mean(per_position["logit_lens_mass"][point])
            activation = np.asarray(per_position["concept"][point], np.float64)[at_measured[row]]
            metrics["steer/concept_rate"] = float(np.sum(activation > 0) / count)
            metrics["steer/concept_activation"] = float(np.sum(activation) / count)
        results.append(GenerationMetrics(metrics, tuple(int(t) for t in per_position["lens_tokens"][point])))
    return results


def steering_generation_metrics(
    base_model: model_parts.TransformerLM,
    inputs: steering.SteeringInputs,
    prompt_tokens: np.ndarray,
    generated_tokens: np.ndarray,
    saes: Mapping[int, JumpReLUSAE],
    layers: Sequence[int],
    features: Sequence[int],
    point_rows: Sequence[int] | None = None,
    *,
    logit_lens_k: int = DEFAULT_LOGIT_LENS_K,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
) -> list[GenerationMetrics]:
    """Per-point steering metrics of a batch of generations (a one-off `SteeringMetricsProgram`).

    The teacher-forced passes run once per generation; points that share one (the scale-0 points of a prompt,
    which all read the one unsteered generation) differ only in the layer and feature they read it with.

    Convention: `docs/metrics.md#steering-metrics` (teacher-forced cheap metrics; concept presence SAE-TS style),
    with the layout and masking of the module docstring.

    Args:
      base_model: The unsteered model; the steered one has a steering site after the block of every SAE in
        `saes` (`steering.add_steering_sites`).
      inputs: The steering of every generation row.
      prompt_tokens: `[G, P]` left-padded prompts.
      generated_tokens: `[G, T]` right-padded generations.
      saes: `{layer: SAE}` of every layer in `layers` (one width).
      layers, features: Each point's steering layer and SAE latent.
      point_rows: The generation row each point reads (default: point i reads row i).
      logit_lens_k: Size of the feature's logit-lens token set.
      vocab_chunk: Vocabulary chunk of the KL/entropy sums.

    Returns:
      One `GenerationMetrics` per point, whose metrics are
      - `steer/nll`, `steer/perplexity`: NLL (and `exp`) of the measured generated tokens under the unsteered model;
      - `steer/kl_steered_base` = KL(steered || base), `steer/kl_base_steered`, `steer/entropy_base`,
        `steer/entropy_steered`: means over the positions predicting measured tokens;
      - `steer/concept_rate`, `steer/concept_activation`: firing rate and mean JumpReLU activation of the point's
        feature when the unsteered model re-reads prompt + generation, on the measured generated tokens;
      - `steer/logit_lens_mass`: mean probability the unsteered model puts on the feature's
        `top_logit_lens_tokens`, over the positions predicting measured tokens;
      - `gen/distinct_1`, `gen/distinct_2`, `gen/longest_repeat` (`repetition_metrics`).
      Means over no measured token are left out.
    """
    num_generations = np.asarray(prompt_tokens).shape[0]
    program = SteeringMetricsProgram(
        base_model, saes,
        num_generations=num_generations,
        seq_len=np.asarray(prompt_tokens).shape[1] + np.asarray(generated_tokens).shape[1],
        num_points=point_bucket(len(layers), num_generations),
        logit_lens_k=logit_lens_k, vocab_chunk=vocab_chunk,
    )
    return program(inputs, prompt_tokens, generated_tokens, layers, features, point_rows)
