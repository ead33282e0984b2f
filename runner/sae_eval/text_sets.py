"""Evaluation text for SAE evaluation sweeps: the bundled prose, a user's files, or a Hugging Face dataset,
cut into fixed-length token windows. Each text source's config class registers its reader (`read_documents`).

Windowing (the SAELens convention): the documents are tokenized without BOS, joined into one token stream, and
cut into consecutive windows of `context_length - 1` tokens, each prefixed with BOS. The first `num_sequences`
windows are the evaluation set, so the same text and tokenizer always give the same tokens.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import glob
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from runner.config.schema import BundledTextConfig, FileTextConfig, HuggingFaceTextConfig, TextSetConfig
from runner.errors import ConfigError
from runner.model import tokenizer as tokenizer_lib

if TYPE_CHECKING:
    from gemma import gm

#: The bundled public-domain prose (see `runner/data/EVAL_TEXT_SOURCES.md`).
BUNDLED_EVAL_TEXT = tokenizer_lib.EVAL_TEXT_PATH
#: File kinds read from a user's glob or a dataset snapshot.
TEXT_SUFFIXES = (".txt", ".md", ".jsonl", ".json", ".parquet")


@dataclasses.dataclass(frozen=True)
class EvalTokens:
    """The evaluation set of a sweep.

    Attributes:
      tokens: `[num_sequences, context_length]` int32 token ids, BOS first, no padding.
      digest: 16 hex digits of the sha256 of `tokens` (part of every evaluation point's key).
      description: Where the text came from, e.g. `bundled:eval_text.txt` (an MLflow param).
    """

    tokens: np.ndarray
    digest: str
    description: str

    @property
    def num_tokens(self) -> int:
        """Tokens in the set, BOS included."""
        return int(self.tokens.size)


@functools.singledispatch
def read_documents(text_config: TextSetConfig) -> tuple[list[str], str]:
    """The documents of a text set and a description of their source (each source's class registers its reader).

    Raises:
      ConfigError: A file or glob matches nothing or cannot be read, a dataset is unreachable or lacks the column.
    """
    raise TypeError(f"no text source {type(text_config).__name__}")


@read_documents.register(BundledTextConfig)
def _bundled_documents(text_config: BundledTextConfig) -> tuple[list[str], str]:
    return _split_paragraph_documents(BUNDLED_EVAL_TEXT.read_text(encoding="utf-8")), "bundled:eval_text.txt"


@read_documents.register(FileTextConfig)
def _file_documents(text_config: FileTextConfig) -> tuple[list[str], str]:
    pattern = text_config.path
    paths = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    if not paths:
        raise ConfigError(f"sae_eval.text.path: {pattern!r} matches no file (allowed: a text file or a glob)")
    documents = [doc for path in paths for doc in _read_text_file(path, text_config.column, "sae_eval.text.path")]
    return documents, f"file:{pattern}"


@read_documents.register(HuggingFaceTextConfig)
def _huggingface_documents(text_config: HuggingFaceTextConfig) -> tuple[list[str], str]:
    """Documents of a Hugging Face dataset repo: the files matching `text_config.files`, column `column`."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        root = Path(
            snapshot_download(text_config.dataset, repo_type="dataset", allow_patterns=list(text_config.files))
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(
            f"sae_eval.text.dataset: cannot download {text_config.dataset!r} from Hugging Face ({reason}) "
            "(allowed: a reachable dataset repo, or text.source bundled / file)"
        ) from None
    paths = sorted(
        path
        for path in root.rglob("*")
        if path.is_file() and path.suffix in TEXT_SUFFIXES
        and any(fnmatch.fnmatch(path.relative_to(root).as_posix(), pattern) for pattern in text_config.files)
    )
    if not paths:
        raise ConfigError(
            f"sae_eval.text.files: {list(text_config.files)} matched no {'/'.join(TEXT_SUFFIXES)} file in "
            f"dataset {text_config.dataset!r}"
        )
    documents = [doc for path in paths for doc in _read_text_file(path, text_config.column, "sae_eval.text.dataset")]
    return documents, f"huggingface:{text_config.dataset}"


def _split_paragraph_documents(text: str) -> list[str]:
    return [paragraph.strip() for paragraph in text.split("\n\n") if paragraph.strip()]


def _read_text_file(path: Path, column: str, field: str) -> list[str]:
    """Documents of one file: paragraphs of text files, the `column` of JSON lines, JSON lists and Parquet."""
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            if column not in table.column_names:
                raise ConfigError(f"{field}: {path} has no column {column!r} (columns: {table.column_names})")
            return [str(value) for value in table.column(column).to_pylist() if value]
        text = path.read_text(encoding="utf-8")
        if path.suffix in (".jsonl", ".json"):
            records = [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" \
                else json.loads(text)
            if not isinstance(records, list) or not all(isinstance(r, dict) and column in r for r in records):
                raise ConfigError(f"{field}: {path} is not a list of records with a {column!r} field")
            return [str(record[column]) for record in records if record[column]]
    except (OSError, UnicodeDecodeError, ValueError) as error:
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"{field}: cannot read {path}: {type(error).__name__}: {error}") from None
    return _split_paragraph_documents(text)


def token_windows(
    tokenizer: gm.text.Tokenizer,
    documents: Sequence[str],
    *,
    context_length: int,
    num_sequences: int,
    source: str = "text",
) -> np.ndarray:
    """`[num_sequences, context_length]` windows of the documents' token stream, each starting with BOS.

    Raises:
      ConfigError: The text holds fewer tokens than `num_sequences` windows need.
    """
    body = context_length - 1
    needed = num_sequences * body
    stream: list[int] = []
    for document in documents:
        stream.extend(int(token) for token in tokenizer.encode(document, add_bos=False))
        if len(stream) >= needed:
            break
    if len(stream) < needed:
        available = len(stream) // body
        raise ConfigError(
            f"sae_eval.num_sequences: {num_sequences} sequences of {context_length} tokens need {needed} text "
            f"tokens but {source} has {len(stream)} (allowed: at most {available} at this context_length, or "
            "more text)"
        )
    windows = np.asarray(stream[:needed], np.int32).reshape(num_sequences, body)
    bos = np.full((num_sequences, 1), tokenizer_lib.BOS_ID, np.int32)
    return np.concatenate([bos, windows], axis=1)


def load_eval_tokens(
    text_config: TextSetConfig, tokenizer: gm.text.Tokenizer, *, context_length: int, num_sequences: int
) -> EvalTokens:
    """Reads and tokenizes the evaluation set of a sweep (see the module docstring for the windowing)."""
    documents, description = read_documents(text_config)
    tokens = token_windows(
        tokenizer, documents, context_length=context_length, num_sequences=num_sequences, source=description
    )
    digest = hashlib.sha256(tokens.tobytes()).hexdigest()[:16]
    return EvalTokens(tokens=tokens, digest=digest, description=description)
