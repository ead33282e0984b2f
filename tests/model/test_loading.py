"""Loading Gemma2 into Penzai: every source ends as the same model; sharding does not change the numbers."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz

from runner.config.schema import HuggingFaceModelConfig, KaggleModelConfig, LocalModelConfig
from runner.errors import CheckpointError
from runner.model import hf_format, synthetic
from runner.model import tokenizer as tokenizer_lib
from runner.model.loading import (
    abstract_gemma2,
    build_gemma2,
    held_parameter_dtype,
    load_model,
    make_host_mesh,
    read_architecture,
    resolve_model_location,
    stored_dtype,
)
from runner.steering.sampler import SteeringSampler
from tests.steering.test_sampler import PROBES, make_batch


@pytest.fixture(scope="module")
def tokens(tiny_model) -> pz.nx.NamedArray:
    ids = [tokenizer_lib.encode_prompt(tiny_model.tokenizer, text) for text in ("The river ran", "Once upon a ti")]
    length = max(map(len, ids))
    return pz.nx.wrap(jnp.asarray([i + [5] * (length - len(i)) for i in ids], jnp.int32)).tag("batch", "seq")


def logits_of(loaded, tokens) -> np.ndarray:
    return np.asarray(loaded.model(tokens).unwrap("batch", "seq", "vocabulary"))


def test_synthetic_local_model_is_the_preset_in_fp32(tiny_model) -> None:
    assert tiny_model.architecture == dataclasses.replace(synthetic.SYNTHETIC_PRESETS["tiny"], sliding_window=8)
    params = pz.unbind_params(tiny_model.model)[1]
    assert {p.value.dtype for p in params} == {jnp.dtype(jnp.float32)}


def test_weights_are_the_checkpoints(tiny_model) -> None:
    flat = synthetic.synthetic_flat_params(tiny_model.architecture, seed=0)
    embeddings = pz.select(tiny_model.model).at_instances_of(pz.Parameter).where(
        lambda p: p.label.endswith("embedder.embeddings")
    ).get_sequence()[0]  # tied: the lookup and the decoder share this parameter
    np.testing.assert_array_equal(
        embeddings.value.unwrap("vocabulary", "embedding"), flat["transformer/embedder"]["input_embedding"]
    )


def test_huggingface_and_kaggle_checkpoints_of_the_same_weights_give_the_same_logits(
    tiny_model, tiny_model_dir, tmp_path, tokens, cache_dir
) -> None:
    flat = synthetic.synthetic_flat_params(tiny_model.architecture, seed=0)
    hf_dir = hf_format.write_hf_checkpoint(flat, tiny_model.architecture, tmp_path / "hf", max_shard_bytes=200_000)
    (hf_dir / "tokenizer.model").write_bytes((tiny_model_dir / "tokenizer.model").read_bytes())
    from_hf = load_model(HuggingFaceModelConfig(path=hf_dir, dtype="float32"), cache_dir=cache_dir)
    # config.json states the query scalar that the Kaggle layout leaves implicit (head_dim); both scale alike.
    assert from_hf.architecture.query_scaling_factor == tiny_model.architecture.query_scaling_factor
    assert dataclasses.replace(from_hf.architecture, query_pre_attn_scalar=None) == tiny_model.architecture
    np.testing.assert_allclose(logits_of(from_hf, tokens), logits_of(tiny_model, tokens), rtol=1e-5, atol=1e-5)


def test_sharded_and_unsharded_logits_agree(tiny_model_dir, tiny_model, tokens, cache_dir) -> None:
    mesh = make_host_mesh(jax.devices()[:4])
    sharded = load_model(LocalModelConfig(path=tiny_model_dir), cache_dir=cache_dir, mesh=mesh)
    mlp = pz.select(sharded.model).at_instances_of(pz.Parameter).where(lambda p: "out_linear" in p.label).get_sequence()
    assert len(mlp[0].value.data_array.sharding.device_set) == 4  # really split over the 4 devices
    np.testing.assert_allclose(logits_of(sharded, tokens), logits_of(tiny_model, tokens), rtol=1e-5, atol=1e-5)


def test_sampler_on_the_sharded_model_gives_the_same_greedy_tokens(
    tiny_model_dir, tiny_model, tiny_saes, cache_dir
) -> None:
    mesh = make_host_mesh(jax.devices()[:4])
    sharded = load_model(LocalModelConfig(path=tiny_model_dir), cache_dir=cache_dir, mesh=mesh)
    prompt = tokenizer_lib.encode_prompt(tiny_model.tokenizer, "The most iconic structure on Earth is")
    rows = [{"tokens": prompt, "layer": 2, "feature": 7, "value": 20.0}, {"tokens": prompt}]
    outputs = [
        SteeringSampler(
            loaded.model, tiny_saes, batch_size=2, prompt_len=32, max_new_tokens=8, eos_id=-1, num_probes=len(PROBES)
        )(make_batch(rows, 32))
        for loaded in (sharded, tiny_model)
    ]
    np.testing.assert_array_equal(outputs[0].tokens, outputs[1].tokens)


def real_like_directory(tiny_model_dir, directory, checkpoint=None):
    """A Kaggle-layout directory without the synthetic marker: the tiny model's tokenizer and `checkpoint` (the
    tiny checkpoint itself by default)."""
    directory.mkdir()
    (directory / "tokenizer.model").write_bytes((tiny_model_dir / "tokenizer.model").read_bytes())
    if checkpoint is None:
        source = synthetic.find_checkpoint_dir(tiny_model_dir)
        (directory / source.name).symlink_to(source, target_is_directory=True)
    else:
        synthetic.write_kaggle_checkpoint(checkpoint, directory / "gemma2-tiny")
    return directory


def test_dtype_auto_is_the_checkpoints_stored_dtype(tiny_model_dir, tmp_path, cache_dir) -> None:
    float32 = load_model(LocalModelConfig(path=real_like_directory(tiny_model_dir, tmp_path / "f32")),
                         cache_dir=cache_dir)
    assert (float32.dtype, float32.held_dtype) == ("float32", "float32")
    assert {p.value.dtype for p in pz.unbind_params(float32.model)[1]} == {jnp.dtype(jnp.float32)}
    assert float32.architecture.sliding_window == 4096  # no synthetic marker: the Gemma2 value

    stored = synthetic.synthetic_flat_params(float32.architecture, seed=0, dtype="bfloat16")
    directory = real_like_directory(tiny_model_dir, tmp_path / "bf16", checkpoint=stored)
    assert stored_dtype(resolve_model_location(LocalModelConfig(path=directory), cache_dir)) == "bfloat16"
    bfloat16 = load_model(LocalModelConfig(path=directory), cache_dir=cache_dir)
    assert bfloat16.dtype == "bfloat16"
    # On CPU the bfloat16 weights are held in float32 (the same values), and so are the activations.
    assert bfloat16.held_dtype == "float32" and bfloat16.model.metadata.activation_dtype == jnp.float32
    embedding = pz.select(bfloat16.model).at_instances_of(pz.Parameter).where(
        lambda p: p.label.endswith("embedder.embeddings")).get_sequence()[0].value.unwrap("vocabulary", "embedding")
    np.testing.assert_array_equal(
        np.asarray(embedding), stored["transformer/embedder"]["input_embedding"].astype(np.float32)
    )


def test_bfloat16_stays_bfloat16_where_the_device_computes_in_it() -> None:
    assert held_parameter_dtype("bfloat16", "tpu") == "bfloat16"
    assert held_parameter_dtype("bfloat16", "gpu") == "bfloat16"
    assert held_parameter_dtype("bfloat16", "cpu") == "float32"
    assert held_parameter_dtype("float32", "cpu") == "float32"


def test_a_float32_huggingface_checkpoint_loads_in_float32_under_dtype_auto(
    tiny_model, tiny_model_dir, tmp_path, tokens, cache_dir
) -> None:
    flat = synthetic.synthetic_flat_params(tiny_model.architecture, seed=0)
    hf_dir = hf_format.write_hf_checkpoint(flat, tiny_model.architecture, tmp_path / "hf")
    (hf_dir / "tokenizer.model").write_bytes((tiny_model_dir / "tokenizer.model").read_bytes())
    loaded = load_model(HuggingFaceModelConfig(path=hf_dir), cache_dir=cache_dir)
    assert loaded.dtype == "float32"
    np.testing.assert_allclose(logits_of(loaded, tokens), logits_of(tiny_model, tokens), rtol=1e-5, atol=1e-5)


def test_activations_can_be_upcast(tiny_model_dir, tmp_path, cache_dir) -> None:
    loaded = load_model(LocalModelConfig(path=real_like_directory(tiny_model_dir, tmp_path / "m"), dtype="bfloat16",
                                         upcast_activations=True), cache_dir=cache_dir)
    assert loaded.model.metadata.activation_dtype == jnp.float32


def test_loading_holds_the_checkpoint_once(tiny_model_dir, tmp_path) -> None:
    """`build_gemma2(consume=True)` takes each tensor out of the restored dict as it converts it."""
    arch = synthetic.SYNTHETIC_PRESETS["tiny"]
    flat = synthetic.synthetic_flat_params(arch, seed=0, dtype="bfloat16")
    model = build_gemma2(flat, arch, parameter_dtype=jnp.float32, consume=True)
    assert all(not leaves for leaves in flat.values()), "every tensor was handed over"
    assert {p.value.dtype for p in pz.unbind_params(model)[1]} == {jnp.dtype(jnp.float32)}
    kept = synthetic.synthetic_flat_params(arch, seed=0)
    build_gemma2(kept, arch)
    assert all(leaves for leaves in kept.values()), "without consume the caller's dict is left alone"


def test_an_abstract_model_has_the_real_ones_parameters_without_memory(tiny_model) -> None:
    abstract = abstract_gemma2(tiny_model.architecture, jnp.float32)
    real = {p.label: p.value for p in pz.unbind_params(tiny_model.model)[1]}
    values = pz.select(abstract).at_instances_of(pz.ParameterValue).get_sequence()
    assert {v.label for v in values} == set(real)
    for value in values:
        assert value.value.named_shape == real[value.label].named_shape
        assert isinstance(value.value.data_array, jax.ShapeDtypeStruct)


def test_kaggle_source_downloads_through_kagglehub(monkeypatch, tiny_model_dir, cache_dir) -> None:
    """The real download call is made (kagglehub itself is replaced: nothing can be downloaded here)."""
    import kagglehub

    asked = []

    def model_download(handle: str) -> str:
        asked.append(handle)
        return str(tiny_model_dir)

    monkeypatch.setattr(kagglehub, "model_download", model_download)
    location = resolve_model_location(KaggleModelConfig(variant="gemma2-2b"), cache_dir)
    assert asked == ["google/gemma-2/flax/gemma2-2b"]
    assert location.checkpoint_dir == synthetic.find_checkpoint_dir(tiny_model_dir)
    assert read_architecture(location).num_layers == 4


def test_missing_checkpoint_directory_is_named(tmp_path, cache_dir) -> None:
    with pytest.raises(CheckpointError, match=str(tmp_path / "nowhere")):
        resolve_model_location(LocalModelConfig(path=tmp_path / "nowhere"), cache_dir)
