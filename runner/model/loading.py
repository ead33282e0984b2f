"""Gemma2 in Penzai: checkpoint discovery, sharded restore, and model construction.

Every source (Kaggle, a local Kaggle-layout directory, Hugging Face, synthetic) ends as the flat Kaggle/Flax
parameter dict, from which one builder makes the Penzai `TransformerLM`. The architecture comes from tensor
shapes (`Gemma2Architecture.from_shapes`), so tiny synthetic and real checkpoints take the same path. Each source's
config class registers where its files are (`resolve_model_location`) and what its architecture is before any
download (`planning_architecture`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from gemma import gm
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from penzai import pz
from penzai.models.transformer import model_parts
from penzai.models.transformer.variants import llamalike_common
from penzai.toolshed import sharding_util

from runner.config.schema import (
    HuggingFaceModelConfig,
    KaggleModelConfig,
    LocalModelConfig,
    ModelConfig,
    SyntheticModelConfig,
)
from runner.errors import CheckpointError
from runner.model import hf_format, synthetic
from runner.model import tokenizer as tokenizer_lib
from runner.model.architecture import Gemma2Architecture, published_architecture

FlatParams = Mapping[str, Mapping[str, Any]]

MODEL_AXIS = "model"
#: Penzai named axes split over the mesh's model axis when their size divides it; everything else replicates.
_SHARDED_NAMED_AXES = ("vocabulary", "neurons", "head_groups")

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A Gemma2 model ready to run.

    Attributes:
      model: Penzai `TransformerLM` (parameters bound, possibly sharded over `mesh`).
      architecture: The hyper-parameters the model was built from.
      tokenizer: gemma's `Gemma2Tokenizer` for the checkpoint's `tokenizer.model`.
      model_id: A stable, human-readable identifier (e.g. `kaggle:gemma2-2b`).
      mesh: The host mesh the parameters live on, or None for a single device.
      dtype: The weights' dtype: `model.dtype`, or with `auto` the checkpoint's stored dtype.
      held_dtype: The dtype the parameters are held and computed in on the device (`held_parameter_dtype`):
        `dtype`, except bfloat16 on CPU, upcast to float32 at load.
    """

    model: model_parts.TransformerLM
    architecture: Gemma2Architecture
    tokenizer: gm.text.Gemma2Tokenizer
    model_id: str
    mesh: Mesh | None = None
    dtype: str = "float32"
    held_dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class CheckpointLocation:
    """Where a model's files are once its source is resolved (nothing is read yet)."""

    kind: str  # "orbax" (Kaggle/Flax layout) or "huggingface"
    checkpoint_dir: Path
    tokenizer_path: Path
    is_synthetic: bool = False


def make_host_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A one-axis (`model`) mesh, with Auto axis types for Penzai, over `devices` or every device JAX sees: this
    host's, or under `jax.distributed` every host's of the slice."""
    devices = devices if devices is not None else jax.devices()
    return Mesh(np.array(devices), (MODEL_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


@functools.singledispatch
def resolve_model_location(model_config: ModelConfig, cache_dir: Path) -> CheckpointLocation:
    """Finds (downloading or writing if needed) the files of the configured model; each source's class registers
    how.

    Args:
      model_config: The model section.
      cache_dir: Where synthetic models are written (`<cache_dir>/synthetic/<preset>-seed<seed>`).
    """
    raise CheckpointError(f"unknown model source {type(model_config).__name__}")


@resolve_model_location.register(KaggleModelConfig)
def _kaggle_location(model_config: KaggleModelConfig, cache_dir: Path) -> CheckpointLocation:
    import kagglehub  # Imported lazily: it reads credentials from KAGGLE_USERNAME/KAGGLE_KEY itself.

    model_dir = Path(kagglehub.model_download(f"google/gemma-2/flax/{model_config.variant}"))
    checkpoint_dir = model_dir / model_config.variant
    if not checkpoint_dir.is_dir():
        checkpoint_dir = synthetic.find_checkpoint_dir(model_dir)
    return CheckpointLocation("orbax", checkpoint_dir, model_dir / "tokenizer.model")


@resolve_model_location.register(LocalModelConfig)
def _local_location(model_config: LocalModelConfig, cache_dir: Path) -> CheckpointLocation:
    model_dir = model_config.path
    return CheckpointLocation(
        "orbax",
        synthetic.find_checkpoint_dir(model_dir),
        model_dir / "tokenizer.model",
        is_synthetic=synthetic.synthetic_architecture(model_dir) is not None,
    )


@resolve_model_location.register(HuggingFaceModelConfig)
def _huggingface_location(model_config: HuggingFaceModelConfig, cache_dir: Path) -> CheckpointLocation:
    directory = hf_format.resolve_hf_checkpoint(model_config.repo_id, model_config.path)
    return CheckpointLocation("huggingface", directory, directory / "tokenizer.model")


@resolve_model_location.register(SyntheticModelConfig)
def _synthetic_location(model_config: SyntheticModelConfig, cache_dir: Path) -> CheckpointLocation:
    model_dir = synthetic.write_synthetic_model(
        cache_dir / "synthetic" / f"{model_config.preset}-seed{model_config.seed}",
        model_config.preset,
        model_config.seed,
    )
    return CheckpointLocation(
        "orbax", synthetic.find_checkpoint_dir(model_dir), model_dir / "tokenizer.model", is_synthetic=True
    )


def read_orbax_shapes(checkpoint_dir: Path) -> dict[str, dict[str, tuple[int, ...]]]:
    """Tensor shapes of an orbax checkpoint, read from its metadata (no weights are loaded)."""
    tree = _orbax_tree(checkpoint_dir)
    return {key: {leaf: tuple(meta.shape) for leaf, meta in value.items()} for key, value in tree.items()}


def _orbax_tree(checkpoint_dir: Path) -> Mapping[str, Mapping[str, Any]]:
    """The array metadata (shape, dtype) of an orbax checkpoint's flat parameter dict."""
    if not Path(checkpoint_dir).is_dir():
        raise CheckpointError(f"{checkpoint_dir}: checkpoint directory does not exist")
    try:
        item_metadata = ocp.PyTreeCheckpointer().metadata(Path(checkpoint_dir).absolute()).item_metadata
    except Exception as error:  # noqa: BLE001 - orbax raises a variety of types for a malformed directory
        raise CheckpointError(f"{checkpoint_dir}: not a readable orbax checkpoint ({type(error).__name__})") from None
    tree = getattr(item_metadata, "tree", item_metadata)
    if not isinstance(tree, Mapping):
        raise CheckpointError(f"{checkpoint_dir}: orbax checkpoint does not hold a flat Gemma parameter dict")
    return tree


def flat_partition_spec(key: str, shape: tuple[int, ...], arch: Gemma2Architecture, mesh_size: int) -> PartitionSpec:
    """How a flat checkpoint tensor is split over the model axis at restore time."""
    axis: int | None = None
    if key.endswith("embedder"):
        axis = 0
    elif key.endswith("attn/kv_einsum"):
        axis = 1
    elif key.endswith("mlp/gating_einsum"):
        axis = 2 if arch.gating_is_d_by_f else 1
    elif key.endswith("mlp/linear"):
        axis = 0
    if axis is None or shape[axis] % mesh_size:
        return PartitionSpec()
    return PartitionSpec(*([None] * axis + [MODEL_AXIS]))


def restore_orbax_params(
    checkpoint_dir: Path, arch: Gemma2Architecture, dtype: Any, mesh: Mesh | None
) -> dict[str, dict[str, Any]]:
    """Restores the flat parameters, cast to `dtype` on the way: with a mesh straight into device shardings
    (`flat_partition_spec`), without one as host numpy arrays (each one then goes to the device alone, see
    `build_gemma2`, so loading never holds the model twice)."""
    shapes = read_orbax_shapes(checkpoint_dir)

    def args(key: str, shape: tuple[int, ...]) -> ocp.RestoreArgs:
        if mesh is None:
            return ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype)
        sharding = NamedSharding(mesh, flat_partition_spec(key, shape, arch, mesh.size))
        return ocp.ArrayRestoreArgs(restore_type=jax.Array, sharding=sharding, dtype=dtype)

    restore_args = {key: {leaf: args(key, shape) for leaf, shape in leaves.items()} for key, leaves in shapes.items()}
    handler = ocp.PyTreeCheckpointHandler(restore_concurrent_gb=synthetic.ORBAX_CONCURRENT_GB)
    with ocp.Checkpointer(handler) as checkpointer:
        return checkpointer.restore(Path(checkpoint_dir).absolute(), restore_args=restore_args)


def gemma2_definition(
    arch: Gemma2Architecture, parameter_dtype: Any, activation_dtype: Any | None = None
) -> model_parts.TransformerLM:
    """Penzai's Gemma2 for `arch` with unbound parameter slots (`pz.ParameterSlot`, labelled `transformer/...`)."""
    config = arch.to_llamalike_config(parameter_dtype, activation_dtype or parameter_dtype)
    return llamalike_common.build_llamalike_transformer(config, init_base_rng=None, name="transformer")


def gemma2_parameters(
    take: Any, arch: Gemma2Architecture
) -> dict[str, pz.nx.NamedArray]:
    """The Penzai parameters (by label, without the `transformer/` prefix) from flat Kaggle-layout tensors, which
    `take(key, leaf)` hands over one at a time (key without `transformer/`), already in the parameter dtype:
    host (numpy) tensors are split and reshaped on the host and put on the device once each.

    The same mapping as `penzai...gemma.gemma_from_pretrained_checkpoint`, driven by `arch` instead of a preset.
    """

    def named(array: Any, *axes: str) -> pz.nx.NamedArray:
        if isinstance(array, np.ndarray):  # a host tensor goes to the device once, in its final layout
            array = jax.device_put(np.ascontiguousarray(array))
        return pz.nx.NamedArray.wrap(array).tag(*axes)

    mapping = {
        "embedder.embeddings": named(take("embedder", "input_embedding"), "vocabulary", "embedding"),
        "final_norm/scale.weights": named(1 + take("final_norm", "scale"), "embedding"),
    }
    k, m, d, h = arch.num_kv_heads, arch.query_head_multiplier, arch.embedding_dim, arch.head_dim
    for i in range(arch.num_layers):
        block = f"block_{i}"
        for norm in ("pre_attention_norm", "post_attention_norm", "pre_ffw_norm", "post_ffw_norm"):
            mapping[f"{block}/{norm}/scale.weights"] = named(1 + take(f"layer_{i}/{norm}", "scale"), "embedding")
        gating = take(f"layer_{i}/mlp/gating_einsum", "w")
        if not arch.gating_is_d_by_f:
            gating = gating.transpose((0, 2, 1))
        mapping[f"{block}/mlp/gating_linear.weights"] = named(gating[0], "embedding", "neurons")
        mapping[f"{block}/mlp/value_linear.weights"] = named(gating[1], "embedding", "neurons")
        del gating
        mapping[f"{block}/mlp/out_linear.weights"] = named(take(f"layer_{i}/mlp/linear", "w"), "neurons", "embedding")
        kv = take(f"layer_{i}/attn/kv_einsum", "w")
        mapping[f"{block}/attention/key.weights"] = named(kv[0], "head_groups", "embedding", "projection")
        mapping[f"{block}/attention/value.weights"] = named(kv[1], "head_groups", "embedding", "projection")
        del kv
        mapping[f"{block}/attention/query.weights"] = named(
            take(f"layer_{i}/attn/q_einsum", "w").reshape((k, m, d, h)),
            "head_groups", "query_heads", "embedding", "projection",
        )
        mapping[f"{block}/attention/output.weights"] = named(
            take(f"layer_{i}/attn/attn_vec_einsum", "w").reshape((k, m, h, d)),
            "head_groups", "query_heads", "projection", "embedding",
        )
    return mapping


def build_gemma2(
    flat_params: FlatParams,
    arch: Gemma2Architecture,
    activation_dtype: Any | None = None,
    *,
    parameter_dtype: Any | None = None,
    consume: bool = False,
) -> model_parts.TransformerLM:
    """Builds Penzai's Gemma2 `TransformerLM` from flat Kaggle-layout parameters.

    Args:
      flat_params: `{flat_key: {leaf: array}}` (numpy or JAX arrays).
      arch: The architecture (`Gemma2Architecture.from_shapes`).
      activation_dtype: What activations run in (default: the parameter dtype).
      parameter_dtype: What the parameters are held in (default: the checkpoint's); each tensor is converted
        on its own, on the default device when it comes from the host.
      consume: Take the tensors out of `flat_params` (a dict this call owns) as they are converted, so a loaded
        checkpoint is never held twice: loading peaks at the model's size plus one tensor.
    """
    params = {key.removeprefix("transformer/"): value for key, value in flat_params.items()}
    if not consume:
        params = {key: dict(leaves) for key, leaves in params.items()}
    parameter_dtype = parameter_dtype or params["layer_0/attn/attn_vec_einsum"]["w"].dtype

    def take(key: str, leaf: str) -> jax.Array | np.ndarray:
        value = params[key].pop(leaf)
        if isinstance(value, np.ndarray):  # host tensors are converted, split and reshaped on the host
            return np.asarray(value, dtype=parameter_dtype)
        return jnp.asarray(value, dtype=parameter_dtype)

    model_def = gemma2_definition(arch, parameter_dtype, activation_dtype)
    mapping = gemma2_parameters(take, arch)
    model = pz.bind_variables(
        model_def, [pz.Parameter(value=v, label=f"transformer/{name}") for name, v in mapping.items()]
    )
    pz.nn.assert_no_parameter_slots(model)
    return model


def abstract_gemma2(
    arch: Gemma2Architecture,
    parameter_dtype: Any,
    activation_dtype: Any | None = None,
    mesh: Mesh | None = None,
) -> model_parts.TransformerLM:
    """Gemma2 of `arch` whose parameters are `jax.ShapeDtypeStruct`s (no memory: for XLA's compiled memory
    analysis of the real sizes), sharded over `mesh` as `shard_model` would place them; parameters frozen."""
    shapes = {
        key.removeprefix("transformer/"): {} for key, _, _ in arch.expected_shapes()
    }
    for key, leaf, shape in arch.expected_shapes():
        shapes[key.removeprefix("transformer/")][leaf] = jax.ShapeDtypeStruct(shape, parameter_dtype)
    values = jax.eval_shape(lambda flat: gemma2_parameters(lambda k, leaf: flat[k][leaf], arch), shapes)
    axis_map = _sharded_axes({name: v.named_shape for name, v in values.items()}, mesh)

    def placed(value: pz.nx.NamedArray) -> pz.nx.NamedArray:
        if mesh is None:
            return value
        sharding = sharding_util.name_to_name_sharding(value, mesh, axis_map)
        return jax.tree.map(lambda sds, s: jax.ShapeDtypeStruct(sds.shape, sds.dtype, sharding=s), value, sharding)

    model_def = gemma2_definition(arch, parameter_dtype, activation_dtype)
    return pz.select(model_def).at_instances_of(pz.ParameterSlot).apply(
        lambda slot: pz.ParameterValue(value=placed(values[slot.label.removeprefix("transformer/")]),
                                       label=slot.label)
    )


def _sharded_axes(named_shapes: Mapping[str, Mapping[str, int]], mesh: Mesh | None) -> dict[str, str]:
    """The named axes split over the mesh's model axis: those of `_SHARDED_NAMED_AXES` whose size divides it."""
    if mesh is None:
        return {}
    sizes: dict[str, int] = {}
    for named_shape in named_shapes.values():
        sizes.update(named_shape)
    return {name: MODEL_AXIS for name in _SHARDED_NAMED_AXES if name in sizes and sizes[name] % mesh.size == 0}


def shard_model(model: model_parts.TransformerLM, mesh: Mesh) -> model_parts.TransformerLM:
    """Places the model's parameters on `mesh`, splitting the named axes that divide the mesh size (in place)."""
    params = pz.unbind_params(model)[1]
    axis_map = _sharded_axes({param.label: param.value.named_shape for param in params}, mesh)
    for param in params:
        param.value = sharding_util.name_to_name_device_put(param.value, mesh, axis_map)
    return model


def load_model(
    model_config: ModelConfig,
    *,
    cache_dir: Path,
    mesh: Mesh | None = None,
    model_id: str | None = None,
) -> LoadedModel:
    """Loads the configured Gemma2 model and its tokenizer.

    Args:
      model_config: The model section.
      cache_dir: Where synthetic checkpoints are written.
      mesh: Host mesh to shard over; None keeps everything on the first local device.
      model_id: Identifier recorded with results (defaults to the source and name).
    """
    location = resolve_model_location(model_config, cache_dir)
    if not location.tokenizer_path.is_file():
        raise CheckpointError(f"{location.tokenizer_path}: tokenizer.model not found next to the checkpoint")
    dtype = resolved_dtype(model_config, location)
    platform = (mesh.devices.flat[0] if mesh is not None else jax.local_devices()[0]).platform
    held = held_parameter_dtype(dtype, platform)
    activation_dtype = jnp.float32 if model_config.upcast_activations else _DTYPES[held]

    if location.kind == "huggingface":
        flat, overrides = hf_format.read_hf_checkpoint(location.checkpoint_dir)
        arch = _hf_architecture(flat, overrides, location.checkpoint_dir)
    else:
        arch = read_architecture(location)
        # Restored in the stored dtype (no conversion copy), converted one tensor at a time while building.
        flat = restore_orbax_params(location.checkpoint_dir, arch, stored_dtype(location), mesh)

    model = build_gemma2(flat, arch, activation_dtype, parameter_dtype=_DTYPES[held], consume=True)
    del flat
    if mesh is not None:
        model = shard_model(model, mesh)
    return LoadedModel(
        model=model,
        architecture=arch,
        tokenizer=tokenizer_lib.load_tokenizer(location.tokenizer_path),
        model_id=model_id or f"{model_config.source}:{location.checkpoint_dir.name}",
        mesh=mesh,
        dtype=dtype,
        held_dtype=held,
    )


def held_parameter_dtype(dtype: str, platform: str) -> str:
    """The dtype parameters of `dtype` are held in on `platform`: bfloat16 is upcast to float32 on CPU (exactly:
    every bfloat16 value is a float32 value), because XLA's CPU backend has no bfloat16 matmul and would otherwise
    keep a float32 copy of every weight beside the bfloat16 one; on GPU and TPU the dtype itself."""
    return "float32" if platform == "cpu" and dtype == "bfloat16" else dtype


def resolved_dtype(model_config: ModelConfig, location: CheckpointLocation) -> str:
    """`model.dtype`, with `auto` the checkpoint's stored dtype (`stored_dtype`)."""
    return model_config.dtype if model_config.dtype != "auto" else stored_dtype(location)


def stored_dtype(location: CheckpointLocation) -> str:
    """The dtype the checkpoint's weights are stored in (`float32` or `bfloat16`), from metadata only: the orbax
    checkpoint's array metadata (Kaggle Flax: bfloat16), or a Hugging Face checkpoint's safetensors headers.

    Raises:
      CheckpointError: the weights are stored in a dtype runner does not load.
    """
    if location.kind == "huggingface":
        name = hf_format.stored_dtype(location.checkpoint_dir)
    else:
        tree = _orbax_tree(location.checkpoint_dir)
        name = str(np.dtype(tree["transformer/layer_0/attn/attn_vec_einsum"]["w"].dtype))
    if name not in _DTYPES:
        raise CheckpointError(f"{location.checkpoint_dir}: weights stored as {name} (allowed: float32, bfloat16; set "
                              "model.dtype to convert)")
    return name


def read_architecture(location: CheckpointLocation) -> Gemma2Architecture:
    """The model's architecture from checkpoint metadata (orbax: no weights are read).

    Kaggle checkpoints do not record the sliding window (4096 for every Gemma2); synthetic models declare theirs
    in their marker file.
    """
    if location.kind == "huggingface":
        flat_numpy, overrides = hf_format.read_hf_checkpoint(location.checkpoint_dir)
        return _hf_architecture(flat_numpy, overrides, location.checkpoint_dir)
    declared = synthetic.synthetic_architecture(location.checkpoint_dir.parent)
    return Gemma2Architecture.from_shapes(
        read_orbax_shapes(location.checkpoint_dir),
        sliding_window=declared.sliding_window if declared else 4096,
        source=str(location.checkpoint_dir),
    )


def _hf_architecture(flat_numpy: FlatParams, overrides: Mapping[str, Any], directory: Path) -> Gemma2Architecture:
    shapes = {key: {leaf: array.shape for leaf, array in leaves.items()} for key, leaves in flat_numpy.items()}
    return dataclasses.replace(Gemma2Architecture.from_shapes(shapes, source=str(directory)), **overrides)


@functools.singledispatch
def planning_architecture(model_config: ModelConfig) -> Gemma2Architecture | None:
    """The model's architecture without downloading or reading weights: a synthetic preset, a published Gemma2
    (Kaggle variant, Hugging Face repo) or a local Kaggle-layout checkpoint's metadata; None when only the
    checkpoint itself could tell (a local Hugging Face directory, an unknown repo, a missing directory)."""
    raise CheckpointError(f"unknown model source {type(model_config).__name__}")


@planning_architecture.register(SyntheticModelConfig)
def _synthetic_architecture(model_config: SyntheticModelConfig) -> Gemma2Architecture | None:
    return synthetic.SYNTHETIC_PRESETS[model_config.preset]


@planning_architecture.register(KaggleModelConfig)
def _kaggle_architecture(model_config: KaggleModelConfig) -> Gemma2Architecture | None:
    return published_architecture(model_config.variant)


@planning_architecture.register(HuggingFaceModelConfig)
def _huggingface_architecture(model_config: HuggingFaceModelConfig) -> Gemma2Architecture | None:
    return published_architecture(model_config.repo_id) if model_config.repo_id else None


@planning_architecture.register(LocalModelConfig)
def _local_architecture(model_config: LocalModelConfig) -> Gemma2Architecture | None:
    try:
        return read_architecture(resolve_model_location(model_config, cache_dir_default()))
    except CheckpointError:
        return None


@functools.singledispatch
def planning_stored_dtype(model_config: ModelConfig) -> str:
    """The dtype the model's weights are stored in, without downloading or reading weights (what `dtype: auto`
    loads): a synthetic preset's, bfloat16 for Kaggle's Flax checkpoints, float32 for the published Hugging Face
    repos (google/gemma-2-*), else the local checkpoint's metadata."""
    raise CheckpointError(f"unknown model source {type(model_config).__name__}")


@planning_stored_dtype.register(SyntheticModelConfig)
def _synthetic_stored_dtype(model_config: SyntheticModelConfig) -> str:
    return synthetic.PRESETS[model_config.preset].dtype


@planning_stored_dtype.register(KaggleModelConfig)
def _kaggle_stored_dtype(model_config: KaggleModelConfig) -> str:
    return "bfloat16"


@planning_stored_dtype.register(HuggingFaceModelConfig)
def _huggingface_stored_dtype(model_config: HuggingFaceModelConfig) -> str:
    if model_config.path is not None:
        with contextlib.suppress(CheckpointError, OSError):
            return hf_format.stored_dtype(model_config.path)
    return "float32"


@planning_stored_dtype.register(LocalModelConfig)
def _local_stored_dtype(model_config: LocalModelConfig) -> str:
    with contextlib.suppress(CheckpointError, OSError):
        return stored_dtype(resolve_model_location(model_config, cache_dir_default()))
    return "bfloat16"


def cache_dir_default() -> Path:
    """`$RUNNER_CACHE_DIR`, else `~/.cache/runner`."""
    return Path(os.environ.get("RUNNER_CACHE_DIR", Path.home() / ".cache" / "runner"))
