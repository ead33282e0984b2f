"""Gemma Scope params.npz files are validated before use, written atomically, and synthetic ones calibrated."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from runner.errors import SAEError
from runner.sae.params import calibrate_thresholds, load_sae, random_sae_arrays, read_params_npz, write_params_npz


def write(tmp_path: Path, arrays: dict, name: str = "params.npz") -> Path:
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def valid_arrays(d_in: int = 8, d_sae: int = 32) -> dict[str, np.ndarray]:
    arrays = random_sae_arrays(d_in, d_sae, seed=0)
    arrays["threshold"] = np.full(d_sae, 0.1, np.float32)
    arrays["b_dec"] = np.linspace(-1, 1, d_in).astype(np.float32)
    return arrays


def test_round_trip_through_the_gemma_scope_file(tmp_path: Path) -> None:
    arrays = valid_arrays()
    path = write_params_npz(arrays, tmp_path / "layer_0/width_32/average_l0_5/params.npz")
    loaded = load_sae(path, sae_id="x", layer=0)
    assert loaded.sae.d_in == 8 and loaded.sae.d_sae == 32
    for name, array in loaded.sae.to_arrays().items():
        np.testing.assert_array_equal(array, arrays[name])


def test_decoder_rows_of_random_sae_are_unit_norm() -> None:
    norms = np.linalg.norm(random_sae_arrays(16, 64, seed=3)["W_dec"], axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-6)


def test_calibrated_thresholds_hit_the_requested_l0() -> None:
    activations = np.random.default_rng(0).standard_normal((2000, 16)).astype(np.float32)
    arrays = calibrate_thresholds(random_sae_arrays(16, 256, seed=0), activations, target_l0=20)
    pre = activations @ arrays["W_enc"] + arrays["b_enc"]
    mean_l0 = (pre > arrays["threshold"]).sum(axis=1).mean()
    assert abs(mean_l0 - 20) < 1.0
    assert np.all(arrays["threshold"] > 0)


def test_pickled_npz_is_refused(tmp_path: Path) -> None:
    arrays = valid_arrays()
    arrays["W_enc"] = np.array([{"evil": 1}], dtype=object)
    path = tmp_path / "params.npz"
    np.savez(path, **arrays)  # numpy pickles object arrays when saving
    with pytest.raises(SAEError, match="pickled objects"):
        read_params_npz(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: a.pop("threshold"), r"missing arrays \['threshold'\]"),
        (lambda a: a.update(W_dec=a["W_dec"][:, :7]), r"W_dec has shape \(32, 7\), expected \(32, 8\)"),
        (lambda a: a.update(b_enc=a["b_enc"].astype(np.int32)), "b_enc has dtype int32"),
        (lambda a: a["W_enc"].__setitem__((0, 0), np.nan), "W_enc has 1 non-finite values"),
        (lambda a: a["b_dec"].__setitem__(2, np.inf), "b_dec has 1 non-finite values"),
        (lambda a: a["threshold"].__setitem__(0, -1.0), "negative"),
    ],
)
def test_malformed_sae_file_is_named_with_its_problem(tmp_path: Path, change, message: str) -> None:
    arrays = valid_arrays()
    change(arrays)
    path = write(tmp_path, arrays)
    with pytest.raises(SAEError, match=message) as raised:
        read_params_npz(path)
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)


def test_width_mismatch_with_the_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SAEError, match="d_in is 8 but the model's residual stream width is 64"):
        read_params_npz(write(tmp_path, valid_arrays()), expected_d_in=64)


def test_missing_or_corrupt_file(tmp_path: Path) -> None:
    with pytest.raises(SAEError, match="not found"):
        read_params_npz(tmp_path / "nope.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(SAEError, match="not a readable npz"):
        read_params_npz(tmp_path / "bad.npz")
