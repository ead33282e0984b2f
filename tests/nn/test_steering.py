"""Steering sites on the synthetic tiny model, against interventions written by hand."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz
from penzai.toolshed.save_intermediates import SaveIntermediate

from runner.model import tokenizer as tokenizer_lib
from runner.nn import measurement, sites, steering
from runner.nn.jumprelu import LATENT_AXIS

PROMPT = "Would you be able to travel through time using a wormhole?"


@pytest.fixture(scope="module")
def prompt_tokens(tiny_model) -> pz.nx.NamedArray:
    ids = tokenizer_lib.encode_prompt(tiny_model.tokenizer, PROMPT)
    return pz.nx.wrap(jnp.asarray([ids], jnp.int32)).tag("batch", "seq")


@pz.pytree_dataclass
class AddVector(pz.nn.Layer):
    """Adds a fixed vector: the hand-written intervention the steering site must reproduce."""

    vector: pz.nx.NamedArray

    def __call__(self, x, **side_inputs):
        return x + self.vector.astype(x.dtype)


def logits_array(logits: pz.nx.NamedArray) -> np.ndarray:
    return np.asarray(logits.unwrap("batch", "seq", "vocabulary"))


def test_scale_zero_gives_exactly_the_unpatched_logits(tiny_model, tiny_saes, prompt_tokens) -> None:
    patched = steering.add_steering_sites(tiny_model.model, tiny_saes)
    inputs = steering.SteeringInputs.from_rows([2], [5], [0.0], ["add"], [0])
    np.testing.assert_array_equal(
        logits_array(patched(prompt_tokens, steering=inputs)), logits_array(tiny_model.model(prompt_tokens))
    )


@pytest.mark.parametrize("steer_from", [0, 1])
def test_steering_equals_adding_the_decoder_row_by_hand(tiny_model, tiny_saes, prompt_tokens, steer_from) -> None:
    layer, feature, scale = 1, 7, 12.5
    patched = steering.add_steering_sites(tiny_model.model, tiny_saes)
    inputs = steering.SteeringInputs.from_rows([layer], [feature], [scale], ["add"], [steer_from])
    steered = logits_array(patched(prompt_tokens, steering=inputs))

    w_dec = np.asarray(tiny_saes[layer].decoder.w_dec.unwrap(LATENT_AXIS, "embedding"))
    seq_len = prompt_tokens.named_shape["seq"]
    by_position = np.outer(np.arange(seq_len) >= steer_from, scale * w_dec[feature]).astype(np.float32)
    vector = pz.nx.wrap(jnp.asarray(by_position)).tag("seq", "embedding")
    by_hand = sites.insert_after_block(tiny_model.model, layer, AddVector(vector))
    np.testing.assert_allclose(steered, logits_array(by_hand(prompt_tokens)), rtol=1e-5, atol=1e-5)
    assert np.abs(steered - logits_array(tiny_model.model(prompt_tokens))).max() > 1e-2


def test_rows_are_steered_only_at_their_own_layer(tiny_model, tiny_saes, prompt_tokens) -> None:
    batch = pz.nx.wrap(jnp.concatenate([prompt_tokens.unwrap("batch", "seq")] * 3)).tag("batch", "seq")
    patched = steering.add_steering_sites(tiny_model.model, tiny_saes)
    inputs = steering.SteeringInputs.from_rows(
        [1, 3, steering.NO_LAYER], [7, 9, 7], [12.5, 30.0, 99.0], ["add"] * 3, [0] * 3
    )
    together = logits_array(patched(batch, steering=inputs))
    for row, (layer, feature, scale) in enumerate([(1, 7, 12.5), (3, 9, 30.0)]):
        alone = steering.SteeringInputs.from_rows([layer], [feature], [scale], ["add"], [0])
        np.testing.assert_allclose(together[row], logits_array(patched(prompt_tokens, steering=alone))[0], atol=1e-5)
    np.testing.assert_array_equal(together[2], logits_array(tiny_model.model(batch))[2])


def test_clamp_sets_the_feature_activation_before_decoding(tiny_model, tiny_saes, prompt_tokens) -> None:
    """Clamping is `h + (c - f_i(h)) * d_i`: the SAE reconstruction of the steered stream, rebuilt with feature
    i read at c, plus the SAE error of the unsteered stream, gives the steered stream exactly."""
    layer, feature, value = 2, 11, 6.0
    sae = tiny_saes[layer]
    _, captured = measurement.capture(tiny_model.model, prompt_tokens, [(layer, "res")])
    before = {layer: captured[(layer, "res")]}
    patched = steering.add_steering_sites(tiny_model.model, {layer: sae})
    inputs = steering.SteeringInputs.from_rows([layer], [feature], [value], ["clamp"], [0])

    h = np.asarray(before[layer].unwrap("batch", "seq", "embedding"))[0]
    f = np.asarray(sae.encode(before[layer]).unwrap("batch", "seq", LATENT_AXIS))[0]
    clamped = f.copy()
    clamped[:, feature] = value
    arrays = sae.to_arrays()
    error = h - (f @ arrays["W_dec"] + arrays["b_dec"])
    expected = clamped @ arrays["W_dec"] + arrays["b_dec"] + error

    site_out = _steered_stream(patched, prompt_tokens, layer, inputs)
    np.testing.assert_allclose(site_out, expected, rtol=1e-4, atol=1e-4)


def _steered_stream(patched, tokens, layer, inputs) -> np.ndarray:
    """The residual stream right after the steering site of `layer`."""
    saved = pz.StateVariable(value=None)
    probe = (
        pz.select(patched)
        .at_instances_of(steering.SteeringSite)
        .where(lambda site: site.layer_index == layer)
        .insert_after(SaveIntermediate(saved))
    )
    probe(tokens, steering=inputs)
    return np.asarray(saved.value.unwrap("batch", "seq", "embedding"))[0]


def test_two_interventions_in_one_row_equal_adding_both_decoder_rows_by_hand(tiny_model, tiny_saes,
                                                                            prompt_tokens) -> None:
    """A combination (K = 2 interventions on one row, at two layers) is the sum of both hand-made additions."""
    (layer_a, feature_a, scale_a), (layer_b, feature_b, scale_b) = (1, 7, 12.5), (3, 9, -20.0)
    patched = steering.add_steering_sites(tiny_model.model, tiny_saes)
    inputs = steering.SteeringInputs.from_rows([[layer_a, layer_b]], [[feature_a, feature_b]], [[scale_a, scale_b]],
                                               [["add", "add"]], [0])
    combined = logits_array(patched(prompt_tokens, steering=inputs))

    by_hand = tiny_model.model
    for layer, feature, scale in ((layer_a, feature_a, scale_a), (layer_b, feature_b, scale_b)):
        w_dec = np.asarray(tiny_saes[layer].decoder.w_dec.unwrap(LATENT_AXIS, "embedding"))
        vector = pz.nx.wrap(jnp.asarray(scale * w_dec[feature], jnp.float32)).tag("embedding")
        by_hand = sites.insert_after_block(by_hand, layer, AddVector(vector))
    np.testing.assert_allclose(combined, logits_array(by_hand(prompt_tokens)), rtol=1e-5, atol=1e-5)

    one = steering.SteeringInputs.from_rows([[layer_a, steering.NO_LAYER]], [[feature_a, 0]], [[scale_a, 99.0]],
                                            [["add", "add"]], [0])
    alone = steering.SteeringInputs.from_rows([layer_a], [feature_a], [scale_a], ["add"], [0])
    np.testing.assert_array_equal(logits_array(patched(prompt_tokens, steering=one)),
                                  logits_array(patched(prompt_tokens, steering=alone)),
                                  err_msg="an unused intervention slot changes nothing")
