"""The spool: finished results that could not be logged yet, kept in a JSON-lines file until the next run of the
same sweep logs them (see `runner.tracking.writer`)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runner.files import write_text_atomically
from runner.results import PointResult, Result, SAEEvalPointResult, SAEMeasurement


class Spool:
    """Finished results that could not be logged yet, one JSON object per line, for one sweep."""

    def __init__(self, path: Path) -> None:
        """A spool kept in the file `path` (which need not exist yet)."""
        self.path = Path(path)

    def read(self) -> list[Result]:
        """The spooled results (none when there is no spool file)."""
        if not self.path.is_file():
            return []
        lines = self.path.read_text(encoding="utf-8").splitlines()
        return [result_from_record(json.loads(line)) for line in lines if line.strip()]

    def write(self, results: Sequence[Result]) -> None:
        """Replaces the spool with `results` (atomically; an empty list removes the file)."""
        if not results:
            self.clear()
            return
        write_text_atomically(self.path, "".join(json.dumps(result_record(result)) + "\n" for result in results))

    def clear(self) -> None:
        """Removes the spool file."""
        self.path.unlink(missing_ok=True)


def result_record(result: Result) -> dict[str, Any]:
    """A result as JSON-safe data (arrays as lists; an SAE measurement's fields beside the point's)."""
    fields = _plain_fields(result)
    if isinstance(result, SAEEvalPointResult):
        fields.update(_plain_fields(fields.pop("measurement")))
    kind = "steering" if isinstance(result, PointResult) else "sae_eval"
    return {"kind": kind, **json.loads(json.dumps(fields))}


def _plain_fields(instance: PointResult | SAEEvalPointResult | SAEMeasurement) -> dict[str, Any]:
    return {
        field.name: (value.tolist() if isinstance(value, np.ndarray) else value)
        for field in dataclasses.fields(instance)
        for value in [getattr(instance, field.name)]
    }


def result_from_record(record: dict[str, Any]) -> Result:
    """The inverse of `result_record`."""
    fields = {key: value for key, value in record.items() if key != "kind"}
    if record["kind"] == "steering":
        return PointResult(**fields)
    measured = [field.name for field in dataclasses.fields(SAEMeasurement) if field.name in fields]
    measurement = SAEMeasurement(**{name: fields.pop(name) for name in measured})
    return SAEEvalPointResult(measurement=measurement, **fields)
