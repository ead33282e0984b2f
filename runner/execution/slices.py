"""Slice replicas: one model spanning every host of a multi-host slice (`cluster.replica: slice`).

A multi-host TPU slice is one machine to libtpu: every host must join one SPMD program. A slice replica is a gang
of one `SliceHostWorker` actor per host, placed together (`ray.util.tpu.slice_placement_group` for a TPU
topology, else a placement group of one bundle per host), joined by `jax.distributed.initialize` with a global
mesh over all the slice's devices. Every job goes to every member; the results come from process 0.

A gang lives and dies as one: when a member fails, the others are blocked in a collective (or fail within a
second), so the controller kills the whole gang and builds a new one (a new coordinator; `jax.distributed` cannot
be initialised twice in a process). What the failed member raised is classified like a host's failure
(`runner.execution.faults`): the job is requeued after a lost host or worker, retried after its own error.

Order of things on a member (each rule learnt the hard way): nothing touches JAX before `start`; `initialize`
comes first, then one collective so every member has its communicators (gloo gives a late one only 30 s); the
model is restored with orbax into the global shardings (collective); nothing is written by one member alone
(synthetic SAEs are written by the driver, before the gang starts).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import socket
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import ray
from ray import exceptions as ray_errors
from ray.actor import ActorHandle
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from runner.config.schema import ClusterConfig
from runner.execution.executor import FailureCallback, ResultCallback
from runner.execution.faults import (
    FaultPolicy,
    OutOfMemory,
    Task,
    classify,
    describe_ray_error,
    fault_counts,
    with_fault_tags,
)
from runner.execution.host_actor import WorkerInfo, check_jax_platform, remove_stale_tpu_lockfile
from runner.execution.ray_setup import (
    check_ray_address_reachable,
    connect_ray,
    keep_driver_jax_on_cpu,
    ray_actor_options,
)
from runner.plan.points import Job
from runner.results import Result

if TYPE_CHECKING:
    from ray.util.tpu import SlicePlacementGroup

    from runner.config.schema import ExperimentConfig
    from runner.execution.workers import Worker
    from runner.plan.prepare import SweepPlan

_log = logging.getLogger(__name__)

#: How long members wait for each other in `jax.distributed.initialize` and at `shutdown`.
GANG_TIMEOUT_S = 300
#: A gang that fails to start this many times in a row is given up.
MAX_GANG_START_FAILURES = 3

GangState = Literal["down", "starting", "idle", "busy", "dead"]


class SliceMemberInfo(WorkerInfo):
    """Where a member of a slice replica runs: a worker's info with its place in the gang."""

    rank: int
    process_index: int
    local_device_count: int


class SliceHostWorker:
    """One host's process of a slice replica (a Ray actor). Nothing here touches JAX before `start`.

    Args:
      rank: This member's process id in the gang (0 reports the results).
      world: Members of the gang (hosts of the slice).
      worker_args: What the worker class takes besides its cache directory and name (`SweepPlan.worker_args()`).
      cache_dir: The runner cache (the synthetic model is read from it).
      platform: The JAX platform every member must run on.
      name: The replica's name, e.g. `replica-0`.
    """

    def __init__(self, rank: int, world: int, worker_args: Mapping[str, Any], *, cache_dir: Path, platform: str,
                 name: str):
        self.rank, self.world = rank, world
        self.name = f"{name}/host-{rank}@{socket.gethostname()}"
        self._worker_args, self._cache_dir, self._platform = dict(worker_args), Path(cache_dir), platform
        self._worker: Worker | None = None

    def coordinator_address(self) -> str:
        """`ip:port` where this member can host the JAX coordinator (asked of rank 0)."""
        with socket.socket() as sock:  # free now; a clash at `initialize` fails the gang, which is then rebuilt
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return f"{ray.util.get_node_ip_address()}:{port}"

    def start(self, coordinator: str) -> SliceMemberInfo:
        """Joins the gang, loads the model on the global mesh and builds the worker; returns where it runs."""
        import jax
        from jax.experimental import multihost_utils

        from runner.execution.workers import enable_compilation_cache, worker_class_for
        from runner.model.loading import make_host_mesh

        if self._platform == "tpu":
            remove_stale_tpu_lockfile()
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=self.world,
            process_id=self.rank,
            cluster_detection_method="deactivate",
            initialization_timeout=GANG_TIMEOUT_S,
            shutdown_timeout_seconds=30,
        )
        multihost_utils.sync_global_devices("runner: gang up")
        platform, devices = check_jax_platform(self._platform, self.name)
        enable_compilation_cache(self._cache_dir)
        config: ExperimentConfig = self._worker_args["config"]
        self._worker = worker_class_for(config.kind)(
            **self._worker_args, cache_dir=self._cache_dir, worker_name=self.name, mesh=make_host_mesh()
        )
        return SliceMemberInfo(
            name=self.name,
            rank=self.rank,
            process_index=jax.process_index(),
            hostname=socket.gethostname(),
            node_id=ray.get_runtime_context().get_node_id(),
            pid=os.getpid(),
            platform=platform,
            device_count=devices,
            local_device_count=jax.local_device_count(),
            batch_size=self._worker.batch_size,
            memory=self._worker.memory_note,
        )

    def run_job(self, job: Job, attempt: int, batch_size: int | None = None) -> list[Result]:
        """Runs `job` with the other members (in batches of at most `batch_size`, kept for later jobs); process 0
        returns the results, the others nothing."""
        import jax

        results = self._worker.run_job(job, attempt, batch_size)
        if jax.process_index() != 0:
            return []
        replica = self.name.split("/", 1)[0]
        return [dataclasses.replace(result, worker=f"{replica}@{socket.gethostname()}", attempt=attempt)
                for result in results]

    def compilations(self) -> int:
        """Programs this member compiled."""
        return self._worker.compilations if self._worker is not None else 0

    def close(self) -> None:
        """Leaves the gang (a barrier: every member calls it at once)."""
        import jax

        jax.distributed.shutdown()


class _Gang:
    """One slice replica as the driver sees it: its placement group, members and what they are doing."""

    def __init__(self, name: str, cluster: ClusterConfig, worker_args: Mapping[str, Any], cache_dir: Path):
        self.name, self._cluster, self._worker_args, self._cache_dir = name, cluster, worker_args, cache_dir
        self.members: list[ActorHandle[SliceHostWorker]] = []
        self.infos: list[SliceMemberInfo] = []
        self.state: GangState = "down"  # down -> starting -> idle <-> busy; dead
        self.refs: list[ray.ObjectRef] = []  # one per member, in rank order, for what the gang is doing now
        self.pending: set[ray.ObjectRef] = set()  # those not returned yet
        self.task: Task | None = None
        self.results: dict[ray.ObjectRef, list[Result] | SliceMemberInfo] = {}
        self.start_failures = 0
        self.last_error = ""
        self.batch_cap: int | None = None  # after running out of memory: the most rows its (rebuilt) members use
        self._group, self._slice = self._reserve()

    def _reserve(self) -> tuple[PlacementGroup, SlicePlacementGroup | None]:
        if self._cluster.slice_topology is not None:
            import ray.util.tpu as ray_tpu

            handle = ray_tpu.slice_placement_group(self._cluster.slice_topology, self._cluster.accelerator_version)
            return handle.placement_group, handle
        hosts = self._cluster.hosts_per_replica
        bundle = {"CPU": 0.0, **self._cluster.resources}
        strategy = "STRICT_SPREAD" if self._cluster.placement == "spread" else "PACK"
        return placement_group([dict(bundle) for _ in range(hosts)], strategy=strategy, name=self.name), None

    @property
    def hosts(self) -> int:
        """Members of the gang."""
        return self._slice.num_hosts if self._slice is not None else self._cluster.hosts_per_replica

    def start(self) -> None:
        """Creates the members (once the placement group is ready) and starts them all at once."""
        ray.get(self._group.ready(), timeout=GANG_TIMEOUT_S)
        options = ray_actor_options(self._cluster, max_restarts=0)
        options.pop("scheduling_strategy", None)
        remote = ray.remote(SliceHostWorker)
        self.members = [
            remote.options(
                **options,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self._group, placement_group_bundle_index=rank),
            ).remote(rank, self.hosts, self._worker_args, cache_dir=self._cache_dir,
                     platform=self._cluster.jax_platform(), name=self.name)
            for rank in range(self.hosts)
        ]
        coordinator = ray.get(self.members[0].coordinator_address.remote(), timeout=GANG_TIMEOUT_S)
        # All at once: they wait for each other.
        self.refs = [member.start.remote(coordinator) for member in self.members]
        self.pending, self.state, self.results = set(self.refs), "starting", {}

    def submit(self, task: Task) -> None:
        """Sends the same job to every member."""
        self.task, self.results, self.state = task, {}, "busy"
        cap = min((size for size in (task.batch_size, self.batch_cap) if size is not None), default=None)
        self.refs = [member.run_job.remote(task.job, task.attempt, cap) for member in self.members]
        self.pending = set(self.refs)

    def kill(self) -> None:
        """Kills every member (a failed gang cannot be reused)."""
        for member in self.members:
            with contextlib.suppress(Exception):
                ray.kill(member, no_restart=True)
        self.members, self.refs, self.pending, self.state = [], [], set(), "down"

    def close(self) -> None:
        """Leaves `jax.distributed` on every member at once, then kills them and frees the placement group."""
        if self.state == "idle" and self.members:
            with contextlib.suppress(Exception):
                ray.get([member.close.remote() for member in self.members], timeout=60)
        self.kill()
        with contextlib.suppress(Exception):
            if self._slice is not None:
                self._slice.shutdown()
            else:
                remove_placement_group(self._group)

    def node_ids(self) -> list[str | None]:
        """The Ray nodes the members ran on (from their last start)."""
        return [info["node_id"] for info in self.infos] or [None]

    def batch_for(self, task: Task) -> int | None:
        """The batch its members run `task` at: their own (from their last start), capped by the caps."""
        own = self.infos[0].get("batch_size") if self.infos else None
        sizes = [size for size in (own, self.batch_cap, task.batch_size) if size is not None]
        return min(sizes) if sizes else None


class SliceExecutor:
    """Runs a sweep's jobs on `cluster.workers` slice replicas (a `runner.execution.executor.JobExecutor`).

    Args:
      sweep_plan: The checked sweep. Synthetic SAEs are written here, on the driver, before any gang starts (see
        the module docstring).
      cache_dir: Where synthetic models and SAEs are written.
      cluster_config: Replicas, hosts per replica, their resources and placement, platform, address, retries.
    """

    def __init__(self, sweep_plan: SweepPlan, cache_dir: Path, cluster_config: ClusterConfig):
        if cluster_config.address:
            check_ray_address_reachable(cluster_config.address)
        keep_driver_jax_on_cpu()
        self._plan = sweep_plan
        self._cache_dir = Path(cache_dir).absolute()
        self._cluster = cluster_config
        self._compilations = 0
        self._events: list[dict[str, str]] = []
        self._job_retries = 0
        self._oom_retries = 0
        self._faults: FaultPolicy | None = None
        self._gangs: list[_Gang] | None = None
        self._owns_ray = False
        self.workers_seen: list[SliceMemberInfo] = []

    @property
    def compilations(self) -> int:
        """Programs compiled by process 0 of each replica alive at the end of the last run."""
        return self._compilations

    @property
    def lost_host_events(self) -> list[dict[str, str]]:
        """Each time a replica was lost while it ran a job: job id, replica, error and `kind`."""
        return list(self._events)

    def fault_counts(self) -> dict[str, int]:
        """`preemptions`, `worker_crashes` and `job_retries` of the last run."""
        return fault_counts(self._events, self._job_retries, self._oom_retries)

    def start(self) -> None:
        """Writes the synthetic SAEs, starts (or joins) Ray and starts every replica's gang; does nothing when
        already started. `run` calls it."""
        if self._gangs is not None:
            return
        worker_args = _with_synthetic_saes_written(self._plan, self._cache_dir)
        self._owns_ray = connect_ray(self._cluster)
        try:
            self._gangs = [_Gang(f"replica-{index}", self._cluster, worker_args, self._cache_dir)
                           for index in range(self._cluster.workers)]
            for gang in self._gangs:
                gang.start()
        except BaseException:
            self.close()
            raise

    def run(self, jobs: Sequence[Job], on_result: ResultCallback, on_failure: FailureCallback) -> None:
        """Runs every job on the replicas; `on_result`/`on_failure` are called on this thread, once per job.

        KeyboardInterrupt (and any error of the callbacks) kills the replicas and propagates.
        """
        if not jobs:
            return
        self.start()
        queue: collections.deque[Task] = collections.deque(Task(job) for job in jobs)
        self._faults = FaultPolicy(self._cluster.max_job_retries, self._cluster.max_worker_crashes, queue, on_failure)
        try:
            self._loop(self._gangs, queue, on_result, on_failure)
            self._compilations = sum(
                ray.get(gang.members[0].compilations.remote(), timeout=30)
                for gang in self._gangs
                if gang.state == "idle"
            )
        except BaseException:
            self.close()
            raise
        finally:
            self._events, self._job_retries = self._faults.classified_events(), self._faults.job_retries
            self._oom_retries = self._faults.oom_retries

    def close(self) -> None:
        """Leaves `jax.distributed` on every replica, kills them, frees their placement groups and leaves Ray."""
        for gang in self._gangs or []:
            gang.close()
        self._gangs = None
        if self._owns_ray:
            self._owns_ray = False
            ray.shutdown()

    def _loop(self, gangs: list[_Gang], queue: collections.deque[Task], on_result: ResultCallback,
              on_failure: FailureCallback) -> None:
        while queue or any(gang.state == "busy" for gang in gangs):
            for gang in gangs:
                if gang.state == "idle" and queue:
                    gang.submit(queue.popleft())
            live = [gang for gang in gangs if gang.state != "dead"]
            if not live:
                reason = "no slice replica left; last error: " + "; ".join(g.last_error for g in gangs)
                while queue:
                    task = queue.popleft()
                    on_failure(task.job, reason, task.attempt)
                return
            refs = [ref for gang in live for ref in gang.pending]
            if not refs:
                time.sleep(0.2)
                continue
            ready, _ = ray.wait(refs, num_returns=1, timeout=1.0)
            for ref in ready:
                gang = next(g for g in live if ref in g.pending)
                gang.pending.discard(ref)
                self._member_returned(gang, ref, on_result)

    def _member_returned(self, gang: _Gang, ref: ray.ObjectRef, on_result: ResultCallback) -> None:
        try:
            value = ray.get(ref)
        except Exception as error:  # noqa: BLE001 - any member's failure ends the gang
            self._gang_failed(gang, error)
            return
        gang.results[ref] = value
        if gang.pending:
            return
        values = [gang.results[r] for r in gang.refs]
        if gang.state == "starting":
            infos = cast(list[SliceMemberInfo], values)
            gang.infos, gang.state, gang.start_failures, gang.refs = infos, "idle", 0, []
            self.workers_seen.extend(infos)
            _log.info("slice replica %s ready on %d hosts", gang.name, len(values))
            return
        task, gang.task, gang.state, gang.refs = gang.task, None, "idle", []
        results = cast(list[Result], values[0])  # rank 0 is process 0: it reports
        on_result(task.job, with_fault_tags(results, task.lost_on_nodes, oom_retries=task.oom_retries))

    def _gang_failed(self, gang: _Gang, error: BaseException) -> None:
        was_starting, task = gang.state == "starting", gang.task
        gang.last_error = describe_ray_error(error) if isinstance(error, ray_errors.RayError) else str(error)
        node_ids = gang.node_ids()
        gang.kill()
        _log.warning("slice replica %s failed: %s", gang.name, gang.last_error)
        if task is not None:
            fault = classify(error, node_ids)
            memory_note = gang.infos[0].get("memory", "") if gang.infos else ""
            self._faults.handle(task, fault, gang.name, gang.batch_for(task), memory_note)
            if isinstance(fault, OutOfMemory):
                gang.batch_cap = task.batch_size
        if was_starting:
            gang.start_failures += 1
            if gang.start_failures >= MAX_GANG_START_FAILURES:
                gang.state = "dead"
                return
        try:
            gang.start()
        except Exception as restart_error:  # noqa: BLE001 - e.g. the placement group never comes back
            gang.last_error, gang.state = f"cannot rebuild: {restart_error}", "dead"


def _with_synthetic_saes_written(sweep_plan: SweepPlan, cache_dir: Path) -> dict[str, Any]:
    """The plan's worker arguments with every synthetic SAE written (on this, the driver's, CPU) and its path set.

    Members of a gang cannot write them: the calibration is a forward pass, which would have to be collective.
    """
    args = sweep_plan.worker_args()
    files = args["sae_files"]
    if all(file.path is not None for file in files.values()):
        return args
    from runner.execution.workers import load_host_model, write_pending_synthetic_saes

    loaded = load_host_model(sweep_plan.config, cache_dir, mesh=None)
    return {**args, "sae_files": write_pending_synthetic_saes(loaded, sweep_plan.config, files, cache_dir)}
