"""Gemma Scope JumpReLU SAEs as Penzai layers (files: `runner.sae.params`).

Inference form (Gemma Scope, arXiv 2408.05147)::

    pre = x @ W_enc + b_enc;  f = pre * (pre > threshold);  x_hat = f @ W_dec + b_dec

computed in float32 whatever the model's dtype (`docs/metrics.md#weights`). Named axes: `embedding` (d_in) and
`sae_latent` (d_sae). `jumprelu` is the one place the activation function is written.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from penzai import pz

LATENT_AXIS = "sae_latent"
SAE_KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")


def jumprelu(pre: pz.nx.NamedArray, threshold: pz.nx.NamedArray) -> pz.nx.NamedArray:
    """The JumpReLU activation: `pre` where `pre > threshold`, else 0."""
    return pz.nx.nmap(jnp.where)(pre > threshold, pre, 0.0)


@pz.pytree_dataclass
class JumpReLUEncoder(pz.nn.Layer):
    """`x -> JumpReLU(x @ W_enc + b_enc)`: the SAE's latent activations (float32).

    Attributes:
      w_enc: `{embedding, sae_latent}` encoder matrix.
      b_enc: `{sae_latent}` encoder bias.
      threshold: `{sae_latent}` JumpReLU thresholds (positive).
    """

    w_enc: pz.nx.NamedArray
    b_enc: pz.nx.NamedArray
    threshold: pz.nx.NamedArray

    def pre_activations(self, x: pz.nx.NamedArray) -> pz.nx.NamedArray:
        """`x @ W_enc + b_enc` in float32, over the `embedding` axis of `x`."""
        x32 = x.astype(jnp.float32)
        return pz.nx.nmap(jnp.dot)(x32.untag("embedding"), self.w_enc.untag("embedding")) + self.b_enc

    def selected_pre_activations(self, x: pz.nx.NamedArray, latents: pz.nx.NamedArray) -> pz.nx.NamedArray:
        """`x @ W_enc[:, latent] + b_enc[latent]` in float32 for one latent per entry of `latents`.

        `latents` holds latent indices over axes that `x` shares (e.g. `{batch}`: each row reads its own latent);
        the result has the axes of `x` without `embedding`. No `[..., d_sae]` intermediate is formed.
        """
        column = self.w_enc[{LATENT_AXIS: latents}]
        x32 = x.astype(jnp.float32)
        return pz.nx.nmap(jnp.dot)(x32.untag("embedding"), column.untag("embedding")) + self.b_enc[
            {LATENT_AXIS: latents}
        ]

    def selected_activations(self, x: pz.nx.NamedArray, latents: pz.nx.NamedArray) -> pz.nx.NamedArray:
        """The JumpReLU activations of the latents `latents` (see `selected_pre_activations`)."""
        return jumprelu(self.selected_pre_activations(x, latents), self.threshold[{LATENT_AXIS: latents}])

    def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        return jumprelu(self.pre_activations(x), self.threshold)


@pz.pytree_dataclass
class SAEDecoder(pz.nn.Layer):
    """`f -> f @ W_dec + b_dec` (float32).

    Attributes:
      w_dec: `{sae_latent, embedding}` decoder matrix; rows are unit-norm feature directions.
      b_dec: `{embedding}` decoder bias.
    """

    w_dec: pz.nx.NamedArray
    b_dec: pz.nx.NamedArray

    def __call__(self, features: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        return pz.nx.nmap(jnp.dot)(features.untag(LATENT_AXIS), self.w_dec.untag(LATENT_AXIS)) + self.b_dec


@pz.pytree_dataclass
class JumpReLUSAE(pz.nn.Layer):
    """A JumpReLU SAE; calling it reconstructs its input.

    Attributes:
      encoder: Residual stream -> latent activations.
      decoder: Latent activations -> reconstruction.
    """

    encoder: JumpReLUEncoder
    decoder: SAEDecoder

    @property
    def d_in(self) -> int:
        """Width of the activations the SAE reads."""
        return self.encoder.w_enc.named_shape["embedding"]

    @property
    def d_sae(self) -> int:
        """Number of latents."""
        return self.encoder.w_enc.named_shape[LATENT_AXIS]

    def encode(self, x: pz.nx.NamedArray) -> pz.nx.NamedArray:
        """Latent activations `f`."""
        return self.encoder(x)

    def decode(self, features: pz.nx.NamedArray) -> pz.nx.NamedArray:
        """Reconstruction from latent activations."""
        return self.decoder(features)

    def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        return self.decode(self.encode(x))

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> JumpReLUSAE:
        """Builds the layer from Gemma Scope `params.npz` arrays (`W_enc [d_in, d_sae]`, ...)."""

        def wrap(name: str, *axes: str) -> pz.nx.NamedArray:
            return pz.nx.NamedArray.wrap(jnp.asarray(arrays[name], dtype=jnp.float32)).tag(*axes)

        return cls(
            encoder=JumpReLUEncoder(
                w_enc=wrap("W_enc", "embedding", LATENT_AXIS),
                b_enc=wrap("b_enc", LATENT_AXIS),
                threshold=wrap("threshold", LATENT_AXIS),
            ),
            decoder=SAEDecoder(w_dec=wrap("W_dec", LATENT_AXIS, "embedding"), b_dec=wrap("b_dec", "embedding")),
        )

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The Gemma Scope `params.npz` arrays of this SAE."""
        return {
            "W_enc": np.asarray(self.encoder.w_enc.unwrap("embedding", LATENT_AXIS)),
            "W_dec": np.asarray(self.decoder.w_dec.unwrap(LATENT_AXIS, "embedding")),
            "b_enc": np.asarray(self.encoder.b_enc.unwrap(LATENT_AXIS)),
            "b_dec": np.asarray(self.decoder.b_dec.unwrap("embedding")),
            "threshold": np.asarray(self.encoder.threshold.unwrap(LATENT_AXIS)),
        }
