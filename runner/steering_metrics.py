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
- A mean is omitted from a row's metrics when it is undefined (no measured token).
- Everything a batch needs (both teacher-forced passes, every per-position statistic, the logit lens) is one
  compiled program per batch shape, so a sweep compiles it once.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz
from penzai.models.transformer import model_parts

from runner import sae_eval, sites, steering
from runner.metrics import special_token_mask
from runner.sae import LATENT_AXIS, JumpReLUSAE
from runner.tokenizer import EOS_ID, PAD_ID

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

    Convention: metrics sheet "Repetition" (distinct-n = unique / total; seq-rep-n would be `1 - distinct_n`).
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
    steered_model: model_parts.TransformerLM,
    inputs: steering.SteeringInputs,
    saes: dict[int, JumpReLUSAE],
    tokens: jax.Array,
    layers: jax.Array,
    features: jax.Array,
    logit_lens_k: int,
    vocab_chunk: int,
) -> dict[str, jax.Array]:
    """One program: the base and steered teacher-forced passes and every per-position statistic of a batch.

    Returns `[B, S]` `nll` (of the next token under base), `kl_steered_base`, `kl_base_steered`, `entropy_base`,
    `entropy_steered`, `logit_lens_mass` (base probability of each row's lens tokens), `concept` (JumpReLU
    activation of each row's feature at its layer when the base model reads the tokens), and `[B, k]` `lens_tokens`.
    """
    named, positions = sae_eval.named_tokens(tokens)
    layer_list = sorted(saes)
    base_logits, residuals = sites.capture(base_model, named, [(layer, "res") for layer in layer_list],
                                           token_positions=positions)
    steered_logits = steered_model(named, token_positions=positions, steering=inputs)
    base_logits = base_logits.unwrap("batch", "seq", "vocabulary")
    steered_logits = steered_logits.unwrap("batch", "seq", "vocabulary")

    unembedding = unembedding_matrix(base_model).unwrap("vocabulary", "embedding")
    concept = jnp.zeros(tokens.shape, jnp.float32)
    directions = jnp.zeros((tokens.shape[0], unembedding.shape[1]), jnp.float32)
    for layer in layer_list:  # each row reads its own layer's SAE; rows of other layers are masked out
        encoder, decoder = saes[layer].encoder, saes[layer].decoder
        on_layer = layers == layer
        columns = encoder.w_enc.unwrap("embedding", LATENT_AXIS)[:, features]  # [D, B]
        resid = residuals[(layer, "res")].unwrap("batch", "seq", "embedding").astype(jnp.float32)
        pre = jnp.einsum("bsd,db->bs", resid, columns) + encoder.b_enc.unwrap(LATENT_AXIS)[features][:, None]
        active = pre > encoder.threshold.unwrap(LATENT_AXIS)[features][:, None]
        concept = jnp.where(on_layer[:, None], jnp.where(active, pre, 0.0), concept)
        directions = jnp.where(on_layer[:, None], decoder.w_dec.unwrap(LATENT_AXIS, "embedding")[features], directions)
    lens_tokens = _logit_lens_top_k(unembedding, directions, k=logit_lens_k)

    pair = sae_eval.logit_pair_statistics(steered_logits, base_logits, vocab_chunk)
    base_lse = pair["log_partition_q"]
    targets = jnp.concatenate([tokens[:, 1:], jnp.full((tokens.shape[0], 1), PAD_ID, tokens.dtype)], axis=1)
    batch, seq = tokens.shape
    lens_index = jnp.broadcast_to(lens_tokens[:, None, :], (batch, seq, logit_lens_k))
    lens_logits = jnp.take_along_axis(base_logits, lens_index, axis=-1).astype(jnp.float32)
    return {
        "nll": sae_eval.cross_entropy_from_partition(base_logits, base_lse, targets),
        "kl_steered_base": pair["kl_pq"],
        "kl_base_steered": pair["kl_qp"],
        "entropy_steered": pair["entropy_p"],
        "entropy_base": pair["entropy_q"],
        "logit_lens_mass": jnp.sum(jnp.exp(lens_logits - base_lse[..., None]), axis=-1),
        "concept": concept,
        "lens_tokens": lens_tokens,
    }


@dataclasses.dataclass(frozen=True)
class GenerationMetrics:
    """The steering metrics of one generation.

    Attributes:
      metrics: MLflow metrics (see `steering_generation_metrics`).
      logit_lens_tokens: The feature's top logit-lens token ids, largest first.
    """

    metrics: dict[str, float]
    logit_lens_tokens: tuple[int, ...]


def steering_generation_metrics(
    base_model: Any,
    steered_model: model_parts.TransformerLM,
    inputs: steering.SteeringInputs,
    prompt_tokens: np.ndarray,
    generated_tokens: np.ndarray,
    saes: Mapping[int, JumpReLUSAE],
    layers: Sequence[int],
    features: Sequence[int],
    *,
    logit_lens_k: int = DEFAULT_LOGIT_LENS_K,
    vocab_chunk: int = sae_eval.DEFAULT_VOCAB_CHUNK,
) -> list[GenerationMetrics]:
    """Per-row steering metrics of a batch of generations, from one compiled program per batch shape.

    Convention: metrics sheet "Steering metrics" (teacher-forced cheap metrics; concept presence SAE-TS style),
    with the layout and masking of the module docstring.

    Args:
      base_model: The unsteered model (`LoadedModel` or Penzai `TransformerLM`).
      steered_model: A model that reads the side input `steering` (patched with `steering.add_steering_sites`);
        the base model itself for rows that are not steered at all.
      inputs: The steering point of every row.
      prompt_tokens: `[B, P]` left-padded prompts.
      generated_tokens: `[B, G]` right-padded generations.
      saes: `{layer: SAE}` of every layer in `layers` (one width).
      layers, features: `[B]` each row's steering layer and SAE latent.
      logit_lens_k: Size of the feature's logit-lens token set.
      vocab_chunk: Vocabulary chunk of the KL/entropy sums.

    Returns:
      One `GenerationMetrics` per row, whose metrics are
      - `steer/nll`, `steer/perplexity`: NLL (and `exp`) of the measured generated tokens under the unsteered model;
      - `steer/kl_steered_base` = KL(steered || base), `steer/kl_base_steered`, `steer/entropy_base`,
        `steer/entropy_steered`: means over the positions predicting measured tokens;
      - `steer/concept_rate`, `steer/concept_activation`: firing rate and mean JumpReLU activation of the row's
        feature when the unsteered model re-reads prompt + generation, on the measured generated tokens;
      - `steer/logit_lens_mass`: mean probability the unsteered model puts on the feature's
        `top_logit_lens_tokens`, over the positions predicting measured tokens;
      - `gen/distinct_1`, `gen/distinct_2`, `gen/longest_repeat` (`repetition_metrics`), `gen/tokens`.
      Means over no measured token are left out.
    """
    prompt_tokens = np.asarray(prompt_tokens, np.int32)
    generated_tokens = np.asarray(generated_tokens, np.int32)
    batch, prompt_len = prompt_tokens.shape
    layers = [int(layer) for layer in layers]
    features = [int(feature) for feature in features]
    if not (generated_tokens.shape[0] == len(layers) == len(features) == batch):
        raise ValueError("prompt_tokens, generated_tokens, layers and features must have the same number of rows")
    missing = sorted(set(layers) - set(saes))
    if missing:
        raise ValueError(f"no SAE for layer(s) {missing}")

    tokens = np.concatenate([prompt_tokens, generated_tokens], axis=1)
    seq_len = tokens.shape[1]
    measured = generated_token_mask(generated_tokens)
    predicts_measured = np.zeros((batch, seq_len), bool)
    predicts_measured[:, prompt_len - 1 : seq_len - 1] = measured
    at_measured = np.zeros((batch, seq_len), bool)
    at_measured[:, prompt_len:] = measured

    per_position = jax.device_get(
        _per_position_statistics(
            pz.freeze_params(_transformer(base_model)),
            pz.freeze_params(steered_model),
            inputs,
            dict(saes),
            jnp.asarray(tokens),
            jnp.asarray(layers, jnp.int32),
            jnp.asarray(features, jnp.int32),
            logit_lens_k=logit_lens_k,
            vocab_chunk=vocab_chunk,
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
            for name in ("kl_steered_base", "kl_base_steered", "entropy_base", "entropy_steered", "logit_lens_mass"):
                metrics[f"steer/{name}"] = mean(name)
            activation = np.asarray(per_position["concept"][row], np.float64)[at_measured[row]]
            metrics["steer/concept_rate"] = float(np.sum(activation > 0) / count)
            metrics["steer/concept_activation"] = float(np.sum(activation) / count)
        results.append(GenerationMetrics(metrics, tuple(int(t) for t in per_position["lens_tokens"][row])))
    return results
