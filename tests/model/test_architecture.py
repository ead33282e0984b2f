"""The Gemma2 architecture is read from tensor shapes alone, for real sizes and synthetic ones."""

from __future__ import annotations

import dataclasses

import pytest
from penzai.models.transformer.variants import gemma

from runner.errors import CheckpointError
from runner.model.architecture import PUBLISHED, Gemma2Architecture, published_architecture

#: Penzai's preset names of the published sizes.
REAL_SIZES = {name.replace("-", "_"): arch for name, arch in PUBLISHED.items()}


def shapes_of(arch: Gemma2Architecture) -> dict[str, dict[str, tuple[int, ...]]]:
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, leaf, shape in arch.expected_shapes():
        shapes.setdefault(key, {})[leaf] = shape
    return shapes


@pytest.mark.parametrize("preset", sorted(REAL_SIZES))
def test_real_checkpoint_shapes_give_exactly_penzais_preset(preset: str) -> None:
    inferred = Gemma2Architecture.from_shapes(shapes_of(REAL_SIZES[preset]))
    config = inferred.to_llamalike_config("bfloat16", "bfloat16")
    expected = gemma._GEMMA_PRESETS[preset]
    for field, value in expected.items():
        assert getattr(config, field) == value, field
    assert inferred.gating_is_d_by_f is not gemma._NEEDS_GATING_TRANSPOSE[preset]
    default_scale = config.query_scaling_factor
    assert default_scale == expected.get("query_scaling_factor", inferred.head_dim**-0.5)


def test_tiny_shapes_round_trip() -> None:
    tiny = Gemma2Architecture(4, 64, 4, 2, 16, 128, 512, gating_is_d_by_f=True, sliding_window=8)
    assert Gemma2Architecture.from_shapes(shapes_of(tiny), sliding_window=8) == tiny


def test_missing_tensor_is_named() -> None:
    shapes = shapes_of(REAL_SIZES["gemma2_2b"])
    del shapes["transformer/layer_0/attn/kv_einsum"]
    with pytest.raises(CheckpointError, match="layer_0/attn/kv_einsum"):
        Gemma2Architecture.from_shapes(shapes, source="ckpt")


def test_inconsistent_layer_shape_is_named() -> None:
    shapes = shapes_of(REAL_SIZES["gemma2_2b"])
    shapes["transformer/layer_7/mlp/linear"]["w"] = (9000, 2304)
    with pytest.raises(CheckpointError, match=r"layer_7/mlp/linear/w has shape \(9000, 2304\)"):
        Gemma2Architecture.from_shapes(shapes)


def test_published_sizes_are_known_by_kaggle_variant_and_hugging_face_repo() -> None:
    assert published_architecture("gemma2-9b-it") == PUBLISHED["gemma2-9b"]
    hugging_face_2b = dataclasses.replace(PUBLISHED["gemma2-2b"], vocab_size=256_000)
    assert published_architecture("google/gemma-2-2b") == hugging_face_2b
    assert published_architecture("google/gemma-2-27b-it").num_layers == 46
    assert published_architecture("someone/other-model") is None
