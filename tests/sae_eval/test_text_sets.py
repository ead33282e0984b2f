"""Evaluation text: the bundled prose, a user's files, a Hugging Face dataset, cut into BOS-first windows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from runner.config.schema import BundledTextConfig, FileTextConfig, HuggingFaceTextConfig
from runner.errors import ConfigError
from runner.model.tokenizer import BOS_ID
from runner.sae_eval import text_sets


def test_the_bundled_text_is_a_few_hundred_kb_of_prose_without_gutenberg_boilerplate() -> None:
    text = text_sets.BUNDLED_EVAL_TEXT.read_text(encoding="utf-8")
    assert 300_000 < len(text.encode("utf-8")) < 900_000
    documents, description = text_sets.read_documents(BundledTextConfig())
    assert description == "bundled:eval_text.txt" and len(documents) > 1000
    assert "gutenberg" not in text.lower()
    assert (text_sets.BUNDLED_EVAL_TEXT.parent / "EVAL_TEXT_SOURCES.md").is_file(), "every work's source is listed"


def test_windows_are_consecutive_bos_first_and_deterministic(tiny_model) -> None:
    documents = ["The river ran quietly past the old mill.", "In the beginning of the season the farmers sowed."]
    windows = text_sets.token_windows(tiny_model.tokenizer, documents, context_length=8, num_sequences=3)
    assert windows.shape == (3, 8) and windows.dtype == np.int32
    assert (windows[:, 0] == BOS_ID).all()
    stream = [t for doc in documents for t in tiny_model.tokenizer.encode(doc, add_bos=False)]
    np.testing.assert_array_equal(windows[:, 1:].ravel(), stream[:21])
    again = text_sets.load_eval_tokens(BundledTextConfig(), tiny_model.tokenizer, context_length=16, num_sequences=4)
    same = text_sets.load_eval_tokens(BundledTextConfig(), tiny_model.tokenizer, context_length=16, num_sequences=4)
    assert again.digest == same.digest and again.num_tokens == 64


def test_too_little_text_is_a_one_line_error_saying_what_fits(tiny_model) -> None:
    with pytest.raises(ConfigError, match=r"sae_eval.num_sequences: 50 sequences of 8 tokens need 350 text tokens "
                                          r"but text has \d+ \(allowed: at most \d+ at this context_length"):
        text_sets.token_windows(tiny_model.tokenizer, ["a short text"], context_length=8, num_sequences=50)


def test_a_glob_reads_text_jsonl_and_parquet_files_in_name_order(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("first paragraph\n\nsecond paragraph\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "from jsonl"}) + "\n", encoding="utf-8")
    pq.write_table(pa.table({"text": ["from parquet"], "id": [1]}), tmp_path / "c.parquet")
    config = FileTextConfig(path=str(tmp_path / "*"))
    documents, description = text_sets.read_documents(config)
    assert documents == ["first paragraph", "second paragraph", "from jsonl", "from parquet"]
    assert description == f"file:{tmp_path / '*'}"


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        (lambda d: None, "sae_eval.text.path: '{d}/*.txt' matches no file"),
        (lambda d: (d / "x.txt").write_bytes(b"\xff\xfe bad"), "sae_eval.text.path: cannot read {d}/x.txt"),
    ],
)
def test_bad_text_files_are_one_line_errors(tmp_path: Path, setup, expected) -> None:
    setup(tmp_path)
    with pytest.raises(ConfigError, match=expected.format(d=tmp_path).replace("*", r"\*").replace(".", r"\.")):
        text_sets.read_documents(FileTextConfig(path=str(tmp_path / "*.txt")))


def test_jsonl_without_the_column_names_it(tmp_path: Path) -> None:
    (tmp_path / "x.jsonl").write_text(json.dumps({"body": "no text field"}) + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"is not a list of records with a 'text' field"):
        text_sets.read_documents(FileTextConfig(path=str(tmp_path / "x.jsonl")))


def cached_dataset(hub: Path, repo_id: str, files: dict[str, str]) -> None:
    """A dataset repo in the Hugging Face cache layout (`datasets--org--name/{refs,snapshots}`)."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    root = hub / f"datasets--{repo_id.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(revision)
    for name, content in files.items():
        path = root / "snapshots" / revision / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")


def test_a_hugging_face_dataset_is_read_through_snapshot_download(tmp_path: Path, monkeypatch) -> None:
    """The real `snapshot_download`, offline, on a dataset already in the Hugging Face cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    cached_dataset(tmp_path, "someone/tiny-text", {
        "data/train.jsonl": json.dumps({"text": "a training document"}) + "\n",
        "data/test.jsonl": json.dumps({"text": "a held-out document"}) + "\n",
        "README.md": "not a document",
    })
    config = HuggingFaceTextConfig(dataset="someone/tiny-text", files=["data/train*"])
    assert text_sets.read_documents(config) == (["a training document"], "huggingface:someone/tiny-text")

    missing = HuggingFaceTextConfig(dataset="someone/absent", files=["*.jsonl"])
    with pytest.raises(ConfigError, match=r"sae_eval.text.dataset: cannot download 'someone/absent' from Hugging "
                                          r"Face \(Cannot find an appropriate cached snapshot"):
        text_sets.read_documents(missing)
