"""A sweep's finished points as a table (one row per finished point), for `runner export`.

A steering sweep's rows come from its point records on the parent run (`runner.tracking.records`), with the run
of each point's curve; an SAE evaluation's from its child runs (one paged search).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mlflow import MlflowClient
from mlflow.entities import Run

from runner.config.schema import ExperimentConfig
from runner.errors import RunnerError
from runner.files import atomic_path
from runner.plan import points as plan
from runner.tracking.layout import TAG_CURVE_KEY, TAG_PARENT, TAG_POINT_KEY, TAG_ROLE, TAG_WORKER
from runner.tracking.records import records_frame
from runner.tracking.search import search_all, sweep_parent, sweep_records

if TYPE_CHECKING:
    import pandas as pd

ExportFormat = Literal["csv", "parquet"]
EXPORT_FORMATS: tuple[str, ...] = ("csv", "parquet")

_SAE_SORT = ["layer", "site", "width", "l0_target"]


def finished_points_frame(config: ExperimentConfig) -> pd.DataFrame:
    """One row per FINISHED point of the config's sweep, sorted like the sweep (steering: prompt, layer, feature,
    scale, seed; SAE evaluation: layer, site, width, l0). A steering point: point_key, curve_key, run_id (its
    curve's run; empty while the curve is not complete), params, prompt, text, worker, attempt, metrics. An SAE:
    point_key, run_id, params, worker, metrics.

    Raises:
      RunnerError: The sweep has no runs in `config.tracking.uri`.
    """
    import pandas as pd

    uri, sweep_id = config.tracking.uri, plan.sweep_id(config)
    parent = sweep_parent(uri, config.tracking.experiment, sweep_id)
    if parent is None:
        raise RunnerError(f"sweep {sweep_id} of {config.name!r} has no runs in {uri}; run it first")
    client = MlflowClient(tracking_uri=uri)
    children = search_all(client, parent.info.experiment_id,
                          f"tags.`{TAG_PARENT}` = '{parent.info.run_id}' AND attributes.status != 'RUNNING'")
    if config.kind == "steering":
        return _steering_frame(uri, parent, children)
    frame = pd.DataFrame([_sae_row(run) for run in children
                          if run.info.status == "FINISHED" and TAG_POINT_KEY in run.data.tags])
    if frame.empty:
        return frame
    return frame.sort_values(_SAE_SORT, kind="stable").reset_index(drop=True)


def _steering_frame(uri: str, parent: Run, children: list[Run]) -> pd.DataFrame:
    """The finished points of a steering sweep's records, each with its curve's run id."""
    finished = [record for record in sweep_records(uri, parent).values() if record.status == "FINISHED"]
    frame = records_frame(finished, token_ids=False)
    if frame.empty:
        return frame
    curve_runs = {run.data.tags[TAG_CURVE_KEY]: run.info.run_id for run in children
                  if run.data.tags.get(TAG_ROLE) == "curve" and TAG_CURVE_KEY in run.data.tags}
    frame.insert(2, "run_id", frame["curve_key"].map(curve_runs))
    return frame


def write_frame(frame: pd.DataFrame, path: Path, file_format: ExportFormat) -> Path:
    """Writes the table as CSV or Parquet (no index), whole or not at all (`runner.files.atomic_path`); returns
    `path`.

    The CSV is RFC 4180: UTF-8, CRLF between records, every text field quoted (quotes doubled), so that any CSV
    reader reads back every row once and every text byte for byte, whatever it holds (CR, LF, NUL, quotes,
    separators). Numbers are unquoted and written in full precision.
    """
    with atomic_path(Path(path), suffix=f".{file_format}") as temporary:
        if file_format == "csv":
            frame.to_csv(temporary, index=False, encoding="utf-8", lineterminator="\r\n",
                         quoting=csv.QUOTE_NONNUMERIC)
        else:
            frame.to_parquet(temporary, index=False)
    return Path(path)


def default_export_path(config: ExperimentConfig, file_format: ExportFormat) -> Path:
    """`<name>-<sweep id prefix>.<format>` in the working directory."""
    return Path(f"{config.name}-{plan.sweep_id(config)[:8]}.{file_format}")


def parse_param(value: str) -> int | float | str | None:
    """An MLflow param string back to its value: "None" -> None, then int, then float, else the string."""
    if value == "None":
        return None
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _sae_row(run: Run) -> dict[str, Any]:
    params = {name: parse_param(run.data.params[name]) for name in plan.SAEEvalPoint.PARAM_NAMES
              if name in run.data.params}
    params["l0_target"] = run.data.params.get("l0_target")  # "canonical" or a number, kept as written
    return {
        "point_key": run.data.tags[TAG_POINT_KEY],
        "run_id": run.info.run_id,
        **params,
        "worker": run.data.tags.get(TAG_WORKER),
        **dict(sorted(run.data.metrics.items())),
    }
