"""Metrics of SAE activations and steered generations.

Conventions (see the project's Gemma Scope metrics sheet): special tokens (PAD 0, EOS 1, BOS 2) never enter an
SAE metric; scalars are token-weighted means over the masked tokens (sums first, divided once).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from penzai import pz

from runner.model.tokenizer import BOS_ID, EOS_ID, PAD_ID
from runner.sae.jumprelu import LATENT_AXIS

SPECIAL_TOKEN_IDS = (PAD_ID, EOS_ID, BOS_ID)


def special_token_mask(tokens: np.ndarray) -> np.ndarray:
    """True where a token is an ordinary token (not PAD, EOS or BOS)."""
    return ~np.isin(np.asarray(tokens), SPECIAL_TOKEN_IDS)


def per_token_l0(features: pz.nx.NamedArray) -> pz.nx.NamedArray:
    """Number of active latents at each position (`f > 0`; JumpReLU zeroes everything below threshold)."""
    return (features > 0).astype(jnp.int32).untag(LATENT_AXIS).sum()


def mean_l0(features: pz.nx.NamedArray, tokens: np.ndarray) -> float:
    """Token-weighted mean L0 over the ordinary tokens of `tokens` (same `{batch?, seq}` layout as features)."""
    l0 = np.asarray(per_token_l0(features).unwrap(*_position_axes(features)), dtype=np.float64)
    mask = special_token_mask(tokens).reshape(l0.shape)
    return float((l0 * mask).sum() / max(mask.sum(), 1))


def top_features(features: pz.nx.NamedArray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Indices and values of the `k` most active latents at each position (`[..., k]`, positions first)."""
    values = np.asarray(features.unwrap(*_position_axes(features), LATENT_AXIS))
    order = np.argsort(-values, axis=-1, kind="stable")[..., :k]
    return order, np.take_along_axis(values, order, axis=-1)


def steering_point_metrics(
    tokens: float, l0_total: float, activation_total: float, fires_total: float
) -> dict[str, float]:
    """Per-point metrics from the sampler's sums for the point (ratios omitted when no token was measured).

    - `steer/l0`: mean SAE L0 at the steering layer over the generated tokens (EOS, BOS and padding excluded), on the
      residual stream after steering.
    - `steer/feature_activation`: the steered feature's mean activation over those tokens.
    - `steer/feature_firing_rate`: fraction of those tokens on which the steered feature fires.
    - `gen/measured_tokens`: how many tokens the means are over.
    """
    metrics = {"gen/measured_tokens": float(tokens)}
    if tokens > 0:
        metrics["steer/l0"] = float(l0_total) / tokens
        metrics["steer/feature_activation"] = float(activation_total) / tokens
        metrics["steer/feature_firing_rate"] = float(fires_total) / tokens
    return metrics


def _position_axes(array: pz.nx.NamedArray) -> tuple[str, ...]:
    return tuple(name for name in ("batch", "seq") if name in array.named_shape)
