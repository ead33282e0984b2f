"""Synthetic Gemma2 checkpoints in the Kaggle/Flax on-disk layout, for tests and offline smoke runs.

A model directory looks exactly like a Kaggle Gemma2 Flax download::

    out_dir/tokenizer.model           sentencepiece BPE trained on the bundled corpus
    out_dir/synthetic-<preset>/       orbax PyTreeCheckpointer checkpoint of the flat parameter dict
    out_dir/runner_synthetic.json     marker: preset, seed and architecture (written last)

The marker also carries what shapes cannot say (the sliding window), see `synthetic_architecture`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp

from runner.errors import CheckpointError
from runner.model.architecture import Gemma2Architecture
from runner.model.tokenizer import CORPUS_PATH, train_sentencepiece

TOKENIZER_FILE_NAME = "tokenizer.model"
MARKER_FILE_NAME = "runner_synthetic.json"

SYNTHETIC_PRESETS: dict[str, Gemma2Architecture] = {
    "tiny": Gemma2Architecture(
        num_layers=4,
        embedding_dim=64,
        num_query_heads=4,
        num_kv_heads=2,
        head_dim=16,
        mlp_hidden_dim=128,
        vocab_size=512,
        gating_is_d_by_f=True,
        sliding_window=8,
    ),
    "small": Gemma2Architecture(
        num_layers=4,
        embedding_dim=256,
        num_query_heads=4,
        num_kv_heads=2,
        head_dim=64,
        mlp_hidden_dim=1024,
        vocab_size=4096,
        gating_is_d_by_f=True,
        sliding_window=32,
    ),
}

# Files that only an orbax checkpoint directory holds (ocdbt and older msgpack layouts).
_ORBAX_MARKER_FILES = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt", "checkpoint")

#: Bump when the weights or tokenizer written for a given preset and seed change, so old models are not reused.
_GENERATOR_VERSION = 1

_NORM_SCALE_STD = 0.1
_EMBEDDING_RMS = 0.1
_FINAL_NORM_SCALE_MEAN = 1 / _EMBEDDING_RMS - 1


def checkpoint_name(preset: str) -> str:
    """Name of the orbax checkpoint subdirectory of a synthetic model."""
    return f"synthetic-{preset}"


def synthetic_flat_params(arch: Gemma2Architecture, seed: int) -> dict[str, dict[str, np.ndarray]]:
    """Deterministic random fp32 weights in the flat Kaggle layout of `arch`.

    Projections are normal with std 1/sqrt(fan_in), so every block output is O(1); norm scales are small
    around 0 (Gemma applies `1 + scale`). Two choices keep greedy decoding from looping on one token:

    - Gemma multiplies embedded tokens by sqrt(D) and ties the output to the embedding, so an embedding of
      std 1 puts the current token in the residual stream with a norm of D and the model predicts it again. The
      embedding std is 0.1/sqrt(D): embedded tokens have RMS 0.1 and the blocks (pre-normed) shape the output.
    - The final norm scale sits around 9 (multiplier 10) so that the logits still have std ~1.
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    params: dict[str, dict[str, np.ndarray]] = {}
    for key, leaf, shape in arch.expected_shapes():
        values = rng.standard_normal(shape, dtype=np.float32) * np.float32(_init_std(arch, key, leaf))
        if key == "transformer/final_norm":
            values += np.float32(_FINAL_NORM_SCALE_MEAN)
        params.setdefault(key, {})[leaf] = values
    return params


def _init_std(arch: Gemma2Architecture, key: str, leaf: str) -> float:
    if leaf == "scale":
        return _NORM_SCALE_STD
    if leaf == "input_embedding":
        return _EMBEDDING_RMS * arch.embedding_dim**-0.5
    fan_in = {
        "attn/attn_vec_einsum": arch.num_query_heads * arch.head_dim,
        "mlp/linear": arch.mlp_hidden_dim,
    }.get(key.split("/", 2)[-1], arch.embedding_dim)
    return fan_in**-0.5


def write_kaggle_checkpoint(flat_params: dict[str, dict[str, np.ndarray]], checkpoint_dir: Path) -> None:
    """Saves `flat_params` with orbax as a Kaggle Gemma2 Flax checkpoint does.

    `PyTreeCheckpointer().restore(checkpoint_dir)` returns the same flat dict: orbax keeps the "/" in keys such
    as "transformer/layer_0/attn/q_einsum" as one dict key (the arrays are stored as
    "transformer/layer_0/attn/q_einsum.w"), like the published checkpoints. `checkpoint_dir` must not exist.
    """
    ocp.PyTreeCheckpointer().save(Path(checkpoint_dir).absolute(), flat_params)


def write_synthetic_model(out_dir: Path, preset: str, seed: int = 0) -> Path:
    """Writes a complete synthetic model (tokenizer + checkpoint + marker) in the Kaggle layout; returns out_dir.

    The model is built in a sibling temporary directory and renamed into place. An `out_dir` that already holds
    the same preset and seed is reused as is.

    Raises:
      CheckpointError: `preset` is unknown, or `out_dir` holds something else.
    """
    out_dir = Path(out_dir).absolute()
    if preset not in SYNTHETIC_PRESETS:
        raise CheckpointError(f"unknown synthetic preset {preset!r}; choose from {sorted(SYNTHETIC_PRESETS)}")
    marker = _marker(preset, seed)
    if _holds_model(out_dir, marker):
        return out_dir
    _refuse_to_overwrite(out_dir)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging_dir = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    staging_dir.chmod(0o755)
    try:
        _write_model_files(staging_dir, preset, seed, marker)
        try:
            staging_dir.rename(out_dir)
        except OSError:
            # Another process finished the same model first.
            if not _holds_model(out_dir, marker):
                raise
    finally:
        shutil.rmtree(staging_dir, ignore_errors=True)
    return out_dir


def _write_model_files(model_dir: Path, preset: str, seed: int, marker: dict) -> None:
    arch = SYNTHETIC_PRESETS[preset]
    corpus_lines = CORPUS_PATH.read_text(encoding="utf-8").splitlines()
    train_sentencepiece(corpus_lines, arch.vocab_size, model_dir / TOKENIZER_FILE_NAME)
    write_kaggle_checkpoint(synthetic_flat_params(arch, seed), model_dir / checkpoint_name(preset))
    (model_dir / MARKER_FILE_NAME).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")


def _marker(preset: str, seed: int) -> dict:
    return {
        "preset": preset,
        "seed": seed,
        "arch": dataclasses.asdict(SYNTHETIC_PRESETS[preset]),
        "version": _GENERATOR_VERSION,
    }


def _read_marker(model_dir: Path) -> dict | None:
    try:
        marker = json.loads((model_dir / MARKER_FILE_NAME).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _holds_model(model_dir: Path, marker: dict) -> bool:
    return _read_marker(model_dir) == marker


def _refuse_to_overwrite(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        found = _read_marker(out_dir)
        holds = f"synthetic preset {found.get('preset')!r} seed {found.get('seed')}" if found else "other files"
        raise CheckpointError(f"{out_dir} already holds {holds}; choose another directory or remove it")
    if out_dir.is_dir():
        out_dir.rmdir()


def synthetic_architecture(model_dir: Path) -> Gemma2Architecture | None:
    """The architecture recorded by `write_synthetic_model` in `model_dir`, or None for other models.

    Shapes give everything but the sliding window and the scalars; the marker gives those too.
    """
    marker = _read_marker(Path(model_dir))
    if marker is None or not isinstance(marker.get("arch"), dict):
        return None
    return Gemma2Architecture(**marker["arch"])


def find_checkpoint_dir(model_dir: Path) -> Path:
    """The orbax checkpoint subdirectory of a Kaggle-layout model directory (tokenizer.model + one checkpoint).

    Raises:
      CheckpointError: `model_dir` is not a directory, lacks tokenizer.model, or holds no or several checkpoints.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"model directory {model_dir} does not exist")
    if not (model_dir / TOKENIZER_FILE_NAME).is_file():
        raise CheckpointError(f"model directory {model_dir} has no {TOKENIZER_FILE_NAME}")
    candidates = sorted(
        child
        for child in model_dir.iterdir()
        if child.is_dir() and not child.name.startswith(".") and _is_orbax_checkpoint(child)
    )
    if not candidates:
        raise CheckpointError(f"model directory {model_dir} has no orbax checkpoint subdirectory")
    if len(candidates) > 1:
        names = ", ".join(child.name for child in candidates)
        raise CheckpointError(f"model directory {model_dir} has several checkpoints ({names}); keep one")
    return candidates[0]


def _is_orbax_checkpoint(directory: Path) -> bool:
    return any((directory / name).exists() for name in _ORBAX_MARKER_FILES)
