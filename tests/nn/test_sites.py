"""Sites of Penzai's Gemma2, found by type: the suffix from any block reproduces the model, and the `mlp` and
`att` layers land inside the block's branches."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz
from penzai.models.transformer import model_parts
from penzai.toolshed.save_intermediates import SaveIntermediate

from runner.lm_stats import token_positions
from runner.model import tokenizer as tokenizer_lib
from runner.nn import measurement, sites

PROMPT = "Would you be able to travel through time using a wormhole?"


@pytest.fixture(scope="module")
def prompt_tokens(tiny_model) -> pz.nx.NamedArray:
    ids = tokenizer_lib.encode_prompt(tiny_model.tokenizer, PROMPT)
    return pz.nx.wrap(jnp.asarray([ids], jnp.int32)).tag("batch", "seq")


def test_the_suffix_from_every_block_gives_the_models_logits(tiny_model, prompt_tokens) -> None:
    model = tiny_model.model
    positions = pz.nx.wrap(token_positions(prompt_tokens.unwrap("batch", "seq"))).tag("batch", "seq")
    expected = np.asarray(model(prompt_tokens).unwrap("batch", "seq", "vocabulary"))
    layers = tiny_model.architecture.num_layers
    _, captured = measurement.capture(model, prompt_tokens, [(layer, "res") for layer in range(layers)])
    captured[(-1, "res")] = sites.embedded_tokens(model, prompt_tokens)
    for first_block in range(layers + 1):
        entry = captured[sites.block_input_site(first_block)]
        logits = sites.suffix_from_block(model, first_block)(entry, token_positions=positions)
        np.testing.assert_allclose(
            np.asarray(logits.unwrap("batch", "seq", "vocabulary")), expected, rtol=1e-5, atol=1e-5
        )


def test_a_layer_inserted_after_a_block_starts_the_next_blocks_suffix(tiny_model) -> None:
    marker = SaveIntermediate()
    patched = sites.insert_after_block(tiny_model.model, 1, marker)
    suffix = sites.suffix_from_block(patched, 2)
    assert suffix.sublayers[0].saved is marker.saved
    assert isinstance(suffix.sublayers[1], model_parts.TransformerBlock)


def test_mlp_and_att_layers_land_inside_their_block(tiny_model) -> None:
    mlp_marker, att_marker = SaveIntermediate(), SaveIntermediate()
    patched = sites.insert_at_site(tiny_model.model, 2, "mlp", mlp_marker)
    patched = sites.insert_at_site(patched, 3, "att", att_marker)
    blocks = pz.select(patched).at_instances_of(model_parts.TransformerBlock).get_sequence()
    mlp_branch = blocks[2].sublayers[1].delta
    assert mlp_branch.sublayers[-1].saved is mlp_marker.saved
    assert isinstance(mlp_branch.sublayers[-3], model_parts.TransformerFeedForward)
    output = pz.select(blocks[3]).at_instances_of(pz.nn.Attention).get_sequence()[0].attn_value_to_output
    assert isinstance(output.sublayers[1], sites.AtHeads) and output.sublayers[1].inner.saved is att_marker.saved
    for index in (0, 1):
        assert pz.select(blocks[index]).at_instances_of(SaveIntermediate).count() == 0
