"""What the driver asks of an executor: run jobs somewhere and report each one back on the calling thread.

Three executors implement it: `runner.execution.local.LocalExecutor` (this process),
`runner.execution.ray_hosts.RayExecutor` (one Ray actor per host) and `runner.execution.slices.SliceExecutor`
(a gang of actors per multi-host slice).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from runner.plan.points import Job
from runner.results import Result

#: `on_result(job, results)`: a job's results, one per point.
ResultCallback = Callable[[Job, list[Result]], None]
#: `on_failure(job, error_text, attempt)`: a job that failed for good; its points fail with the error.
FailureCallback = Callable[[Job, str, int], None]
#: `progress(points done, points to run, failures, tokens)`, called by the driver after every logged job.
ProgressCallback = Callable[[int, int, int, int], None]


class JobExecutor(Protocol):
    """Runs jobs somewhere and reports each one back on the calling thread."""

    def run(self, jobs: Sequence[Job], on_result: ResultCallback, on_failure: FailureCallback) -> None:
        """Runs every job; calls `on_result(job, results)` or `on_failure(job, error_text, attempt)` per job."""

    @property
    def compilations(self) -> int:
        """Programs compiled by the executor's workers so far."""

    def fault_counts(self) -> dict[str, int]:
        """`preemptions`, `worker_crashes` and `job_retries` of the last run (the slice executor adds
        `slice_wait_s`), logged on the sweep's parent run."""

    def start(self) -> None:
        """Brings the workers up (they load the model); `run` does it too. Does nothing when already started."""

    def close(self) -> None:
        """Releases the workers; does nothing when they are not up."""
