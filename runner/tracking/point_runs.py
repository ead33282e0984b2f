"""An SAE evaluation sweep's layout: one child run per SAE (a sweep has tens, not thousands).

A child carries `point_key`, the SAE's params and metrics, and its artifacts (`density.npy`,
`density_histogram.png`, `top_features.json`, `l0_histogram.json`). A point that already has a FINISHED run is
never logged again; the run of a point that failed is reused when it is run again. The parent gets the table of
every SAE (`sae_metrics.json`) and the sweep's plots.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunTag

from runner.errors import RunnerError
from runner.plan.points import Point, SAEEvalPoint
from runner.redaction import scrub
from runner.results import Result, SAEEvalPointResult
from runner.tracking import plots
from runner.tracking.clients import log_batch
from runner.tracking.layout import (
    PLOTS_DIR,
    SAE_TABLE_ARTIFACT,
    TAG_ATTEMPT,
    TAG_ERROR,
    TAG_PARENT,
    TAG_POINT_KEY,
    TAG_ROLE,
    TAG_SWEEP_ID,
    TAG_WORKER,
)
from runner.tracking.runs import SweepRuns, now_ms, terminate_quietly, truncate

ROLE = "point"


@dataclasses.dataclass
class _Child:
    """What the layout knows about the child run of one point."""

    run_id: str
    status: str
    params: frozenset[str]
    has_error_tag: bool
    artifact_uri: str


class PointRuns:
    """One child run per point of an SAE evaluation sweep (see the module docstring)."""

    def __init__(self, sweep: SweepRuns, points: list[SAEEvalPoint]) -> None:
        """Reads the sweep's existing child runs (a resumed sweep)."""
        self._sweep = sweep
        self._client = sweep.clients.client
        self._num_points = len(points)
        self._children = {run.data.tags[TAG_POINT_KEY]: _child_of(run) for run in sweep.children(ROLE)
                          if TAG_POINT_KEY in run.data.tags}
        self._rows: dict[str, dict[str, Any]] = {}

    def finished_point_keys(self) -> set[str]:
        """The points with a FINISHED child run."""
        return {key for key, child in self._children.items() if child.status == "FINISHED"}

    def counts(self) -> dict[str, int]:
        """`points_finished` and `points_failed` (points whose run did not finish)."""
        return self.point_counts()

    def point_counts(self) -> dict[str, int]:
        """`points_finished` and `points_failed` (points whose run did not finish)."""
        finished = len(self.finished_point_keys())
        return {"points_finished": finished, "points_failed": len(self._children) - finished}

    def log_results(self, points: list[Point], results: list[Result],
                    also: Callable[[MlflowClient], None] | None = None) -> None:
        """Logs each finished point as a child run (see the module docstring), then makes the request `also`."""
        for point, result in zip(points, results, strict=True):
            self._log_point(point, result)
        if also is not None:
            also(self._client)

    def fail_points(self, points: list[Point], error: str, attempt: int,
                    also: Callable[[MlflowClient], None] | None = None) -> None:
        """Ends each point's child run FAILED with tag `runner.error` (scrubbed, truncated), then makes the
        request `also`."""
        for point in points:
            self._fail_point(point, error, attempt)
        if also is not None:
            also(self._client)

    def end_running(self, status: str) -> None:
        """Ends the child runs left RUNNING with `status`."""
        for run in self._sweep.children(ROLE, "attributes.status = 'RUNNING'"):
            terminate_quietly(self._client, run.info.run_id, status, "the sweep ended while this point was running")
            key = run.data.tags.get(TAG_POINT_KEY)
            if key in self._children:
                self._children[key].status = status

    def write_parent_files(self, directory: Path) -> list[str]:
        """Writes `sae_metrics.json` (one row per finished SAE) and the sweep's plots into `directory`."""
        import pandas as pd

        rows = self._table_rows()
        if not rows:
            return []
        frame = pd.DataFrame(rows)
        frame.to_json(directory / SAE_TABLE_ARTIFACT, orient="split", index=False, date_format="iso")
        plots.write_sae_eval_plots(frame, directory / PLOTS_DIR)
        return [SAE_TABLE_ARTIFACT]

    def _log_point(self, point: Point, result: Result) -> None:
        key = point.point_key
        if result.point_key != key:
            raise RunnerError(f"result for point {result.point_key} logged against point {key}")
        existing = self._children.get(key)
        if existing is not None and existing.status == "FINISHED":
            return
        child = self._start_child(point, attempt=result.attempt, worker=result.worker, extra_tags=result.tags)
        try:
            now = now_ms()
            metrics = [Metric(k, v, now, 0) for k, v in sorted(result.metrics.items())]
            log_batch(self._client, child.run_id, params=self._new_params(child, point), metrics=metrics)
            child.params = child.params | set(point.params())
            if child.has_error_tag:
                self._client.delete_tag(child.run_id, TAG_ERROR)
                child.has_error_tag = False
            with tempfile.TemporaryDirectory(prefix="runner-point-") as scratch:
                write_point_artifacts(point, result, Path(scratch))
                self._sweep.clients.artifacts(child.artifact_uri).log_artifacts(scratch)
            self._client.set_terminated(child.run_id, "FINISHED")
        except BaseException as error:
            status = "KILLED" if isinstance(error, (KeyboardInterrupt, SystemExit)) else "FAILED"
            terminate_quietly(self._client, child.run_id, status, f"{type(error).__name__}: {error}")
            child.status = status
            raise
        child.status = "FINISHED"
        self._rows[key] = table_row(key, point.params(), result.metrics)

    def _fail_point(self, point: Point, error: str, attempt: int) -> None:
        existing = self._children.get(point.point_key)
        if existing is not None and existing.status == "FINISHED":
            return
        child = self._start_child(point, attempt=attempt, worker=None)
        try:
            params = self._new_params(child, point)
            log_batch(self._client, child.run_id, params=params, tags=[RunTag(TAG_ERROR, truncate(scrub(error)))])
            child.params = child.params | {param.key for param in params}
            child.has_error_tag = True
        finally:
            self._client.set_terminated(child.run_id, "FAILED")
            child.status = "FAILED"

    def _start_child(self, point: Point, *, attempt: int, worker: str | None,
                     extra_tags: Mapping[str, str] | None = None) -> _Child:
        """Creates the point's child run, or reopens its unfinished one, with fresh tags; status RUNNING."""
        tags = {TAG_PARENT: self._sweep.parent_run_id, TAG_SWEEP_ID: self._sweep.sweep_id,
                TAG_POINT_KEY: point.point_key, TAG_ROLE: ROLE, TAG_ATTEMPT: str(attempt),
                **{k: truncate(v) for k, v in (extra_tags or {}).items()}}
        if worker is not None:
            tags[TAG_WORKER] = worker
        child = self._children.get(point.point_key)
        if child is None:
            run = self._client.create_run(self._sweep.experiment_id, run_name=_run_name(point), tags=tags)
            child = _Child(run.info.run_id, "RUNNING", frozenset(), has_error_tag=False,
                           artifact_uri=run.info.artifact_uri)
            self._children[point.point_key] = child
        else:
            self._client.log_batch(child.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
            self._client.update_run(child.run_id, status="RUNNING")
            child.status = "RUNNING"
        return child

    @staticmethod
    def _new_params(child: _Child, point: Point) -> list[Param]:
        """The point's params the run does not have yet (MLflow params are immutable)."""
        return [Param(k, v) for k, v in point.params().items() if k not in child.params]

    def _table_rows(self) -> list[dict[str, Any]]:
        """One row per FINISHED child: from memory for points logged now, else (a resumed sweep) from its run."""
        finished = self.finished_point_keys()
        rows = [self._rows[key] for key in finished if key in self._rows]
        if finished - set(self._rows):
            for run in self._sweep.children(ROLE, "attributes.status = 'FINISHED'"):
                key = run.data.tags.get(TAG_POINT_KEY)
                if key in finished and key not in self._rows:
                    rows.append(table_row(key, run.data.params, run.data.metrics))
        return sorted(rows, key=lambda row: tuple(row[column] for column in ("layer", "site", "width", "l0_target")))


def write_point_artifacts(point: Point, result: SAEEvalPointResult, directory: Path) -> None:
    """Writes the files of one SAE's child run into `directory`."""
    measured = result.measurement
    np.save(directory / "density.npy", measured.density, allow_pickle=False)
    plots.write_density_histogram(
        measured.density_histogram, measured.density_histogram_edges, directory / "density_histogram.png",
        title=f"layer {point.layer} {point.site} width {point.width}",
        dead=int(measured.metrics.get("density/n_dead", 0)),
    )
    columns = ["sequence", "position", "token", "token_text", "feature_ids", "feature_values"]
    table = {"columns": columns, "data": [[row[c] for c in columns] for row in measured.top_feature_rows]}
    (directory / "top_features.json").write_text(json.dumps(table), encoding="utf-8")
    (directory / "l0_histogram.json").write_text(json.dumps(measured.l0_histogram.tolist()), encoding="utf-8")


def _child_of(run: Run) -> _Child:
    return _Child(run.info.run_id, run.info.status, frozenset(run.data.params), TAG_ERROR in run.data.tags,
                  artifact_uri=run.info.artifact_uri)


def table_row(key: str, params: Mapping[str, str], metrics: Mapping[str, float]) -> dict[str, Any]:
    """A row of the parent's SAE table from a point's params and metrics."""
    fields = {"sae_id": params["sae_id"], "layer": int(params["layer"]), "site": params["site"],
              "width": params["width"], "l0_target": params["l0_target"]}
    return {"point_key": key, **fields, **{k: float(v) for k, v in sorted(metrics.items())}}


def _run_name(point: SAEEvalPoint) -> str:
    return f"L{point.layer} {point.site} w{point.width} l0 {point.l0}"
