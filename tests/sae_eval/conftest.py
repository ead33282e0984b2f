"""Fixtures of the SAE evaluation tests: the evaluation tokens and their plain float64 capture."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz

from runner.model.tokenizer import EOS_ID, PAD_ID
from runner.sae.sources import calibration_tokens
from tests.sae_eval.references import reference_capture


@pytest.fixture(scope="session")
def eval_tokens(tiny_model) -> np.ndarray:
    """6 x 24 corpus windows, BOS first; row 1 right-padded, row 3 ends with EOS then padding."""
    tokens = calibration_tokens(tiny_model.tokenizer, num_sequences=6, seq_len=24).copy()
    tokens[1, 18:] = PAD_ID
    tokens[3, 17] = EOS_ID
    tokens[3, 18:] = PAD_ID
    return tokens


@pytest.fixture(scope="session")
def captured(tiny_model, eval_tokens):
    """The logits and the activation at every site of `SITE_KEYS`, in float64."""
    logits, residuals = reference_capture(pz.freeze_params(tiny_model.model), jnp.asarray(eval_tokens))
    return np.asarray(logits, np.float64), {k: np.asarray(v, np.float64) for k, v in residuals.items()}
