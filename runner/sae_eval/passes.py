"""The forward passes of an SAE evaluation: one clean pass that captures every site, and per change (the SAE's
reconstruction spliced in, or the site zero-ablated) a re-run of only the blocks that change affects.

Definitions: `docs/metrics.md#splice-evaluation`; token positions and masks: `docs/metrics.md#masking-and-aggregation`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from penzai import pz
from penzai.models.transformer import model_parts

from runner.lm_stats import (
    DEFAULT_VOCAB_CHUNK,
    cross_entropy_from_partition,
    logit_pair_statistics,
    named_tokens,
    over_sequence_chunks,
    seq_chunk_for,
    special_token_mask_on_device,
)
from runner.nn import measurement, sites
from runner.nn.sites import SiteKey


def capture_sites(
    model: model_parts.TransformerLM, tokens: jax.Array, site_keys: Sequence[SiteKey]
) -> tuple[jax.Array, dict[SiteKey, jax.Array]]:
    """One forward pass returning the logits and the activation at every `(layer, site)` in `site_keys`.

    `(-1, "res")` is the residual stream entering block 0 (the scaled embeddings). Jittable
    (`capture_sites_jit`, with `site_keys` a tuple and the model through `pz.freeze_params`).

    Args:
      model: The Penzai Gemma2 model.
      tokens: `[B, S]` token ids (BOS first; PAD anywhere gets position -1 and is not attended to).
      site_keys: The activations to capture (`runner.nn.sites`).

    Returns:
      `[B, S, V]` logits (the model's dtype, soft-capped) and `{(layer, site): [B, S, D]}` activations.
    """
    named, positions = named_tokens(tokens)
    inside = [key for key in site_keys if key[0] >= 0]
    logits, activations = measurement.capture(model, named, inside, token_positions=positions)
    if (-1, "res") in site_keys:
        activations[(-1, "res")] = sites.embedded_tokens(model, named, token_positions=positions)
    return (
        logits.unwrap("batch", "seq", "vocabulary"),
        {key: value.unwrap("batch", "seq", "embedding") for key, value in activations.items()},
    )


#: `capture_sites` compiled (pass `site_keys` as a tuple, the model through `pz.freeze_params`).
capture_sites_jit = jax.jit(capture_sites, static_argnames="site_keys")


def patched_suffix(model: model_parts.TransformerLM, layer: int, site: str, patch: pz.nn.Layer) -> pz.nn.Layer:
    """The part of the model that `patch` at `(layer, site)` changes: it takes the residual stream entering block
    `sites.entry_point(layer, site)` (capture it at `entry_capture(layer, site)`) and returns the logits."""
    patched = sites.insert_at_site(model, layer, site, patch)
    return sites.suffix_from_block(patched, sites.entry_point(layer, site))


def entry_capture(layer: int, site: str) -> SiteKey:
    """The capture holding the input of `patched_suffix(model, layer, site, ...)`."""
    return sites.block_input_site(sites.entry_point(layer, site))


def _suffix_hidden(suffix: pz.nn.Layer, entry: jax.Array, tokens: jax.Array) -> tuple[jax.Array, pz.nn.Layer]:
    """The patched suffix's final hidden states `[B, S, D]` and its head (`sites.split_at_unembedding`)."""
    _, positions = named_tokens(tokens)
    mask = pz.nx.wrap(special_token_mask_on_device(tokens)).tag("batch", "seq")
    trunk, head = sites.split_at_unembedding(suffix)
    hidden = trunk(
        pz.nx.wrap(entry).tag("batch", "seq", "embedding"),
        token_positions=positions,
        **{measurement.SPLICE_MASK_INPUT: mask},
    )
    return hidden.unwrap("batch", "seq", "embedding"), head


def _next_tokens(tokens: jax.Array) -> jax.Array:
    """`[B, S]` the token each position predicts (PAD after the last: that position is dropped)."""
    return jnp.concatenate([tokens[:, 1:], jnp.zeros((tokens.shape[0], 1), tokens.dtype)], axis=1)


@jax.jit
def clean_token_losses(clean_logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Per-position `[B, S-1]` next-token CE of the clean pass (unmasked: combine with `next_token_loss_mask`), a
    few positions at a time (no float32 copy of the logits)."""

    def chunk_losses(logits: jax.Array, targets: jax.Array) -> jax.Array:
        logits = logits.astype(jnp.float32)
        return cross_entropy_from_partition(logits, jax.nn.logsumexp(logits, axis=-1), targets)

    chunk = seq_chunk_for(*tokens.shape)
    return over_sequence_chunks(chunk_losses, [clean_logits, _next_tokens(tokens)], chunk)[:, :-1]


@functools.partial(jax.jit, static_argnames="vocab_chunk")
def patched_token_losses(
    suffix: pz.nn.Layer,
    entry: jax.Array,
    tokens: jax.Array,
    clean_logits: jax.Array,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
) -> dict[str, jax.Array]:
    """Runs a `patched_suffix` on its captured input; returns per-position `[B, S-1]` `ce` (next-token CE of the
    patched logits) and `kl` (KL(clean || patched)). Unmasked: combine with `next_token_loss_mask`.

    The patched logits are made a few positions at a time (`runner.lm_stats.seq_chunk_for`), beside the clean
    logits of those positions (`runner.lm_stats.over_sequence_chunks`): the clean logits are the only
    `[B, S, vocabulary]` array.
    """
    hidden, head = _suffix_hidden(suffix, entry, tokens)

    def chunk_losses(hidden: jax.Array, clean: jax.Array, targets: jax.Array) -> dict[str, jax.Array]:
        patched = head(pz.nx.wrap(hidden).tag("batch", "seq", "embedding")).unwrap("batch", "seq", "vocabulary")
        pair = logit_pair_statistics(clean, patched, vocab_chunk)
        return {"ce": cross_entropy_from_partition(patched, pair["log_partition_q"], targets), "kl": pair["kl_pq"]}

    chunk = seq_chunk_for(*tokens.shape)
    losses = over_sequence_chunks(chunk_losses, [hidden, clean_logits, _next_tokens(tokens)], chunk)
    return {name: value[:, :-1] for name, value in losses.items()}
