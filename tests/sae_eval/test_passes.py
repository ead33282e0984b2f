"""The SAE evaluation's clean capture pass against a plain capture, with right and left padding."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from penzai import pz

from runner.model.tokenizer import PAD_ID
from runner.sae_eval import passes
from tests.sae_eval.references import SITE_KEYS


def test_capture_sites_matches_a_plain_capture_and_ignores_left_padding(tiny_model, eval_tokens, captured) -> None:
    frozen = pz.freeze_params(tiny_model.model)
    logits, activations = passes.capture_sites_jit(frozen, jnp.asarray(eval_tokens), site_keys=SITE_KEYS)
    ref_logits, ref_activations = captured
    real = eval_tokens != PAD_ID
    np.testing.assert_allclose(np.asarray(logits)[real], ref_logits[real], atol=1e-5)
    for key in SITE_KEYS:
        np.testing.assert_allclose(np.asarray(activations[key])[real], ref_activations[key][real], atol=1e-5)
    # The same rows left-padded by 3 (last 3 tokens dropped) read as if unpadded.
    shift = 3
    left = np.full_like(eval_tokens, PAD_ID)
    left[:, shift:] = eval_tokens[:, :-shift]
    _, left_activations = passes.capture_sites_jit(frozen, jnp.asarray(left), site_keys=SITE_KEYS)
    keep = real[:, :-shift]
    for key in ((2, "res"), (2, "att")):
        np.testing.assert_allclose(
            np.asarray(left_activations[key])[:, shift:][keep], ref_activations[key][:, :-shift][keep], atol=1e-4
        )
