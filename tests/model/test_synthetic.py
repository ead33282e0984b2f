"""Specification of runner.synthetic: random Gemma2 checkpoints in the exact Kaggle/Flax on-disk layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from runner.errors import CheckpointError
from runner.model.architecture import PUBLISHED, Gemma2Architecture
from runner.model.synthetic import (
    MARKER_FILE_NAME,
    PRESETS,
    SYNTHETIC_PRESETS,
    find_checkpoint_dir,
    synthetic_architecture,
    synthetic_flat_params,
    synthetic_tensors,
    write_kaggle_checkpoint,
    write_synthetic_model,
    write_synthetic_tokenizer,
)
from runner.model.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def tiny_model(models_dir: Path) -> Path:
    return write_synthetic_model(models_dir / "tiny-seed0", "tiny", seed=0)


def restore(checkpoint_dir: Path) -> dict:
    return ocp.PyTreeCheckpointer().restore(checkpoint_dir)


def metadata_shapes(checkpoint_dir: Path) -> dict[str, dict[str, tuple[int, ...]]]:
    tree = ocp.PyTreeCheckpointer().metadata(checkpoint_dir).item_metadata.tree
    return {key: {leaf: tuple(meta.shape) for leaf, meta in leaves.items()} for key, leaves in tree.items()}


def array_bytes(flat: dict) -> dict[tuple[str, str], bytes]:
    return {(key, leaf): np.asarray(array).tobytes() for key, leaves in flat.items() for leaf, array in leaves.items()}


def test_presets_are_the_documented_sizes():
    tiny, small = SYNTHETIC_PRESETS["tiny"], SYNTHETIC_PRESETS["small"]
    assert (tiny.num_layers, tiny.embedding_dim, tiny.num_query_heads, tiny.num_kv_heads) == (4, 64, 4, 2)
    assert (tiny.head_dim, tiny.mlp_hidden_dim, tiny.vocab_size, tiny.sliding_window) == (16, 128, 512, 8)
    assert (small.num_layers, small.embedding_dim, small.num_query_heads, small.num_kv_heads) == (4, 256, 4, 2)
    assert (small.head_dim, small.mlp_hidden_dim, small.vocab_size, small.sliding_window) == (64, 1024, 4096, 32)
    assert tiny.gating_is_d_by_f and small.gating_is_d_by_f


#: The presets small enough to write in a test (the published sizes are rehearsed by `runner synth` and the bench).
SMALL_PRESETS = ("tiny", "small")


@pytest.mark.parametrize("preset", SMALL_PRESETS)
def test_flat_params_have_the_presets_keys_shapes_and_fp32(preset: str):
    arch = SYNTHETIC_PRESETS[preset]
    flat = synthetic_flat_params(arch, seed=0)
    found = [(key, leaf, array.shape) for key, leaves in flat.items() for leaf, array in leaves.items()]
    assert sorted(found) == sorted(arch.expected_shapes())
    assert all(array.dtype == np.float32 for leaves in flat.values() for array in leaves.values())


def test_flat_params_are_scaled_for_order_one_activations():
    arch = SYNTHETIC_PRESETS["tiny"]
    flat = synthetic_flat_params(arch, seed=0)
    q = flat["transformer/layer_0/attn/q_einsum"]["w"]
    assert q.std() == pytest.approx(arch.embedding_dim**-0.5, rel=0.1)
    assert abs(flat["transformer/layer_0/pre_attention_norm"]["scale"]).mean() < 0.2


def test_flat_params_depend_only_on_the_seed():
    arch = SYNTHETIC_PRESETS["tiny"]
    assert array_bytes(synthetic_flat_params(arch, 3)) == array_bytes(synthetic_flat_params(arch, 3))
    assert array_bytes(synthetic_flat_params(arch, 3)) != array_bytes(synthetic_flat_params(arch, 4))


def test_orbax_keeps_slash_keys_flat_like_kaggle_checkpoints(tmp_path: Path):
    flat = {
        "transformer/layer_0/attn/q_einsum": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)},
        "transformer/embedder": {"input_embedding": np.ones((4, 2), np.float32)},
    }
    write_kaggle_checkpoint(flat, tmp_path / "checkpoint")
    restored = restore(tmp_path / "checkpoint")
    assert set(restored) == {"transformer/layer_0/attn/q_einsum", "transformer/embedder"}
    assert array_bytes(restored) == array_bytes(flat)


def test_model_directory_has_the_kaggle_layout(tiny_model: Path):
    assert sorted(path.name for path in tiny_model.iterdir()) == [MARKER_FILE_NAME, "synthetic-tiny", "tokenizer.model"]
    assert find_checkpoint_dir(tiny_model) == tiny_model / "synthetic-tiny"


def test_restored_checkpoint_equals_the_flat_params(tiny_model: Path):
    restored = restore(tiny_model / "synthetic-tiny")
    assert array_bytes(restored) == array_bytes(synthetic_flat_params(SYNTHETIC_PRESETS["tiny"], seed=0))


@pytest.mark.parametrize("preset", SMALL_PRESETS)
def test_architecture_from_orbax_metadata_is_the_preset(models_dir: Path, preset: str):
    model_dir = write_synthetic_model(models_dir / f"{preset}-seed0", preset, seed=0)
    arch = SYNTHETIC_PRESETS[preset]
    shapes = metadata_shapes(find_checkpoint_dir(model_dir))
    assert Gemma2Architecture.from_shapes(shapes, sliding_window=arch.sliding_window) == arch
    assert synthetic_architecture(model_dir) == arch


def test_tokenizer_vocabulary_matches_the_embedding_rows(tiny_model: Path):
    assert load_tokenizer(tiny_model / "tokenizer.model").vocab_size == SYNTHETIC_PRESETS["tiny"].vocab_size


def test_same_seed_gives_the_same_arrays_and_tokenizer_bytes(models_dir: Path, tiny_model: Path):
    again = write_synthetic_model(models_dir / "tiny-seed0-again", "tiny", seed=0)
    assert array_bytes(restore(again / "synthetic-tiny")) == array_bytes(restore(tiny_model / "synthetic-tiny"))
    assert (again / "tokenizer.model").read_bytes() == (tiny_model / "tokenizer.model").read_bytes()
    assert (again / MARKER_FILE_NAME).read_bytes() == (tiny_model / MARKER_FILE_NAME).read_bytes()


def test_different_seed_gives_different_arrays(models_dir: Path, tiny_model: Path):
    other = write_synthetic_model(models_dir / "tiny-seed1", "tiny", seed=1)
    assert array_bytes(restore(other / "synthetic-tiny")) != array_bytes(restore(tiny_model / "synthetic-tiny"))


def test_an_existing_model_for_the_same_preset_and_seed_is_reused(tiny_model: Path):
    before = (tiny_model / "tokenizer.model").stat().st_mtime_ns
    assert write_synthetic_model(tiny_model, "tiny", seed=0) == tiny_model
    assert (tiny_model / "tokenizer.model").stat().st_mtime_ns == before


def test_a_directory_holding_another_model_is_not_overwritten(tiny_model: Path):
    with pytest.raises(CheckpointError, match="'tiny' seed 0"):
        write_synthetic_model(tiny_model, "tiny", seed=7)
    assert json.loads((tiny_model / MARKER_FILE_NAME).read_text())["seed"] == 0


def test_writing_leaves_no_temporary_directories(models_dir: Path, tiny_model: Path):
    assert not [path.name for path in models_dir.iterdir() if path.name.startswith(".")]


def test_unknown_preset_is_refused(tmp_path: Path):
    with pytest.raises(CheckpointError, match="huge"):
        write_synthetic_model(tmp_path / "model", "huge")


def test_find_checkpoint_dir_requires_the_directory(tmp_path: Path):
    with pytest.raises(CheckpointError, match="missing-model"):
        find_checkpoint_dir(tmp_path / "missing-model")


def test_find_checkpoint_dir_requires_tokenizer_model(tmp_path: Path):
    (tmp_path / "gemma2-2b").mkdir()
    (tmp_path / "gemma2-2b" / "_METADATA").write_text("{}")
    with pytest.raises(CheckpointError, match=f"{tmp_path}.*tokenizer.model"):
        find_checkpoint_dir(tmp_path)


def test_find_checkpoint_dir_requires_a_checkpoint(tmp_path: Path):
    (tmp_path / "tokenizer.model").write_bytes(b"")
    (tmp_path / "notes").mkdir()
    with pytest.raises(CheckpointError, match=f"{tmp_path}.*no orbax checkpoint"):
        find_checkpoint_dir(tmp_path)


def test_find_checkpoint_dir_refuses_several_checkpoints(tmp_path: Path):
    (tmp_path / "tokenizer.model").write_bytes(b"")
    for name in ("gemma2-2b", "gemma2-9b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "checkpoint").write_bytes(b"")
    with pytest.raises(CheckpointError, match="gemma2-2b, gemma2-9b"):
        find_checkpoint_dir(tmp_path)


@pytest.mark.parametrize("preset", ["gemma2-2b", "gemma2-9b", "gemma2-27b"])
def test_the_published_presets_have_the_published_shapes_in_bfloat16_and_a_gemma_sized_tokenizer(preset: str):
    spec = PRESETS[preset]
    assert spec.architecture == PUBLISHED[preset] and spec.architecture.vocab_size == 256_128
    assert (spec.dtype, spec.tokenizer_pieces, spec.sae_width) == ("bfloat16", 256_000, "16k")
    assert all(0 <= layer < spec.architecture.num_layers for layer in spec.sae_layers)


def test_bfloat16_weights_are_the_float32_draws_rounded_and_drawn_a_block_at_a_time(monkeypatch):
    import ml_dtypes

    from runner.model import synthetic

    monkeypatch.setattr(synthetic, "_DRAW_BLOCK_ELEMENTS", 1_000)  # many blocks even for the tiny tensors
    arch = SYNTHETIC_PRESETS["tiny"]
    full = synthetic_flat_params(arch, seed=2)
    streamed = {(key, leaf): values for key, leaf, values in synthetic_tensors(arch, seed=2, dtype="bfloat16")}
    assert set(streamed) == {(key, leaf) for key, leaves in full.items() for leaf in leaves}
    for (key, leaf), values in streamed.items():
        assert values.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(values, full[key][leaf].astype(ml_dtypes.bfloat16))


def test_the_published_presets_tokenizer_leaves_the_padded_rows_without_a_piece(tmp_path: Path):
    path = write_synthetic_tokenizer(PRESETS["gemma2-2b"], tmp_path / "tokenizer.model")
    tokenizer = load_tokenizer(path)
    assert tokenizer.vocab_size == 256_000 < PRESETS["gemma2-2b"].architecture.vocab_size
    assert max(tokenizer.encode("The most iconic structure on Earth is")) < 16_384, "trained pieces for text"


def test_a_preset_written_by_an_earlier_generator_is_replaced_not_refused(tmp_path) -> None:
    out = write_synthetic_model(tmp_path / "tiny", "tiny", 0)
    current = json.loads((out / MARKER_FILE_NAME).read_text())
    (out / MARKER_FILE_NAME).write_text(json.dumps({**current, "version": -1}))  # an older runner's model
    write_synthetic_model(out, "tiny", 0)
    assert json.loads((out / MARKER_FILE_NAME).read_text()) == current, "rewritten by this generator"
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already holds other files"):
        write_synthetic_model(other, "tiny", 0)


def test_a_bfloat16_model_written_tensor_by_tensor_through_files_restores_its_bfloat16_draws(tmp_path, monkeypatch):
    """The path the published presets take (too large to draw in memory): each tensor goes through a .npy file,
    whose header records bfloat16 as raw 2-byte records; the checkpoint must still hold bfloat16 values."""
    import dataclasses

    import ml_dtypes

    from runner.model import synthetic

    monkeypatch.setattr(synthetic, "_IN_MEMORY_BYTES", 0)
    monkeypatch.setitem(synthetic.PRESETS, "tiny-bf16", dataclasses.replace(PRESETS["tiny"], dtype="bfloat16"))
    out = write_synthetic_model(tmp_path / "tiny-bf16", "tiny-bf16", seed=1)
    restored = restore(find_checkpoint_dir(out))
    expected = synthetic_flat_params(SYNTHETIC_PRESETS["tiny"], seed=1, dtype="bfloat16")
    assert set(restored) == set(expected)
    for key, leaves in expected.items():
        for leaf, values in leaves.items():
            assert restored[key][leaf].dtype == ml_dtypes.bfloat16, (key, leaf)
            np.testing.assert_array_equal(restored[key][leaf], values)
    assert not (out / ".tensors").exists()
