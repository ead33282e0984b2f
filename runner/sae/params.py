"""Gemma Scope `params.npz` files: validated reading (never unpickling), atomic writing, and random or calibrated
synthetic SAE arrays. The layer they load into is `runner.nn.jumprelu.JumpReLUSAE`.
"""

from __future__ import annotations

import dataclasses
import zipfile
from pathlib import Path

import numpy as np

from runner.errors import SAEError
from runner.files import atomic_path
from runner.nn.jumprelu import JumpReLUSAE

SAE_KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")


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
