"""Specification of runner.hf_format: Gemma2 Hugging Face checkpoints <-> the flat Kaggle/Flax layout."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import huggingface_hub
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from runner.errors import CheckpointError
from runner.model.architecture import Gemma2Architecture
from runner.model.hf_format import (
    DOWNLOAD_PATTERNS,
    flat_to_hf_tensors,
    read_hf_checkpoint,
    resolve_hf_checkpoint,
    write_hf_checkpoint,
)
from runner.model.synthetic import SYNTHETIC_PRESETS, synthetic_flat_params

ARCH = SYNTHETIC_PRESETS["tiny"]
N, K, H, D, F = ARCH.num_query_heads, ARCH.num_kv_heads, ARCH.head_dim, ARCH.embedding_dim, ARCH.mlp_hidden_dim


@pytest.fixture(scope="module")
def flat() -> dict[str, dict[str, np.ndarray]]:
    return synthetic_flat_params(ARCH, seed=0)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory, flat) -> Path:
    return write_hf_checkpoint(flat, ARCH, tmp_path_factory.mktemp("hf") / "single")


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory: pytest.TempPathFactory, flat) -> Path:
    return write_hf_checkpoint(flat, ARCH, tmp_path_factory.mktemp("hf") / "sharded", max_shard_bytes=200_000)


@pytest.fixture(scope="module")
def hf_tensors(hf_dir: Path) -> dict[str, np.ndarray]:
    return load_file(str(hf_dir / "model.safetensors"))


def assert_flat_equal(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key, leaves in expected.items():
        assert actual[key].keys() == leaves.keys(), key
        for leaf, array in leaves.items():
            assert actual[key][leaf].dtype == array.dtype, (key, leaf)
            np.testing.assert_array_equal(actual[key][leaf], array, err_msg=f"{key}/{leaf}")


def copy_checkpoint(source: Path, target: Path) -> Path:
    target.mkdir()
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


# ------------------------------------------------------------------------------------------ round trips


def test_flat_to_hf_to_flat_is_exact(hf_dir: Path, flat):
    restored, _ = read_hf_checkpoint(hf_dir)
    assert_flat_equal(restored, flat)


def test_sharded_round_trip_is_exact_and_has_an_index(sharded_dir: Path, flat):
    index = json.loads((sharded_dir / "model.safetensors.index.json").read_text())
    shard_names = sorted(set(index["weight_map"].values()))
    assert len(shard_names) > 1
    assert shard_names[0] == f"model-00001-of-{len(shard_names):05d}.safetensors"
    assert all((sharded_dir / name).stat().st_size <= 200_000 + 10_000 for name in shard_names)
    assert not (sharded_dir / "model.safetensors").exists()
    restored, _ = read_hf_checkpoint(sharded_dir)
    assert_flat_equal(restored, flat)


def test_bfloat16_round_trips_through_ml_dtypes(tmp_path: Path, flat):
    bf16 = {key: {leaf: a.astype(ml_dtypes.bfloat16) for leaf, a in leaves.items()} for key, leaves in flat.items()}
    out_dir = write_hf_checkpoint(bf16, ARCH, tmp_path / "bf16")
    assert json.loads((out_dir / "config.json").read_text())["torch_dtype"] == "bfloat16"
    restored, _ = read_hf_checkpoint(out_dir)
    assert_flat_equal(restored, bf16)


def test_gating_comes_back_d_by_f_from_an_f_by_d_checkpoint(tmp_path: Path, flat):
    f_by_d = dataclasses.replace(ARCH, gating_is_d_by_f=False)
    transposed = {key: dict(leaves) for key, leaves in flat.items()}
    for i in range(ARCH.num_layers):
        gating = flat[f"transformer/layer_{i}/mlp/gating_einsum"]["w"]
        transposed[f"transformer/layer_{i}/mlp/gating_einsum"] = {"w": gating.transpose(0, 2, 1)}
    restored, _ = read_hf_checkpoint(write_hf_checkpoint(transposed, f_by_d, tmp_path / "f_by_d"))
    assert_flat_equal(restored, flat)


# ------------------------------------------------------------------------------- transformers conventions


def test_tensor_names_and_shapes_are_transformers_gemma2(hf_tensors):
    expected = {"model.embed_tokens.weight": (ARCH.vocab_size, D), "model.norm.weight": (D,)}
    for i in range(ARCH.num_layers):
        layer = f"model.layers.{i}"
        expected |= {
            f"{layer}.self_attn.q_proj.weight": (N * H, D),
            f"{layer}.self_attn.k_proj.weight": (K * H, D),
            f"{layer}.self_attn.v_proj.weight": (K * H, D),
            f"{layer}.self_attn.o_proj.weight": (D, N * H),
            f"{layer}.mlp.gate_proj.weight": (F, D),
            f"{layer}.mlp.up_proj.weight": (F, D),
            f"{layer}.mlp.down_proj.weight": (D, F),
        }
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            expected[f"{layer}.{norm}.weight"] = (D,)
    assert {name: tensor.shape for name, tensor in hf_tensors.items()} == expected


def test_query_projection_matches_flax_einsum(flat, hf_tensors):
    x = np.random.default_rng(0).standard_normal(D).astype(np.float32)
    flax_q = np.einsum("d,ndh->nh", x, flat["transformer/layer_1/attn/q_einsum"]["w"])
    hf_q = (hf_tensors["model.layers.1.self_attn.q_proj.weight"] @ x).reshape(N, H)  # view(..., -1, head_dim)
    np.testing.assert_allclose(hf_q, flax_q, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("kv_index", "hf_name"), [(0, "k_proj"), (1, "v_proj")])
def test_key_and_value_projections_match_flax_einsum(flat, hf_tensors, kv_index: int, hf_name: str):
    x = np.random.default_rng(1).standard_normal(D).astype(np.float32)
    flax_kv = np.einsum("d,kdh->kh", x, flat["transformer/layer_2/attn/kv_einsum"]["w"][kv_index])
    hf_kv = (hf_tensors[f"model.layers.2.self_attn.{hf_name}.weight"] @ x).reshape(K, H)
    np.testing.assert_allclose(hf_kv, flax_kv, rtol=1e-5, atol=1e-5)


def test_output_projection_matches_flax_einsum(flat, hf_tensors):
    per_head = np.random.default_rng(2).standard_normal((N, H)).astype(np.float32)
    flax_out = np.einsum("nh,nhd->d", per_head, flat["transformer/layer_0/attn/attn_vec_einsum"]["w"])
    hf_out = hf_tensors["model.layers.0.self_attn.o_proj.weight"] @ per_head.reshape(N * H)
    np.testing.assert_allclose(hf_out, flax_out, rtol=1e-5, atol=1e-5)


def test_mlp_matches_flax_gated_mlp(flat, hf_tensors):
    x = np.random.default_rng(3).standard_normal(D).astype(np.float32)
    gating = flat["transformer/layer_3/mlp/gating_einsum"]["w"]
    flax_hidden = np.tanh(x @ gating[0]) * (x @ gating[1])  # any activation: only the wiring is checked
    flax_out = flax_hidden @ flat["transformer/layer_3/mlp/linear"]["w"]
    mlp = "model.layers.3.mlp"
    hf_hidden = np.tanh(hf_tensors[f"{mlp}.gate_proj.weight"] @ x) * (hf_tensors[f"{mlp}.up_proj.weight"] @ x)
    hf_out = hf_tensors[f"{mlp}.down_proj.weight"] @ hf_hidden
    np.testing.assert_allclose(hf_out, flax_out, rtol=1e-4, atol=1e-5)


def test_norm_weights_carry_over_unchanged(flat, hf_tensors):
    np.testing.assert_array_equal(
        hf_tensors["model.layers.0.pre_feedforward_layernorm.weight"], flat["transformer/layer_0/pre_ffw_norm"]["scale"]
    )
    np.testing.assert_array_equal(hf_tensors["model.norm.weight"], flat["transformer/final_norm"]["scale"])


def test_safetensors_declare_the_pt_format(hf_dir: Path):
    from safetensors import safe_open

    with safe_open(str(hf_dir / "model.safetensors"), framework="numpy") as handle:
        assert handle.metadata() == {"format": "pt"}


def test_flat_to_hf_tensors_is_what_is_written(flat, hf_tensors):
    in_memory = flat_to_hf_tensors(flat, ARCH)
    assert in_memory.keys() == hf_tensors.keys()
    assert all(np.array_equal(in_memory[name], hf_tensors[name]) for name in hf_tensors)


# ------------------------------------------------------------------------------------------- config.json


def test_config_is_a_gemma2_config(hf_dir: Path):
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["architectures"] == ["Gemma2ForCausalLM"]
    assert config["model_type"] == "gemma2"
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (D, F, 4)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (N, K, H)
    assert (config["vocab_size"], config["sliding_window"], config["query_pre_attn_scalar"]) == (512, 8, 16.0)
    assert (config["pad_token_id"], config["eos_token_id"], config["bos_token_id"]) == (0, 1, 2)
    assert config["hidden_activation"] == "gelu_pytorch_tanh"
    assert config["torch_dtype"] == "float32"


def test_overrides_are_architecture_fields_and_rebuild_the_architecture(hf_dir: Path, flat):
    restored, overrides = read_hf_checkpoint(hf_dir)
    assert overrides == {
        "sliding_window": 8,
        "query_pre_attn_scalar": 16.0,
        "final_logit_softcap": 30.0,
        "attn_logits_soft_cap": 50.0,
        "rms_norm_eps": 1e-6,
        "rope_wavelength": 10_000.0,
    }
    shapes = {key: {leaf: a.shape for leaf, a in leaves.items()} for key, leaves in restored.items()}
    inferred = Gemma2Architecture.from_shapes(shapes)
    assert dataclasses.replace(inferred, **overrides) == dataclasses.replace(ARCH, query_pre_attn_scalar=16.0)


def test_transformers_5_rope_parameters_are_accepted(tmp_path: Path, hf_dir: Path):
    directory = copy_checkpoint(hf_dir, tmp_path / "v5")
    edit_config(directory, rope_theta=None, rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
    _, overrides = read_hf_checkpoint(directory)
    assert overrides["rope_wavelength"] == 5000.0


def test_null_soft_caps_mean_no_cap_and_other_nulls_mean_default(tmp_path: Path, hf_dir: Path):
    directory = copy_checkpoint(hf_dir, tmp_path / "nulls")
    edit_config(directory, final_logit_softcapping=None, sliding_window=None, query_pre_attn_scalar=None)
    _, overrides = read_hf_checkpoint(directory)
    assert overrides["final_logit_softcap"] is None
    assert "sliding_window" not in overrides and "query_pre_attn_scalar" not in overrides


# ------------------------------------------------------------------------------------------------ errors


def test_missing_config_is_reported(tmp_path: Path, hf_dir: Path):
    directory = copy_checkpoint(hf_dir, tmp_path / "no-config")
    (directory / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no-config.*config.json"):
        read_hf_checkpoint(directory)


def test_wrong_model_type_is_reported(tmp_path: Path, hf_dir: Path):
    directory = copy_checkpoint(hf_dir, tmp_path / "llama")
    edit_config(directory, model_type="llama")
    with pytest.raises(CheckpointError, match="model_type is 'llama'"):
        read_hf_checkpoint(directory)


def test_missing_tensor_is_named(tmp_path: Path, hf_dir: Path, hf_tensors):
    directory = copy_checkpoint(hf_dir, tmp_path / "partial")
    partial = {name: t for name, t in hf_tensors.items() if name != "model.layers.2.mlp.up_proj.weight"}
    save_file(partial, str(directory / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing tensor model.layers.2.mlp.up_proj.weight"):
        read_hf_checkpoint(directory)


def test_missing_shard_is_named(tmp_path: Path, sharded_dir: Path):
    directory = copy_checkpoint(sharded_dir, tmp_path / "lost-shard")
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    lost = index["weight_map"]["model.layers.0.self_attn.q_proj.weight"]
    (directory / lost).unlink()
    with pytest.raises(CheckpointError, match=f"missing file {lost}"):
        read_hf_checkpoint(directory)


def test_wrong_shape_is_reported(tmp_path: Path, hf_dir: Path, hf_tensors):
    directory = copy_checkpoint(hf_dir, tmp_path / "bad-shape")
    edit_config(directory, num_attention_heads=8)
    with pytest.raises(CheckpointError, match=r"q_proj.weight has shape \[64, 64\], expected \[128, 64\]"):
        read_hf_checkpoint(directory)


def test_layer_types_other_than_gemma2s_alternation_are_refused(tmp_path: Path, hf_dir: Path):
    directory = copy_checkpoint(hf_dir, tmp_path / "all-global")
    edit_config(directory, layer_types=["full_attention"] * 4)
    with pytest.raises(CheckpointError, match="layer_types"):
        read_hf_checkpoint(directory)


# ------------------------------------------------------------------------------------------- resolving


def test_a_local_directory_is_used_as_is(hf_dir: Path):
    assert resolve_hf_checkpoint("google/gemma-2-2b", hf_dir) == hf_dir


def test_a_missing_local_directory_is_reported(tmp_path: Path):
    with pytest.raises(CheckpointError, match="nowhere"):
        resolve_hf_checkpoint(None, tmp_path / "nowhere")


def test_a_repo_id_is_downloaded_with_only_weights_config_and_tokenizer(tmp_path: Path, monkeypatch):
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert resolve_hf_checkpoint("google/gemma-2-2b", None) == tmp_path
    assert calls == [("google/gemma-2-2b", {"allow_patterns": DOWNLOAD_PATTERNS})]
    assert set(DOWNLOAD_PATTERNS) == {"*.json", "*.safetensors", "tokenizer.model"}


def test_neither_repo_nor_directory_is_reported():
    with pytest.raises(CheckpointError, match="repo id"):
        resolve_hf_checkpoint(None, None)
