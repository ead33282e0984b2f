"""The executor of `runner run` without Ray: jobs run one after another on one worker in this process."""

from __future__ import annotations

import collections
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from runner.execution.executor import FailureCallback, ResultCallback
from runner.execution.faults import FaultPolicy, Task, classify, fault_counts, with_fault_tags
from runner.plan.points import Job

if TYPE_CHECKING:
    from runner.execution.workers import SAEEvalWorker, SteeringWorker
    from runner.plan.prepare import SweepPlan


class LocalExecutor:
    """Runs jobs in this process on one worker of the sweep's kind (built on first use, or `worker`: one already
    built for the same model, SAEs and shapes, e.g. from an earlier sweep). A job's error fails its points; a job
    that runs out of memory runs again at half the batch (`runner.execution.faults.FaultPolicy`).
    A `runner.execution.executor.JobExecutor`."""

    def __init__(self, sweep_plan: SweepPlan, cache_dir: Path, worker: SteeringWorker | SAEEvalWorker | None = None):
        self._plan = sweep_plan
        self._cache_dir = cache_dir
        self._worker = worker
        self._oom_retries = 0

    @property
    def worker(self) -> SteeringWorker | SAEEvalWorker | None:
        """The worker, once built."""
        return self._worker

    @property
    def compilations(self) -> int:
        """Programs compiled by the local worker so far."""
        return self._worker.compilations if self._worker is not None else 0

    def fault_counts(self) -> dict[str, int]:
        """No host to lose, and no retries of a job's own error; out-of-memory retries of the last run."""
        return fault_counts([], 0, self._oom_retries)

    def start(self) -> None:
        """Nothing to start ahead: the worker is built by the first `run` that has jobs (a resumed sweep with
        nothing left to do loads no model)."""

    def close(self) -> None:
        """Nothing to release: the worker is this process."""

    def run(self, jobs: Sequence[Job], on_result: ResultCallback, on_failure: FailureCallback) -> None:
        """Runs the jobs one after another."""
        from runner.execution.workers import (
            worker_class_for,  # JAX model code is imported only when a sweep really runs.
        )

        if self._worker is None and jobs:
            worker_class = worker_class_for(self._plan.config.kind)
            self._worker = worker_class(**self._plan.worker_args(), cache_dir=self._cache_dir)
        queue: collections.deque[Task] = collections.deque(Task(job) for job in jobs)
        policy = FaultPolicy(0, 1, queue, on_failure, alive_nodes=set)
        while queue:
            task = queue.popleft()
            batch_size = self._worker.batch_size if task.batch_size is None else min(task.batch_size,
                                                                                     self._worker.batch_size)
            try:
                results = self._worker.run_job(task.job, task.attempt, task.batch_size)
            except Exception as error:  # noqa: BLE001 - the job's own error: classified, its points fail or it reruns
                policy.handle(task, classify(error, [None], set), "local", batch_size, self._worker.memory_note)
            else:
                on_result(task.job, with_fault_tags(results, [], oom_retries=task.oom_retries))
        self._oom_retries = policy.oom_retries
