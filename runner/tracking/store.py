"""MLflow tracking of a sweep: one parent run per sweep, one child run per point.

The parent carries tag `sweep_id`; children carry `mlflow.parentRunId` and `point_key`. A rerun of the same config
reuses the parent, skips points that already have a FINISHED child and reuses the run of a point that failed, so
no point ever has two FINISHED children. Only the process that owns a `SweepTracker` writes to the sweep.

Nothing from the environment is logged; error texts are scrubbed of URL credentials and tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH, MAX_TAG_VAL_LENGTH

from runner.config.schema import ExperimentConfig
from runner.errors import RunnerError, TrackingUnavailable, first_line
from runner.plan.points import Point, SAEEvalPoint, SteeringPoint
from runner.redaction import scrub
from runner.results import PointResult, Result
from runner.tracking import plots
from runner.tracking.layout import (
    CONFIG_ARTIFACT,
    PLOTS_DIR,
    SAE_TABLE_ARTIFACT,
    TABLE_ARTIFACT,
    TAG_ATTEMPT,
    TAG_ERROR,
    TAG_EXPERIMENT_KIND,
    TAG_LOGGED_ARTIFACTS,
    TAG_NEURONPEDIA,
    TAG_PARENT,
    TAG_POINT_KEY,
    TAG_ROLE,
    TAG_SWEEP_ID,
    TAG_WORKER,
)
from runner.tracking.search import find_sweep_parent, search_all
from runner.tracking.sqlite import checkpoint_sqlite_tracking, tune_sqlite_tracking

_log = logging.getLogger(__name__)
_T = TypeVar("_T")

SweepStatus = Literal["FINISHED", "FAILED", "KILLED"]


@dataclasses.dataclass
class _Child:
    """What the tracker knows about the child run of one point."""

    run_id: str
    status: str
    params: frozenset[str]
    has_error_tag: bool
    artifact_uri: str


class SweepTracker:
    """Logs one sweep to MLflow through an `MlflowClient` (no fluent global state).

    Usage::

        tracker = SweepTracker(config.tracking.uri, config.tracking.experiment)
        with tracker.sweep(config, sweep_id(config), len(points)) as parent_run_id:
            done = tracker.finished_point_keys()
            for point in points:
                if point.point_key not in done:
                    tracker.log_point(point, run_point(point))

    Any exception inside the `with` ends the parent FAILED (KeyboardInterrupt or SystemExit: KILLED) with no child
    left RUNNING; a normal exit closes it FINISHED when every point finished, else FAILED. `TrackingUnavailable`
    leaves the runs as they are (the server cannot be reached); the next run of the sweep closes them.
    """

    def __init__(self, uri: str, experiment_name: str) -> None:
        """Connects to the tracking server or database at `uri`; nothing is created until `open_sweep`."""
        self.uri = uri
        self.experiment_name = experiment_name
        tune_sqlite_tracking(uri)
        self._client = MlflowClient(tracking_uri=uri)
        self._experiment_id: str | None = None
        self._parent_run_id: str | None = None
        self._sweep_id = ""
        self._num_points = 0
        self._children: dict[str, _Child] = {}
        self._rows: dict[str, dict[str, Any]] = {}
        self._kind = "steering"

    @property
    def experiment_id(self) -> str | None:
        """The MLflow experiment id, once `open_sweep` has run."""
        return self._experiment_id

    @property
    def parent_run_id(self) -> str | None:
        """The parent run id while a sweep is open."""
        return self._parent_run_id

    # -- sweep lifecycle ----------------------------------------------------------------------------------------

    def open_sweep(self, config: ExperimentConfig, sweep_id: str, num_points: int) -> str:
        """Creates the experiment if missing, then reuses the sweep's parent run (resume) or creates it.

        Logs params `sweep_id` and `num_points` and the artifact `config/experiment.yaml` once, and marks the parent
        RUNNING. Returns the parent run id.
        """
        self._experiment_id = self._ensure_experiment()
        parent = find_sweep_parent(self._client, self._experiment_id, sweep_id)
        if parent is None:
            run = self._client.create_run(
                self._experiment_id,
                run_name=f"{config.name}-{sweep_id[:8]}",
                tags={TAG_SWEEP_ID: sweep_id, TAG_ROLE: "sweep"},
            )
            run_id, logged = run.info.run_id, {}
        else:
            run_id, logged = parent.info.run_id, parent.data.params
            self._client.update_run(run_id, status="RUNNING")
            if TAG_ERROR in parent.data.tags:
                self._client.delete_tag(run_id, TAG_ERROR)
        self._parent_run_id, self._sweep_id, self._num_points = run_id, sweep_id, num_points
        self._kind = config.kind
        try:
            params = {"sweep_id": sweep_id, "num_points": str(num_points)}
            new = [Param(k, v) for k, v in params.items() if k not in logged]
            if new:
                self._client.log_batch(run_id, params=new)
            artifacts = {f.path for f in self._client.list_artifacts(run_id, "config")}
            if CONFIG_ARTIFACT not in artifacts:
                self._client.log_text(run_id, config.to_yaml(), CONFIG_ARTIFACT)
            self._children = {
                run.data.tags[TAG_POINT_KEY]: _child_of(run)
                for run in self._search_children()
                if TAG_POINT_KEY in run.data.tags
            }
        except BaseException as error:
            self._terminate_quietly(run_id, _status_for(error), _describe(error))
            self._parent_run_id = None
            raise
        self._rows = {}
        return run_id

    def close_sweep(self, status: SweepStatus, results_table: list[dict[str, Any]] | None = None) -> None:
        """Logs counts, the table and the plots, then terminates the parent with `status`.

        Args:
          status: The parent's final status.
          results_table: Rows of the table; by default one row per FINISHED child (a steering point: point_key,
            prompt_index, layer, feature, scale, seed, text and its metrics; an SAE: its params and metrics).
        """
        parent = self._require_open()
        stray = "KILLED" if status == "KILLED" else "FAILED"
        for run in self._search_children("attributes.status = 'RUNNING'"):
            self._terminate_quietly(run.info.run_id, stray, "the sweep ended while this point was running")
            key = run.data.tags.get(TAG_POINT_KEY)
            if key in self._children:
                self._children[key].status = stray
        statuses = [child.status for child in self._children.values()]
        counts = {
            "points_total": self._num_points,
            "points_finished": statuses.count("FINISHED"),
            "points_failed": len(statuses) - statuses.count("FINISHED"),
        }
        now = _now_ms()
        self._client.log_batch(parent, metrics=[Metric(k, float(v), now, 0) for k, v in counts.items()])
        rows = results_table if results_table is not None else self._table_rows()
        if rows:
            self._log_table_and_plots(parent, rows)
        self._client.set_terminated(parent, status)
        self._parent_run_id = None
        checkpoint_sqlite_tracking(self.uri)

    def warm_up_plots(self) -> None:
        """Loads the plotting library now (about half a second), e.g. while the workers start, rather than when
        the sweep closes."""
        plots.warm_up()

    def log_sweep_metrics(self, metrics: Mapping[str, float]) -> None:
        """Logs metrics of the whole sweep on its parent run (e.g. `preemptions`, `worker_crashes`)."""
        parent = self._require_open()
        now = _now_ms()
        self._client.log_batch(parent, metrics=[Metric(k, float(v), now, 0) for k, v in sorted(metrics.items())])

    @contextlib.contextmanager
    def sweep(self, config: ExperimentConfig, sweep_id: str, num_points: int) -> Iterator[str]:
        """Opens the sweep and guarantees it is closed: see the class docstring. Yields the parent run id."""
        parent = self.open_sweep(config, sweep_id, num_points)
        try:
            yield parent
            self.finish()
        except BaseException as error:
            self.abort(error)
            raise

    def finish(self) -> None:
        """Closes the open sweep FINISHED when every point finished, else FAILED (see `close_sweep`)."""
        if self._parent_run_id is not None:
            self.close_sweep(self._final_status())

    def abort(self, error: BaseException) -> None:
        """Closes the open sweep after `error`: FAILED (KILLED for Ctrl-C), no child left RUNNING; never raises.
        After `TrackingUnavailable` the runs are left as they are: nothing can be closed on a server that is gone,
        and a later run of the sweep reopens and closes them."""
        if self._parent_run_id is None:
            return
        if isinstance(error, TrackingUnavailable):
            self._parent_run_id = None
            return
        self._close_after_error(self._parent_run_id, _status_for(error), error)

    # -- points -------------------------------------------------------------------------------------------------

    def finished_point_keys(self) -> set[str]:
        """Returns the point keys that already have a FINISHED child run (one paged search)."""
        self._require_open()
        runs = self._search_children("attributes.status = 'FINISHED'")
        return {run.data.tags[TAG_POINT_KEY] for run in runs if TAG_POINT_KEY in run.data.tags}

    def log_point(self, point: Point, result: Result) -> str:
        """Logs one finished point as a child run: params, metrics, the result's tags and artifacts (a steering
        point: `generation.txt`, `generation.json`; an SAE: `density.npy`, `density_histogram.png`,
        `top_features.json`, `l0_histogram.json`).

        Reuses the point's earlier unfinished run if there is one; if the point already has a FINISHED run, nothing
        is logged and that run's id is returned. Returns the child run id.
        """
        parent = self._require_open()
        key = point.point_key
        if result.point_key != key:
            raise RunnerError(f"result for point {result.point_key} logged against point {key}")
        existing = self._children.get(key)
        if existing is not None and existing.status == "FINISHED":
            return existing.run_id
        child = self._start_child(
            parent, point, attempt=result.attempt, worker=result.worker, extra_tags=result.tags
        )
        try:
            now = _now_ms()
            metrics = [Metric(k, v, now, 0) for k, v in sorted(result.metrics.items())]
            params = self._new_params(child, point)
            # One call for params and metrics where MLflow's per-call limits allow it.
            while params or metrics:
                self._client.log_batch(
                    child.run_id, params=params[:MAX_PARAMS_TAGS_PER_BATCH], metrics=metrics[:MAX_METRICS_PER_BATCH]
                )
                params, metrics = params[MAX_PARAMS_TAGS_PER_BATCH:], metrics[MAX_METRICS_PER_BATCH:]
            child.params = child.params | set(point.params())
            if child.has_error_tag:
                self._client.delete_tag(child.run_id, TAG_ERROR)
                child.has_error_tag = False
            with tempfile.TemporaryDirectory(prefix="runner-point-") as scratch:
                write_point_artifacts(point, result, Path(scratch))
                # The run's artifact store straight from its URI (`MlflowClient.log_artifacts` reads the run first).
                get_artifact_repository(child.artifact_uri, tracking_uri=self.uri).log_artifacts(scratch)
            self._client.set_terminated(child.run_id, "FINISHED")
        except BaseException as error:
            self._terminate_quietly(child.run_id, _status_for(error), _describe(error))
            child.status = _status_for(error)
            raise
        child.status = "FINISHED"
        self._rows[key] = table_row(key, point.params(), result.metrics,
                                   result.text if isinstance(result, PointResult) else None)
        return child.run_id

    def fail_point(self, point: Point, error: str, attempt: int) -> str:
        """Records a point that failed: its child run ends FAILED with tag `runner.error` (scrubbed, truncated).

        A point that already has a FINISHED run keeps it. Returns the child run id.
        """
        parent = self._require_open()
        existing = self._children.get(point.point_key)
        if existing is not None and existing.status == "FINISHED":
            return existing.run_id
        child = self._start_child(parent, point, attempt=attempt, worker=None)
        try:
            self._log_params(child, point)
            self._client.set_tag(child.run_id, TAG_ERROR, _truncate(scrub(error)))
            child.has_error_tag = True
        finally:
            self._client.set_terminated(child.run_id, "FAILED")
            child.status = "FAILED"
        return child.run_id

    # -- internals ----------------------------------------------------------------------------------------------

    def _require_open(self) -> str:
        if self._parent_run_id is None:
            raise RunnerError("no sweep is open: call open_sweep (or use `with tracker.sweep(...)`) first")
        return self._parent_run_id

    def _ensure_experiment(self) -> str:
        experiment = self._client.get_experiment_by_name(self.experiment_name)
        if experiment is None:
            try:
                return self._client.create_experiment(
                    self.experiment_name, tags={TAG_EXPERIMENT_KIND: "custom_model_development"}
                )
            except MlflowException:
                # Another driver may have created it meanwhile.
                experiment = self._client.get_experiment_by_name(self.experiment_name)
                if experiment is None:
                    raise
        if experiment.lifecycle_stage == "deleted":
            raise RunnerError(
                f"tracking.experiment: MLflow experiment {self.experiment_name!r} is deleted; restore it "
                f"(`mlflow experiments restore --experiment-id {experiment.experiment_id}`) or choose another name"
            )
        return experiment.experiment_id

    def _search_children(self, extra_filter: str = "") -> list[Run]:
        query = f"tags.{TAG_PARENT} = '{self._parent_run_id}'"
        if extra_filter:
            query += f" AND {extra_filter}"
        return search_all(self._client, self._experiment_id, query)

    def _start_child(
        self,
        parent: str,
        point: Point,
        *,
        attempt: int,
        worker: str | None,
        extra_tags: Mapping[str, str] | None = None,
    ) -> _Child:
        """Creates the point's child run, or reopens its unfinished one, with fresh tags; status RUNNING."""
        tags = {TAG_PARENT: parent, TAG_SWEEP_ID: self._sweep_id, TAG_POINT_KEY: point.point_key,
                TAG_ROLE: "point", TAG_ATTEMPT: str(attempt),
                **{k: _truncate(v) for k, v in (extra_tags or {}).items()}}
        if worker is not None:
            tags[TAG_WORKER] = worker
        if isinstance(point, SteeringPoint) and point.neuronpedia_url is not None:
            tags[TAG_NEURONPEDIA] = point.neuronpedia_url
        child = self._children.get(point.point_key)
        if child is None:
            run = self._client.create_run(self._experiment_id, run_name=_run_name(point), tags=tags)
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

    def _log_params(self, child: _Child, point: Point) -> None:
        """Logs the point's params the run does not have yet."""
        params = self._new_params(child, point)
        for start in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(child.run_id, params=params[start : start + MAX_PARAMS_TAGS_PER_BATCH])
        child.params = child.params | {p.key for p in params}

    def _terminate_quietly(self, run_id: str, status: str, error: str) -> None:
        """Ends a run with an error tag; never raises (used while another error propagates)."""
        try:
            self._client.set_tag(run_id, TAG_ERROR, _truncate(scrub(error)))
            self._client.set_terminated(run_id, status)
        except Exception as failure:  # noqa: BLE001 - the original error matters more
            _log.warning("could not mark run %s %s: %s", run_id, status, first_line(str(failure)))

    def _close_after_error(self, parent: str, status: SweepStatus, error: BaseException) -> None:
        """Closes the sweep after `error` without ever masking it."""
        try:
            self._client.set_tag(parent, TAG_ERROR, _truncate(scrub(_describe(error))))
            self.close_sweep(status)
        except Exception:  # noqa: BLE001
            _log.exception("closing sweep %s after an error failed; terminating its runs only", self._sweep_id)
            for run in _safe(lambda: self._search_children("attributes.status = 'RUNNING'"), []):
                self._terminate_quietly(run.info.run_id, status, _describe(error))
            self._terminate_quietly(parent, status, _describe(error))
            self._parent_run_id = None

    def _final_status(self) -> SweepStatus:
        finished = sum(child.status == "FINISHED" for child in self._children.values())
        return "FINISHED" if finished >= self._num_points else "FAILED"

    def _table_rows(self) -> list[dict[str, Any]]:
        """One row per FINISHED child: from memory for points logged now, else (a resumed sweep) read back from
        the runs (and, for a steering point, its `generation.json`)."""
        finished = {key for key, child in self._children.items() if child.status == "FINISHED"}
        rows = [self._rows[key] for key in finished if key in self._rows]
        if finished - set(self._rows):
            with tempfile.TemporaryDirectory(prefix="runner-table-") as tmp:
                for run in self._search_children("attributes.status = 'FINISHED'"):
                    key = run.data.tags.get(TAG_POINT_KEY)
                    if key is None or key in self._rows or key not in finished:
                        continue
                    text = None
                    if self._kind == "steering":
                        path = self._client.download_artifacts(run.info.run_id, "generation.json", tmp)
                        text = json.loads(Path(path).read_text(encoding="utf-8"))["text"]
                    rows.append(table_row(key, run.data.params, run.data.metrics, text))
        order = ("prompt_index", "layer", "feature", "scale", "seed") if self._kind == "steering" else \
            ("layer", "site", "width", "l0_target")
        return sorted(rows, key=lambda r: tuple(r[column] for column in order))

    def _log_table_and_plots(self, parent: str, rows: list[dict[str, Any]]) -> None:
        import pandas as pd  # imported here so workers that only log points never pay for pandas/matplotlib

        frame = pd.DataFrame(rows)
        table_name = TABLE_ARTIFACT if self._kind == "steering" else SAE_TABLE_ARTIFACT
        with tempfile.TemporaryDirectory(prefix="runner-close-") as tmp:
            table = Path(tmp) / table_name
            frame.to_json(table, orient="split", index=False, date_format="iso")
            self._client.log_artifact(parent, str(table))
            plot_dir = Path(tmp) / PLOTS_DIR
            if self._kind == "steering":
                written = plots.write_feature_plots(frame, plot_dir)
            else:
                written = plots.write_sae_eval_plots(frame, plot_dir)
            if written:
                self._client.log_artifacts(parent, str(plot_dir), PLOTS_DIR)
        logged = json.loads(self._client.get_run(parent).data.tags.get(TAG_LOGGED_ARTIFACTS, "[]"))
        entry = {"path": table_name, "type": "table"}
        if entry not in logged:
            self._client.set_tag(parent, TAG_LOGGED_ARTIFACTS, json.dumps([*logged, entry]))


def write_point_artifacts(point: Point, result: Result, directory: Path) -> None:
    """Writes the files of one point's child run into `directory`."""
    if isinstance(result, PointResult):
        generation = {"text": result.text, "token_ids": list(result.token_ids), "prompt": point.prompt}
        (directory / "generation.txt").write_text(result.text, encoding="utf-8")
        (directory / "generation.json").write_text(json.dumps(generation), encoding="utf-8")
        return
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


def table_row(key: str, params: Mapping[str, str], metrics: Mapping[str, float], text: str | None) -> dict[str, Any]:
    """A row of the parent's table from a point's params and metrics (steering points also have their `text`)."""
    if "feature" in params:
        fields = {"prompt_index": int(params["prompt_index"]), "layer": int(params["layer"]),
                  "feature": int(params["feature"]), "scale": float(params["scale"]), "seed": int(params["seed"]),
                  "text": text}
    else:
        fields = {"sae_id": params["sae_id"], "layer": int(params["layer"]), "site": params["site"],
                  "width": params["width"], "l0_target": params["l0_target"]}
    return {"point_key": key, **fields, **{k: float(v) for k, v in sorted(metrics.items())}}


def _run_name(point: Point) -> str:
    if isinstance(point, SAEEvalPoint):
        return f"L{point.layer} {point.site} w{point.width} l0 {point.l0}"
    return f"L{point.layer} f{point.feature} x{point.scale:g} s{point.seed} p{point.prompt_index}"


def _status_for(error: BaseException) -> SweepStatus:
    return "KILLED" if isinstance(error, (KeyboardInterrupt, SystemExit)) else "FAILED"


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _truncate(text: str) -> str:
    return text if len(text) <= MAX_TAG_VAL_LENGTH else text[: MAX_TAG_VAL_LENGTH - 3] + "..."


def _now_ms() -> int:
    return int(time.time() * 1000)


def _safe(function: Callable[[], _T], default: _T) -> _T:
    try:
        return function()
    except Exception:  # noqa: BLE001
        return default
