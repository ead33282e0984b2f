"""The driver of a sweep: a checked plan (`runner.plan.prepare`) -> executor -> results -> MLflow.

`run_sweep` opens the sweep's parent run, skips points that already finished (resume), logs what an earlier run
left in the spool, runs the rest in jobs on an executor (`runner.execution`), and logs each point as it
completes. This process is the only MLflow writer: results come back on this thread and a tracking thread logs
them (`runner.tracking.writer.TrackingWriter`) while the executor goes on.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from runner.errors import TrackingUnavailable
from runner.execution.executor import JobExecutor, ProgressCallback
from runner.execution.local import LocalExecutor
from runner.plan.points import Job, Point
from runner.plan.prepare import SweepPlan
from runner.results import FailedPoint, Result

if TYPE_CHECKING:
    # MLflow is imported on the tracking set-up thread, while Ray and the workers start on this one.
    from runner.tracking.spool import Spool
    from runner.tracking.store import SweepTracker
    from runner.tracking.writer import TrackingWriter


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


def run_sweep(
    sweep_plan: SweepPlan,
    *,
    cache_dir: Path,
    executor: JobExecutor | None = None,
    progress: ProgressCallback | None = None,
    output_dir: Path | None = None,
) -> SweepSummary:
    """Runs the planned sweep and logs every point to MLflow (this process is the only MLflow writer).

    Points whose child run already FINISHED are skipped, so re-running a sweep resumes it; results spooled by an
    earlier run whose tracking server went away (`output_dir/.runner/spool/`, `output_dir` defaulting to the
    working directory) are logged first, without being computed again. Results are logged by a tracking thread
    while the executor goes on (`TrackingWriter`). `executor` defaults to a `LocalExecutor`. `progress` is called
    after every logged job with (points done, points to run, failures, tokens).

    Raises:
      TrackingUnavailable: The tracking server stayed unreachable for `tracking.retry_timeout_s`; the finished
        results are in the spool for the next run.
    """
    executor = executor if executor is not None else LocalExecutor(sweep_plan, cache_dir)
    spool = spool_path(output_dir if output_dir is not None else Path.cwd(), sweep_plan.sweep_id)
    return SweepRun(sweep_plan, executor, spool, progress).run()


@dataclasses.dataclass(frozen=True)
class _Opened:
    """What opening the sweep found.

    Attributes:
      parent_run_id: The sweep's parent run.
      spooled: Results an earlier run left in the spool, logged now.
      done_keys: Points not to run again: FINISHED before, or just logged from the spool.
      seconds: Time the opening took.
    """

    parent_run_id: str
    spooled: list[Result]
    done_keys: set[str]
    seconds: float


class SweepRun:
    """One run of a planned sweep (see `run_sweep`): opens the tracker on a set-up thread while the executor
    starts, runs what is left, counts what the tracking thread logged, and closes the sweep while the executor
    shuts down. On any error the parent run is closed FAILED (KILLED on an interrupt), never left RUNNING.

    Args:
      sweep_plan: The checked sweep.
      executor: Where the jobs run.
      spool: The file where unlogged results wait (`spool_path`).
      progress: Called after every logged job (see `run_sweep`).
    """

    def __init__(self, sweep_plan: SweepPlan, executor: JobExecutor, spool: Path,
                 progress: ProgressCallback | None = None):
        self._plan = sweep_plan
        self._executor = executor
        self._spool_path = spool
        self._progress = progress
        self._tracker: SweepTracker | None = None
        self._spool: Spool | None = None
        self._counts_lock = threading.Lock()
        self._to_run = self._finished = self._failed = self._tokens = 0

    def run(self) -> SweepSummary:
        """Runs the sweep to its end; see `run_sweep`."""
        started = time.perf_counter()
        background = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="runner-tracking-setup")
        opening = background.submit(self.open_tracking)
        try:
            self._executor.start()  # Ray and the workers come up while the tracker opens (Ray wants the main thread)
            waiting = time.perf_counter()
            opened = opening.result()
            tracking_wait = time.perf_counter() - waiting
            remaining = [point for point in self._plan.points if point.point_key not in opened.done_keys]
            self._to_run = len(remaining)
            writer = self._tracking_writer()
            self._run_jobs(remaining, writer)
            waiting = time.perf_counter()
            writer.close()  # the results still queued when the last job came back
            faults = self._executor.fault_counts()
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
            if self._tracker is not None:
                self._tracker.abort(error)
            raise
        finally:
            self._executor.close()
            background.shutdown(wait=True)
        total = len(self._plan.points)
        return SweepSummary(
            sweep_id=self._plan.sweep_id,
            parent_run_id=opened.parent_run_id,
            experiment_id=self._tracker.experiment_id,
            points_total=total,
            points_skipped=total - len(remaining) - len(opened.spooled),
            points_finished=self._finished + len(opened.spooled),
            points_failed=self._failed,
            generated_tokens=self._tokens,
            seconds=time.perf_counter() - started,
            tracking_seconds=opened.seconds + writer.busy_seconds + close_seconds,
            tracking_wait_seconds=tracking_wait,
            compilations=self._executor.compilations,
            points_from_spool=len(opened.spooled),
            faults=faults,
        )

    def open_tracking(self) -> _Opened:
        """Connects to the tracking store, opens the sweep, finds its finished points and logs what an earlier run
        left in the spool (on the set-up thread)."""
        from runner.tracking.spool import Spool
        from runner.tracking.store import SweepTracker

        config = self._plan.config
        opened = time.perf_counter()
        self._spool = Spool(self._spool_path)
        self._tracker = SweepTracker(config.tracking.uri, config.tracking.experiment)
        parent_run_id = self._tracker.open_sweep(config, self._plan.sweep_id, len(self._plan.points))
        done = self._tracker.finished_point_keys()
        by_key: dict[str, Point] = {point.point_key: point for point in self._plan.points}
        spooled = [r for r in self._spool.read() if r.point_key in by_key and r.point_key not in done]
        for result in spooled:
            self._tracker.log_point(by_key[result.point_key], result)
        self._spool.clear()
        seconds = time.perf_counter() - opened
        self._tracker.warm_up_plots()
        return _Opened(parent_run_id, spooled, done | {result.point_key for result in spooled}, seconds)

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

    def _run_jobs(self, remaining: list[Point], writer: TrackingWriter) -> None:
        """Runs the remaining points' jobs, handing their results and failures to the tracking thread; on an
        error, abandons the tracking thread (what it did not log is spooled) and raises the error.

        Raises:
          TrackingUnavailable: The tracking thread gave up; the results not logged are in the spool.
        """
        try:
            self._executor.run(
                self._plan.pack(remaining),
                lambda job, results: hand_over_results(writer, job, results),
                lambda job, error, attempt: writer.put_failure(job.points, error, attempt),
            )
        except TrackingUnavailable:
            writer.close(abandon=True)  # raises it again, saying where the unlogged results are kept
            raise
        except BaseException:
            with contextlib.suppress(TrackingUnavailable):
                writer.close(abandon=True)
            raise
