"""Evaluating SAEs on a set of token sequences: the driver that runs the passes batch by batch, feeds the metric
sums, and builds each SAE's `SAEMeasurement` with its per-token top-feature table.

Definitions: `docs/metrics.md` (the sites, masking and aggregation, SAE metrics, splice evaluation, density).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from runner.lm_stats import DEFAULT_VOCAB_CHUNK, special_token_mask
from runner.model.tokenizer import PAD_ID
from runner.nn.jumprelu import JumpReLUSAE
from runner.nn.measurement import SpliceSAEReconstruction, ZeroAblate
from runner.results import SAEMeasurement
from runner.sae_eval.metrics import DEFAULT_TOP_FEATURES, SAEMetricSums, SpliceLossSums, sae_token_statistics
from runner.sae_eval.passes import (
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
                "token_text": tokenizer.decode([token]) if tokenizer is not None else "",
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
