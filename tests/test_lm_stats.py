"""runner.lm_stats: token masks and positions, and the chunked vocabulary statistics against numpy float64."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from runner.lm_stats import (
    cross_entropy_from_partition,
    logit_pair_statistics,
    next_token_loss_mask,
    special_token_mask,
    special_token_mask_on_device,
    token_positions,
)
from runner.model.tokenizer import BOS_ID, EOS_ID, PAD_ID

TOKENS = np.array([[PAD_ID, PAD_ID, BOS_ID, 5, 6, 7], [BOS_ID, 8, 9, EOS_ID, PAD_ID, PAD_ID]], np.int32)


def log_softmax(z: np.ndarray) -> np.ndarray:
    shifted = z - z.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_left_and_right_padded_rows_get_the_positions_of_their_unpadded_tokens() -> None:
    np.testing.assert_array_equal(
        np.asarray(token_positions(jnp.asarray(TOKENS))), [[-1, -1, 0, 1, 2, 3], [0, 1, 2, 3, -1, -1]]
    )


def test_special_tokens_are_masked_on_host_and_device_alike() -> None:
    expected = [[False, False, False, True, True, True], [False, True, True, False, False, False]]
    np.testing.assert_array_equal(special_token_mask(TOKENS), expected)
    np.testing.assert_array_equal(np.asarray(special_token_mask_on_device(jnp.asarray(TOKENS))), expected)


def test_the_loss_counts_predictions_from_ordinary_tokens_of_a_real_next_token() -> None:
    # Predicting EOS from 9 counts; predicting from BOS, EOS or padding does not.
    expected = [[False, False, False, True, True], [False, True, True, False, False]]
    np.testing.assert_array_equal(next_token_loss_mask(TOKENS), expected)


@pytest.mark.parametrize("vocab_chunk", [7, 50, 64])
def test_pair_statistics_match_numpy_whatever_the_chunk(vocab_chunk: int) -> None:
    rng = np.random.default_rng(0)
    p_logits, q_logits = (3.0 * rng.standard_normal((2, 2, 5, 50))).astype(np.float32)
    stats = logit_pair_statistics(jnp.asarray(p_logits), jnp.asarray(q_logits), vocab_chunk)
    log_p, log_q = log_softmax(p_logits.astype(np.float64)), log_softmax(q_logits.astype(np.float64))
    expected = {
        "kl_pq": (np.exp(log_p) * (log_p - log_q)).sum(-1),
        "kl_qp": (np.exp(log_q) * (log_q - log_p)).sum(-1),
        "entropy_p": -(np.exp(log_p) * log_p).sum(-1),
        "entropy_q": -(np.exp(log_q) * log_q).sum(-1),
    }
    for name, value in expected.items():
        np.testing.assert_allclose(np.asarray(stats[name]), value, rtol=1e-4, atol=1e-5, err_msg=name)
    targets = rng.integers(0, 50, (2, 5))
    ce = cross_entropy_from_partition(jnp.asarray(q_logits), stats["log_partition_q"], jnp.asarray(targets))
    np.testing.assert_allclose(np.asarray(ce), -np.take_along_axis(log_q, targets[..., None], -1)[..., 0], rtol=1e-5)


def test_identical_distributions_have_exactly_zero_divergence() -> None:
    logits = jnp.asarray(np.random.default_rng(1).standard_normal((3, 40)), jnp.float32)
    stats = logit_pair_statistics(logits, logits, vocab_chunk=16)
    assert np.all(np.asarray(stats["kl_pq"]) == 0.0) and np.all(np.asarray(stats["kl_qp"]) == 0.0)
