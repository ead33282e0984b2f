"""The driver of a sweep: a checked plan (`runner.plan.prepare`) -> executor -> results -> MLflow.

`run_sweep` opens the sweep's parent run, skips points that already finished (resume), logs what an earlier run
left in the spool, runs the rest in jobs on an executor (`runner.execution`), and logs each point as it
completes. This process is the only MLflow writer: results come back on this thread and a tracking thread logs
them (`runner.tracking.writer.TrackingWriter`) while the executor goes on.

Before any of that, and before a model file is read or Ray starts, `claim_sweep` leases the sweep to this driver
(reaching a tracking server first; `runner.tracking.lease`): a second driver of the same sweep stops at once, and
no point is ever logged twice.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from runner.errors import TrackingUnavailable
from runner.execution.executor import JobExecutor, ProgressCallback
from runner.execution.local import LocalExecutor
from runner.plan.points import Job, Point, SteeringPoint
from runner.plan.prepare import SweepPlan
from runner.plan.search import CurveSearch, ScaleSamples, next_round
from runner.redaction import redact_uri
from runner.results import FailedPoint, Result

if TYPE_CHECKING:
    from collections.abc import Callable

    from runner.config.schema import ExperimentConfig
    from runner.tracking.lease import SweepLease
    from runner.tracking.spool import Spool
    from runner.tracking.store import SweepTracker
    from runner.tracking.writer import TrackingWriter


#: The tag of a search point's result: the round that evaluated it.
SEARCH_ROUND_TAG = "search/round"
#: `(round, points of the round, points still to run)`, as a search round starts.
RoundCallback = Callable[[int, int, int], None]


def round_samples(points: Sequence[SteeringPoint], curve: tuple[int, int], scale: float,
                  metrics: Mapping[str, Mapping[str, float]]) -> ScaleSamples:
    """The samples of one curve's scale: the metrics of its finished points, by (prompt index, seed)."""
    return {(point.prompt_index, point.seed): metrics[point.point_key] for point in points
            if (point.layer, point.feature) == curve and point.scale == scale and point.point_key in metrics}


def search_rows(searches: Mapping[tuple[int, int], CurveSearch]) -> list[dict[str, object]]:
    """Each curve's search outcome as JSON-safe data: layer, feature, status, the found, kept and best scales
    (None where unknown), the target metric's interval there, rounds and generations."""
    rows: list[dict[str, object]] = []
    for (layer, feature), search in searches.items():
        summary = search.summary()
        known = {name: (None if math.isnan(value) else value) for name, value in
                 (("found_scale", summary.found_scale), ("kept_scale", summary.kept_scale),
                  ("best_scale", summary.best_scale))}
        target = summary.target_at_found
        rows.append({"layer": layer, "feature": feature, "status": summary.status, **known,
                     "target_mean": None if math.isnan(target.mean) else target.mean,
                     "target_interval": [target.low, target.high] if math.isfinite(target.half_width) else None,
                     "target_n": target.n, "rounds": summary.rounds, "generations": summary.generations})
    return rows


@dataclasses.dataclass(frozen=True)
class SweepSummary:
    """How a sweep ended.

    Attributes:
      seconds: Wall time of `run_sweep`.
      tracking_seconds: Time spent logging to MLflow (opening the sweep, the tracking thread's work, closing it),
        mostly while the workers computed.
      tracking_wait_seconds: The part of `seconds` the sweep spent waiting on MLflow alone: the opening not
        hidden behind the workers' start-up, the results still to log after the last job, the closing not
        hidden behind the workers' shut-down.
    """

    sweep_id: str
    parent_run_id: str
    experiment_id: str | None
    points_total: int
    points_skipped: int
    points_finished: int
    points_failed: int
    generated_tokens: int
    seconds: float
    tracking_seconds: float
    compilations: int
    tracking_wait_seconds: float = 0.0
    points_from_spool: int = 0
    faults: dict[str, int] = dataclasses.field(default_factory=dict)
    search: list[dict[str, object]] = dataclasses.field(default_factory=list)


def hand_over_results(writer: TrackingWriter, job: Job, results: Sequence[Result | FailedPoint]) -> None:
    """Queues a job's results for the tracking thread: its finished points as results, each point the worker could
    not finish (`FailedPoint`) as a failure with its own error."""
    finished = [(point, result) for point, result in zip(job.points, results, strict=True)
                if not isinstance(result, FailedPoint)]
    if finished:
        writer.put_results([point for point, _ in finished], [result for _, result in finished])
    for point, result in zip(job.points, results, strict=True):
        if isinstance(result, FailedPoint):
            writer.put_failure([point], result.error, result.attempt)


def spool_path(output_dir: Path, sweep_id: str) -> Path:
    """Where a sweep's results wait while the tracking server is unreachable."""
    return Path(output_dir) / ".runner" / "spool" / f"{sweep_id}.jsonl"


def claim_sweep(
    config: ExperimentConfig,
    sweep_id: str,
    *,
    take_over: bool = False,
    on_retry: Callable[[str, float], None] | None = None,
) -> SweepLease:
    """Leases the sweep to this driver, reaching a tracking server first (retrying for `tracking.retry_timeout_s`);
    call it before anything heavy starts, and release the lease when the sweep ends.

    Args:
      config: The experiment.
      sweep_id: Its sweep (`runner.plan.points.sweep_id`).
      take_over: Take a tracking server's lease even while another driver's heartbeat is fresh.
      on_retry: Called with (the failure, seconds until the next try) while the store is unreachable.

    Raises:
      TrackingUnavailable: The store stayed unreachable, or refused the connection.
      LeaseHeld: Another driver runs the sweep.
    """
    from runner.tracking.lease import claim_sweep as claim

    tracking = config.tracking
    return claim(tracking.uri, tracking.experiment, sweep_id, retry_timeout_s=tracking.retry_timeout_s,
                 take_over=take_over, on_retry=on_retry)


def run_sweep(
    sweep_plan: SweepPlan,
    *,
    cache_dir: Path,
    executor: JobExecutor | None = None,
    progress: ProgressCallback | None = None,
    output_dir: Path | None = None,
    lease: SweepLease | None = None,
    on_round: RoundCallback | None = None,
) -> SweepSummary:
    """Runs the planned sweep and logs every point to MLflow (this process is the only MLflow writer).

    Points whose child run already FINISHED are skipped, so re-running a sweep resumes it; results spooled by an
    earlier run whose tracking server went away (`output_dir/.runner/spool/`, `output_dir` defaulting to the
    working directory) are logged first, without being computed again. Results are logged by a tracking thread
    while the executor goes on (`TrackingWriter`). `executor` defaults to a `LocalExecutor`. `progress` is called
    after every logged job with (points done, points to run, failures, tokens). `lease` is the sweep's lease
    (`claim_sweep`); without one, the sweep is claimed here, before the executor starts, and released at the end.
    `on_round` is called as each round of a scale search starts, with (round, its points, those to run).

    Raises:
      TrackingUnavailable: The tracking server stayed unreachable for `tracking.retry_timeout_s` (at the start, or
        during the sweep: then the finished results are in the spool for the next run).
      LeaseHeld: Another driver runs the sweep.
      LeaseLost: Another driver took the sweep over meanwhile; its runs are left to that driver.
    """
    own_lease = lease is None
    if own_lease:
        lease = claim_sweep(sweep_plan.config, sweep_plan.sweep_id)
    try:
        executor = executor if executor is not None else LocalExecutor(sweep_plan, cache_dir)
        spool = spool_path(output_dir if output_dir is not None else Path.cwd(), sweep_plan.sweep_id)
        return SweepRun(sweep_plan, executor, spool, progress, lease, on_round).run()
    finally:
        if own_lease:
            lease.release()


@dataclasses.dataclass(frozen=True)
class _Opened:
    """What opening the sweep found.

    Attributes:
      parent_run_id: The sweep's parent run.
      spooled: Results an earlier run left in the spool, logged now.
      done_keys: Points not to run again: FINISHED before, or just logged from the spool.
      seconds: Time the opening took.
      finished_metrics: A search's finished points' metrics, by point key (what its rounds are replayed from).
      spooled_later: A search's spooled results of points of later rounds, by point key (logged when their
        round comes, instead of running them).
    """

    parent_run_id: str
    spooled: list[Result]
    done_keys: set[str]
    seconds: float
    finished_metrics: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    spooled_later: dict[str, Result] = dataclasses.field(default_factory=dict)


class SweepRun:
    """One run of a planned sweep (see `run_sweep`): opens the tracker on a set-up thread while the executor
    starts, runs what is left, counts what the tracking thread logged, and closes the sweep while the executor
    shuts down. On any error the parent run is closed FAILED (KILLED on an interrupt), never left RUNNING.

    Args:
      sweep_plan: The checked sweep.
      executor: Where the jobs run.
      spool: The file where unlogged results wait (`spool_path`).
      progress: Called after every logged job (see `run_sweep`).
      lease: The sweep's lease, checked before every result is handed on.
      on_round: Called as each round of a scale search starts (see `run_sweep`).
    """

    def __init__(self, sweep_plan: SweepPlan, executor: JobExecutor, spool: Path,
                 progress: ProgressCallback | None = None, lease: SweepLease | None = None,
                 on_round: RoundCallback | None = None):
        self._plan = sweep_plan
        self._on_round = on_round
        self._lease = lease
        self._executor = executor
        self._spool_path = spool
        self._progress = progress
        self._tracker: SweepTracker | None = None
        self._spool: Spool | None = None
        self._counts_lock = threading.Lock()
        self._to_run = self._finished = self._failed = self._tokens = 0
        self._points_total = len(sweep_plan.points)

    def run(self) -> SweepSummary:
        """Runs the sweep to its end; see `run_sweep`."""
        started = time.perf_counter()
        if self._lease is not None:
            self._lease.check()  # a lease lost while the plan was made: the runs are another driver's
        background = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="runner-tracking-setup")
        opening = background.submit(self.open_tracking)
        try:
            self._executor.start()  # Ray and the workers come up while the tracker opens (Ray wants the main thread)
            waiting = time.perf_counter()
            opened = opening.result()
            tracking_wait = time.perf_counter() - waiting
            writer = self._tracking_writer()
            searches = None
            if self._plan.search is None:
                remaining = [point for point in self._plan.points if point.point_key not in opened.done_keys]
                self._to_run = len(remaining)
                self._run_jobs(remaining, writer)
                faults = self._executor.fault_counts()
            else:
                searches, faults = self._run_search(opened, writer)
            waiting = time.perf_counter()
            writer.close()  # the results still queued when the last job came back
            if searches is not None:
                self._tracker.log_search(self._plan.search, *searches)
            self._tracker.log_sweep_metrics(faults)
            tracking_wait += time.perf_counter() - waiting
            finishing = background.submit(self.finish_tracking)  # the table and plots, while the workers shut down
            self._executor.close()
            waiting = time.perf_counter()
            close_seconds = finishing.result()
            tracking_wait += time.perf_counter() - waiting
        except BaseException as error:
            with contextlib.suppress(BaseException):
                opening.result()  # an interrupt may come while the sweep is being opened: close what was opened
            if self._tracker is not None and not _is_lease_lost(error):  # a new owner has the runs now
                self._tracker.abort(error)
            raise
        finally:
            self._executor.close()
            background.shutdown(wait=True)
        total = self._points_total
        return SweepSummary(
            sweep_id=self._plan.sweep_id,
            parent_run_id=opened.parent_run_id,
            experiment_id=self._tracker.experiment_id,
            points_total=total,
            points_skipped=total - self._to_run - len(opened.spooled),
            points_finished=self._finished + len(opened.spooled),
            points_failed=self._failed,
            generated_tokens=self._tokens,
            seconds=time.perf_counter() - started,
            tracking_seconds=opened.seconds + writer.busy_seconds + close_seconds,
            tracking_wait_seconds=tracking_wait,
            compilations=self._executor.compilations,
            points_from_spool=len(opened.spooled),
            faults=faults,
            search=search_rows(searches[0]) if searches is not None else [],
        )

    def open_tracking(self) -> _Opened:
        """Connects to the tracking store, opens the sweep, finds its finished points and logs what an earlier run
        left in the spool (on the set-up thread)."""
        from runner.tracking.lease import reach_store
        from runner.tracking.spool import Spool
        from runner.tracking.store import SweepTracker

        config = self._plan.config
        opened = time.perf_counter()
        self._spool = Spool(self._spool_path)
        reach_store(config.tracking.uri, config.tracking.retry_timeout_s)  # a new local store: created safely
        self._tracker = SweepTracker(config.tracking.uri, config.tracking.experiment)
        parent_run_id = self._tracker.open_sweep(_as_logged(config), self._plan.sweep_id, self._plan.points)
        done = self._tracker.finished_point_keys()
        by_key: dict[str, Point] = {point.point_key: point for point in self._plan.points}
        unlogged = list({r.point_key: r for r in self._spool.read() if r.point_key not in done}.values())
        spooled = [r for r in unlogged if r.point_key in by_key]
        if spooled:
            self._tracker.log_results([by_key[result.point_key] for result in spooled], spooled)
        finished_metrics, later = {}, {}
        if self._plan.search is not None:
            finished_metrics = self._tracker.finished_point_metrics()
            finished_metrics.update({result.point_key: dict(result.metrics) for result in spooled})
            later = {result.point_key: result for result in unlogged if result.point_key not in by_key}
        self._spool.clear()
        seconds = time.perf_counter() - opened
        self._tracker.warm_up_plots()
        return _Opened(parent_run_id, spooled, done | {result.point_key for result in spooled}, seconds,
                       finished_metrics, later)

    def count_logged(self, finished: int, failed: int, tokens: int) -> None:
        """Adds what the tracking thread just logged to the counts, and reports the progress."""
        with self._counts_lock:
            self._finished += finished
            self._failed += failed
            self._tokens += tokens
            done, failures, tokens_so_far = self._finished + self._failed, self._failed, self._tokens
        if self._progress is not None:
            self._progress(done, self._to_run, failures, tokens_so_far)

    def finish_tracking(self) -> float:
        """Logs the sweep's table and plots and closes its parent run; returns the seconds it took."""
        finishing = time.perf_counter()
        self._tracker.finish()
        return time.perf_counter() - finishing

    def _tracking_writer(self) -> TrackingWriter:
        """The tracking thread of this run, with the config's patience for an unreachable server."""
        from runner.tracking.writer import RetryPolicy, TrackingWriter  # imported by the set-up thread by now

        patience = self._plan.config.tracking.retry_timeout_s
        policy = RetryPolicy(max_delay_s=min(30.0, patience / 10), give_up_after_s=patience)
        return TrackingWriter(self._tracker, self._spool, policy, self.count_logged)

    def _run_search(self, opened: _Opened, writer: TrackingWriter
                    ) -> tuple[tuple[dict[tuple[int, int], CurveSearch], dict[tuple[int, int], str]], dict[str, int]]:
        """Runs a scale search round by round (`runner.plan.search`): each round's points are every unfinished
        curve's candidate scales on every prompt and seed, run together; their metrics narrow the brackets.

        A resumed search replays its rounds from the metrics of the points already logged, so it runs only the
        points of the rounds it had not finished. Returns each `(layer, feature)` curve's search and curve key,
        and the fault counts of all rounds.
        """
        settings, steering = self._plan.search, self._plan.config.steering
        searches = {(layer, feature): CurveSearch(settings)
                    for layer in steering.layers for feature in steering.features}
        known = dict(opened.finished_metrics)
        curve_keys: dict[tuple[int, int], str] = {}
        faults: dict[str, int] = {}
        self._points_total = 0
        round_number = 0
        while candidates := next_round(searches):
            round_number += 1
            points = self._plan.points_at(candidates)
            self._points_total += len(points)
            curve_keys.update({(point.layer, point.feature): point.curve_key for point in points})
            self._tracker.add_points(points)
            from_spool = [point for point in points
                          if point.point_key not in known and point.point_key in opened.spooled_later]
            if from_spool:
                writer.put_results(from_spool, [opened.spooled_later[point.point_key] for point in from_spool])
                known.update({point.point_key: dict(opened.spooled_later[point.point_key].metrics)
                              for point in from_spool})
            todo = [point for point in points if point.point_key not in known]
            if self._on_round is not None:
                self._on_round(round_number, len(points), len(todo))
            if todo:
                with self._counts_lock:
                    self._to_run += len(todo)
                known.update(self._run_round(todo, writer, round_number))
                for name, count in self._executor.fault_counts().items():
                    faults[name] = faults.get(name, 0) + count
            for curve, scales in candidates.items():
                for scale in scales:
                    searches[curve].record(scale, round_samples(points, curve, scale, known))
                searches[curve].end_round()
        return (searches, curve_keys), faults

    def _run_round(self, points: list[SteeringPoint], writer: TrackingWriter, round_number: int
                   ) -> dict[str, dict[str, float]]:
        """Runs one search round's points (tagged `search/round`); returns the metrics of those that finished."""
        finished: dict[str, dict[str, float]] = {}
        round_tag = {SEARCH_ROUND_TAG: str(round_number)}

        def on_result(job: Job, results: list[Result | FailedPoint]) -> None:
            tagged = [dataclasses.replace(result, tags={**result.tags, **round_tag}) for result in results]
            finished.update({result.point_key: dict(result.metrics) for result in tagged
                             if not isinstance(result, FailedPoint)})
            hand_over_results(writer, job, tagged)

        self._execute(points, writer, on_result)
        return finished

    def _run_jobs(self, remaining: list[Point], writer: TrackingWriter) -> None:
        """Runs the remaining points' jobs, handing their results and failures to the tracking thread; on an
        error, abandons the tracking thread (what it did not log is spooled) and raises the error.

        Raises:
          TrackingUnavailable: The tracking thread gave up; the results not logged are in the spool.
        """
        self._execute(remaining, writer, lambda job, results: hand_over_results(writer, job, results))

    def _execute(self, points: Sequence[Point], writer: TrackingWriter,
                 put_results: Callable[[Job, list[Result | FailedPoint]], None]) -> None:
        """Runs the points' jobs on the executor, results to `put_results` (after checking the sweep's lease) and
        failures to the tracking thread (see `_run_jobs`)."""

        def on_result(job: Job, results: list[Result]) -> None:
            if self._lease is not None:
                self._lease.check()
            put_results(job, results)

        try:
            self._executor.run(
                self._plan.pack(points),
                on_result,
                lambda job, error, attempt: writer.put_failure(job.points, error, attempt),
            )
        except TrackingUnavailable:
            writer.close(abandon=True)  # raises it again, saying where the unlogged results are kept
            raise
        except BaseException:
            with contextlib.suppress(TrackingUnavailable):
                writer.close(abandon=True)
            raise


def _as_logged(config: ExperimentConfig) -> ExperimentConfig:
    """The config as the parent run records it: the tracking URI without credentials (`redact_uri`)."""
    uri = redact_uri(config.tracking.uri)
    if uri == config.tracking.uri:
        return config
    return config.model_copy(update={"tracking": config.tracking.model_copy(update={"uri": uri})})


def _is_lease_lost(error: BaseException) -> bool:
    from runner.tracking.lease import LeaseLost

    return isinstance(error, LeaseLost)
