"""Judge-free metrics of steered generations, computed batched after sampling by teacher forcing.

Conventions (project Gemma Scope metrics sheet, "Steering metrics"):

- Layout: `prompt_tokens [B, P]` left-padded with PAD (BOS first after the padding) and `generated_tokens [B, G]`
  right-padded (PAD after the row's EOS), exactly as `runner.sampling.SteeringSampler` takes and returns them.
  The teacher-forced sequence is `concat(prompt, generation)`; padding gets position -1 and is never attended to
  (Penzai's KV-cache rule, see `sae_eval.token_positions`), so a row reads as if it were unpadded.
- Generated tokens measured: those before the row's first EOS that are not special (PAD, EOS, BOS). Token j of
  the generation sits at sequence position `P + j` and is predicted from position `P + j - 1`.
- Distribution metrics (NLL, KL, entropy, logit-lens mass) are per-row means over the positions that predict a
  measured token; concept metrics are per-row means over the measured tokens' own positions. Sums are float64 on
  the host, divided once per row. All in nats. Logits are the model's (soft-capped), cast to float32.
- A metric is omitted from a row's dict when it is undefined (no measured token, no SAE for the row's layer).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz
from penzai.models.transformer import model_parts

from runner import sae_eval, steering
from runner.metrics import special_token_mask
from runner.sae import LATENT_AXIS, JumpReLUSAE
from runner.tokenizer import EOS_ID, PAD_ID

#: `(tokens [B, S], token_positions [B, S]) -> logits [B, S, V]` of the steered model.
SteeredLogits = Callable[[jax.Array, jax.Array], jax.Array]

DEFAULT_LOGIT_LENS_K = 10


def _transformer(model: Any) -> model_parts.TransformerLM:
    """The Penzai model of a `LoadedModel`, or the model itself."""
    return getattr(model, "model", model)


def unembedding_matrix(model: Any) -> pz.nx.NamedArray:
    """The raw `{vocabulary, embedding}` unembedding (Gemma2 ties it to the input embedding table)."""
    decoder = pz.select(_transformer(model)).at_instances_of(pz.nn.EmbeddingDecode).get_sequence()[0]
    embeddings = decoder.table.embeddings
    return getattr(embeddings, "value", embeddings)  # a Parameter or ParameterValue, else the array itself


@functools.partial(jax.jit, static_argnames="k")
def _logit_lens_top_k(unembedding: jax.Array, directions: jax.Array, k: int) -> jax.Array:
    """`[R, k]` token ids with the largest `direction @ W_E^T` (ties: lower id first)."""
    scores = jnp.dot(directions.astype(jnp.float32), unembedding.astype(jnp.float32).T)
    return jax.lax.top_k(scores, k)[1].astype(jnp.int32)


def top_logit_lens_tokens(model: Any, sae: JumpReLUSAE, feature: int, k: int = DEFAULT_LOGIT_LENS_K) -> list[int]:
    """The `k` token ids with the largest `W_dec[feature] @ W_E^T`, largest first.

    Raw unembedding: no final norm, no soft-cap (metrics sheet, feature-card extras).
    """
    return [int(token) for token in _logit_lens_rows(model, sae, [feature], k)[0]]


def _logit_lens_rows(model: Any, sae: JumpReLUSAE, features: Sequence[int], k: int) -> np.ndarray:
    unembedding = unembedding_matrix(model).unwrap("vocabulary", "embedding")
    directions = sae.decoder.w_dec.unwrap(LATENT_AXIS, "embedding")[jnp.asarray(features, jnp.int32)]
    return np.asarray(_logit_lens_top_k(unembedding, directions, k=k))


@jax.jit
def _steering_site_logits(
    model: model_parts.TransformerLM, inputs: steering.SteeringInputs, tokens: jax.Array, positions: jax.Array
) -> jax.Array:
    logits = model(
        pz.nx.wrap(tokens).tag("batch", "seq"),
        token_positions=pz.nx.wrap(positions).tag("batch", "seq"),
        steering=inputs,
    )
    return logits.unwrap("batch", "seq", "vocabulary")


def patched_steered_logits(patched_model: model_parts.TransformerLM, inputs: steering.SteeringInputs) -> SteeredLogits:
    """The steered logits of a model patched with `steering.add_steering_sites`, one steering point per row."""
    frozen = pz.freeze_params(patched_model)
    return lambda tokens, positions: _steering_site_logits(frozen, inputs, tokens, positions)


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

    Convention: metrics sheet "Repetition" (distinct-n = unique / total; seq-rep-n would be `1 - distinct_n`).
    """
    tokens = [int(token) for token in tokens]
    metrics = {"gen/longest_repeat": float(longest_repeated_span(tokens))}
    for n in (1, 2):
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        if grams:
            metrics[f"gen/distinct_{n}"] = len(set(grams)) / len(grams)
    return metrics


@functools.partial(jax.jit, static_argnames="vocab_chunk")
def _per_position_statistics(
    base_logits: jax.Array,
    steered_logits: jax.Array,
    targets: jax.Array,
    lens_tokens: jax.Array,
    vocab_chunk: int,
) -> dict[str, jax.Array]:
    """`[B, S]` NLL under base, KLs, entropies and base mass on each row's `lens_tokens [B, k]`."""
    pair = sae_eval.logit_pair_statistics(steered_logits, base_logits, vocab_chunk)
    base_lse = pair["log_partition_q"]
    batch, seq = targets.shape
    lens_index = jnp.broadcast_to(lens_tokens[:, None, :], (batch, seq, lens_tokens.shape[-1]))
    lens_logits = jnp.take_along_axis(base_logits, lens_index, axis=-1).astype(jnp.float32)
    return {
        "nll": sae_eval.cross_entropy_from_partition(base_logits, base_lse, targets),
        "kl_steered_base": pair["kl_pq"],
        "kl_base_steered": pair["kl_qp"],
        "entropy_steered": pair["entropy_p"],
        "entropy_base": pair["entropy_q"],
        "logit_lens_mass": jnp.sum(jnp.exp(lens_logits - base_lse[..., None]), axis=-1),
    }


@jax.jit
def _row_feature_activation(sae: JumpReLUSAE, resid: jax.Array, features: jax.Array) -> jax.Array:
    """`[B, S]` JumpReLU activation of each row's own latent `features[b]` (float32)."""
    w_enc = sae.encoder.w_enc.unwrap("embedding", LATENT_AXIS)[:, features]  # [D, B]
    b_enc = sae.encoder.b_enc.unwrap(LATENT_AXIS)[features]
    threshold = sae.encoder.threshold.unwrap(LATENT_AXIS)[features]
    pre = jnp.einsum("bsd,db->bs", resid.astype(jnp.float32), w_enc) + b_enc[:, None]
    return jnp.where(pre > threshold[:, None], pre, 0.0)


def steering_generation_metrics(
    base_model: Any,
    steered: SteeredLogits | tuple[model_parts.TransformerLM, steering.SteeringInputs],
    prompt_tokens: np.ndarray,
    generated_tokens: np.ndarray,
    saes: Mapping[int, JumpReLUSAE],
    layers: Sequence[int],
    features: Sequence[int],
    *,
    logit_lens_k: int = DEFAULT_LOGIT_LENS_K,
    vocab_chunk: int = sae_eval.DEFAULT_VOCAB_CHUNK,
) -> list[dict[str, float]]:
    """Per-row steering metrics of a batch of generations.

    Convention: metrics sheet "Steering metrics" (teacher-forced cheap metrics; concept presence SAE-TS style),
    with the layout and masking of the module docstring.

    Args:
      base_model: The unsteered model (`LoadedModel` or Penzai `TransformerLM`).
      steered: The steered configuration: a `SteeredLogits` callable, or `(patched model, SteeringInputs)` with the
        model patched by `steering.add_steering_sites`.
      prompt_tokens: `[B, P]` left-padded prompts.
      generated_tokens: `[B, G]` right-padded generations.
      saes: `{layer: SAE}`; a row whose layer is not in it gets no concept or logit-lens metrics.
      layers, features: `[B]` each row's steering layer and SAE latent.
      logit_lens_k: Size of the feature's logit-lens token set.
      vocab_chunk: Vocabulary chunk of the KL/entropy sums.

    Returns:
      One dict per row with
      - `steer/nll`, `steer/perplexity`: NLL (and `exp`) of the measured generated tokens under the unsteered model;
      - `steer/kl_steered_base` = KL(steered || base), `steer/kl_base_steered`, `steer/entropy_base`,
        `steer/entropy_steered`: means over the positions predicting measured tokens;
      - `steer/concept_rate`, `steer/concept_activation`: firing rate and mean JumpReLU activation of the row's
        feature when the unsteered model re-reads prompt + generation, on the measured generated tokens;
      - `steer/logit_lens_mass`: mean probability the unsteered model puts on the feature's
        `top_logit_lens_tokens`, over the positions predicting measured tokens;
      - `gen/distinct_1`, `gen/distinct_2`, `gen/longest_repeat` (`repetition_metrics`), `gen/tokens`.
    """
    prompt_tokens = np.asarray(prompt_tokens, np.int32)
    generated_tokens = np.asarray(generated_tokens, np.int32)
    batch, prompt_len = prompt_tokens.shape
    layers = [int(layer) for layer in layers]
    features = [int(feature) for feature in features]
    if not (generated_tokens.shape[0] == len(layers) == len(features) == batch):
        raise ValueError("prompt_tokens, generated_tokens, layers and features must have the same number of rows")
    if isinstance(steered, tuple):
        steered = patched_steered_logits(*steered)

    tokens = np.concatenate([prompt_tokens, generated_tokens], axis=1)
    seq_len = tokens.shape[1]
    measured = generated_token_mask(generated_tokens)
    predicts_measured = np.zeros((batch, seq_len), bool)
    predicts_measured[:, prompt_len - 1 : seq_len - 1] = measured
    at_measured = np.zeros((batch, seq_len), bool)
    at_measured[:, prompt_len:] = measured
    targets = np.concatenate([tokens[:, 1:], np.full((batch, 1), PAD_ID, np.int32)], axis=1)

    device_tokens = jnp.asarray(tokens)
    site_layers = tuple(sorted(saes))  # every SAE layer, whatever this batch holds: one compiled program per sweep
    base_logits, residuals = sae_eval.capture_sites_jit(
        pz.freeze_params(_transformer(base_model)), device_tokens, layers=site_layers
    )
    steered_logits = steered(device_tokens, sae_eval.token_positions(device_tokens))

    lens_tokens = np.zeros((batch, logit_lens_k), np.int32)
    concept = np.zeros((batch, seq_len), np.float64)
    for layer in site_layers:
        rows = [row for row in range(batch) if layers[row] == layer]
        row_features = [features[row] if row in rows else 0 for row in range(batch)]
        lens_tokens[rows] = _logit_lens_rows(base_model, saes[layer], [features[row] for row in rows], logit_lens_k)
        activation = np.asarray(
            _row_feature_activation(saes[layer], residuals[layer], jnp.asarray(row_features, jnp.int32)), np.float64
        )
        concept[rows] = activation[rows]

    per_position = jax.device_get(
        _per_position_statistics(
            base_logits, steered_logits, jnp.asarray(targets), jnp.asarray(lens_tokens), vocab_chunk=vocab_chunk
        )
    )
    results = []
    for row in range(batch):
        metrics = repetition_metrics(generated_tokens[row][measured[row]])
        count = float(measured[row].sum())
        metrics["gen/tokens"] = count
        if count > 0:
            weight = predicts_measured[row].astype(np.float64)

            def mean(name: str) -> float:
                return float(np.sum(np.asarray(per_position[name][row], np.float64) * weight) / count)

            metrics["steer/nll"] = mean("nll")
            metrics["steer/perplexity"] = float(np.exp(metrics["steer/nll"]))
            for name in ("kl_steered_base", "kl_base_steered", "entropy_base", "entropy_steered"):
                metrics[f"steer/{name}"] = mean(name)
            if layers[row] in saes:
                metrics["steer/logit_lens_mass"] = mean("logit_lens_mass")
                activation = concept[row][at_measured[row]]
                metrics["steer/concept_rate"] = float(np.sum(activation > 0) / count)
                metrics["steer/concept_activation"] = float(np.sum(activation) / count)
        results.append(metrics)
    return results
