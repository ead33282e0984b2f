"""Measurement layers on the synthetic tiny model: capture leaves the model's output alone, the splice replaces
only ordinary positions."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz

from runner.model import tokenizer as tokenizer_lib
from runner.model.tokenizer import BOS_ID, EOS_ID, PAD_ID
from runner.nn import measurement
from runner.sae.sources import calibration_tokens

PROMPT = "Would you be able to travel through time using a wormhole?"


@pytest.fixture(scope="module")
def special_tokens_batch(tiny_model) -> np.ndarray:
    """4 x 24 corpus windows, BOS first; row 1 right-padded, row 3 ends with EOS then padding."""
    tokens = calibration_tokens(tiny_model.tokenizer, num_sequences=4, seq_len=24).copy()
    tokens[1, 18:] = PAD_ID
    tokens[3, 17] = EOS_ID
    tokens[3, 18:] = PAD_ID
    return tokens


def test_capture_leaves_the_logits_unchanged(tiny_model) -> None:
    ids = tokenizer_lib.encode_prompt(tiny_model.tokenizer, PROMPT)
    tokens = pz.nx.wrap(jnp.asarray([ids], jnp.int32)).tag("batch", "seq")
    logits, activations = measurement.capture(tiny_model.model, tokens, [(2, "res"), (1, "mlp"), (2, "att")])
    np.testing.assert_array_equal(
        np.asarray(logits.unwrap("batch", "seq", "vocabulary")),
        np.asarray(tiny_model.model(tokens).unwrap("batch", "seq", "vocabulary")),
    )
    for value in activations.values():
        assert value.named_shape == {"batch": 1, "seq": len(ids), "embedding": 64}


def test_splice_keeps_special_positions_and_reconstructs_the_rest(tiny_model, tiny_saes, special_tokens_batch) -> None:
    sae, tokens = tiny_saes[2], special_tokens_batch
    _, activations = measurement.capture(
        tiny_model.model, pz.nx.wrap(jnp.asarray(tokens)).tag("batch", "seq"), [(2, "res")]
    )
    x = np.asarray(activations[(2, "res")].unwrap("batch", "seq", "embedding"), np.float32)
    special = np.isin(tokens, [PAD_ID, EOS_ID, BOS_ID])

    named = pz.nx.wrap(jnp.asarray(x)).tag("batch", "seq", "embedding")
    mask = pz.nx.wrap(jnp.asarray(~special)).tag("batch", "seq")
    spliced = measurement.SpliceSAEReconstruction(sae)(named, **{measurement.SPLICE_MASK_INPUT: mask})
    out = np.asarray(spliced.unwrap("batch", "seq", "embedding"))
    np.testing.assert_array_equal(out[special], x[special])
    arrays = {name: value.astype(np.float64) for name, value in sae.to_arrays().items()}
    pre = x.astype(np.float64) @ arrays["W_enc"] + arrays["b_enc"]
    x_hat = np.where(pre > arrays["threshold"], pre, 0.0) @ arrays["W_dec"] + arrays["b_dec"]
    np.testing.assert_allclose(out[~special], x_hat[~special], rtol=1e-4, atol=1e-4)


def test_zero_ablation_zeroes_every_position() -> None:
    x = pz.nx.wrap(jnp.ones((4, 24, 64), jnp.float32)).tag("batch", "seq", "embedding")
    out = measurement.ZeroAblate()(x)
    assert out.named_shape == x.named_shape
    np.testing.assert_array_equal(np.asarray(out.unwrap("batch", "seq", "embedding")), 0.0)
