"""Language-model statistics that steering and SAE evaluation share: which tokens count, where tokens sit, and the
per-position cross-entropy, KL divergence and entropy of next-token distributions.

Definitions: `docs/metrics.md#masking-and-aggregation` (the special-token and loss masks, token positions) and
`docs/metrics.md#vocabulary-sums` (logits, cross-entropy from a partition, the chunked KL and entropy sums).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from runner.model.tokenizer import BOS_ID, EOS_ID, PAD_ID

SPECIAL_TOKEN_IDS = (PAD_ID, EOS_ID, BOS_ID)
#: Vocabulary entries processed at once by the chunked vocabulary sums.
DEFAULT_VOCAB_CHUNK = 32768
#: Positions (batch rows x sequence positions) whose logits over the vocabulary a teacher-forced pass holds at
#: once (`seq_chunk_for`, `over_sequence_chunks`): at Gemma2's 256,128 rows one position's float32 logits are
#: 1 MiB, so the chunks cost a fixed ~100 MiB whatever the batch and sequence, while each chunk's unembedding
#: still multiplies a few dozen rows at once.
LOGIT_POSITIONS = 32


def seq_chunk_for(batch_size: int, seq_len: int, positions: int = LOGIT_POSITIONS) -> int:
    """Sequence positions per chunk of a `[batch_size, seq_len]` teacher-forced pass: `positions / batch_size`,
    at least 1 and at most `seq_len`."""
    return max(1, min(seq_len, positions // max(batch_size, 1)))


def special_token_mask(tokens: np.ndarray) -> np.ndarray:
    """True where a token is an ordinary token (not PAD, EOS or BOS), on the host."""
    return ~np.isin(np.asarray(tokens), SPECIAL_TOKEN_IDS)


def special_token_mask_on_device(tokens: jax.Array) -> jax.Array:
    """`special_token_mask` of a device array (jittable)."""
    return ~jnp.isin(tokens, jnp.asarray(SPECIAL_TOKEN_IDS))


def next_token_loss_mask(tokens: np.ndarray) -> np.ndarray:
    """`[B, S-1]` positions whose next-token loss counts: `M[:, :-1] & (tokens[:, 1:] != PAD)`.

    Predicting from BOS, EOS or padding never counts; predicting an EOS does.
    """
    tokens = np.asarray(tokens)
    return special_token_mask(tokens)[:, :-1] & (tokens[:, 1:] != PAD_ID)


def token_positions(tokens: jax.Array) -> jax.Array:
    """`[..., S]` positions: -1 at padding, else the count of non-pad tokens before (Penzai's KV-cache rule)."""
    tokens = jnp.asarray(tokens)
    not_pad = tokens != PAD_ID
    return jnp.where(not_pad, jnp.cumsum(not_pad, axis=-1) - 1, -1).astype(jnp.int32)


def named_tokens(tokens: jax.Array) -> tuple[pz.nx.NamedArray, pz.nx.NamedArray]:
    """`[B, S]` token ids as `{batch, seq}` named arrays of the tokens and of their `token_positions`."""
    tokens = jnp.asarray(tokens, jnp.int32)
    return (
        pz.nx.wrap(tokens).tag("batch", "seq"),
        pz.nx.wrap(token_positions(tokens)).tag("batch", "seq"),
    )


def over_sequence_chunks(function: Callable[..., Any], sequences: Sequence[jax.Array], chunk: int) -> Any:
    """`function` applied to consecutive `chunk`-position slices of `sequences` (`[B, S, ...]` arrays sharing S),
    one slice after the other, with its outputs (`[R, chunk, ...]` each, R any leading size) written back into
    `[R, S, ...]` arrays. When `chunk` does not divide S the last slice is shifted back to end at S (its first
    positions are computed twice, to the same values); nothing is padded or copied.

    A teacher-forced pass maps its final hidden states to logits and reduces them to per-position statistics
    inside `function`, so `[B, S, vocabulary]` logits never exist at once.
    """
    length = sequences[0].shape[1]
    chunk = min(chunk, length)
    steps = -(-length // chunk)

    def slices(start: jax.Array) -> list[jax.Array]:
        return [jax.lax.dynamic_slice_in_dim(array, start, chunk, axis=1) for array in sequences]

    shapes = jax.eval_shape(lambda: function(*slices(jnp.zeros((), jnp.int32))))
    outputs = jax.tree.map(lambda spec: jnp.zeros((spec.shape[0], length, *spec.shape[2:]), spec.dtype), shapes)

    def step(index: jax.Array, outputs: Any) -> Any:
        start = jnp.minimum(index * chunk, length - chunk)
        results = function(*slices(start))
        return jax.tree.map(
            lambda out, result: jax.lax.dynamic_update_slice_in_dim(out, result, start, axis=1), outputs, results
        )

    return jax.lax.fori_loop(0, steps, step, outputs)


def _vocab_slices(vocab_size: int, chunk: int) -> list[slice]:
    return [slice(start, min(start + chunk, vocab_size)) for start in range(0, vocab_size, chunk)]


def logit_pair_statistics(
    p_logits: jax.Array, q_logits: jax.Array, vocab_chunk: int = DEFAULT_VOCAB_CHUNK
) -> dict[str, jax.Array]:
    """Per-position divergences between two next-token distributions given by logits `[..., V]` (float32 math).

    Returns `{log_partition_p, log_partition_q, kl_pq, kl_qp, entropy_p, entropy_q}`, each `[...]`, with
    `kl_pq = KL(p || q) = sum_v p_v (log p_v - log q_v)` in nats. Sums over the vocabulary run chunk by chunk.
    Identical logits give exactly 0 for both KLs.
    """
    lse_p = jax.nn.logsumexp(p_logits.astype(jnp.float32), axis=-1)
    lse_q = jax.nn.logsumexp(q_logits.astype(jnp.float32), axis=-1)
    kl_pq = kl_qp = entropy_p = entropy_q = jnp.zeros_like(lse_p)
    for vocab in _vocab_slices(p_logits.shape[-1], vocab_chunk):
        log_p = p_logits[..., vocab].astype(jnp.float32) - lse_p[..., None]
        log_q = q_logits[..., vocab].astype(jnp.float32) - lse_q[..., None]
        prob_p, prob_q = jnp.exp(log_p), jnp.exp(log_q)
        kl_pq = kl_pq + jnp.sum(prob_p * (log_p - log_q), axis=-1)
        kl_qp = kl_qp + jnp.sum(prob_q * (log_q - log_p), axis=-1)
        entropy_p = entropy_p - jnp.sum(prob_p * log_p, axis=-1)
        entropy_q = entropy_q - jnp.sum(prob_q * log_q, axis=-1)
    return {
        "log_partition_p": lse_p,
        "log_partition_q": lse_q,
        "kl_pq": kl_pq,
        "kl_qp": kl_qp,
        "entropy_p": entropy_p,
        "entropy_q": entropy_q,
    }


def cross_entropy_from_partition(logits: jax.Array, log_partition: jax.Array, targets: jax.Array) -> jax.Array:
    """`logsumexp(z) - z[target]` per position, from precomputed `log_partition = logsumexp(z)` (float32)."""
    target_logits = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return log_partition - target_logits.astype(jnp.float32)
