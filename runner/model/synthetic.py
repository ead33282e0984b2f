"""Synthetic Gemma2 checkpoints in the Kaggle/Flax on-disk layout, for tests, offline smoke runs and rehearsals of
the published sizes.

A model directory looks exactly like a Kaggle Gemma2 Flax download::

    out_dir/tokenizer.model           sentencepiece BPE trained on bundled text
    out_dir/synthetic-<preset>/       orbax PyTreeCheckpointer checkpoint of the flat parameter dict
    out_dir/runner_synthetic.json     marker: preset, seed, stored dtype and architecture (written last)

The marker also carries what shapes cannot say (the sliding window), see `synthetic_architecture`.

Presets (`PRESETS`): `tiny` and `small` (float32, a tokenizer with one piece per embedding row), and the published
Gemma2 shapes `gemma2-2b`, `gemma2-9b`, `gemma2-27b` (bfloat16 like the Kaggle checkpoints, the padded 256,128-row
embedding, and a tokenizer of 256,000 pieces like Gemma's: 16,384 trained on the bundled text, the rest filler
pieces `<synthetic-N>`, so ids 256,000-256,127 have no piece, exactly as in the real checkpoints). Weights are
generated and written one tensor at a time in the stored dtype: no float32 copy of the whole model is ever made.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp

from runner.errors import CheckpointError
from runner.model.architecture import PUBLISHED, Gemma2Architecture
from runner.model.tokenizer import CORPUS_PATH, EVAL_TEXT_PATH, pad_sentencepiece, train_sentencepiece

TOKENIZER_FILE_NAME = "tokenizer.model"
MARKER_FILE_NAME = "runner_synthetic.json"

_TINY = Gemma2Architecture(
    num_layers=4,
    embedding_dim=64,
    num_query_heads=4,
    num_kv_heads=2,
    head_dim=16,
    mlp_hidden_dim=128,
    vocab_size=512,
    gating_is_d_by_f=True,
    sliding_window=8,
)
_SMALL = Gemma2Architecture(
    num_layers=4,
    embedding_dim=256,
    num_query_heads=4,
    num_kv_heads=2,
    head_dim=64,
    mlp_hidden_dim=1024,
    vocab_size=4096,
    gating_is_d_by_f=True,
    sliding_window=32,
)
#: Pieces of Gemma's tokenizer (the Kaggle embedding has 256,128 rows: 128 ids without a piece).
GEMMA_TOKENIZER_PIECES = 256_000
#: Pieces trained on the bundled evaluation text for the published-size presets (the rest are filler pieces).
_TRAINED_PIECES = 16_384
#: Tokenizers up to this size are trained on the small bundled corpus (as `tiny` and `small` always were).
_CORPUS_MAX_PIECES = 4096


@dataclasses.dataclass(frozen=True)
class SyntheticPreset:
    """A synthetic model size and how its checkpoint is written.

    Attributes:
      architecture: The shapes.
      dtype: The stored dtype of the weights (`float32` or `bfloat16`): what `dtype: auto` loads.
      tokenizer_pieces: Pieces of its tokenizer; fewer than `architecture.vocab_size` leaves ids without a piece.
      trained_pieces: Of those, the pieces trained on bundled text (the rest are filler pieces).
      sae_layers: The layers `runner synth` writes SAEs for unless told otherwise.
      sae_width: The width label of those SAEs (`16k`: Gemma Scope's 16,384 latents); None: 4 x the model width.
    """

    architecture: Gemma2Architecture
    dtype: str
    tokenizer_pieces: int
    trained_pieces: int
    sae_layers: tuple[int, ...]
    sae_width: str | None = None


PRESETS: dict[str, SyntheticPreset] = {
    "tiny": SyntheticPreset(_TINY, "float32", 512, 512, tuple(range(_TINY.num_layers))),
    "small": SyntheticPreset(_SMALL, "float32", 4096, 4096, tuple(range(_SMALL.num_layers))),
    # Gemma Scope's most used layers of each size (2B: every layer exists; 27B's residual release has 10/22/34).
    "gemma2-2b": SyntheticPreset(PUBLISHED["gemma2-2b"], "bfloat16", GEMMA_TOKENIZER_PIECES, _TRAINED_PIECES,
                                 (6, 12, 20), "16k"),
    "gemma2-9b": SyntheticPreset(PUBLISHED["gemma2-9b"], "bfloat16", GEMMA_TOKENIZER_PIECES, _TRAINED_PIECES,
                                 (9, 20, 31), "16k"),
    "gemma2-27b": SyntheticPreset(PUBLISHED["gemma2-27b"], "bfloat16", GEMMA_TOKENIZER_PIECES, _TRAINED_PIECES,
                                  (10, 22, 34), "16k"),
}
#: The architecture of every preset.
SYNTHETIC_PRESETS: dict[str, Gemma2Architecture] = {name: preset.architecture for name, preset in PRESETS.items()}

# Files that only an orbax checkpoint directory holds (ocdbt and older msgpack layouts).
_ORBAX_MARKER_FILES = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt", "checkpoint")

#: Bump when the weights or tokenizer written for a given preset and seed change, so old models are not reused.
_GENERATOR_VERSION = 1

#: Elements drawn at once when writing bfloat16 (a float32 block of 64 MiB).
_DRAW_BLOCK_ELEMENTS = 16 * 2**20

_NORM_SCALE_STD = 0.1
_EMBEDDING_RMS = 0.1
_FINAL_NORM_SCALE_MEAN = 1 / _EMBEDDING_RMS - 1


def checkpoint_name(preset: str) -> str:
    """Name of the orbax checkpoint subdirectory of a synthetic model."""
    return f"synthetic-{preset}"


def synthetic_tensors(
    arch: Gemma2Architecture,
    seed: int,
    dtype: str = "float32",
    allocate: Callable[[tuple[int, ...], np.dtype], np.ndarray] = np.empty,
) -> Iterator[tuple[str, str, np.ndarray]]:
    """Deterministic random weights in the flat Kaggle layout of `arch`, one `(key, leaf, array)` at a time, in
    `dtype` (`float32`, or `bfloat16` rounded from the same float32 draws), each drawn into an array that
    `allocate(shape, dtype)` makes (e.g. a memory-mapped file).

    Projections are normal with std 1/sqrt(fan_in), so every block output is O(1); norm scales are small
    around 0 (Gemma applies `1 + scale`). Two choices keep greedy decoding from looping on one token:

    - Gemma multiplies embedded tokens by sqrt(D) and ties the output to the embedding, so an embedding of
      std 1 puts the current token in the residual stream with a norm of D and the model predicts it again. The
      embedding std is 0.1/sqrt(D): embedded tokens have RMS 0.1 and the blocks (pre-normed) shape the output.
    - The final norm scale sits around 9 (multiplier 10) so that the logits still have std ~1.

    Large tensors are drawn in row blocks, so no float32 copy of a whole bfloat16 tensor exists either.
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    out_dtype = _numpy_dtype(dtype)
    for key, leaf, shape in arch.expected_shapes():
        std = np.float32(_init_std(arch, key, leaf))
        offset = np.float32(_FINAL_NORM_SCALE_MEAN if key == "transformer/final_norm" else 0.0)
        values = allocate(shape, out_dtype)
        rows_of = values.reshape(shape[0], -1)
        block_rows = max(1, _DRAW_BLOCK_ELEMENTS // max(rows_of.shape[1], 1))
        for start in range(0, shape[0], block_rows):
            block = rng.standard_normal(rows_of[start : start + block_rows].shape, dtype=np.float32) * std + offset
            rows_of[start : start + block_rows] = block.astype(out_dtype)
        yield key, leaf, values


def synthetic_flat_params(
    arch: Gemma2Architecture, seed: int, dtype: str = "float32"
) -> dict[str, dict[str, np.ndarray]]:
    """Every tensor of `synthetic_tensors` in one flat dict (for small models and tests)."""
    params: dict[str, dict[str, np.ndarray]] = {}
    for key, leaf, values in synthetic_tensors(arch, seed, dtype):
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


#: Gigabytes orbax moves at once when writing or reading a checkpoint (its default lets it hold a copy of the
#: whole model while it writes).
ORBAX_CONCURRENT_GB = 1


def write_kaggle_checkpoint(flat_params: dict[str, dict[str, np.ndarray]], checkpoint_dir: Path) -> None:
    """Saves `flat_params` with orbax as a Kaggle Gemma2 Flax checkpoint does, `ORBAX_CONCURRENT_GB` at a time.

    `PyTreeCheckpointer().restore(checkpoint_dir)` returns the same flat dict: orbax keeps the "/" in keys such
    as "transformer/layer_0/attn/q_einsum" as one dict key (the arrays are stored as
    "transformer/layer_0/attn/q_einsum.w"), like the published checkpoints. `checkpoint_dir` must not exist.
    """
    handler = ocp.PyTreeCheckpointHandler(save_concurrent_gb=ORBAX_CONCURRENT_GB)
    with ocp.Checkpointer(handler) as checkpointer:
        checkpointer.save(Path(checkpoint_dir).absolute(), flat_params)


def write_synthetic_model(out_dir: Path, preset: str, seed: int = 0) -> Path:
    """Writes a complete synthetic model (tokenizer + checkpoint + marker) in the Kaggle layout; returns out_dir.

    The model is built in a sibling temporary directory and renamed into place. An `out_dir` that already holds
    the same preset and seed is reused as is.

    Raises:
      CheckpointError: `preset` is unknown, or `out_dir` holds something else.
    """
    out_dir = Path(out_dir).absolute()
    if preset not in PRESETS:
        raise CheckpointError(f"unknown synthetic preset {preset!r}; choose from {sorted(PRESETS)}")
    marker = _marker(preset, seed)
    if _holds_model(out_dir, marker):
        return out_dir
    stale = _holds_older_generation(out_dir, marker)
    if not stale:
        _refuse_to_overwrite(out_dir)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging_dir = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    staging_dir.chmod(0o755)
    try:
        _write_model_files(staging_dir, preset, seed, marker)
        if stale:  # the same preset written by an earlier runner: replaced by this one's
            shutil.rmtree(out_dir)
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
    spec = PRESETS[preset]
    write_synthetic_tokenizer(spec, model_dir / TOKENIZER_FILE_NAME)
    if spec.architecture.parameter_count() * np.dtype(_numpy_dtype(spec.dtype)).itemsize < _IN_MEMORY_BYTES:
        flat = synthetic_flat_params(spec.architecture, seed, spec.dtype)
        write_kaggle_checkpoint(flat, model_dir / checkpoint_name(preset))
    else:
        scratch = model_dir / ".tensors"
        try:
            write_kaggle_checkpoint(_tensors_on_disk(spec, seed, scratch), model_dir / checkpoint_name(preset))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    (model_dir / MARKER_FILE_NAME).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")


#: Models smaller than this are generated in memory; larger ones tensor by tensor into files orbax then reads.
_IN_MEMORY_BYTES = 2**30


def _numpy_dtype(dtype: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(np.float32)


def _tensors_on_disk(spec: SyntheticPreset, seed: int, scratch: Path) -> dict[str, dict[str, np.ndarray]]:
    """The preset's weights as memory-mapped files under `scratch`, each written as it is drawn: the process holds
    one draw block at a time, and the pages are the file system's to evict."""
    scratch.mkdir(parents=True)
    files = iter(scratch / f"{index}.npy" for index in itertools.count())

    def allocate(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        return np.lib.format.open_memmap(next(files), mode="w+", dtype=dtype, shape=shape)

    flat: dict[str, dict[str, np.ndarray]] = {}
    for key, leaf, values in synthetic_tensors(spec.architecture, seed, spec.dtype, allocate):
        values.flush()
        # A .npy header records bfloat16 as raw 2-byte records ('<V2'): the file is read back in its own dtype.
        stored = np.load(values.filename, mmap_mode="r", allow_pickle=False)
        flat.setdefault(key, {})[leaf] = stored.view(values.dtype)
        del values
    return flat


def write_synthetic_tokenizer(spec: SyntheticPreset, path: Path) -> Path:
    """The preset's tokenizer: `trained_pieces` trained on the bundled corpus (the evaluation text for the large
    presets, which the small corpus cannot fill), padded with filler pieces up to `tokenizer_pieces`."""
    text = CORPUS_PATH if spec.trained_pieces <= _CORPUS_MAX_PIECES else EVAL_TEXT_PATH
    train_sentencepiece(text.read_text(encoding="utf-8").splitlines(), spec.trained_pieces, path)
    if spec.tokenizer_pieces > spec.trained_pieces:
        pad_sentencepiece(path, spec.tokenizer_pieces)
    return path


def _marker(preset: str, seed: int) -> dict:
    spec = PRESETS[preset]
    return {
        "preset": preset,
        "seed": seed,
        "arch": dataclasses.asdict(spec.architecture),
        "dtype": spec.dtype,
        "tokenizer_pieces": spec.tokenizer_pieces,
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


def _holds_older_generation(model_dir: Path, marker: dict) -> bool:
    """Whether `model_dir` holds the same preset and seed as `marker` written by another version of runner's
    generator (whose weights may differ): runner's own output, safe to replace."""
    found = _read_marker(model_dir)
    return found is not None and found != marker and all(found.get(key) == marker[key] for key in ("preset", "seed"))


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
