"""`runner export`'s files: any CSV reader reads back every point once and every text byte for byte."""

from __future__ import annotations

import csv

import numpy as np
import pandas as pd
import pytest

from runner.tracking.export import write_frame

#: What generated text can hold: control characters, quotes, separators, words that readers take for missing values.
HOSTILE_TEXTS = [
    "a plain sentence", "carriage\rreturn", "line\nfeed", "both\r\nat once", "\r", "\n\n", "nul\x00byte",
    'say "hi"', '"', "comma, here", "semi;colon", "tab\there", "NA", "None", "null", "nan", " padded ",
    "\x0bvertical\x0cfeed", "next\x85line", "line\u2028separator", "\x1b[31mansi\x1b[0m", "ünïcödé 雪",
]


@pytest.fixture()
def export_frame() -> pd.DataFrame:
    """A steering export of 2,000 points whose texts mix the hostile ones with random control characters."""
    rng = np.random.default_rng(0)
    alphabet = list("abc ,;\"'\r\n\t\x00\x01\x1f\x7f")
    random_texts = ["".join(rng.choice(alphabet, size=int(rng.integers(1, 30)))) for _ in range(2000)]
    texts = HOSTILE_TEXTS + random_texts[len(HOSTILE_TEXTS):]
    return pd.DataFrame({
        "point_key": [f"{i:016x}" for i in range(2000)],
        "run_id": [f"run{i}" for i in range(2000)],
        "layer": rng.integers(0, 26, 2000),
        "scale": rng.normal(size=2000) * 100,
        "top_k": [None] * 2000,
        "prompt": ["The most iconic structure on Earth is"] * 2000,
        "text": texts,
        "steer/kl_base_steered": rng.random(2000) * 1e-9,
    })


def test_the_csv_module_reads_back_every_point_once_and_every_text_byte_for_byte(export_frame, tmp_path) -> None:
    path = write_frame(export_frame, tmp_path / "sweep.csv", "csv")
    with path.open(newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    assert [row["point_key"] for row in rows] == export_frame["point_key"].tolist()
    assert [row["text"] for row in rows] == export_frame["text"].tolist()
    assert [float(row["scale"]) for row in rows] == export_frame["scale"].tolist(), "floats in full precision"


def test_pandas_reads_back_every_point_once_and_every_text_byte_for_byte(export_frame, tmp_path) -> None:
    path = write_frame(export_frame, tmp_path / "sweep.csv", "csv")
    assert pd.read_csv(path)["point_key"].tolist() == export_frame["point_key"].tolist()
    # Only pandas' own guess that "NA" or "" mean a missing value is turned off here; the file is read as written.
    back = pd.read_csv(path, keep_default_na=False, dtype={"point_key": str, "text": str})
    assert back["text"].tolist() == export_frame["text"].tolist()
    assert back["steer/kl_base_steered"].tolist() == export_frame["steer/kl_base_steered"].tolist()


def test_an_export_replaces_its_file_whole_or_leaves_it_alone(export_frame, tmp_path) -> None:
    path = tmp_path / "sweep.csv"
    path.write_text("an earlier export\n")
    with pytest.raises(ValueError, match="Conversion failed"):  # pyarrow's ArrowInvalid, a ValueError
        write_frame(export_frame.assign(text=[object()] * len(export_frame)), path, "parquet")
    assert path.read_text() == "an earlier export\n"
    assert [p.name for p in tmp_path.iterdir()] == ["sweep.csv"], "no temporary file is left behind"
    write_frame(export_frame, path, "parquet")
    assert pd.read_parquet(path)["text"].tolist() == export_frame["text"].tolist()
