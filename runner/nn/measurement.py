"""Layers inserted at a site to measure it: capturing its activations, splicing an SAE's reconstruction in, or
ablating it (`docs/metrics.md#splice-evaluation`).

Capture uses Penzai's own `SaveIntermediate`, whose state variable is read back after the call (also inside a
jitted function: the value is a traced array there).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
from penzai import pz
from penzai.models.transformer import model_parts
from penzai.toolshed.save_intermediates import SaveIntermediate

from runner.nn.jumprelu import JumpReLUSAE
from runner.nn.sites import SiteKey, insert_at_site, split_at_unembedding

#: The side input naming where `SpliceSAEReconstruction` splices (`{batch, seq}` bool).
SPLICE_MASK_INPUT = "splice_mask"


def capture(
    model: model_parts.TransformerLM,
    tokens: pz.nx.NamedArray,
    sites: Sequence[SiteKey],
    **side_inputs: Any,
) -> tuple[pz.nx.NamedArray, dict[SiteKey, pz.nx.NamedArray]]:
    """Runs the model once; returns its logits and the activation at every `(layer, site)` in `sites`."""
    patched, saved = _with_captures(model, sites)
    logits = patched(tokens, **side_inputs)
    return logits, {key: variable.value for key, variable in saved.items()}


def capture_hidden(
    model: model_parts.TransformerLM,
    tokens: pz.nx.NamedArray,
    sites: Sequence[SiteKey],
    **side_inputs: Any,
) -> tuple[pz.nx.NamedArray, dict[SiteKey, pz.nx.NamedArray]]:
    """Like `capture`, but stops before the unembedding: returns the final hidden states `{..., embedding}`
    (`runner.nn.sites.split_at_unembedding`; the side input `token_positions` is required) instead of the
    logits, so no `[..., vocabulary]` array is made."""
    patched, saved = _with_captures(model, sites)
    trunk, _ = split_at_unembedding(patched)
    hidden = trunk(tokens, **side_inputs)
    return hidden, {key: variable.value for key, variable in saved.items()}


def _with_captures(
    model: pz.nn.Layer, sites: Sequence[SiteKey]
) -> tuple[pz.nn.Layer, dict[SiteKey, pz.StateVariable]]:
    saved = {key: pz.StateVariable(value=None, label=f"capture/{key[1]}_{key[0]}") for key in sites}
    patched = model
    for (layer_index, site), variable in saved.items():
        patched = insert_at_site(patched, layer_index, site, SaveIntermediate(variable))
    return patched, saved


@pz.pytree_dataclass
class SpliceSAEReconstruction(pz.nn.Layer):
    """Replaces the site's activation by the SAE reconstruction where the side input `splice_mask` is True.

    Positions outside the mask (BOS, EOS, padding) keep their original activation. The SAE runs in float32 and
    its output is cast back to the stream's dtype.

    Attributes:
      sae: The SAE whose reconstruction is spliced in.
    """

    sae: JumpReLUSAE

    def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        reconstruction = self.sae(x).astype(x.dtype)
        return pz.nx.nmap(jnp.where)(side_inputs[SPLICE_MASK_INPUT], reconstruction, x)


@pz.pytree_dataclass
class ZeroAblate(pz.nn.Layer):
    """Sets the site's activation to zero at every position (the splice evaluation's worst-case baseline)."""

    def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        return pz.nx.nmap(jnp.zeros_like)(x)
