"""MLflow tracking of a sweep: one parent run per sweep, its child runs laid out by the sweep's kind.

The parent carries tags `sweep_id` and `runner.kind`. A steering sweep keeps every point's record on the parent
and a child run per steering curve (`runner.tracking.curve_runs`); an SAE evaluation a child run per SAE
(`runner.tracking.point_runs`). A rerun of the same config reuses the parent and skips the points that already
finished, so no point is ever logged as finished twice. Only the process that owns a `SweepTracker` writes to the
sweep.

Nothing from the environment is logged; error texts are scrubbed of URL credentials and tokens.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Literal

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from runner.config.schema import ExperimentConfig
from runner.errors import RunnerError, TrackingUnavailable
from runner.plan.points import Point, SteeringPoint
from runner.plan.search import CurveSearch, SearchSettings
from runner.redaction import scrub
from runner.results import Result
from runner.tracking import plots
from runner.tracking.clients import TrackingClients, log_batch
from runner.tracking.curve_runs import CurveRuns
from runner.tracking.layout import (
    CONFIG_ARTIFACT,
    TAG_ERROR,
    TAG_EXPERIMENT_KIND,
    TAG_KIND,
    TAG_LOGGED_ARTIFACTS,
    TAG_ROLE,
    TAG_SWEEP_ID,
)
from runner.tracking.point_runs import PointRuns
from runner.tracking.runs import ChildRuns, SweepRuns, now_ms, terminate_quietly, truncate
from runner.tracking.search import find_sweep_parent
from runner.tracking.sqlite import checkpoint_sqlite_tracking, tune_sqlite_tracking

_log = logging.getLogger(__name__)

SweepStatus = Literal["FINISHED", "FAILED", "KILLED"]
#: The parent's progress metrics (`points_finished`, `points_failed`) are logged at most this often while the
#: sweep runs, and when it closes.
PROGRESS_INTERVAL_S = 5.0


class SweepTracker:
    """Logs one sweep to MLflow through `MlflowClient`s (no fluent global state).

    Usage::

        tracker = SweepTracker(config.tracking.uri, config.tracking.experiment)
        with tracker.sweep(config, sweep_id(config), points) as parent_run_id:
            done = tracker.finished_point_keys()
            for job in jobs:  # of the points not in `done`
                tracker.log_results(job.points, run(job))

    Any exception inside the `with` ends the parent FAILED (KeyboardInterrupt or SystemExit: KILLED) with no child
    left RUNNING; a normal exit closes it FINISHED when every point finished, else FAILED. `TrackingUnavailable`
    leaves the runs as they are (the server cannot be reached); the next run of the sweep closes them.

    Args:
      uri: The tracking server or database.
      experiment_name: The MLflow experiment (created when missing).
      parallelism: Requests in flight at once (`TrackingClients`); by default 4 to a server, 1 to a local store.
    """

    def __init__(self, uri: str, experiment_name: str, parallelism: int | None = None) -> None:
        self.uri = uri
        self.experiment_name = experiment_name
        tune_sqlite_tracking(uri)
        self._clients = TrackingClients(uri, parallelism)
        self._client = self._clients.client
        self._experiment_id: str | None = None
        self._parent_run_id: str | None = None
        self._sweep_id = ""
        self._num_points = 0
        self._parent_artifact_uri = ""
        self._children: ChildRuns | None = None
        self._progress_logged = -PROGRESS_INTERVAL_S

    @property
    def experiment_id(self) -> str | None:
        """The MLflow experiment id, once `open_sweep` has run."""
        return self._experiment_id

    @property
    def parent_run_id(self) -> str | None:
        """The parent run id while a sweep is open."""
        return self._parent_run_id

    # -- sweep lifecycle ----------------------------------------------------------------------------------------

    def open_sweep(self, config: ExperimentConfig, sweep_id: str, points: Sequence[Point]) -> str:
        """Creates the experiment if missing, then reuses the sweep's parent run (resume) or creates it, and reads
        what an earlier run of the sweep logged.

        Logs params `sweep_id` and `num_points` and the artifact `config/experiment.yaml` once, and marks the parent
        RUNNING. A steering sweep's curves that an earlier run completed but did not log are logged now. Returns
        the parent run id.
        """
        self._experiment_id = self._ensure_experiment()
        parent = find_sweep_parent(self._client, self._experiment_id, sweep_id)
        if parent is None:
            run = self._client.create_run(
                self._experiment_id,
                run_name=f"{config.name}-{sweep_id[:8]}",
                tags={TAG_SWEEP_ID: sweep_id, TAG_ROLE: "sweep", TAG_KIND: config.kind},
            )
            run_id, artifact_uri, logged, tags = run.info.run_id, run.info.artifact_uri, {}, run.data.tags
        else:
            run_id, artifact_uri = parent.info.run_id, parent.info.artifact_uri
            logged, tags = parent.data.params, parent.data.tags
            self._client.update_run(run_id, status="RUNNING")
            if TAG_ERROR in tags:
                self._client.delete_tag(run_id, TAG_ERROR)
        self._parent_run_id, self._sweep_id, self._num_points = run_id, sweep_id, len(points)
        self._parent_artifact_uri = artifact_uri
        try:
            params = {"sweep_id": sweep_id, "num_points": str(len(points))}
            log_batch(self._client, run_id, params=[Param(k, v) for k, v in params.items() if k not in logged],
                      tags=[RunTag(TAG_KIND, config.kind)] if TAG_KIND not in tags else [])
            if CONFIG_ARTIFACT not in {f.path for f in self._client.list_artifacts(run_id, "config")}:
                self._client.log_text(run_id, config.to_yaml(), CONFIG_ARTIFACT)
            runs = SweepRuns(self._clients, self._experiment_id, run_id, artifact_uri, sweep_id)
            if config.kind == "steering":
                children = CurveRuns(runs, [point for point in points if isinstance(point, SteeringPoint)])
                children.load()
            else:
                children = PointRuns(runs, list(points))
            self._children = children
        except BaseException as error:
            terminate_quietly(self._client, run_id, _status_for(error), _describe(error))
            self._parent_run_id = None
            raise
        return run_id

    def close_sweep(self, status: SweepStatus) -> None:
        """Ends the child runs left RUNNING, logs the counts, tables, plots and report on the parent, then
        terminates it with `status`."""
        parent = self._require_open()
        children = self._require_children()
        children.end_running("KILLED" if status == "KILLED" else "FAILED")
        now = now_ms()
        counts = {"points_total": self._num_points, **children.counts()}
        log_batch(self._client, parent, metrics=[Metric(k, float(v), now, 0) for k, v in counts.items()])
        self._log_parent_files(parent, children)
        self._client.set_terminated(parent, status)
        self._parent_run_id = None
        self._clients.close()
        checkpoint_sqlite_tracking(self.uri)

    def warm_up_plots(self) -> None:
        """Loads what closing the sweep needs now (matplotlib and its font, pandas, SciPy's t quantiles, jinja2:
        about a second), e.g. while the workers start, rather than when the sweep closes."""
        import importlib

        plots.warm_up()
        for module in ("pandas", "scipy.special", "jinja2"):
            importlib.import_module(module)

    def log_sweep_metrics(self, metrics: Mapping[str, float]) -> None:
        """Logs metrics of the whole sweep on its parent run (e.g. `preemptions`, `worker_crashes`)."""
        parent = self._require_open()
        now = now_ms()
        log_batch(self._client, parent, metrics=[Metric(k, float(v), now, 0) for k, v in sorted(metrics.items())])

    @contextlib.contextmanager
    def sweep(self, config: ExperimentConfig, sweep_id: str, points: Sequence[Point]) -> Iterator[str]:
        """Opens the sweep and guarantees it is closed: see the class docstring. Yields the parent run id."""
        parent = self.open_sweep(config, sweep_id, points)
        try:
            yield parent
            self.finish()
        except BaseException as error:
            self.abort(error)
            raise

    def finish(self) -> None:
        """Closes the open sweep FINISHED when every point finished, else FAILED (see `close_sweep`)."""
        if self._parent_run_id is not None:
            finished = self._require_children().point_counts()["points_finished"]
            self.close_sweep("FINISHED" if finished >= self._num_points else "FAILED")

    def abort(self, error: BaseException) -> None:
        """Closes the open sweep after `error`: FAILED (KILLED for Ctrl-C), no child left RUNNING; never raises.
        After `TrackingUnavailable` the runs are left as they are: nothing can be closed on a server that is gone,
        and a later run of the sweep reopens and closes them."""
        if self._parent_run_id is None:
            return
        if isinstance(error, TrackingUnavailable):
            self._parent_run_id = None
            self._clients.close()
            return
        self._close_after_error(self._parent_run_id, _status_for(error), error)

    # -- points -------------------------------------------------------------------------------------------------

    def finished_point_keys(self) -> set[str]:
        """The point keys that already finished (read when the sweep was opened, and logged since)."""
        self._require_open()
        return self._require_children().finished_point_keys()

    def add_points(self, points: Sequence[SteeringPoint]) -> None:
        """Adds a search round's points to the open steering sweep (their curves are planned with them)."""
        self._require_open()
        self._curve_runs().add_points(points)

    def finished_point_metrics(self) -> dict[str, dict[str, float]]:
        """The metrics of every point of the steering sweep that finished before it was opened, by point key (what
        a search replays its rounds from)."""
        self._require_open()
        return self._curve_runs().finished_point_metrics()

    def log_search(self, settings: SearchSettings, searches: Mapping[tuple[int, int], CurveSearch],
                   curve_keys: Mapping[tuple[int, int], str]) -> None:
        """Logs each curve's scale-search summary on its curve run (`search/*` metrics, the `search/status` tag;
        `SearchSummary.metrics`/`tags`), and keeps them for the sweep's curve table."""
        self._require_open()
        summaries = {}
        for curve, search in searches.items():
            summary = search.summary()
            summaries[curve_keys[curve]] = (summary.metrics(), summary.tags(settings))
        self._curve_runs().log_search(summaries)

    def _curve_runs(self) -> CurveRuns:
        children = self._require_children()
        if not isinstance(children, CurveRuns):
            raise RunnerError("a steering sweep's operation on an SAE evaluation sweep")
        return children

    def log_results(self, points: Sequence[Point], results: Sequence[Result]) -> None:
        """Logs a batch of finished points (a job's) and the sweep's progress. A point that already finished
        keeps its first result; logging the same batch again (a retry after an error) logs nothing twice."""
        parent = self._require_open()
        self._require_children().log_results(list(points), list(results), also=self._progress(parent))

    def fail_points(self, points: Sequence[Point], error: str, attempt: int) -> None:
        """Records a batch of points whose job failed on its `attempt`-th try with `error` (scrubbed, truncated).
        A point that already finished keeps its result; a failed point runs again on the next run of the sweep."""
        parent = self._require_open()
        self._require_children().fail_points(list(points), error, attempt, also=self._progress(parent))

    # -- internals ----------------------------------------------------------------------------------------------

    def _progress(self, parent: str) -> Callable[[MlflowClient], None] | None:
        """The request that logs the sweep's progress on the parent (`points_finished`, `points_failed`), at most
        every `PROGRESS_INTERVAL_S`; None when it is not due."""
        if time.monotonic() - self._progress_logged < PROGRESS_INTERVAL_S:
            return None
        self._progress_logged = time.monotonic()
        children = self._require_children()

        def log_progress(client: MlflowClient) -> None:
            now = now_ms()
            counts = children.point_counts()
            client.log_batch(parent, metrics=[Metric(k, float(v), now, 0) for k, v in counts.items()])

        return log_progress

    def _require_open(self) -> str:
        if self._parent_run_id is None:
            raise RunnerError("no sweep is open: call open_sweep (or use `with tracker.sweep(...)`) first")
        return self._parent_run_id

    def _require_children(self) -> ChildRuns:
        if self._children is None:
            raise RunnerError("no sweep is open: call open_sweep (or use `with tracker.sweep(...)`) first")
        return self._children

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

    def _log_parent_files(self, parent: str, children: ChildRuns) -> None:
        """Writes the layout's tables, plots and report and uploads them (in parallel to a server); the tables
        are listed in the parent's `mlflow.loggedArtifacts` tag, where the UI finds them."""
        with tempfile.TemporaryDirectory(prefix="runner-close-") as scratch:
            root = Path(scratch)
            tables = children.write_parent_files(root)
            files = sorted(path for path in root.rglob("*") if path.is_file())
            repository = self._clients.artifacts(self._parent_artifact_uri)

            def upload(_client: MlflowClient, path: Path) -> None:
                folder = path.parent.relative_to(root).as_posix()
                repository.log_artifact(str(path), None if folder == "." else folder)

            self._clients.map(upload, files)
        if tables:
            entries = json.loads(self._client.get_run(parent).data.tags.get(TAG_LOGGED_ARTIFACTS, "[]"))
            entries += [entry for entry in ({"path": table, "type": "table"} for table in tables)
                        if entry not in entries]
            self._client.set_tag(parent, TAG_LOGGED_ARTIFACTS, json.dumps(entries))

    def _close_after_error(self, parent: str, status: SweepStatus, error: BaseException) -> None:
        """Closes the sweep after `error` without ever masking it."""
        try:
            self._client.set_tag(parent, TAG_ERROR, truncate(scrub(_describe(error))))
            self.close_sweep(status)
        except Exception:  # noqa: BLE001
            _log.exception("closing sweep %s after an error failed; ending its runs only", self._sweep_id)
            with contextlib.suppress(Exception):
                self._require_children().end_running(status)
            terminate_quietly(self._client, parent, status, _describe(error))
            self._parent_run_id = None
            self._clients.close()


def _status_for(error: BaseException) -> SweepStatus:
    return "KILLED" if isinstance(error, (KeyboardInterrupt, SystemExit)) else "FAILED"


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"
