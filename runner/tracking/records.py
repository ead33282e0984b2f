"""A steering sweep's point records: what became of each point, kept on the sweep's parent run.

Each batch of results the tracking thread logs (a job's points) is one JSON file, `points/<batch>.json`, written
with one artifact upload. The files are the sweep's record of which points finished: resuming, `runner runs`,
`runner export`, the curve runs and the parent's tables are all read from them. A file is whole or unreadable (one
JSON document), never half a batch; an unreadable file (a driver killed during the upload) is skipped and its
points run again. Where two files hold the same point, its FINISHED record wins over a FAILED one, and of two
records with the same status the one in the first file by name: each point is read back once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from runner.plan.points import SteeringPoint
from runner.results import PointResult
from runner.tracking.layout import POINTS_DIR, TAG_LOGIT_LENS

if TYPE_CHECKING:
    import pandas as pd
    from mlflow.store.artifact.artifact_repo import ArtifactRepository

_log = logging.getLogger(__name__)

RecordStatus = Literal["FINISHED", "FAILED"]
#: The version of the batch file layout (`{"format": 1, "records": [...]}`).
RECORD_FORMAT = 1
#: How a sweep's points are sorted in every table: as the sweep expands them.
SORT_COLUMNS = ("prompt_index", "layer", "feature", "scale", "seed")
#: The columns an MLflow table of points starts with (the point, its text, the main metrics); the others follow.
TABLE_COLUMNS_FIRST = ("layer", "feature", "scale", "prompt_index", "seed", "text", "steer/concept_rate",
                       "steer/feature_activation", "steer/logit_lens_mass", "steer/nll", "steer/kl_steered_base",
                       "gen/distinct_2", "gen/num_tokens")


@dataclasses.dataclass(frozen=True)
class PointRecord:
    """What became of one steering point.

    Attributes:
      point_key: The point (`SteeringPoint.point_key`).
      curve_key: Its steering curve (`SteeringPoint.curve_key`).
      status: FINISHED (with a generation and metrics) or FAILED (with `error`).
      params: The point's params with their types (`SteeringPoint.param_values`).
      prompt: The prompt text.
      text: The generated continuation (None when FAILED).
      token_ids: The generated token ids.
      metrics: The point's metrics (MLflow metric keys).
      tags: The result's short texts (its feature's logit-lens tokens, a lost host's fault counts).
      worker: Which worker produced it (None when FAILED).
      attempt: 1 for the first try, incremented on each retry.
      error: Why the point failed (scrubbed, one line), else None.
      neuronpedia_url: The steered feature's dashboard, when known.
    """

    point_key: str
    curve_key: str
    status: RecordStatus
    params: Mapping[str, Any]
    prompt: str
    text: str | None
    token_ids: tuple[int, ...]
    metrics: Mapping[str, float]
    tags: Mapping[str, str]
    worker: str | None
    attempt: int
    error: str | None = None
    neuronpedia_url: str | None = None

    @classmethod
    def finished(cls, point: SteeringPoint, result: PointResult) -> PointRecord:
        """The record of a point that finished with `result`."""
        return cls(point.point_key, point.curve_key, "FINISHED", point.param_values(), point.prompt, result.text,
                   tuple(result.token_ids), dict(result.metrics), dict(result.tags), result.worker, result.attempt,
                   neuronpedia_url=point.neuronpedia_url)

    @classmethod
    def failed(cls, point: SteeringPoint, error: str, attempt: int) -> PointRecord:
        """The record of a point whose job failed with `error` (already scrubbed) on its `attempt`-th try."""
        return cls(point.point_key, point.curve_key, "FAILED", point.param_values(), point.prompt, None, (), {}, {},
                   None, attempt, error, point.neuronpedia_url)

    def to_json(self) -> dict[str, Any]:
        """The record as JSON data."""
        return {**dataclasses.asdict(self), "token_ids": list(self.token_ids)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PointRecord:
        """The inverse of `to_json`."""
        return cls(**{**data, "token_ids": tuple(data["token_ids"])})

    def row(self) -> dict[str, Any]:
        """The record as a table row: keys, params, prompt, text, token ids, worker, attempt, fault tags, metrics."""
        tags = {key: value for key, value in self.tags.items() if key != TAG_LOGIT_LENS}
        return {"point_key": self.point_key, "curve_key": self.curve_key, **self.params, "prompt": self.prompt,
                "text": self.text, "token_ids": list(self.token_ids), "worker": self.worker,
                "attempt": self.attempt, **tags, **dict(sorted(self.metrics.items()))}


def batch_name(records: Sequence[PointRecord]) -> str:
    """The file name of a batch: the same batch logged again (a retry) replaces its file."""
    listed = json.dumps(sorted([record.point_key, record.status] for record in records))
    return f"{hashlib.sha256(listed.encode()).hexdigest()[:16]}.json"


def write_batch(records: Sequence[PointRecord], directory: Path) -> Path:
    """Writes a batch file into `directory`; returns its path."""
    path = Path(directory) / batch_name(records)
    path.write_text(json.dumps({"format": RECORD_FORMAT, "records": [r.to_json() for r in records]}),
                    encoding="utf-8")
    return path


def read_batches(paths: Iterable[Path]) -> dict[str, PointRecord]:
    """The records of batch files, one per point (see the module docstring for which one); unreadable files are
    skipped with a warning."""
    merged: dict[str, PointRecord] = {}
    for path in sorted(paths, key=lambda p: p.name):
        try:
            document = json.loads(Path(path).read_text(encoding="utf-8"))
            if document.get("format") != RECORD_FORMAT:
                raise ValueError(f"format {document.get('format')!r}")
            records = [PointRecord.from_json(data) for data in document["records"]]
        except (OSError, ValueError, KeyError, TypeError) as error:
            _log.warning("skipping the unreadable point record file %s (its points run again): %s",
                         Path(path).name, error)
            continue
        for record in records:
            known = merged.get(record.point_key)
            if known is None or (known.status == "FAILED" and record.status == "FINISHED"):
                merged[record.point_key] = record
    return merged


def read_batch_directory(directory: Path) -> dict[str, PointRecord]:
    """The records of every batch file in `directory` (a downloaded `points/` folder; none when it is missing)."""
    directory = Path(directory)
    return read_batches(directory.glob("*.json")) if directory.is_dir() else {}


def download_records(repository: ArtifactRepository, scratch: Path) -> dict[str, PointRecord]:
    """The records on a parent run, given its artifact repository (`ArtifactRepository`)."""
    if not any(info.path == POINTS_DIR for info in repository.list_artifacts()):
        return {}
    return read_batch_directory(Path(repository.download_artifacts(POINTS_DIR, str(scratch))))


def table_document(records: Iterable[PointRecord]) -> dict[str, list]:
    """The records as an MLflow table (`{"columns": [...], "data": [...]}`, what `mlflow.log_table` writes and
    `mlflow.load_table` reads), one row per record (`PointRecord.row`) sorted like the sweep, the columns a reader
    scans first (`TABLE_COLUMNS_FIRST`) leading; a metric that is not finite is null, as pandas writes it."""
    rows = sorted((record.row() for record in records), key=lambda row: tuple(row[c] for c in SORT_COLUMNS))
    present = list(dict.fromkeys(column for row in rows for column in row))
    first = [column for column in TABLE_COLUMNS_FIRST if column in present]
    columns = first + [column for column in present if column not in first]
    return {"columns": columns, "data": [[_json_value(row.get(column)) for column in columns] for row in rows]}


def _json_value(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def records_frame(records: Iterable[PointRecord], *, token_ids: bool = True) -> pd.DataFrame:
    """One row per record (`PointRecord.row`), sorted like the sweep."""
    import pandas as pd

    rows = [record.row() for record in records]
    if not token_ids:
        for row in rows:
            row.pop("token_ids")
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    return frame.sort_values(list(SORT_COLUMNS), kind="stable").reset_index(drop=True)


def status_counts(records: Mapping[str, PointRecord]) -> dict[str, int]:
    """Records by status."""
    counts: dict[str, int] = {}
    for record in records.values():
        counts[record.status] = counts.get(record.status, 0) + 1
    return counts
