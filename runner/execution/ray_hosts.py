"""Runs a sweep's jobs on Ray: one `HostWorker` actor per host, driven by a controller loop on the driver.

The driver hands each idle worker one job at a time and waits on all of them with `ray.wait`. What a failed job
raised is classified (`runner.execution.faults.classify`) and the `FaultPolicy` requeues, retries or fails the
job. A worker that went away (its host, its raylet or its process: `ActorDiedError`, `ActorUnavailableError`,
`NodeDiedError`, ...) is probed until Ray has restarted it, or dropped when it is dead for good; when no worker is
left, the remaining jobs fail with the reason.

Two things end a run without failing any point. A worker that could not start (`WorkerStartupError`: its
checkpoint, tokenizer, SAEs or device) is dropped, reported once while other workers run, and raised when no worker
is left. The local Ray that the executor started for itself losing its raylet or control store
(`LocalRayDied`) stops the run at once: running the sweep again resumes it.

Results and failures are reported on the driver thread only, so the driver stays the only MLflow writer. The
driver never runs JAX on an accelerator: `keep_driver_jax_on_cpu` pins it to the CPU, and every worker asserts
the platform it really got (`runner.execution.host_actor`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import ray
from ray import exceptions as ray_errors
from ray.actor import ActorHandle

from runner.config.schema import ClusterConfig
from runner.errors import RunnerError
from runner.execution.executor import FailureCallback, ResultCallback
from runner.execution.faults import (
    FaultPolicy,
    OutOfMemory,
    Task,
    WorkerStartupError,
    classify,
    describe_ray_error,
    fault_counts,
    with_fault_tags,
    worker_survived,
)
from runner.execution.host_actor import HostWorker, WorkerInfo
from runner.execution.ray_setup import (
    LocalRayDied,
    LocalRayWatch,
    check_ray_address_reachable,
    connect_ray,
    keep_driver_jax_on_cpu,
    ray_actor_options,
)
from runner.plan.points import Job

if TYPE_CHECKING:
    from runner.execution.workers import Worker
    from runner.plan.prepare import SweepPlan

_log = logging.getLogger(__name__)


SlotState = Literal["probing", "waiting", "idle", "busy", "dead"]


@dataclasses.dataclass
class _Slot:
    """One worker actor as the controller sees it."""

    name: str
    actor: ActorHandle[HostWorker]
    state: SlotState = "probing"
    next_probe_at: float = 0.0
    failed_probes: int = 0
    last_error: str = ""
    node_id: str | None = None
    startup_error: WorkerStartupError | None = None
    startup_error_reported: bool = False
    #: The worker's own batch (its last probe) and the most it may use after running out of memory (None: no cap).
    batch_size: int | None = None
    batch_cap: int | None = None
    memory_note: str = ""

    def batch_for(self, task: Task) -> int | None:
        """The batch the worker runs `task` at: its own, capped by the task's and this slot's caps."""
        sizes = [size for size in (self.batch_size, self.batch_cap, task.batch_size) if size is not None]
        return min(sizes) if sizes else None


@dataclasses.dataclass(frozen=True)
class _Limits:
    """How often a job may fail, how long the controller waits for workers and how often it probes them."""

    max_job_retries: int
    max_worker_crashes: int
    worker_wait_s: float
    probe_interval_s: float
    worker_resources: Mapping[str, float]


class RayExecutor:
    """Runs a sweep's jobs on `cluster.workers` Ray actors, one per host (a `runner.execution.executor.JobExecutor`).

    Without `cluster.address` (and no `RAY_ADDRESS` in the environment, as `ray job submit` sets) it starts a
    local Ray for the run and shuts it down afterwards; otherwise it joins that cluster and only disconnects.
    Creating the executor pins this process's JAX to the CPU (`keep_driver_jax_on_cpu`).

    Args:
      sweep_plan: The checked sweep.
      cache_dir: Where workers write synthetic models and SAEs.
      cluster_config: Workers, their resources, platform, address and job retries.
      worker_class: What each actor runs (a `SteeringWorker` or subclass).
      max_restarts: Restarts Ray grants each actor (-1: unlimited, as for preemptible hosts).
      worker_wait_s: How long jobs wait while no worker is alive (starting, restarting) before they fail.
      probe_interval_s: Pause between probes of a restarting worker.
    """

    def __init__(
        self,
        sweep_plan: SweepPlan,
        cache_dir: Path,
        cluster_config: ClusterConfig,
        worker_class: type[Worker] | None = None,
        *,
        max_restarts: int = -1,
        worker_wait_s: float = 1800.0,
        probe_interval_s: float = 1.0,
    ):
        if cluster_config.replica != "host":
            raise RunnerError(
                "cluster.replica: 'slice' replicas run on runner.execution.slices.SliceExecutor, not RayExecutor"
            )
        if cluster_config.address:
            check_ray_address_reachable(cluster_config.address)
        self._plan = sweep_plan
        self._cache_dir = Path(cache_dir).absolute()
        self._cluster = cluster_config
        self._worker_class = worker_class
        self._max_restarts = max_restarts
        self._limits = _Limits(
            max_job_retries=cluster_config.max_job_retries,
            max_worker_crashes=cluster_config.max_worker_crashes,
            worker_wait_s=worker_wait_s,
            probe_interval_s=probe_interval_s,
            worker_resources=dict(cluster_config.resources),
        )
        self._compilations = 0
        self._lost_host_events: list[dict[str, str]] = []
        self._workers_seen: list[WorkerInfo] = []
        self._job_retries = 0
        self._oom_retries = 0
        self._slots: list[_Slot] | None = None
        self._owns_ray = False
        self._local_ray: LocalRayWatch | None = None
        keep_driver_jax_on_cpu()

    @property
    def compilations(self) -> int:
        """Programs compiled by the workers alive at the end of the last run (a restart starts from zero)."""
        return self._compilations

    @property
    def lost_host_events(self) -> list[dict[str, str]]:
        """Each time a job was requeued because its worker or host went away: job id, worker, node, error, and
        `kind`: `preemption` (the node died) or `worker_crash` (the worker process died on a live node)."""
        return list(self._lost_host_events)

    def fault_counts(self) -> dict[str, int]:
        """How often jobs lost their host to preemption, lost their worker to a crash, and were retried after
        their own error, in the last run."""
        return fault_counts(self._lost_host_events, self._job_retries, self._oom_retries)

    @property
    def workers_seen(self) -> list[WorkerInfo]:
        """`HostWorker.info()` of every worker (and restarted worker) that came up, in order."""
        return list(self._workers_seen)

    def start(self) -> None:
        """Starts (or joins) Ray and creates the worker actors, which begin loading the model; does nothing when
        already started. `run` calls it; calling it first lets the workers load while the driver does other work."""
        if self._slots is not None:
            return
        self._owns_ray = connect_ray(self._cluster)
        started_local = self._owns_ray and not (self._cluster.address or os.environ.get("RAY_ADDRESS"))
        self._local_ray = LocalRayWatch() if started_local else None
        try:
            self._slots = self._start_workers()
        except BaseException:
            self.close()
            raise

    def wait_for_workers(self, timeout_s: float = 600.0) -> list[WorkerInfo]:
        """Starts the workers if needed and waits until every one has loaded the model; returns their `info()`.

        Raises:
          RunnerError: A worker failed to start or did not come up in `timeout_s`.
        """
        self.start()
        try:
            return ray.get([slot.actor.info.remote() for slot in self._slots], timeout=timeout_s)
        except ray_errors.RayTaskError as error:
            if isinstance(error.cause, WorkerStartupError):
                raise error.cause from None
            raise RunnerError(f"workers did not come up: {describe_ray_error(error)}") from None
        except (ray_errors.RayError, ray_errors.GetTimeoutError) as error:
            raise RunnerError(f"workers did not come up: {describe_ray_error(error)}") from None

    def run(self, jobs: Sequence[Job], on_result: ResultCallback, on_failure: FailureCallback) -> None:
        """Runs every job on the workers; `on_result`/`on_failure` are called on this thread, once per job.

        KeyboardInterrupt (and any error of the callbacks) kills the workers and propagates. The workers stay up
        for another `run` until `close`.
        """
        if not jobs:
            return
        self.start()
        controller = _Controller(
            self._slots, self._limits, on_result, on_failure,
            on_worker_ready=self._workers_seen.append,
            local_ray_died=self._local_ray.what_died if self._local_ray is not None else None,
        )
        try:
            controller.run([Task(job) for job in jobs])
            self._compilations = _count_compilations(self._slots)
        except BaseException:
            self.close()
            raise
        finally:
            self._lost_host_events = controller.faults.classified_events()
            self._job_retries = controller.faults.job_retries
            self._oom_retries = controller.faults.oom_retries

    def close(self) -> None:
        """Kills the workers and leaves Ray (shutting down a local Ray this executor started)."""
        for slot in self._slots or []:
            with contextlib.suppress(Exception):
                ray.kill(slot.actor, no_restart=True)
        self._slots = None
        if self._owns_ray:
            self._owns_ray = False
            ray.shutdown()

    def _start_workers(self) -> list[_Slot]:
        remote_class = ray.remote(HostWorker).options(**ray_actor_options(self._cluster, self._max_restarts))
        slots = []
        for index in range(self._cluster.workers):
            name = f"worker-{index}"
            actor = remote_class.remote(
                self._plan.worker_args(),
                cache_dir=self._cache_dir,
                platform=self._cluster.jax_platform(),
                name=name,
                worker_class=self._worker_class,
            )
            slots.append(_Slot(name=name, actor=actor))
        return slots


def _count_compilations(slots: list[_Slot]) -> int:
    """Sum of the live workers' compilations (waits at most 30 s)."""
    refs = [slot.actor.compilations.remote() for slot in slots if slot.state == "idle"]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=30) if refs else ([], [])
    total = 0
    for ref in ready:
        with contextlib.suppress(ray_errors.RayError):
            total += ray.get(ref)
    return total


class _Controller:
    """The `ray.wait` loop of one `RayExecutor.run`: a queue of tasks and a state per worker.

    A worker is probed (`info()`) when it starts and after it was lost: a successful probe makes it idle, a
    restarting one is probed again after `probe_interval_s`, and one that is dead for good is dropped. Each idle
    worker gets one job at a time.
    """

    def __init__(
        self,
        slots: list[_Slot],
        limits: _Limits,
        on_result: ResultCallback,
        on_failure: FailureCallback,
        *,
        on_worker_ready: Callable[[WorkerInfo], None],
        local_ray_died: Callable[[], str | None] | None = None,
    ):
        self._slots = slots
        self._local_ray_died = local_ray_died
        self._limits = limits
        self._on_result = on_result
        self._on_failure = on_failure
        self._on_worker_ready = on_worker_ready
        self._queue: collections.deque[Task] = collections.deque()
        self._in_flight: dict[ray.ObjectRef, tuple[_Slot, Task | None]] = {}  # -> (worker, its task; None: probe)
        self._last_worker_alive = time.monotonic()
        self._last_wait_warning = time.monotonic()
        self.faults = FaultPolicy(limits.max_job_retries, limits.max_worker_crashes, self._queue, on_failure)

    def run(self, tasks: list[Task]) -> None:
        """Runs until every task has reported a result or a failure.

        Raises:
          WorkerStartupError: No worker is left and one could not start (no job is failed for it).
          LocalRayDied: The local Ray this run started lost its raylet or control store.
        """
        self._queue.extend(tasks)
        for slot in self._slots:
            self._probe(slot)
        while self._queue or any(slot.state == "busy" for slot in self._slots):
            self._stop_if_local_ray_died()
            self._probe_due_workers()
            self._dispatch()
            self._report_startup_failures()
            if self._gave_up_for_lack_of_workers():
                return
            if not self._in_flight:
                time.sleep(self._limits.probe_interval_s / 4)
                continue
            try:
                ready, _ = ray.wait(list(self._in_flight), num_returns=1, timeout=1.0)
            except ray_errors.RaySystemError:
                self._stop_if_local_ray_died()
                raise
            for ref in ready:
                slot, task = self._in_flight.pop(ref)
                if task is None:
                    self._probe_returned(slot, ref)
                else:
                    self._job_returned(slot, task, ref)

    # -- workers --------------------------------------------------------------------------------------------

    def _probe(self, slot: _Slot) -> None:
        slot.state = "probing"
        self._in_flight[slot.actor.info.remote()] = (slot, None)

    def _probe_due_workers(self) -> None:
        now = time.monotonic()
        for slot in self._slots:
            if slot.state == "waiting" and now >= slot.next_probe_at:
                self._probe(slot)

    def _stop_if_local_ray_died(self) -> None:
        """Raises `LocalRayDied` when the local Ray this run started lost a process its workers need."""
        what = self._local_ray_died() if self._local_ray_died is not None else None
        if what is None:
            return
        queued = sum(len(task.job.points) for task in self._queue)
        running = sum(len(task.job.points) for _, task in self._in_flight.values() if task is not None)
        raise LocalRayDied(what, queued + running)

    def _probe_returned(self, slot: _Slot, ref: ray.ObjectRef) -> None:
        try:
            info = ray.get(ref)
        except ray_errors.RayTaskError as error:  # info() raised: the worker is up but could not start
            cause = error.cause
            slot.startup_error = cause if isinstance(cause, WorkerStartupError) else None
            slot.last_error = str(cause) if slot.startup_error is not None else describe_ray_error(error)
            with contextlib.suppress(Exception):
                ray.kill(slot.actor, no_restart=True)
            slot.state = "dead"
        except ray_errors.ActorDiedError as error:
            slot.last_error = describe_ray_error(error)
            slot.failed_probes += 1
            # An actor that raised in __init__ is never restarted; one found dead 3 times in a row is gone too.
            if error.actor_init_failed or slot.failed_probes >= 3:
                self._drop(slot)
            else:
                self._probe_later(slot)
        except ray_errors.RayError as error:  # unavailable while restarting: ask again shortly
            slot.last_error = describe_ray_error(error)
            self._probe_later(slot)
        else:
            slot.state, slot.failed_probes, slot.node_id = "idle", 0, info["node_id"]
            slot.batch_size, slot.memory_note = info.get("batch_size"), info.get("memory", "")
            self._on_worker_ready(info)
            _log.info("worker ready: %s", info)

    def _probe_later(self, slot: _Slot) -> None:
        slot.state = "waiting"
        slot.next_probe_at = time.monotonic() + self._limits.probe_interval_s

    def _drop(self, slot: _Slot) -> None:
        slot.state = "dead"
        _log.warning("worker %s is gone: %s", slot.name, slot.last_error)

    # -- jobs -----------------------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        for slot in self._slots:
            if not self._queue:
                return
            if slot.state == "idle":
                task = self._queue.popleft()
                slot.state = "busy"
                cap = min((size for size in (task.batch_size, slot.batch_cap) if size is not None), default=None)
                self._in_flight[slot.actor.run_job.remote(task.job, task.attempt, cap)] = (slot, task)

    def _job_returned(self, slot: _Slot, task: Task, ref: ray.ObjectRef) -> None:
        try:
            results = ray.get(ref)
        except ray_errors.RayError as error:
            fault = classify(error, [slot.node_id])
            if worker_survived(fault):
                slot.state = "idle"
            else:
                slot.last_error = describe_ray_error(error)
                if isinstance(error, ray_errors.ActorDiedError) and error.actor_init_failed:
                    self._drop(slot)
                else:
                    self._probe(slot)
            self.faults.handle(task, fault, slot.name, slot.batch_for(task), slot.memory_note)
            if isinstance(fault, OutOfMemory):
                slot.batch_cap = task.batch_size  # the worker (or its restart) keeps the smaller batch
        else:
            slot.state = "idle"
            self._dispatch()  # keep the worker busy while this thread hands the results over
            self._on_result(task.job, with_fault_tags(results, task.lost_on_nodes, oom_retries=task.oom_retries))

    def _report_startup_failures(self) -> None:
        """Warns, once per worker, of the workers that could not start while others run the sweep."""
        if not any(slot.state in ("idle", "busy") for slot in self._slots):
            return  # if none ever starts, the failure is raised instead
        for slot in self._slots:
            if slot.startup_error is not None and not slot.startup_error_reported:
                _log.warning("%s; going on with the other workers", slot.startup_error)
                slot.startup_error_reported = True

    def _gave_up_for_lack_of_workers(self) -> bool:
        """Fails the queued jobs when every worker is dead, or none has been alive for `worker_wait_s`.

        Raises:
          WorkerStartupError: Every worker is gone and one of them could not start.
        """
        now = time.monotonic()
        if any(slot.state in ("idle", "busy") for slot in self._slots):
            self._last_worker_alive = now
            return False
        dead = [slot for slot in self._slots if slot.state == "dead"]
        failed_start = [slot.startup_error for slot in dead if slot.startup_error is not None]
        if len(dead) == len(self._slots) and failed_start:
            raise failed_start[0]
        if len(dead) == len(self._slots):
            reason = f"no Ray worker left (all {len(dead)} died); last error: {dead[-1].last_error}"
        elif now - self._last_worker_alive > self._limits.worker_wait_s:
            last_error = next((slot.last_error for slot in self._slots if slot.last_error), "none (still pending)")
            reason = (f"no Ray worker came up in {self._limits.worker_wait_s:.0f} s (each needs "
                      f"{dict(self._limits.worker_resources)}); last error: {last_error}")
        else:
            if now - self._last_wait_warning > 30:
                self._last_wait_warning = now
                _log.warning("waiting for a Ray worker (each needs %s)", dict(self._limits.worker_resources))
            return False
        while self._queue:
            task = self._queue.popleft()
            self._on_failure(task.job, reason, task.attempt)
        return True


