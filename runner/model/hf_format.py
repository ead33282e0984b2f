"""Gemma2 checkpoints in Hugging Face format (config.json + safetensors), converted to and from the flat
Kaggle/Flax layout that the rest of the package loads.

Tensor correspondence (D embed, V vocab, N query heads, K kv heads, H head dim, F MLP width), per layer i::

    model.embed_tokens.weight                 [V, D]    transformer/embedder input_embedding [V, D]
    model.norm.weight                         [D]       transformer/final_norm scale
    model.layers.i.self_attn.q_proj.weight    [N*H, D]  attn/q_einsum w [N, D, H]        (rows head-major)
    model.layers.i.self_attn.k_proj.weight    [K*H, D]  attn/kv_einsum w[0] [K, D, H]
    model.layers.i.self_attn.v_proj.weight    [K*H, D]  attn/kv_einsum w[1] [K, D, H]
    model.layers.i.self_attn.o_proj.weight    [D, N*H]  attn/attn_vec_einsum w [N, H, D]
    model.layers.i.mlp.gate_proj.weight       [F, D]    mlp/gating_einsum w[0] (transposed in [2, D, F])
    model.layers.i.mlp.up_proj.weight         [F, D]    mlp/gating_einsum w[1]
    model.layers.i.mlp.down_proj.weight       [D, F]    mlp/linear w [F, D] (transposed)
    model.layers.i.{input_layernorm, post_attention_layernorm, pre_feedforward_layernorm,
                    post_feedforward_layernorm}.weight   {pre,post}_{attention,ffw}_norm scale

Both formats apply RMSNorm weights as `1 + weight`, so norm tensors carry over unchanged. Query head n uses
kv head n // (N / K) in both (transformers' `repeat_kv`, Penzai's head groups). See also
`docs/penzai-gemma2.md#hugging-face-format`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from runner.errors import CheckpointError
from runner.files import atomic_path, write_text_atomically
from runner.model.architecture import Gemma2Architecture

CONFIG_FILE_NAME = "config.json"
SINGLE_FILE_NAME = "model.safetensors"
INDEX_FILE_NAME = "model.safetensors.index.json"
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model"]

FlatParams = dict[str, dict[str, np.ndarray]]

# Flax norm name -> transformers norm name, inside layer i.
_LAYER_NORMS = {
    "pre_attention_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "pre_ffw_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}

# config.json key -> Gemma2Architecture field.
_CONFIG_OVERRIDES = {
    "sliding_window": "sliding_window",
    "query_pre_attn_scalar": "query_pre_attn_scalar",
    "final_logit_softcapping": "final_logit_softcap",
    "attn_logit_softcapping": "attn_logits_soft_cap",
    "rms_norm_eps": "rms_norm_eps",
    "rope_theta": "rope_wavelength",
}

# A null soft cap in config.json disables it (Penzai accepts None); a null elsewhere means "use the default".
_FIELDS_WHERE_NULL_MEANS_OFF = frozenset({"final_logit_softcap", "attn_logits_soft_cap"})

_HIDDEN_ACTIVATION = "gelu_pytorch_tanh"

_DTYPE_NAMES = {
    np.dtype(np.float32): "float32",
    np.dtype(np.float16): "float16",
    np.dtype(ml_dtypes.bfloat16): "bfloat16",
}


# ----------------------------------------------------------------------------------------------- reading


def read_hf_checkpoint(directory: Path) -> tuple[FlatParams, dict[str, Any]]:
    """Reads a Hugging Face Gemma2 checkpoint as flat Kaggle-layout params (gating [2, D, F]) and overrides.

    Returns:
      `(flat_params, overrides)`, where `overrides` maps `Gemma2Architecture` field names to the values of
      config.json that shapes cannot give (sliding window, query scalar, soft caps, RMSNorm epsilon, RoPE base).

    Raises:
      CheckpointError: config.json or a tensor is missing, the model is not Gemma2, or a shape is inconsistent.
    """
    directory = Path(directory)
    config = _read_config(directory)
    with _TensorReader(directory) as tensors:
        flat = _hf_to_flat(tensors, config, source=str(directory))
    return flat, architecture_overrides(config, source=str(directory / CONFIG_FILE_NAME))


#: safetensors' dtype names of the dtypes runner loads.
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def stored_dtype(directory: Path) -> str:
    """The dtype of a checkpoint's weights (`float32`, `bfloat16`, ...), from a safetensors header: no weights
    are read."""
    directory = Path(directory)
    name = "model.layers.0.self_attn.o_proj.weight"
    file_name = _tensor_files(directory).get(name)
    if file_name is None:
        raise CheckpointError(f"{directory}: missing tensor {name}")
    with safe_open(str(directory / file_name), framework="numpy") as handle:
        stored = handle.get_slice(name).get_dtype()
    return _SAFETENSORS_DTYPES.get(stored, stored.lower())


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE_NAME
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: no {CONFIG_FILE_NAME}; not a Hugging Face checkpoint") from None
    except ValueError as error:
        raise CheckpointError(f"{path}: invalid JSON ({error})") from None
    model_type = config.get("model_type")
    if model_type != "gemma2":
        raise CheckpointError(f"{path}: model_type is {model_type!r}, expected 'gemma2'")
    activation = config.get("hidden_activation", _HIDDEN_ACTIVATION)
    if activation != _HIDDEN_ACTIVATION:
        raise CheckpointError(f"{path}: hidden_activation is {activation!r}, expected {_HIDDEN_ACTIVATION!r}")
    return config


def architecture_overrides(config: Mapping[str, Any], source: str = CONFIG_FILE_NAME) -> dict[str, Any]:
    """`Gemma2Architecture` fields that a Gemma2 config.json sets (only those present in it).

    Accepts both `rope_theta` and transformers 5's `rope_parameters`. A null soft cap stays None (no cap).

    Raises:
      CheckpointError: the layer types or RoPE bases do not fit Gemma2 (sliding on even layers, one RoPE base).
    """
    overrides = {
        field: config[key]
        for key, field in _CONFIG_OVERRIDES.items()
        if key in config and (config[key] is not None or field in _FIELDS_WHERE_NULL_MEANS_OFF)
    }
    rope_thetas = set(_rope_thetas(config.get("rope_parameters")))
    if len(rope_thetas) > 1:
        raise CheckpointError(f"{source}: several RoPE bases {sorted(rope_thetas)}; Gemma2 uses one")
    if rope_thetas:
        overrides["rope_wavelength"] = rope_thetas.pop()
    layer_types = config.get("layer_types")
    if layer_types is not None:
        expected = [_layer_type(i) for i in range(len(layer_types))]
        if list(layer_types) != expected:
            raise CheckpointError(f"{source}: layer_types {layer_types} differ from Gemma2's alternation {expected}")
    return overrides


def _rope_thetas(rope_parameters: Any) -> Iterator[float]:
    """RoPE bases of `rope_parameters`: one dict, or one dict per layer type."""
    if not isinstance(rope_parameters, Mapping):
        return
    if "rope_theta" in rope_parameters:
        yield float(rope_parameters["rope_theta"])
    for value in rope_parameters.values():
        if isinstance(value, Mapping) and "rope_theta" in value:
            yield float(value["rope_theta"])


def _layer_type(layer_index: int) -> str:
    return "sliding_attention" if layer_index % 2 == 0 else "full_attention"


class _TensorReader:
    """Reads tensors by name from a single or sharded safetensors checkpoint, opening each file once."""

    def __init__(self, directory: Path):
        self._directory = directory
        self._file_of = _tensor_files(directory)
        self._handles: dict[str, safe_open] = {}
        self._exit_stack = contextlib.ExitStack()

    def __enter__(self) -> _TensorReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._exit_stack.close()

    def get(self, name: str, shape: tuple[int | None, ...]) -> np.ndarray:
        """The tensor `name` (bf16 via ml_dtypes), checked against `shape` (None: any size)."""
        file_name = self._file_of.get(name)
        if file_name is None:
            raise CheckpointError(f"{self._directory}: missing tensor {name}")
        if file_name not in self._handles:
            path = self._directory / file_name
            if not path.is_file():
                raise CheckpointError(f"{self._directory}: missing file {file_name} (holds {name})")
            self._handles[file_name] = self._exit_stack.enter_context(safe_open(str(path), framework="numpy"))
        tensor = self._handles[file_name].get_tensor(name)
        fits = len(tensor.shape) == len(shape) and all(
            want in (None, got) for got, want in zip(tensor.shape, shape, strict=True)
        )
        if not fits:
            expected = ", ".join("?" if size is None else str(size) for size in shape)
            found = list(tensor.shape)
            raise CheckpointError(f"{self._directory}: tensor {name} has shape {found}, expected [{expected}]")
        return tensor


def _tensor_files(directory: Path) -> dict[str, str]:
    """Tensor name -> safetensors file name, from the index or the single file."""
    index_path = directory / INDEX_FILE_NAME
    if index_path.is_file():
        try:
            return dict(json.loads(index_path.read_text())["weight_map"])
        except (ValueError, KeyError, TypeError):
            raise CheckpointError(f"{index_path}: not a safetensors index (no weight_map)") from None
    single_path = directory / SINGLE_FILE_NAME
    if not single_path.is_file():
        raise CheckpointError(f"{directory}: neither {SINGLE_FILE_NAME} nor {INDEX_FILE_NAME}")
    with safe_open(str(single_path), framework="numpy") as handle:
        return {name: SINGLE_FILE_NAME for name in handle.keys()}  # noqa: SIM118 - a safetensors handle, not a dict


def _hf_to_flat(tensors: _TensorReader, config: Mapping[str, Any], source: str) -> FlatParams:
    try:
        num_layers = int(config["num_hidden_layers"])
        n, k, h = (int(config[key]) for key in ("num_attention_heads", "num_key_value_heads", "head_dim"))
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{source}/{CONFIG_FILE_NAME}: missing or invalid {error}") from None

    embedding = tensors.get("model.embed_tokens.weight", (None, None))
    d = embedding.shape[1]
    flat: FlatParams = {
        "transformer/embedder": {"input_embedding": embedding},
        "transformer/final_norm": {"scale": tensors.get("model.norm.weight", (d,))},
    }
    for i in range(num_layers):
        attn, mlp, kaggle = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp", f"transformer/layer_{i}"
        query = tensors.get(f"{attn}.q_proj.weight", (n * h, d))
        key = tensors.get(f"{attn}.k_proj.weight", (k * h, d))
        value = tensors.get(f"{attn}.v_proj.weight", (k * h, d))
        output = tensors.get(f"{attn}.o_proj.weight", (d, n * h))
        gate = tensors.get(f"{mlp}.gate_proj.weight", (None, d))
        f = gate.shape[0]
        up = tensors.get(f"{mlp}.up_proj.weight", (f, d))
        down = tensors.get(f"{mlp}.down_proj.weight", (d, f))
        flat[f"{kaggle}/attn/q_einsum"] = {"w": _rows_to_heads(query, n)}
        flat[f"{kaggle}/attn/kv_einsum"] = {"w": np.stack([_rows_to_heads(key, k), _rows_to_heads(value, k)])}
        flat[f"{kaggle}/attn/attn_vec_einsum"] = {"w": output.T.reshape(n, h, d)}
        flat[f"{kaggle}/mlp/gating_einsum"] = {"w": np.stack([gate.T, up.T])}
        flat[f"{kaggle}/mlp/linear"] = {"w": down.T}
        for kaggle_norm, hf_norm in _LAYER_NORMS.items():
            flat[f"{kaggle}/{kaggle_norm}"] = {"scale": tensors.get(f"model.layers.{i}.{hf_norm}.weight", (d,))}
    return {key: {leaf: np.ascontiguousarray(array) for leaf, array in leaves.items()} for key, leaves in flat.items()}


def _rows_to_heads(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """A transformers projection [heads*H, D] (rows head-major) as a Flax einsum weight [heads, D, H]."""
    return weight.reshape(num_heads, -1, weight.shape[1]).transpose(0, 2, 1)


# ----------------------------------------------------------------------------------------------- writing


def flat_to_hf_tensors(
    flat_params: Mapping[str, Mapping[str, np.ndarray]], arch: Gemma2Architecture
) -> dict[str, np.ndarray]:
    """The transformers Gemma2 tensors (name -> contiguous array) of flat Kaggle-layout params."""
    n, k, h, d = arch.num_query_heads, arch.num_kv_heads, arch.head_dim, arch.embedding_dim

    def flat(key: str, leaf: str = "w") -> np.ndarray:
        return np.asarray(flat_params[f"transformer/{key}"][leaf])

    tensors = {
        "model.embed_tokens.weight": flat("embedder", "input_embedding"),
        "model.norm.weight": flat("final_norm", "scale"),
    }
    for i in range(arch.num_layers):
        hf, kaggle = f"model.layers.{i}", f"layer_{i}"
        kv = flat(f"{kaggle}/attn/kv_einsum")
        gating = flat(f"{kaggle}/mlp/gating_einsum")
        gate, up = (gating[0].T, gating[1].T) if arch.gating_is_d_by_f else (gating[0], gating[1])
        tensors |= {
            f"{hf}.self_attn.q_proj.weight": flat(f"{kaggle}/attn/q_einsum").transpose(0, 2, 1).reshape(n * h, d),
            f"{hf}.self_attn.k_proj.weight": kv[0].transpose(0, 2, 1).reshape(k * h, d),
            f"{hf}.self_attn.v_proj.weight": kv[1].transpose(0, 2, 1).reshape(k * h, d),
            f"{hf}.self_attn.o_proj.weight": flat(f"{kaggle}/attn/attn_vec_einsum").reshape(n * h, d).T,
            f"{hf}.mlp.gate_proj.weight": gate,
            f"{hf}.mlp.up_proj.weight": up,
            f"{hf}.mlp.down_proj.weight": flat(f"{kaggle}/mlp/linear").T,
        }
        for kaggle_norm, hf_norm in _LAYER_NORMS.items():
            tensors[f"{hf}.{hf_norm}.weight"] = flat(f"{kaggle}/{kaggle_norm}", "scale")
    return {name: np.ascontiguousarray(tensor) for name, tensor in tensors.items()}


def hf_config(arch: Gemma2Architecture, dtype: np.dtype) -> dict[str, Any]:
    """A transformers Gemma2 config.json for `arch` with weights of `dtype`."""
    return {
        "architectures": ["Gemma2ForCausalLM"],
        "model_type": "gemma2",
        "hidden_size": arch.embedding_dim,
        "intermediate_size": arch.mlp_hidden_dim,
        "num_attention_heads": arch.num_query_heads,
        "num_key_value_heads": arch.num_kv_heads,
        "head_dim": arch.head_dim,
        "num_hidden_layers": arch.num_layers,
        "vocab_size": arch.vocab_size,
        "sliding_window": arch.sliding_window,
        "query_pre_attn_scalar": _query_pre_attn_scalar(arch),
        "final_logit_softcapping": arch.final_logit_softcap,
        "attn_logit_softcapping": arch.attn_logits_soft_cap,
        "rms_norm_eps": arch.rms_norm_eps,
        "rope_theta": arch.rope_wavelength,
        "layer_types": [_layer_type(i) for i in range(arch.num_layers)],
        "hidden_activation": _HIDDEN_ACTIVATION,
        "hidden_act": _HIDDEN_ACTIVATION,
        "max_position_embeddings": 8192,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
        "use_cache": True,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
        "torch_dtype": _dtype_name(dtype),
    }


def _query_pre_attn_scalar(arch: Gemma2Architecture) -> float:
    if arch.query_pre_attn_scalar is not None:
        return float(arch.query_pre_attn_scalar)
    # Rounded: scale ** -2 of a non-square scalar such as 144 is off in the last bits.
    return round(arch.query_scaling_factor**-2, 6)


def _dtype_name(dtype: np.dtype) -> str:
    try:
        return _DTYPE_NAMES[np.dtype(dtype)]
    except KeyError:
        raise CheckpointError(f"cannot write {np.dtype(dtype)} weights; use float32, float16 or bfloat16") from None


def write_hf_checkpoint(
    flat_params: Mapping[str, Mapping[str, np.ndarray]],
    arch: Gemma2Architecture,
    out_dir: Path,
    max_shard_bytes: int | None = None,
) -> Path:
    """Writes flat Kaggle-layout params as a Hugging Face Gemma2 checkpoint in `out_dir`; returns `out_dir`.

    One `model.safetensors`, or with `max_shard_bytes` shards `model-0000i-of-0000n.safetensors` of at most that
    many bytes (a larger single tensor gets a shard of its own) plus `model.safetensors.index.json`. Each file is
    written atomically; config.json comes last.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = flat_to_hf_tensors(flat_params, arch)
    config = hf_config(arch, tensors["model.embed_tokens.weight"].dtype)
    if max_shard_bytes is None:
        _save_safetensors_atomically(tensors, out_dir / SINGLE_FILE_NAME)
    else:
        shards = _shard(tensors, max_shard_bytes)
        weight_map = {}
        for number, names in enumerate(shards, start=1):
            file_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            _save_safetensors_atomically({name: tensors[name] for name in names}, out_dir / file_name)
            weight_map |= {name: file_name for name in names}
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
        write_text_atomically(out_dir / INDEX_FILE_NAME, json.dumps(index, indent=2) + "\n")
    write_text_atomically(out_dir / CONFIG_FILE_NAME, json.dumps(config, indent=2) + "\n")
    return out_dir


def _shard(tensors: Mapping[str, np.ndarray], max_shard_bytes: int) -> list[list[str]]:
    """Tensor names grouped, in order, into shards of at most `max_shard_bytes` (each shard holds >= 1)."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for name, tensor in tensors.items():
        if shards[-1] and shard_bytes + tensor.nbytes > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += tensor.nbytes
    return shards


def _save_safetensors_atomically(tensors: dict[str, np.ndarray], path: Path) -> None:
    with atomic_path(path) as temporary:
        # transformers refuses safetensors files without format metadata.
        save_file(tensors, str(temporary), metadata={"format": "pt"})


# ----------------------------------------------------------------------------------------------- resolving


def resolve_hf_checkpoint(repo_id: str | None, path: Path | None) -> Path:
    """The local directory of a Hugging Face checkpoint: `path` as is, else a snapshot of `repo_id`.

    Downloads only config/safetensors/tokenizer files. The token, if any, is read by huggingface_hub itself
    from HF_TOKEN (or its login cache) and never passes through here.

    Raises:
      CheckpointError: neither is given, `path` is not a directory, or the download fails.
    """
    if path is not None:
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"Hugging Face checkpoint directory {path} does not exist")
        return path
    if not repo_id:
        raise CheckpointError("give a Hugging Face repo id or a local checkpoint directory")
    import huggingface_hub  # Deferred: slow to import and only needed for downloads.

    try:
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=DOWNLOAD_PATTERNS))
    except huggingface_hub.errors.GatedRepoError:
        raise CheckpointError(f"Hugging Face repo {repo_id} is gated: accept its license and set HF_TOKEN") from None
    except huggingface_hub.errors.RepositoryNotFoundError:
        raise CheckpointError(f"Hugging Face repo {repo_id} not found (or private without HF_TOKEN)") from None
    except (huggingface_hub.errors.HfHubHTTPError, huggingface_hub.errors.LocalEntryNotFoundError, OSError) as error:
        raise CheckpointError(f"cannot download Hugging Face repo {repo_id}: {type(error).__name__}") from None
