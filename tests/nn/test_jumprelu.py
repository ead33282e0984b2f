"""The JumpReLU SAE layers compute the published formula (docs/metrics.md#weights)."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
from penzai import pz

from runner.nn.jumprelu import JumpReLUSAE, jumprelu
from runner.sae.params import random_sae_arrays


def write(tmp_path: Path, arrays: dict, name: str = "params.npz") -> Path:
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def valid_arrays(d_in: int = 8, d_sae: int = 32) -> dict[str, np.ndarray]:
    arrays = random_sae_arrays(d_in, d_sae, seed=0)
    arrays["threshold"] = np.full(d_sae, 0.1, np.float32)
    arrays["b_dec"] = np.linspace(-1, 1, d_in).astype(np.float32)
    return arrays


def test_jumprelu_matches_numpy_formula() -> None:
    arrays = valid_arrays()
    arrays["b_enc"] = np.linspace(-0.2, 0.2, 32).astype(np.float32)
    sae = JumpReLUSAE.from_arrays(arrays)
    x = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    pre = x @ arrays["W_enc"] + arrays["b_enc"]
    f = np.where(pre > arrays["threshold"], pre, 0)
    x_hat = f @ arrays["W_dec"] + arrays["b_dec"]
    named_x = pz.nx.wrap(jnp.asarray(x)).tag("seq", "embedding")
    np.testing.assert_allclose(sae.encode(named_x).unwrap("seq", "sae_latent"), f, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sae(named_x).unwrap("seq", "embedding"), x_hat, rtol=1e-5, atol=1e-5)


def test_jumprelu_keeps_only_values_strictly_above_the_threshold() -> None:
    pre = pz.nx.wrap(jnp.asarray([0.5, 1.0, 1.5, -2.0])).tag("sae_latent")
    threshold = pz.nx.wrap(jnp.asarray([1.0, 1.0, 1.0, -3.0])).tag("sae_latent")
    np.testing.assert_array_equal(jumprelu(pre, threshold).unwrap("sae_latent"), [0.0, 0.0, 1.5, -2.0])


def test_selected_activations_are_those_latents_of_the_full_encoding() -> None:
    arrays = valid_arrays()
    arrays["b_enc"] = np.linspace(-0.2, 0.2, 32).astype(np.float32)
    sae = JumpReLUSAE.from_arrays(arrays)
    x = pz.nx.wrap(jnp.asarray(np.random.default_rng(2).standard_normal((3, 5, 8)), jnp.float32)).tag(
        "batch", "seq", "embedding"
    )
    latents = np.array([4, 0, 31])
    selected = sae.encoder.selected_activations(x, pz.nx.wrap(jnp.asarray(latents)).tag("batch"))
    full = np.asarray(sae.encode(x).unwrap("batch", "seq", "sae_latent"))
    expected = full[np.arange(3), :, latents]  # [batch, seq]: row b reads latent latents[b]
    np.testing.assert_allclose(selected.unwrap("batch", "seq"), expected, rtol=1e-6, atol=1e-6)
    pre = sae.encoder.selected_pre_activations(x, pz.nx.wrap(jnp.asarray(latents)).tag("batch"))
    full_pre = np.asarray(sae.encoder.pre_activations(x).unwrap("batch", "seq", "sae_latent"))
    np.testing.assert_allclose(pre.unwrap("batch", "seq"), full_pre[np.arange(3), :, latents], rtol=1e-6, atol=1e-6)
