"""Runs a sweep's jobs on Ray: one `HostWorker` actor per host, driven by a controller loop on the driver.

The driver hands each idle worker one job at a time and waits on all of them with `ray.wait`. Two kinds of
failure are told apart:

- infrastructure (the host, its raylet or the worker process went away: `ActorDiedError`,
  `ActorUnavailableError`, `NodeDiedError`, ...): the job goes back to the front of the queue without using an
  attempt (a *lost-host event*), and the worker is probed until Ray has restarted it, or dropped when it is dead
  for good. When no worker is left, the remaining jobs fail with the reason.
- the job's own error (`RayTaskError`): the job is retried up to `cluster.max_job_retries` more times, then
  its points fail.

Results and failures are reported on the driver thread only, so the driver stays the only MLflow writer. The
driver never runs JAX on an accelerator: `keep_driver_jax_on_cpu` pins it to the CPU, and every worker asserts
the platform it really got, because a busy TPU makes JAX fall back to the CPU silently.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import logging
import math
import os
import re
import socket
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import ray
from ray import exceptions as ray_errors

from runner.config.schema import ClusterConfig
from runner.errors import RunnerError, first_line
from runner.execution.executor import FailureCallback, ResultCallback
from runner.plan.points import Job
from runner.results import Result
from runner.sae.sources import SAEFile

_log = logging.getLogger(__name__)

#: libtpu's lock: only one process per host may hold the TPU; a crashed worker leaves the file behind.
TPU_LOCKFILE = Path("/tmp/libtpu_lockfile")

#: `JAX_PLATFORMS` value for each `cluster.platform` (the `gpu` alias would also demand ROCm).
JAX_PLATFORMS_ENV = {"cpu": "cpu", "gpu": "cuda", "tpu": "tpu"}

#: Errors that say the worker or its host went away, not that the job is wrong.
INFRASTRUCTURE_ERRORS: tuple[type[BaseException], ...] = (
    ray_errors.RayActorError,  # ActorDiedError, ActorUnavailableError
    ray_errors.NodeDiedError,
    ray_errors.WorkerCrashedError,
    ray_errors.ObjectLostError,  # OwnerDiedError, ObjectReconstructionFailedError, ...
    ray_errors.OutOfMemoryError,
    ray_errors.LocalRayletDiedError,
)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
#: Tags of a point whose job lost its host to a preemption or its worker to a crash (absent: none).
TAG_PREEMPTIONS = "runner.preemptions"
TAG_WORKER_CRASHES = "runner.worker_crashes"


class WorkerPlatformError(RunnerError):
    """A worker's JAX did not get the platform the cluster config asks for."""


# -------------------------------------------------------------------------------------------------------------
# The worker side


def processes_holding(path: Path) -> list[int]:
    """Ids of the live processes that have `path` open (those whose /proc entries this user may read)."""
    target = os.path.realpath(path)
    holders = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        with contextlib.suppress(OSError):
            if any(os.readlink(fd) == target for fd in fd_dir.iterdir()):
                holders.append(int(fd_dir.parent.name))
    return holders


def remove_stale_tpu_lockfile(path: Path = TPU_LOCKFILE) -> bool:
    """Deletes libtpu's lockfile when no live process holds it open; returns whether it was deleted."""
    if not path.exists():
        return False
    holders = processes_holding(path)
    if holders:
        _log.warning("%s is held by process(es) %s; leaving it", path, holders)
        return False
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except PermissionError as error:
        _log.warning("cannot remove stale %s: %s", path, error)
        return False
    _log.warning("removed stale %s left by a dead process", path)
    return True


def check_jax_platform(expected: str, host: str) -> tuple[str, int]:
    """Returns (platform, device count) of this process's JAX; raises `WorkerPlatformError` unless `expected`."""
    import jax

    try:
        devices = jax.devices()
    except RuntimeError as error:
        raise WorkerPlatformError(
            f"{host}: JAX could not start platform {expected!r}: {_first_line(str(error))}"
        ) from None
    platform = devices[0].platform
    if platform != expected:
        hint = {
            "tpu": f"; is another process holding the TPU ({TPU_LOCKFILE})?",
            "gpu": "; is jax[cuda12] (runner[cuda]) installed on this host?",
        }.get(expected, "")
        raise WorkerPlatformError(
            f"{host}: expected JAX platform {expected!r} but JAX runs on {platform!r} "
            f"({len(devices)} device(s)){hint}"
        )
    return platform, len(devices)


@contextlib.contextmanager
def _host_lock(path: Path) -> Iterator[None]:
    """An exclusive lock shared by the workers of one host (and of one shared filesystem)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def localise_sae_files(config: Any, sae_files: Mapping[str, SAEFile]) -> dict[str, SAEFile]:
    """The driver's SAE files as seen from this host: Gemma Scope files missing here are downloaded again.

    Raises:
      RunnerError: A local SAE file of the driver does not exist on this host, or a download names another SAE.
    """
    from runner.sae.sources import resolve_sae_file

    files = dict(sae_files)
    missing = [key for key, f in files.items() if f.path is not None and not Path(f.path).is_file()]
    if not missing:
        return files
    if config.sae.source != "huggingface":
        paths = ", ".join(str(files[key].path) for key in missing)
        raise RunnerError(
            f"{socket.gethostname()}: SAE file(s) {paths} do not exist on this worker host (allowed: sae.path on a "
            "filesystem every host mounts at the same path, or sae.source huggingface)"
        )
    for key in missing:
        # Gemma Scope files are found by release, layer, width and the L0 the driver resolved.
        again = resolve_sae_file(config.sae, files[key].layer, width=files[key].width, l0=files[key].l0, model_id="")
        if again.sae_id != files[key].sae_id:
            raise RunnerError(f"layer {files[key].layer}: the driver resolved {files[key].sae_id} but this host got "
                              f"{again.sae_id}")
        files[key] = again
    return files


class HostWorker:
    """One host's worker (`runner.execution.workers.SteeringWorker` or `SAEEvalWorker`) as a Ray actor
    (`ray.remote(HostWorker)`; `RayExecutor` creates them).

    On start it removes a stale TPU lockfile (platform tpu), checks that JAX got `platform`, then loads the model
    and SAEs once. `__init__` runs again on every restart of the actor.

    Args:
      worker_args: What the worker class takes besides the cache directory and its name
        (`SweepPlan.worker_args()`: config, sae_files, batch_size, eval_tokens).
      cache_dir: Where synthetic models and SAEs are written.
      platform: The JAX platform this worker must run on: cpu, gpu or tpu.
      name: The worker's slot name, e.g. `worker-0`; results are tagged `<name>@<hostname>`.
      worker_class: The class doing the work; the sweep kind's (`runner.execution.workers.worker_class_for`) when
        None. It
        must be importable on the workers (or registered with `ray.cloudpickle.register_pickle_by_value`).
    """

    def __init__(
        self,
        worker_args: Mapping[str, Any],
        *,
        cache_dir: Path,
        platform: str,
        name: str,
        worker_class: type | None = None,
    ):
        self.name = f"{name}@{socket.gethostname()}"
        if platform == "tpu":
            remove_stale_tpu_lockfile()
        self.platform, self.device_count = check_jax_platform(platform, self.name)
        config = worker_args["config"]
        from runner.execution.workers import enable_compilation_cache, worker_class_for

        enable_compilation_cache(cache_dir)
        if worker_class is None:
            worker_class = worker_class_for(config.kind)
        sae_files = localise_sae_files(config, worker_args["sae_files"])
        # Synthetic SAEs are written by the first worker of a filesystem and reused by the others.
        writes_saes = any(f.path is None for f in sae_files.values())
        lock = _host_lock(cache_dir / ".runner-worker-init.lock") if writes_saes else contextlib.nullcontext()
        with lock:
            self._worker = worker_class(
                **{**worker_args, "sae_files": sae_files}, cache_dir=cache_dir, worker_name=self.name
            )

    def info(self) -> dict[str, Any]:
        """Where this worker runs: name, hostname, Ray node id, process id, JAX platform and device count."""
        return {
            "name": self.name,
            "hostname": socket.gethostname(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "platform": self.platform,
            "device_count": self.device_count,
        }

    def run_job(self, job: Job, attempt: int) -> list[Result]:
        """Runs one job; every result names this worker and the attempt."""
        results = self._worker.run_job(job, attempt)
        return [dataclasses.replace(result, worker=self.name, attempt=attempt) for result in results]

    def compilations(self) -> int:
        """Programs this worker compiled since it (re)started."""
        return self._worker.compilations


# -------------------------------------------------------------------------------------------------------------
# The driver side


def keep_driver_jax_on_cpu() -> None:
    """Makes this process's JAX use the CPU only, so the driver never takes a host's TPU or GPU.

    Effective until JAX first initialises its backends; call it before anything touches `jax.devices()`.
    """
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:
        sys.modules["jax"].config.update("jax_platforms", "cpu")


def ray_actor_options(cluster: ClusterConfig, max_restarts: int) -> dict[str, Any]:
    """`.options(...)` of one worker actor: the host's resources, its JAX platform, restarts but no task retries."""
    resources = dict(cluster.resources)
    options: dict[str, Any] = {
        "num_cpus": resources.pop("CPU", 0.0),
        "num_gpus": resources.pop("GPU", 0.0),
        "max_restarts": max_restarts,
        "max_task_retries": 0,  # the controller owns retries: a job is never run twice behind its back
        "scheduling_strategy": "SPREAD",
        "runtime_env": {"env_vars": {"JAX_PLATFORMS": JAX_PLATFORMS_ENV[cluster.jax_platform()]}},
    }
    if resources:
        options["resources"] = resources
    return options


@dataclasses.dataclass
class Task:
    """A job waiting or running: `attempt` counts the job's own failures; `lost_on_nodes` holds the Ray node of
    each worker the job lost (a node that died meanwhile: a preemption; one still alive: a worker crash)."""

    job: Job
    attempt: int = 1
    lost_on_nodes: list[str | None] = dataclasses.field(default_factory=list)


class JobFaults:
    """What happens to a job after its own error or the loss of its worker, for host and slice replicas alike.

    - The job's own error: retried `max_job_retries` more times (at the back of the queue), then its points fail.
    - A lost worker: the job goes back to the front of the queue without using an attempt. A preemption (the
      worker's node died) is retried without limit; a worker that died on a node that is still alive may have
      been killed by the job itself (out of memory, a crash in XLA), so after `max_worker_crashes` such losses
      the job fails.

    Args:
      max_job_retries: Retries of a job that raised.
      max_worker_crashes: Worker crashes a job may cause before it fails.
      queue: The controller's queue of tasks.
      on_failure: Reports a job that failed for good.
    """

    def __init__(self, max_job_retries: int, max_worker_crashes: int, queue: collections.deque[Task],
                 on_failure: FailureCallback):
        self._max_job_retries = max_job_retries
        self._max_worker_crashes = max_worker_crashes
        self._queue = queue
        self._on_failure = on_failure
        self._events: list[dict[str, str]] = []
        self.job_retries = 0

    def job_raised(self, task: Task, error: str) -> None:
        """The job failed by itself: retry it, or fail its points."""
        if task.attempt <= self._max_job_retries:
            _log.warning("job %s failed on attempt %d, retrying: %s", task.job.job_id, task.attempt, error)
            self.job_retries += 1
            self._queue.append(Task(task.job, task.attempt + 1, task.lost_on_nodes))
        else:
            self._on_failure(task.job, error, task.attempt)

    def worker_lost(self, task: Task, worker: str, node_id: str | None, error: str) -> None:
        """The job's worker went away on `node_id`: records the event, then requeues the job or fails it after
        too many crashes."""
        event = {"job_id": task.job.job_id, "worker": worker, "node_id": node_id or "", "error": error}
        self._events.append(event)
        _log.warning("lost worker %s while it ran job %s: %s", worker, task.job.job_id, error)
        task.lost_on_nodes.append(node_id)
        crashes = fault_kinds(task.lost_on_nodes).count("worker_crash")
        if crashes >= self._max_worker_crashes:
            self._on_failure(task.job, f"crashed its worker {crashes} times on hosts that stayed up "
                             f"(cluster.max_worker_crashes={self._max_worker_crashes}); last: {error}", task.attempt)
        else:
            self._queue.appendleft(task)

    def classified_events(self) -> list[dict[str, str]]:
        """Every lost-worker event with its `kind`, judged now that Ray has had time to notice dead nodes."""
        kinds = fault_kinds([event["node_id"] or None for event in self._events])
        return [{**event, "kind": kind} for event, kind in zip(self._events, kinds, strict=True)]


def fault_counts(events: Sequence[Mapping[str, str]], job_retries: int) -> dict[str, int]:
    """`preemptions`, `worker_crashes` and `job_retries` from classified lost-worker events."""
    kinds = [event["kind"] for event in events]
    return {"preemptions": kinds.count("preemption"), "worker_crashes": kinds.count("worker_crash"),
            "job_retries": job_retries}


SlotState = Literal["probing", "waiting", "idle", "busy", "dead"]


@dataclasses.dataclass
class _Slot:
    """One worker actor as the controller sees it."""

    name: str
    actor: Any
    state: SlotState = "probing"
    next_probe_at: float = 0.0
    failed_probes: int = 0
    last_error: str = ""
    node_id: str | None = None


@dataclasses.dataclass(frozen=True)
class _Policy:
    """How the controller retries, waits and gives up."""

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
      sweep_plan: The checked sweep (`runner.plan.prepare.SweepPlan`).
      cache_dir: Where workers write synthetic models and SAEs.
      cluster_config: Workers, their resources, platform, address and job retries.
      worker_class: What each actor runs (a `SteeringWorker` or subclass).
      max_restarts: Restarts Ray grants each actor (-1: unlimited, as for preemptible hosts).
      worker_wait_s: How long jobs wait while no worker is alive (starting, restarting) before they fail.
      probe_interval_s: Pause between probes of a restarting worker.
    """

    def __init__(
        self,
        sweep_plan: Any,
        cache_dir: Path,
        cluster_config: ClusterConfig,
        worker_class: type | None = None,
        *,
        max_restarts: int = -1,
        worker_wait_s: float = 1800.0,
        probe_interval_s: float = 1.0,
    ):
        if cluster_config.replica != "host":
            raise RunnerError("cluster.replica: 'slice' replicas run on runner.slices.SliceExecutor, not RayExecutor")
        if cluster_config.address:
            check_ray_address_reachable(cluster_config.address)
        self._plan = sweep_plan
        self._cache_dir = Path(cache_dir).absolute()
        self._cluster = cluster_config
        self._worker_class = worker_class
        self._max_restarts = max_restarts
        self._policy = _Policy(
            max_job_retries=cluster_config.max_job_retries,
            max_worker_crashes=cluster_config.max_worker_crashes,
            worker_wait_s=worker_wait_s,
            probe_interval_s=probe_interval_s,
            worker_resources=dict(cluster_config.resources),
        )
        self._compilations = 0
        self._lost_host_events: list[dict[str, str]] = []
        self._workers_seen: list[dict[str, Any]] = []
        self._job_retries = 0
        self._slots: list[_Slot] | None = None
        self._owns_ray = False
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
        return fault_counts(self._lost_host_events, self._job_retries)

    @property
    def workers_seen(self) -> list[dict[str, Any]]:
        """`HostWorker.info()` of every worker (and restarted worker) that came up, in order."""
        return list(self._workers_seen)

    def start(self) -> None:
        """Starts (or joins) Ray and creates the worker actors, which begin loading the model; does nothing when
        already started. `run` calls it; calling it first lets the workers load while the driver does other work."""
        if self._slots is not None:
            return
        self._owns_ray = connect_ray(self._cluster)
        try:
            self._slots = self._start_workers()
        except BaseException:
            self.close()
            raise

    def wait_for_workers(self, timeout_s: float = 600.0) -> list[dict[str, Any]]:
        """Starts the workers if needed and waits until every one has loaded the model; returns their `info()`.

        Raises:
          RunnerError: A worker failed to start or did not come up in `timeout_s`.
        """
        self.start()
        try:
            return ray.get([slot.actor.info.remote() for slot in self._slots], timeout=timeout_s)
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
            self._slots, self._policy, on_result, on_failure,
            on_worker_ready=self._workers_seen.append,
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


def connect_ray(cluster: ClusterConfig) -> bool:
    """Starts a local Ray or joins `cluster.address` (or `RAY_ADDRESS`); returns whether it connected (and so must
    disconnect). A local Ray must have the resources one worker asks for.

    Raises:
      RunnerError: Ray cannot be started or joined, or this machine lacks a worker's resources.
    """
    if ray.is_initialized():
        return False
    address = cluster.address or os.environ.get("RAY_ADDRESS")
    try:
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            per_worker_cpus = cluster.resources.get("CPU", 0.0)
            hosts = cluster.workers * (cluster.hosts_per_replica if cluster.replica == "slice" else 1)
            num_cpus = max(os.cpu_count() or 1, math.ceil(hosts * per_worker_cpus))
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as error:
        _shutdown_quietly()
        where = f"Ray at {address!r}" if address else "a local Ray"
        raise RunnerError(f"cluster.address: cannot start or join {where}: {_first_line(str(error))}") from None
    except BaseException:  # Ctrl-C while connecting
        _shutdown_quietly()
        raise
    if not address:
        available = ray.cluster_resources()
        short = {k: v for k, v in cluster.resources.items() if available.get(k, 0.0) < v}
        if short:
            ray.shutdown()
            have = {k: available.get(k, 0.0) for k in short}
            raise RunnerError(
                f"cluster.resources: a worker needs {short} but this machine has {have} (allowed: what this "
                "machine has, or cluster.address / --address of a Ray cluster with such hosts)"
            )
    return True


def _shutdown_quietly() -> None:
    with contextlib.suppress(Exception):
        if ray.is_initialized():
            ray.shutdown()


def check_ray_address_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fails fast on a `host:port` (or `ray://host:port`) nobody listens on; `ray.init` would retry for minutes.

    Raises:
      RunnerError: Nothing accepts a TCP connection there.
    """
    host_port = address.removeprefix("ray://")
    host, sep, port = host_port.rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto" and other forms Ray resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as error:
        raise RunnerError(f"cluster.address: cannot reach Ray at {address!r}: {error.strerror or error} (is the "
                          "cluster up, and is this its head's GCS port, usually 6379?)") from None


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
        policy: _Policy,
        on_result: ResultCallback,
        on_failure: FailureCallback,
        *,
        on_worker_ready: Callable[[dict[str, Any]], None],
    ):
        self._slots = slots
        self._policy = policy
        self._on_result = on_result
        self._on_failure = on_failure
        self._on_worker_ready = on_worker_ready
        self._queue: collections.deque[Task] = collections.deque()
        self._in_flight: dict[Any, tuple[_Slot, Task | None]] = {}  # ObjectRef -> (worker, its task; None: probe)
        self._last_worker_alive = time.monotonic()
        self._last_wait_warning = time.monotonic()
        self.faults = JobFaults(policy.max_job_retries, policy.max_worker_crashes, self._queue, on_failure)

    def run(self, tasks: list[Task]) -> None:
        """Runs until every task has reported a result or a failure."""
        self._queue.extend(tasks)
        for slot in self._slots:
            self._probe(slot)
        while self._queue or any(slot.state == "busy" for slot in self._slots):
            self._probe_due_workers()
            self._dispatch()
            if self._gave_up_for_lack_of_workers():
                return
            if not self._in_flight:
                time.sleep(self._policy.probe_interval_s / 4)
                continue
            ready, _ = ray.wait(list(self._in_flight), num_returns=1, timeout=1.0)
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

    def _probe_returned(self, slot: _Slot, ref: Any) -> None:
        try:
            info = ray.get(ref)
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
            slot.state, slot.failed_probes, slot.node_id = "idle", 0, info.get("node_id")
            self._on_worker_ready(info)
            _log.info("worker ready: %s", info)

    def _probe_later(self, slot: _Slot) -> None:
        slot.state = "waiting"
        slot.next_probe_at = time.monotonic() + self._policy.probe_interval_s

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
                self._in_flight[slot.actor.run_job.remote(task.job, task.attempt)] = (slot, task)

    def _job_returned(self, slot: _Slot, task: Task, ref: Any) -> None:
        try:
            results = ray.get(ref)
        except ray_errors.RayTaskError as error:  # the job's own error
            slot.state = "idle"
            self.faults.job_raised(task, describe_cause(error))
        except INFRASTRUCTURE_ERRORS as error:
            slot.last_error = describe_ray_error(error)
            if isinstance(error, ray_errors.ActorDiedError) and error.actor_init_failed:
                self._drop(slot)
            else:
                self._probe(slot)
            self.faults.worker_lost(task, slot.name, slot.node_id, slot.last_error)
        except ray_errors.RayError as error:  # anything else Ray reports is charged to the job: bounded retries
            slot.state = "idle"
            self.faults.job_raised(task, describe_ray_error(error))
        else:
            slot.state = "idle"
            self._dispatch()  # keep the worker busy while this thread hands the results over
            self._on_result(task.job, with_fault_tags(results, task.lost_on_nodes))

    def _gave_up_for_lack_of_workers(self) -> bool:
        """Fails the queued jobs when every worker is dead, or none has been alive for `worker_wait_s`."""
        now = time.monotonic()
        if any(slot.state in ("idle", "busy") for slot in self._slots):
            self._last_worker_alive = now
            return False
        dead = [slot for slot in self._slots if slot.state == "dead"]
        if len(dead) == len(self._slots):
            reason = f"no Ray worker left (all {len(dead)} died); last error: {dead[-1].last_error}"
        elif now - self._last_worker_alive > self._policy.worker_wait_s:
            last_error = next((slot.last_error for slot in self._slots if slot.last_error), "none (still pending)")
            reason = (f"no Ray worker came up in {self._policy.worker_wait_s:.0f} s (each needs "
                      f"{dict(self._policy.worker_resources)}); last error: {last_error}")
        else:
            if now - self._last_wait_warning > 30:
                self._last_wait_warning = now
                _log.warning("waiting for a Ray worker (each needs %s)", dict(self._policy.worker_resources))
            return False
        while self._queue:
            task = self._queue.popleft()
            self._on_failure(task.job, reason, task.attempt)
        return True


def fault_kinds(node_ids: Sequence[str | None]) -> list[str]:
    """`preemption` for each node that is no longer alive (or unknown), else `worker_crash`.

    Ray marks a node dead only after its health checks fail (seconds), so a loss judged right after it happened
    can look like a crash; judged again later (when the job's results come back, at the end of the run) it is
    a preemption.
    """
    if not node_ids:
        return []
    alive = _alive_nodes()
    return ["worker_crash" if node_id in alive else "preemption" for node_id in node_ids]


def _alive_nodes() -> set[str]:
    try:
        return {node["NodeID"] for node in ray.nodes() if node.get("Alive")}
    except Exception:  # noqa: BLE001 - without an answer from Ray every loss counts as a preemption
        return set()


def with_fault_tags(results: list[Result], lost_on_nodes: Sequence[str | None]) -> list[Result]:
    """Stamps `runner.preemptions` / `runner.worker_crashes` on the results of a job that lost workers."""
    if not lost_on_nodes:
        return results
    kinds = fault_kinds(lost_on_nodes)
    tags = {TAG_PREEMPTIONS: str(kinds.count("preemption")), TAG_WORKER_CRASHES: str(kinds.count("worker_crash"))}
    return [dataclasses.replace(result, tags={**result.tags, **tags}) for result in results]


def describe_ray_error(error: BaseException) -> str:
    """A Ray error in one line: for a worker whose `__init__` raised, the exception it raised."""
    text = _ANSI.sub("", str(error)).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if isinstance(error, ray_errors.RayActorError) and error.actor_init_failed and lines:
        return f"worker failed to start: {lines[-1]}"
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def describe_cause(error: ray_errors.RayTaskError) -> str:
    """The exception a Ray task raised, in one line."""
    cause = error.cause if error.cause is not None else error
    return f"{type(cause).__name__}: {cause}"


def _first_line(text: str) -> str:
    return first_line(_ANSI.sub("", text))
