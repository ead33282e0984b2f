"""Evaluating SAEs on a set of token sequences: the driver that runs the passes batch by batch, feeds the metric
sums, and builds each SAE's `SAEMeasurement` with its per-token top-feature table.

Definitions: `docs/metrics.md` (the sites, masking and aggregation, SAE metrics, splice evaluation, density).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Hashable, Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from runner.lm_stats import DEFAULT_VOCAB_CHUNK, special_token_mask
from runner.model.tokenizer import PAD_ID, decode_tokens
from runner.nn import sites
from runner.nn.jumprelu import JumpReLUSAE
from runner.nn.measurement import SpliceSAEReconstruction, ZeroAblate
from runner.results import SAEMeasurement
from runner.sae_eval.metrics import DEFAULT_TOP_FEATURES, SAEMetricSums, SpliceLossSums, sae_token_statistics
from runner.sae_eval.passes import (
    capture_sites,
    capture_sites_jit,
    clean_token_losses,
    entry_capture,
    patched_suffix,
    patched_token_losses,
)

if TYPE_CHECKING:
    from gemma import gm

    from runner.model.loading import LoadedModel

#: Sequences (from the start of the evaluation set) whose per-token top features go into the table.
DEFAULT_TABLE_SEQUENCES = 4


@dataclasses.dataclass(frozen=True)
class SiteSAE:
    """An SAE to evaluate and where it reads.

    Attributes:
      layer: The block of its site.
      sae: The SAE.
      site: `res`, `mlp` or `att` (`runner.nn.sites`).
    """

    layer: int
    sae: JumpReLUSAE
    site: str = "res"


def top_feature_rows(
    tokens: np.ndarray,
    top_ids: np.ndarray,
    top_values: np.ndarray,
    first_sequence: int,
    tokenizer: gm.text.Tokenizer | None = None,
) -> list[dict[str, Any]]:
    """Table rows of the per-token top latents at every masked position of a batch (see
    `SAEMeasurement.top_feature_rows`).

    Args:
      tokens: `[B, S]` token ids of the rows to tabulate.
      top_ids, top_values: `[B, S, k]` from `sae_token_statistics`.
      first_sequence: Index of row 0 in the evaluation set.
      tokenizer: Decodes `token_text` when given.
    """
    tokens = np.asarray(tokens)
    mask = special_token_mask(tokens)
    rows = []
    for row, position in zip(*np.nonzero(mask), strict=True):
        positive = top_values[row, position] > 0
        token = int(tokens[row, position])
        rows.append(
            {
                "sequence": int(first_sequence + row),
                "position": int(position),
                "token": token,
                "token_text": decode_tokens(tokenizer, [token]) if tokenizer is not None else "",
                "feature_ids": [int(i) for i in top_ids[row, position][positive]],
                "feature_values": [float(v) for v in top_values[row, position][positive]],
            }
        )
    return rows


def _pad_rows(tokens: np.ndarray, batch_size: int) -> np.ndarray:
    """Appends all-PAD rows up to `batch_size` (they carry no masked token and change no metric)."""
    missing = batch_size - tokens.shape[0]
    if missing <= 0:
        return tokens
    return np.concatenate([tokens, np.full((missing, tokens.shape[1]), PAD_ID, tokens.dtype)])


def evaluate_saes(
    loaded_model: LoadedModel,
    saes: Mapping[Hashable, SiteSAE],
    tokens: np.ndarray,
    batch_size: int,
    *,
    top_features: int = DEFAULT_TOP_FEATURES,
    table_sequences: int = DEFAULT_TABLE_SEQUENCES,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
) -> dict[Hashable, SAEMeasurement]:
    """Evaluates every SAE on `tokens`, following `docs/metrics.md`.

    Per batch: one clean forward captures every site and every patched suffix's input, and serves every SAE;
    then, per SAE, the model from the first affected block on with the reconstruction spliced in at masked
    positions, and per distinct `(layer, site)`, the same with the site zero-ablated at all positions (shared by
    the SAEs of that site). The last batch is filled up with all-PAD rows so one compiled program serves every
    batch.

    Args:
      loaded_model: The model (its tokenizer decodes the table's tokens).
      saes: The SAEs to evaluate, by any key (the results use the same keys).
      tokens: `[N, T]` int token ids, BOS first, PAD 0 allowed (masked out, not attended to).
      batch_size: Sequences per forward pass.
      top_features: Latents per position in the top-feature table.
      table_sequences: How many leading sequences go into the table.
      vocab_chunk: Vocabulary chunk of the KL sums.

    Returns:
      `{key: SAEMeasurement}`.
    """
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [N, T], got shape {tokens.shape}")
    if not saes:
        return {}
    base = loaded_model.model
    tokenizer = loaded_model.tokenizer
    site_keys = sorted({(item.layer, item.site) for item in saes.values()})
    captures = tuple(sorted(set(site_keys) | {entry_capture(*key) for key in site_keys}))
    frozen = pz.freeze_params(base)
    spliced = {key: pz.freeze_params(patched_suffix(base, item.layer, item.site, SpliceSAEReconstruction(item.sae)))
               for key, item in saes.items()}
    ablated = {site_key: pz.freeze_params(patched_suffix(base, *site_key, ZeroAblate())) for site_key in site_keys}
    sae_sums = {key: SAEMetricSums.empty(item.sae.d_in, item.sae.d_sae) for key, item in saes.items()}
    loss_sums = {key: SpliceLossSums() for key in saes}
    tables: dict[Hashable, list[dict[str, Any]]] = {key: [] for key in saes}
    top_k = min(top_features, min(item.sae.d_sae for item in saes.values()))

    for start in range(0, tokens.shape[0], batch_size):
        batch = _pad_rows(tokens[start : start + batch_size], batch_size)
        device_batch = jnp.asarray(batch)
        clean_logits, activations = capture_sites_jit(frozen, device_batch, site_keys=captures)
        ce_clean = clean_token_losses(clean_logits, device_batch)
        zero_ablated = {
            site_key: patched_token_losses(
                ablated[site_key], activations[entry_capture(*site_key)], device_batch, clean_logits,
                vocab_chunk=vocab_chunk,
            )
            for site_key in site_keys
        }
        table_rows = max(0, min(table_sequences - start, batch.shape[0]))
        for key, item in saes.items():
            site_key = (item.layer, item.site)
            stats = jax.device_get(sae_token_statistics(item.sae, activations[site_key], device_batch, top_k=top_k))
            sae_sums[key].update(stats, batch)
            if table_rows:
                tables[key].extend(
                    top_feature_rows(
                        batch[:table_rows], stats["top_ids"][:table_rows], stats["top_values"][:table_rows], start,
                        tokenizer,
                    )
                )
            splice = patched_token_losses(
                spliced[key], activations[entry_capture(*site_key)], device_batch, clean_logits,
                vocab_chunk=vocab_chunk,
            )
            losses = {
                "ce_clean": ce_clean,
                "ce_spliced": splice["ce"],
                "kl_spliced": splice["kl"],
                "ce_zero_ablated": zero_ablated[site_key]["ce"],
                "kl_zero_ablated": zero_ablated[site_key]["kl"],
            }
            loss_sums[key].update(jax.device_get(losses), batch)

    results = {}
    for key in saes:
        counts, edges = sae_sums[key].log10_density_histogram()
        results[key] = SAEMeasurement(
            metrics={**sae_sums[key].finalize(), **loss_sums[key].finalize()},
            density=sae_sums[key].density(),
            density_histogram=counts,
            density_histogram_edges=edges,
            l0_histogram=sae_sums[key].l0_histogram.copy(),
            top_feature_rows=tuple(tables[key]),
        )
    return results


def abstract_sae(d_in: int, d_sae: int) -> JumpReLUSAE:
    """An SAE of the given shape whose arrays are `jax.ShapeDtypeStruct`s (for compiled memory analysis)."""
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,),
              "threshold": (d_sae,)}
    return jax.eval_shape(lambda: JumpReLUSAE.from_arrays({k: jnp.zeros(v, jnp.float32) for k, v in shapes.items()}))


def batch_need(
    loaded_model: LoadedModel,
    *,
    batch_size: int,
    seq_len: int,
    site_keys: list[tuple[int, str]],
    d_sae: int,
    program_need: Callable[[Any, int], int],
    argument_bytes: Callable[..., int],
    top_features: int = DEFAULT_TOP_FEATURES,
) -> int:
    """Bytes a batch of `evaluate_saes` needs beyond the resident weights, from XLA's compiled memory analysis of
    its passes at `[batch_size, seq_len]` (compiled now, with the persistent compilation cache serving the same
    programs when they run): the clean pass; and, while its logits and captured activations are held, the largest
    of the clean losses, the patched suffix that re-runs the most blocks (the site whose change comes first) and
    the SAE statistics at `d_sae` latents.

    Args:
      loaded_model: The model.
      batch_size, seq_len: The batch shape.
      site_keys: Every `(layer, site)` the sweep's SAEs read.
      d_sae: The widest SAE's latents.
      program_need, argument_bytes: `runner.plan.memory.program_need` and `argument_bytes`.
      top_features: Latents per position of the top-feature table.
    """
    base = loaded_model.model
    frozen = pz.freeze_params(base)
    tokens = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)
    captures = tuple(sorted(set(site_keys) | {entry_capture(*key) for key in site_keys}))
    clean_pass = capture_sites_jit.lower(frozen, tokens, site_keys=captures).compile()
    logits, activations = jax.eval_shape(functools.partial(capture_sites, site_keys=captures), frozen, tokens)
    held = sum(argument_bytes(value) for value in (logits, activations))
    first = min(site_keys, key=lambda key: sites.entry_point(*key))
    sae = abstract_sae(sites.site_width(loaded_model.architecture, first[1]), d_sae)
    suffix = pz.freeze_params(patched_suffix(base, *first, SpliceSAEReconstruction(sae)))
    while_held = [
        (clean_token_losses.lower(logits, tokens).compile(), 0),
        (patched_token_losses.lower(suffix, activations[entry_capture(*first)], tokens, logits).compile(),
         argument_bytes(suffix)),
        (sae_token_statistics.lower(sae, activations[first], tokens, top_k=min(top_features, d_sae)).compile(),
         argument_bytes(sae)),
    ]
    beside = max(
        program_need(program.memory_analysis(), weights) - _held_arguments(program, weights, held)
        for program, weights in while_held
    )
    return max(program_need(clean_pass.memory_analysis(), argument_bytes(frozen)), held + max(beside, 0))


def _held_arguments(program: Any, weights: int, held: int) -> int:
    """The part of a pass's non-weight arguments that is among the held clean logits and activations (counted
    once, in `held`)."""
    return min(program.memory_analysis().argument_size_in_bytes - weights, held)
