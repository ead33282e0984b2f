"""A steering sweep's layout: every point's record on the parent run, and one child run per steering curve.

Logging a batch of results (one job's points) is:

1. one file of point records on the parent (`points/<batch>.json`, `runner.tracking.records`), one upload: from
   then on the points count as logged, and a rerun of the sweep skips them;
2. a child run for each curve the batch completes (every point of the curve has a record): created with its tags,
   its points table uploaded (`points.json`: params, metrics, text and token ids of each point), then its params
   and metrics in one `log_batch` (for each main metric, `runner.tracking.curves.CURVE_METRICS`, the mean over
   prompts and seeds at step = the scale's index on the curve, `steer/scale` itself at each step, and the
   `curve/*` summaries),
   then ended FINISHED, or FAILED when some of its points failed;
3. the parent's progress (`points_finished`, `points_failed`).

On a tracking server the curve runs and the progress go out in parallel (`TrackingClients.map`). A curve run
carries the digest of the records it summarises (tag `runner.curve_digest`, logged with its metrics, after its
table): a run whose digest or status does not match the records (a driver killed while logging it; a failed point
that finished on a later run) is deleted and logged again, when the sweep is opened or its points change.

When the sweep closes, the parent gets the sweep's tables (`generations.parquet`: every finished point;
`curves.json`: every curve's summaries and run), its plots (heatmaps per layer, the most and least steerable
curves) and `report.html`.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from runner.errors import RunnerError
from runner.plan.points import Point, SteeringPoint
from runner.redaction import scrub
from runner.results import PointResult, Result
from runner.tracking import curves, plots, report
from runner.tracking.clients import log_batch
from runner.tracking.layout import (
    CURVE_POINTS_ARTIFACT,
    CURVES_TABLE_ARTIFACT,
    PLOTS_DIR,
    POINTS_DIR,
    REPORT_ARTIFACT,
    TABLE_ARTIFACT,
    TAG_CURVE_DIGEST,
    TAG_CURVE_KEY,
    TAG_ERROR,
    TAG_LOGGED_ARTIFACTS,
    TAG_LOGIT_LENS,
    TAG_NEURONPEDIA,
    TAG_PARENT,
    TAG_ROLE,
    TAG_SWEEP_ID,
)
from runner.tracking.records import PointRecord, download_records, table_document, write_batch
from runner.tracking.runs import SweepRuns, now_ms, terminate_quietly, truncate

ROLE = "curve"


class _CurveRun:
    """What the layout knows about a curve's child run."""

    def __init__(self, run_id: str, status: str, digest: str | None) -> None:
        self.run_id, self.status, self.digest = run_id, status, digest


class CurveRuns:
    """The steering layout (see the module docstring) of one open sweep.

    Args:
      sweep: The open sweep.
      points: Every point of the sweep.
    """

    def __init__(self, sweep: SweepRuns, points: Sequence[SteeringPoint]) -> None:
        self._sweep = sweep
        self._plans = curves.plan_curves(points)
        self._points = {point.point_key: point for point in points}
        self._records: dict[str, PointRecord] = {}
        # Every record the parent held when the sweep was opened, those of points not planned yet included (a
        # search's later rounds): they join `_records` when `add_points` plans their points.
        self._loaded: dict[str, PointRecord] = {}
        self._runs: dict[str, _CurveRun] = {}
        self._search: dict[str, tuple[dict[str, float], dict[str, str]]] = {}
        self._lock = threading.Lock()  # the tracking thread logs records while the driver plans a search's rounds
        # Older active runs of a curve than its newest (none unless the store was changed by hand): deleted when
        # curves are next logged.
        self._stale: list[str] = []

    # -- opening ------------------------------------------------------------------------------------------------

    def load(self) -> None:
        """Reads what an earlier run of the sweep logged (its point records and curve runs), then logs the curves
        that are complete but have no current run."""
        with tempfile.TemporaryDirectory(prefix="runner-records-") as scratch:
            records = download_records(self._sweep.clients.artifacts(self._sweep.parent_artifact_uri), Path(scratch))
        self._loaded = records
        self._records = {key: record for key, record in records.items() if key in self._points}
        for run in sorted(self._sweep.children(ROLE), key=lambda run: run.info.start_time):
            key = run.data.tags.get(TAG_CURVE_KEY)
            if key in self._runs:
                self._stale.append(self._runs[key].run_id)
            self._runs[key] = _CurveRun(run.info.run_id, run.info.status, run.data.tags.get(TAG_CURVE_DIGEST))
        self._log_due_curves(self._plans, [])

    # -- a search's rounds ----------------------------------------------------------------------------------------

    def add_points(self, points: Sequence[SteeringPoint]) -> None:
        """Adds points to the sweep (a search round's): their curves are planned again with them."""
        with self._lock:
            self._points.update({point.point_key: point for point in points})
            self._plans = curves.plan_curves(self._points.values())
            self._records.update({point.point_key: self._loaded[point.point_key] for point in points
                                  if point.point_key in self._loaded and point.point_key not in self._records})

    def finished_point_metrics(self) -> dict[str, dict[str, float]]:
        """The metrics of every point the parent held FINISHED when the sweep was opened (planned or not yet)."""
        return {key: dict(record.metrics) for key, record in self._loaded.items() if record.status == "FINISHED"}

    def log_search(self, summaries: Mapping[str, tuple[Mapping[str, float], Mapping[str, str]]]) -> None:
        """Logs each curve's search summary (`search/*` metrics and tags, by curve key) on its current run, and
        keeps it for the sweep's tables."""
        with self._lock:
            self._search.update({key: (dict(metrics), dict(tags)) for key, (metrics, tags) in summaries.items()})
            tasks = [self._search_task(key) for key in summaries if key in self._runs]
        self._sweep.clients.map(lambda client, task: task(client), tasks)

    def _search_task(self, key: str) -> Callable[[MlflowClient], None]:
        run_id = self._runs[key].run_id
        metrics, tags = self._search[key]

        def log(client: MlflowClient) -> None:
            now = now_ms()
            log_batch(client, run_id, metrics=[Metric(name, value, now, 0) for name, value in metrics.items()],
                      tags=[RunTag(name, value) for name, value in tags.items()])

        return log

    # -- points -------------------------------------------------------------------------------------------------

    def finished_point_keys(self) -> set[str]:
        """The points with a FINISHED record."""
        return {key for key, record in self._records.items() if record.status == "FINISHED"}

    def point_counts(self) -> dict[str, int]:
        """`points_finished` and `points_failed` (points whose last record is FAILED)."""
        finished = len(self.finished_point_keys())
        return {"points_finished": finished, "points_failed": len(self._records) - finished}

    def counts(self) -> dict[str, int]:
        """`point_counts`, and `curves_total` and `curves_logged` (curves whose run is current)."""
        logged = sum(not self._is_due(plan) for plan in self._plans.values()
                     if all(key in self._records for key in plan.point_keys))
        return {**self.point_counts(), "curves_total": len(self._plans), "curves_logged": logged}

    def log_results(self, points: list[Point], results: list[Result],
                    also: Callable[[MlflowClient], None] | None = None) -> None:
        """Logs a batch of finished points (see the module docstring); `also` is a request made meanwhile."""
        records = []
        for point, result in zip(points, results, strict=True):
            if result.point_key != point.point_key or not isinstance(result, PointResult):
                raise RunnerError(f"result for point {result.point_key} logged against point {point.point_key}")
            records.append(PointRecord.finished(point, result))
        self._log_records(records, also)

    def fail_points(self, points: list[Point], error: str, attempt: int,
                    also: Callable[[MlflowClient], None] | None = None) -> None:
        """Records a batch of points whose job failed with `error` (scrubbed here)."""
        self._log_records([PointRecord.failed(point, scrub(error), attempt) for point in points], also)

    def _log_records(self, records: list[PointRecord], also: Callable[[MlflowClient], None] | None) -> None:
        """Uploads the records not logged yet as one file, then logs the curves they complete. Logging the same
        batch again (a retry) writes the same file and logs only the curves still due."""
        with self._lock:
            self._log_records_locked(records, also)

    def _log_records_locked(self, records: list[PointRecord], also: Callable[[MlflowClient], None] | None) -> None:
        new = [record for record in records if self._is_news(record)]
        if new:
            with tempfile.TemporaryDirectory(prefix="runner-batch-") as scratch:
                path = write_batch(new, Path(scratch))
                self._sweep.clients.artifacts(self._sweep.parent_artifact_uri).log_artifact(str(path), POINTS_DIR)
            for record in new:
                self._records[record.point_key] = record
        touched = {record.curve_key: self._plans[record.curve_key] for record in records}
        self._log_due_curves(touched, [also] if also is not None else [])

    def _is_news(self, record: PointRecord) -> bool:
        known = self._records.get(record.point_key)
        return known is None or (known.status != "FINISHED" and record != known)

    # -- curves -------------------------------------------------------------------------------------------------

    def _log_due_curves(self, plans: Mapping[str, curves.CurvePlan], also: list[Callable[[MlflowClient], None]]
                        ) -> None:
        """Logs the curve runs of `plans` that are complete but not current, and `also`, in parallel."""
        due = [plan for plan in plans.values() if self._is_due(plan)]
        tasks: list[Callable[[MlflowClient], None]] = [*(self._curve_task(plan) for plan in due), *also]
        stale, self._stale = self._stale, []
        tasks.extend(_deletion(run_id) for run_id in stale)
        self._sweep.clients.map(lambda client, task: task(client), tasks)

    def _is_due(self, plan: curves.CurvePlan) -> bool:
        records = [self._records.get(key) for key in plan.point_keys]
        if any(record is None for record in records):
            return False
        run = self._runs.get(plan.curve_key)
        return run is None or run.digest != _digest(records) or run.status != _curve_status(records)

    def _curve_task(self, plan: curves.CurvePlan) -> Callable[[MlflowClient], None]:
        def log_curve(client: MlflowClient) -> None:
            self._log_curve(client, plan)

        return log_curve

    def _log_curve(self, client: MlflowClient, plan: curves.CurvePlan) -> None:
        """(Re)creates the curve's run from its records (see the module docstring)."""
        records = sorted((self._records[key] for key in plan.point_keys), key=lambda r: r.point_key)
        finished = [record for record in records if record.status == "FINISHED"]
        failed = [record for record in records if record.status == "FAILED"]
        old = self._runs.get(plan.curve_key)
        if old is not None:
            client.delete_run(old.run_id)  # deleting a deleted run again (a retry) does nothing
        tags = {TAG_PARENT: self._sweep.parent_run_id, TAG_SWEEP_ID: self._sweep.sweep_id, TAG_ROLE: ROLE,
                TAG_CURVE_KEY: plan.curve_key,
                TAG_LOGGED_ARTIFACTS: json.dumps([{"path": CURVE_POINTS_ARTIFACT, "type": "table"}])}
        if plan.neuronpedia_url is not None:
            tags[TAG_NEURONPEDIA] = plan.neuronpedia_url
        lens = next((record.tags[TAG_LOGIT_LENS] for record in finished if TAG_LOGIT_LENS in record.tags), None)
        if lens is not None:
            tags[TAG_LOGIT_LENS] = truncate(lens)
        if failed:
            tags[TAG_ERROR] = truncate(f"{len(failed)} of {len(records)} points failed; the first: {failed[0].error}")
        run = client.create_run(self._sweep.experiment_id, run_name=plan.run_name, tags=tags)
        status = _curve_status(records)
        self._runs[plan.curve_key] = _CurveRun(run.info.run_id, "RUNNING", None)
        try:
            with tempfile.TemporaryDirectory(prefix="runner-curve-") as scratch:
                table = Path(scratch) / CURVE_POINTS_ARTIFACT
                table.write_text(json.dumps(table_document(finished)), encoding="utf-8")
                self._sweep.clients.artifacts(run.info.artifact_uri).log_artifact(str(table))
            digest = _digest(records)
            search_metrics, search_tags = self._search.get(plan.curve_key, ({}, {}))
            now = now_ms()
            log_batch(client, run.info.run_id,
                      metrics=[*curve_metrics(plan, finished, len(failed)),
                               *(Metric(name, value, now, 0) for name, value in search_metrics.items())],
                      params=[Param(name, value) for name, value in plan.params.items()],
                      tags=[RunTag(TAG_CURVE_DIGEST, digest), *(RunTag(k, v) for k, v in search_tags.items())])
            client.set_terminated(run.info.run_id, status)
        except BaseException as error:
            terminate_quietly(client, run.info.run_id, "FAILED", f"{type(error).__name__}: {error}")
            self._runs[plan.curve_key] = _CurveRun(run.info.run_id, "FAILED", None)
            raise
        self._runs[plan.curve_key] = _CurveRun(run.info.run_id, status, digest)

    # -- closing ------------------------------------------------------------------------------------------------

    def end_running(self, status: str) -> None:
        """Ends the curve runs left RUNNING (the sweep stopped while they were logged) with `status`; they are
        logged again by the next run."""
        for run in self._sweep.children(ROLE, "attributes.status = 'RUNNING'"):
            terminate_quietly(self._sweep.clients.client, run.info.run_id, status,
                              "the sweep ended while this curve was being logged")
            key = run.data.tags.get(TAG_CURVE_KEY)
            if key in self._runs:
                self._runs[key].status = status

    def write_parent_files(self, directory: Path) -> list[str]:
        """Writes the sweep's tables, plots and report into `directory` (see the module docstring)."""
        import pandas as pd

        finished = [record for record in self._records.values() if record.status == "FINISHED"]
        if not finished:
            return []
        table = table_document(finished)
        pd.DataFrame(table["data"], columns=table["columns"]).to_parquet(directory / TABLE_ARTIFACT, index=False)
        frame = pd.DataFrame([record.row() for record in finished])
        summaries = self.curve_summaries()
        curve_rows = [self._curve_row(plan, summaries.get(key, {})) for key, plan in self._plans.items()
                      if key in summaries]
        pd.DataFrame(curve_rows).to_json(directory / CURVES_TABLE_ARTIFACT, orient="split", index=False)
        plots.write_steering_plots(frame, summaries, directory / PLOTS_DIR)
        report.write_report(directory / REPORT_ARTIFACT, finished, sweep_id=self._sweep.sweep_id)
        return [TABLE_ARTIFACT, CURVES_TABLE_ARTIFACT]

    def curve_summaries(self) -> dict[str, dict[str, float]]:
        """Each curve with a finished point: its `curve/*` summaries (see `runner.tracking.curves.summarize`)."""
        by_curve: dict[str, list[PointRecord]] = {}
        for record in self._records.values():
            if record.status == "FINISHED":
                by_curve.setdefault(record.curve_key, []).append(record)
        return {key: {**curves.summarize(curves.scale_means(records)), **self._search.get(key, ({}, {}))[0]}
                for key, records in by_curve.items()}

    def _curve_row(self, plan: curves.CurvePlan, summary: Mapping[str, float]) -> dict[str, Any]:
        records = [self._records[key] for key in plan.point_keys if key in self._records]
        run = self._runs.get(plan.curve_key)
        return {"layer": plan.layer, "feature": plan.feature,
                **{name: summary.get(name) for name in SUMMARY_COLUMNS}, **summary,
                "points": len(plan.point_keys),
                "points_finished": sum(record.status == "FINISHED" for record in records),
                "points_failed": sum(record.status == "FAILED" for record in records),
                "mode": plan.mode, "positions": plan.positions, "neuronpedia_url": plan.neuronpedia_url,
                "run_id": run.run_id if run is not None else None, "curve_key": plan.curve_key,
                **self._search.get(plan.curve_key, ({}, {}))[1]}


#: The summaries every row of `curves.json` has (empty where a curve has none); any other summary a curve has
#: gets a column too.
SUMMARY_COLUMNS = (curves.SCALE_AT_TARGET, curves.NLL_AT_TARGET, curves.KL_AT_TARGET, curves.MAX_CONCEPT,
                   curves.SCALE_AT_MAX_CONCEPT)


def curve_metrics(plan: curves.CurvePlan, finished: Sequence[PointRecord], failed: int) -> list[Metric]:
    """A curve run's metrics: at step = the scale's index, `steer/scale`, and for each of `CURVE_METRICS` the mean
    over prompts and seeds with its 95% interval (`<metric>_ci_low`, `<metric>_ci_high`, when there are two
    samples or more) and the samples it is over (`steer/samples`); the `curve/*` summaries and point counts at
    step 0."""
    now = now_ms()
    means = curves.scale_means(finished)
    intervals = curves.scale_intervals(finished, curves.CURVE_METRICS)
    metrics = []
    for scale, values in means.items():
        step = plan.step(scale)
        metrics.append(Metric(curves.SCALE_METRIC, scale, now, step))
        metrics.extend(Metric(name, values[name], now, step) for name in curves.CURVE_METRICS if name in values)
        at_scale = intervals.get(scale, {})
        metrics.append(Metric(curves.SAMPLES_METRIC, float(max((i.n for i in at_scale.values()), default=0)),
                              now, step))
        for name, interval in at_scale.items():
            if name in values and math.isfinite(interval.half_width):
                metrics.extend([Metric(f"{name}_ci_low", interval.low, now, step),
                                Metric(f"{name}_ci_high", interval.high, now, step)])
    summary = {**curves.summarize(means), curves.POINTS_FINISHED: len(finished), curves.POINTS_FAILED: failed}
    metrics.extend(Metric(name, float(value), now, 0) for name, value in sorted(summary.items()))
    return metrics


def _curve_status(records: Sequence[PointRecord]) -> str:
    return "FINISHED" if all(record.status == "FINISHED" for record in records) else "FAILED"


def _digest(records: Sequence[PointRecord | None]) -> str:
    listed = sorted(f"{record.point_key}:{record.status}" for record in records if record is not None)
    return hashlib.sha256(" ".join(listed).encode()).hexdigest()[:16]


def _deletion(run_id: str) -> Callable[[MlflowClient], None]:
    def delete(client: MlflowClient) -> None:
        client.delete_run(run_id)

    return delete
