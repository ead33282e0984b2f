"""Gemma Scope JumpReLU SAEs as Penzai layers, and loading them from the Gemma Scope file layout.

Inference form (Gemma Scope, arXiv 2408.05147)::

    pre = x @ W_enc + b_enc;  f = pre * (pre > threshold);  x_hat = f @ W_dec + b_dec

computed in float32 whatever the model's dtype (`docs/metrics.md#weights`). Named axes: `embedding` (d_in) and
`sae_latent` (d_sae). `jumprelu` is the one place the activation function is written.
"""

from __future__ import annotations

import dataclasses
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from penzai import pz

from runner.errors import SAEError
from runner.files import atomic_path

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


@dataclasses.dataclass(frozen=True)
class LoadedSAE:
    """An SAE with where it came from.

    Attributes:
      sae: The Penzai layer.
      sae_id: Stable identifier, e.g. `gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71`.
      layer: Residual-stream site (output of block `layer`).
      path: The `params.npz` it was read from.
    """

    sae: JumpReLUSAE
    sae_id: str
    layer: int
    path: Path


def read_params_npz(path: Path, *, expected_d_in: int | None = None) -> dict[str, np.ndarray]:
    """Reads and validates a Gemma Scope `params.npz` (never unpickles).

    Checks the keys, 1-D/2-D shapes that agree with each other, floating dtypes, finite values, positive
    thresholds, and `d_in == expected_d_in` when given.

    Raises:
      SAEError: one line naming the file and what is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise SAEError(f"{path}: SAE params.npz not found")
    if not zipfile.is_zipfile(path):
        raise SAEError(f"{path}: not a readable npz file (not a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except ValueError as error:
        if "pickle" in str(error).lower():
            raise SAEError(f"{path}: holds pickled objects; only plain numeric arrays are allowed") from None
        raise SAEError(f"{path}: not a readable npz file ({error})") from None
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise SAEError(f"{path}: not a readable npz file ({type(error).__name__})") from None

    missing = [key for key in SAE_KEYS if key not in arrays]
    if missing:
        raise SAEError(f"{path}: missing arrays {missing}; a Gemma Scope SAE has {list(SAE_KEYS)}")
    for name in SAE_KEYS:
        if not np.issubdtype(arrays[name].dtype, np.floating):
            raise SAEError(f"{path}: {name} has dtype {arrays[name].dtype}; expected a floating dtype")
    d_in, d_sae = arrays["W_enc"].shape if arrays["W_enc"].ndim == 2 else (None, None)
    expected = {
        "W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,), "threshold": (d_sae,)
    }
    for name, shape in expected.items():
        if d_in is None or arrays[name].shape != shape:
            raise SAEError(
                f"{path}: {name} has shape {arrays[name].shape}, expected {shape} "
                f"(from W_enc {arrays['W_enc'].shape} = [d_in, d_sae])"
            )
    for name in SAE_KEYS:
        if not np.all(np.isfinite(arrays[name])):
            bad = int(np.size(arrays[name]) - np.count_nonzero(np.isfinite(arrays[name])))
            raise SAEError(f"{path}: {name} has {bad} non-finite values (NaN or inf)")
    if np.any(arrays["threshold"] < 0):
        raise SAEError(f"{path}: threshold has negative entries; JumpReLU thresholds must be >= 0")
    if expected_d_in is not None and d_in != expected_d_in:
        raise SAEError(f"{path}: SAE d_in is {d_in} but the model's residual stream width is {expected_d_in}")
    return arrays


def load_sae(path: Path, *, sae_id: str, layer: int, expected_d_in: int | None = None) -> LoadedSAE:
    """Reads a `params.npz` into a `LoadedSAE` (see `read_params_npz` for the checks)."""
    arrays = read_params_npz(path, expected_d_in=expected_d_in)
    return LoadedSAE(sae=JumpReLUSAE.from_arrays(arrays), sae_id=sae_id, layer=layer, path=Path(path))


def write_params_npz(arrays: dict[str, np.ndarray], path: Path) -> Path:
    """Writes SAE arrays in the Gemma Scope `params.npz` format, atomically."""
    path = Path(path)
    with atomic_path(path, suffix=".npz") as temporary:  # np.savez appends .npz to any other name
        np.savez(temporary, **{name: np.asarray(arrays[name], dtype=np.float32) for name in SAE_KEYS})
    return path


def random_sae_arrays(d_in: int, d_sae: int, seed: int) -> dict[str, np.ndarray]:
    """A random SAE with unit-norm decoder rows and an encoder tied to them (thresholds still zero)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    w_dec = rng.standard_normal((d_sae, d_in)).astype(np.float32)
    w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
    return {
        "W_enc": w_dec.T.copy(),
        "W_dec": w_dec,
        "b_enc": np.zeros(d_sae, np.float32),
        "b_dec": np.zeros(d_in, np.float32),
        "threshold": np.zeros(d_sae, np.float32),
    }


def calibrate_thresholds(
    arrays: dict[str, np.ndarray], activations: np.ndarray, target_l0: float
) -> dict[str, np.ndarray]:
    """Fits a random tied SAE (`random_sae_arrays`) to activations: centred inputs, thresholds for a target L0,
    and the encoder gain that reconstructs best.

    - `b_dec` is the activations' mean and `b_enc = -b_dec @ W_enc`, so the SAE reads `x - b_dec`;
    - each latent's threshold is set so that it fires on `target_l0 / d_sae` of the activations, so the mean L0
      over `activations` ([tokens, d_in], BOS and padding already removed) lands near `target_l0`;
    - the encoder (and thresholds) are scaled by the least-squares gain of the reconstruction, which changes no
      firing decision and keeps the decoder rows unit-norm.

    Thresholds are kept strictly positive, as JumpReLU requires.
    """
    x = activations.astype(np.float64)
    w_enc = arrays["W_enc"].astype(np.float64)
    b_dec = x.mean(axis=0)
    centred = x - b_dec
    pre = centred @ w_enc
    d_sae = pre.shape[1]
    fire_fraction = min(max(target_l0 / d_sae, 0.0), 1.0)
    thresholds = np.maximum(np.quantile(pre, 1.0 - fire_fraction, axis=0), 1e-3)
    reconstruction = np.where(pre > thresholds, pre, 0.0) @ arrays["W_dec"].astype(np.float64)
    energy = float(np.sum(reconstruction * reconstruction))
    gain = float(np.sum(centred * reconstruction)) / energy if energy > 0 else 1.0
    gain = gain if gain > 0 else 1.0
    return {
        **arrays,
        "W_enc": (gain * w_enc).astype(np.float32),
        "b_enc": (-gain * (b_dec @ w_enc)).astype(np.float32),
        "b_dec": b_dec.astype(np.float32),
        "threshold": (gain * thresholds).astype(np.float32),
    }
