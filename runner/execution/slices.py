"""Slice replicas: one model spanning every host of a multi-host slice (`cluster.replica: slice`).

A multi-host TPU slice is one machine to libtpu: every host must join one SPMD program. A slice replica is a gang
of one `SliceHostWorker` actor per host, placed together, joined by `jax.distributed.initialize` with a global mesh
over all the slice's devices. Every job goes to every member; the results come from process 0.

Where a gang runs (`_Reservation`): for a TPU topology, a slice that is whole (every host alive, worker 0 among
them) and free, found from the nodes' `ray.io/tpu-*` labels; its head is claimed as Ray claims one
(`reserve_tpu_slice` on the slice's worker 0) and its hosts are reserved with `ray.util.tpu.slice_placement_group`,
bundle i on TPU worker i, so that member i is TPU worker i and JAX process i. Without a topology (GPU hosts,
tests), a placement group of `hosts_per_replica` bundles. Nothing waits on the cluster for long: the controller
polls each reservation while the other replicas run, and a replica waits for a slice without limit.

A gang lives and dies as one: when a member fails, the others are blocked in a collective (or fail because of it),
so the controller waits for the other members' outcome (and, for a member that went away, for Ray to tell whether
its host died), judges the gang's fault from all of them
(`runner.execution.faults.classify_gang`: a lost host makes the gang preempted whatever the survivors raised),
kills the whole gang and builds a new one (a new coordinator; `jax.distributed` cannot be initialised twice in a
process). After a preemption the old reservation is given back and a new slice is reserved (a replacement slice
has a new name); the time a replica spends without its slice after a loss is `slice_wait_s` in the fault counts.

A member that cannot start (checkpoint, tokenizer, device...) raises a classified `WorkerStartupError`; a gang
that keeps failing to start is given up, and when no replica is left the sweep ends with that error, no point
failed.

Order of things on a member (each rule learnt the hard way): nothing touches JAX before `start`; `initialize`
comes first, then one collective so every member has its communicators (gloo gives a late one only 30 s); the
model is restored with orbax into the global shardings (collective); nothing is computed by one member alone:
synthetic SAEs are fitted on the driver and shipped through Ray's object store, and each member writes them into
its own cache.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import socket
import time
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import ray
from ray.actor import ActorHandle
from ray.util.placement_group import PlacementGroup, placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from runner.config.schema import ClusterConfig
from runner.execution.executor import FailureCallback, ResultCallback
from runner.execution.faults import (
    FaultPolicy,
    OutOfMemory,
    PreemptedHost,
    Task,
    WorkerStartupError,
    alive_ray_nodes,
    classify,
    classify_gang,
    fault_counts,
    raised_startup_error,
    startup_error,
    with_fault_tags,
    worker_survived,
)
from runner.execution.host_actor import WorkerInfo, check_jax_platform, remove_stale_tpu_lockfile
from runner.execution.ray_setup import (
    check_ray_address_reachable,
    connect_ray,
    keep_driver_jax_on_cpu,
    ray_actor_options,
)
from runner.files import write_bytes_atomically
from runner.plan.points import Job
from runner.results import Result

if TYPE_CHECKING:
    from ray.util.tpu import SlicePlacementGroup

    from runner.config.schema import ExperimentConfig
    from runner.config.tpu_slices import TpuSliceShape
    from runner.execution.workers import Worker
    from runner.plan.prepare import SweepPlan
    from runner.sae.sources import SAEFile

_log = logging.getLogger(__name__)

#: How long members wait for each other in `jax.distributed.initialize` and at `shutdown`.
GANG_TIMEOUT_S = 300
#: A gang that fails to start this many times in a row for its own reasons (not a preemption) is given up.
MAX_GANG_START_FAILURES = 3
#: How long a failed gang's fault may wait, beyond Ray's time to mark a lost node dead (`node_death_window_s`),
#: for the other members' outcome and for Ray to say whether a member that went away took its host with it.
GANG_SETTLE_MARGIN_S = 5.0
#: How often the controller looks at the replicas waiting for a slice, and how often such a replica says so.
POLL_S = 1.0
WAIT_LOG_EVERY_S = 60.0
#: A slice's head claim that does not come within this is given up and another slice looked for.
HEAD_RESERVATION_S = 30.0
#: A reservation whose placement group is not placed within this (a host went away meanwhile) is given back.
RESERVATION_READY_S = 120.0

GangState = Literal["reserving", "starting", "idle", "busy", "settling", "dead"]
#: Synthetic SAEs shipped to every member: SAE id -> (path under the cache directory, the file's bytes).
ShippedSAEs = dict[str, tuple[str, bytes]]


class SliceMemberInfo(WorkerInfo):
    """Where a member of a slice replica runs: a worker's info with its place in the gang."""

    rank: int
    process_index: int
    local_device_count: int


class SliceHostWorker:
    """One host's process of a slice replica (a Ray actor). Nothing here touches JAX before `start`.

    Args:
      rank: This member's process id in the gang (0 reports the results); on a TPU slice, its TPU worker id.
      world: Members of the gang (hosts of the slice).
      worker_args: What the worker class takes besides its cache directory and name (`SweepPlan.worker_args()`);
        synthetic SAEs have no path yet.
      shipped_saes: The synthetic SAEs, fitted on the driver, to write into this member's cache.
      cache_dir: The runner cache on this host (the synthetic model and the shipped SAEs are written there).
      platform: The JAX platform every member must run on.
      name: The replica's name, e.g. `replica-0`.
    """

    def __init__(self, rank: int, world: int, worker_args: Mapping[str, Any], shipped_saes: ShippedSAEs, *,
                 cache_dir: Path, platform: str, name: str):
        self.rank, self.world = rank, world
        self.name = f"{name}/host-{rank}@{socket.gethostname()}"
        self._worker_args, self._cache_dir, self._platform = dict(worker_args), Path(cache_dir), platform
        self._shipped_saes = shipped_saes
        self._worker: Worker | None = None

    def coordinator_address(self) -> str:
        """`ip:port` where this member can host the JAX coordinator (asked of rank 0)."""
        with socket.socket() as sock:  # free now; a clash at `initialize` fails the gang, which is then rebuilt
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return f"{ray.util.get_node_ip_address()}:{port}"

    def start(self, coordinator: str) -> SliceMemberInfo:
        """Joins the gang, loads the model on the global mesh and builds the worker; returns where it runs.

        Raises:
          WorkerStartupError: Whatever failed, classified here (`runner.execution.faults.startup_error`).
        """
        try:
            return self._start(coordinator)
        except Exception as error:  # noqa: BLE001 - the driver gets one classified line, not a traceback
            raise startup_error(error, self.name) from None

    def _start(self, coordinator: str) -> SliceMemberInfo:
        import jax
        from jax.experimental import multihost_utils

        from runner.execution.workers import enable_compilation_cache, worker_class_for
        from runner.model.loading import make_host_mesh

        if self._platform == "tpu":
            remove_stale_tpu_lockfile()
        sae_files = received_saes(self._worker_args["sae_files"], self._shipped_saes, self._cache_dir)
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
            **{**self._worker_args, "sae_files": sae_files}, cache_dir=self._cache_dir, worker_name=self.name,
            mesh=make_host_mesh(),
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


def received_saes(sae_files: Mapping[str, SAEFile], shipped: ShippedSAEs, cache_dir: Path) -> dict[str, SAEFile]:
    """`sae_files` with every shipped SAE written under this host's `cache_dir` (atomically: members sharing a
    disk may write the same file) and its path set there."""
    files = dict(sae_files)
    for sae_id, (relative, data) in shipped.items():
        path = cache_dir / relative
        if not (path.is_file() and path.read_bytes() == data):
            write_bytes_atomically(path, data)
        files[sae_id] = dataclasses.replace(files[sae_id], path=path)
    return files


class _Reservation:
    """The hosts one gang runs on, held by a placement group until `release`. Never blocks for long: `poll` moves
    it on and says whether its placement group is placed.

    For a TPU slice, each attempt picks a slice that is whole and free (Ray's `_get_intact_tpu_slices`, then every
    host's chips and worker 0's head resource unused), claims its head as Ray does (`reserve_tpu_slice` with the
    slice's name: the claim can only land on that slice) and reserves its hosts with `slice_placement_group`, bundle
    i pinned to `ray.io/tpu-worker-id` i of that slice.
    """

    def __init__(self, name: str, cluster: ClusterConfig):
        self.name, self._cluster = name, cluster
        self.shape: TpuSliceShape | None = cluster.tpu_slice()
        self.group: PlacementGroup | None = None
        self.slice_name: str | None = None
        self.node_ids: list[str] = []
        self._slice: SlicePlacementGroup | None = None
        self._head: PlacementGroup | None = None
        self._created = 0.0

    @property
    def hosts(self) -> int:
        """Bundles of the placement group: members of the gang."""
        return self.shape.hosts if self.shape is not None else self._cluster.hosts_per_replica

    def describe(self) -> str:
        """What is reserved, in words."""
        if self.shape is None:
            return f"{self.hosts} hosts with {self._cluster.host_bundle()} each"
        return f"a free, whole {self.shape.describe()}"

    def poll(self, taken: Collection[str]) -> bool:
        """Creates the reservation when there is none (on a TPU slice that is whole, free and not in `taken`);
        returns whether its placement group is placed."""
        if self.group is None:
            self._create(taken)
            return False
        table = placement_group_table(self.group)
        if table.get("state") == "CREATED":
            bundles = table.get("bundles_to_node_id", {})
            self.node_ids = [bundles[index] for index in sorted(bundles)]
            return True
        if time.monotonic() - self._created > RESERVATION_READY_S:
            _log.warning("%s: the hosts of %s were not all placed within %.0f s; looking again", self.name,
                         self.slice_name or "its placement group", RESERVATION_READY_S)
            self.release()
        return False

    def _create(self, taken: Collection[str]) -> None:
        bundle = self._cluster.host_bundle()
        self._created = time.monotonic()
        if self.shape is None:
            strategy = "STRICT_SPREAD" if self._cluster.placement == "spread" else "PACK"
            self.group = placement_group([dict(bundle) for _ in range(self.hosts)], strategy=strategy, name=self.name)
            return
        import ray.util.tpu as ray_tpu
        from ray._private.accelerators.tpu import reserve_tpu_slice

        free = [name for name in free_whole_slices(self.shape) if name not in taken]
        if not free:
            return
        try:
            claimed = reserve_tpu_slice(self.shape.topology, self.shape.accelerator_type,
                                        timeout_s=HEAD_RESERVATION_S, slice_name=free[0])
        except (TimeoutError, RuntimeError) as error:  # taken by another client meanwhile: look again
            _log.info("%s: could not claim TPU slice %s: %s", self.name, free[0], error)
            return
        if claimed is None:
            return
        self.slice_name, self._head = claimed
        self._slice = ray_tpu.slice_placement_group(
            self.shape.topology, self.shape.ray_version, resources_per_bundle=bundle,
            chips_per_vm=self.shape.chips_per_host, strategy="STRICT_SPREAD", name=self.name,
            bundle_label_selector=[{ray._raylet.RAY_NODE_TPU_SLICE_NAME_KEY: self.slice_name,
                                    ray._raylet.RAY_NODE_TPU_WORKER_ID_KEY: str(rank)} for rank in range(self.hosts)],
        )
        self.group = self._slice.placement_group

    def release(self) -> None:
        """Gives the hosts back (the worker placement group and the head claim); the next `poll` reserves anew."""
        with contextlib.suppress(Exception):
            if self._slice is not None:
                self._slice.shutdown()
            elif self.group is not None:
                remove_placement_group(self.group)
        with contextlib.suppress(Exception):
            if self._head is not None:
                remove_placement_group(self._head)
        self.group = self._slice = self._head = self.slice_name = None
        self.node_ids = []


def free_whole_slices(shape: TpuSliceShape) -> list[str]:
    """Names of the TPU slices of `shape` that have every host alive (Ray's integrity check) with all their chips
    and worker 0's head resource unused, by name."""
    from ray._private.state import available_resources_per_node
    from ray.util.tpu import _get_intact_tpu_slices

    whole = _get_intact_tpu_slices(shape.topology, shape.accelerator_type)
    available = available_resources_per_node()
    free = []
    for name, nodes in whole.items():
        chips_free = all(available.get(node["NodeID"], {}).get("TPU", 0) >= node["Resources"].get("TPU", 0)
                         for node in nodes)
        head_free = any(available.get(node["NodeID"], {}).get(shape.head_resource, 0) >= 1 for node in nodes)
        if chips_free and head_free:
            free.append(name)
    return sorted(free)


class _Gang:
    """One slice replica as the driver sees it: its reservation, members and what they are doing."""

    def __init__(self, name: str, cluster: ClusterConfig, worker_args: Mapping[str, Any], shipped: ray.ObjectRef,
                 cache_dir: Path):
        self.name, self._cluster, self._worker_args, self._cache_dir = name, cluster, worker_args, cache_dir
        self._shipped = shipped
        self.reservation = _Reservation(name, cluster)
        self.members: list[ActorHandle[SliceHostWorker]] = []
        self.infos: list[SliceMemberInfo] = []
        self.state: GangState = "reserving"  # reserving -> starting -> idle <-> busy; settling -> reserving; dead
        self.refs: list[ray.ObjectRef] = []  # one per member, in rank order, for what the gang is doing now
        self.pending: set[ray.ObjectRef] = set()  # those not returned yet
        self.coordinator: str | None = None
        self.task: Task | None = None
        self.results: dict[ray.ObjectRef, Any] = {}
        self.errors: list[BaseException] = []
        self.settle_by = 0.0
        self.settling_from: GangState = "busy"
        self.start_failures = 0
        self.last_error = ""
        self.startup_error: WorkerStartupError | None = None
        self.batch_cap: int | None = None  # after running out of memory: the most rows its (rebuilt) members use
        self.lost_at: float | None = None  # when it lost its slice, until it has one again
        self.waiting_since = time.monotonic()
        self.last_wait_log = time.monotonic()

    def create_members(self) -> None:
        """Creates one member per bundle of the placed reservation and asks rank 0 for a coordinator address."""
        options = ray_actor_options(self._cluster, max_restarts=0)
        options.pop("scheduling_strategy", None)
        remote = ray.remote(SliceHostWorker)
        hosts = self.reservation.hosts
        self.members = [
            remote.options(
                **options,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.reservation.group,
                                                                     placement_group_bundle_index=rank),
            ).remote(rank, hosts, self._worker_args, self._shipped, cache_dir=self._cache_dir,
                     platform=self._cluster.jax_platform(), name=self.name)
            for rank in range(hosts)
        ]
        self.coordinator, self.infos, self.results, self.errors = None, [], {}, []
        self.refs = [self.members[0].coordinator_address.remote()]
        self.pending, self.state = set(self.refs), "starting"

    def join(self, coordinator: str) -> None:
        """Starts every member at once with rank 0's coordinator (they wait for each other)."""
        self.coordinator, self.results = coordinator, {}
        self.refs = [member.start.remote(coordinator) for member in self.members]
        self.pending = set(self.refs)

    def submit(self, task: Task) -> None:
        """Sends the same job to every member."""
        self.task, self.results, self.errors, self.state = task, {}, [], "busy"
        cap = min((size for size in (task.batch_size, self.batch_cap) if size is not None), default=None)
        self.refs = [member.run_job.remote(task.job, task.attempt, cap) for member in self.members]
        self.pending = set(self.refs)

    def failed(self, error: BaseException) -> None:
        """Notes a member's failure; the gang settles (waits for the others' outcome) before it is judged."""
        self.errors.append(error)
        if self.state != "settling":
            self.settling_from, self.state = self.state, "settling"
            self.settle_by = time.monotonic() + node_death_window_s() + GANG_SETTLE_MARGIN_S

    def settled(self) -> bool:
        """Whether the failed gang's fault can be judged: one of its nodes died, or every member returned having
        raised its own error, or the wait is over. A member that went away is judged only once Ray had the time to
        mark its node dead (a preemption: the slice is given up) or not (a crash: the slice is kept)."""
        alive = alive_ray_nodes()
        if any(node is not None and node not in alive for node in self.node_ids()):
            return True
        if time.monotonic() > self.settle_by:
            return True
        went_away = any(not worker_survived(classify(error, self.node_ids(), lambda: alive)) for error in self.errors)
        return not self.pending and not went_away

    def kill(self) -> None:
        """Kills every member (a failed gang cannot be reused)."""
        for member in self.members:
            with contextlib.suppress(Exception):
                ray.kill(member, no_restart=True)
        self.members, self.refs, self.pending = [], [], set()

    def close(self) -> None:
        """Leaves `jax.distributed` on every member at once, then kills them and gives the reservation back."""
        if self.state == "idle" and self.members:
            with contextlib.suppress(Exception):
                ray.get([member.close.remote() for member in self.members], timeout=60)
        self.kill()
        self.reservation.release()

    def node_ids(self) -> list[str | None]:
        """The Ray nodes of the gang: its reservation's bundles, else where its members last ran."""
        return list(self.reservation.node_ids) or [info["node_id"] for info in self.infos] or [None]

    def batch_for(self, task: Task) -> int | None:
        """The batch its members run `task` at: their own (from their last start), capped by the caps."""
        own = self.infos[0].get("batch_size") if self.infos else None
        sizes = [size for size in (own, self.batch_cap, task.batch_size) if size is not None]
        return min(sizes) if sizes else None


class SliceExecutor:
    """Runs a sweep's jobs on `cluster.workers` slice replicas (a `runner.execution.executor.JobExecutor`).

    Args:
      sweep_plan: The checked sweep. Synthetic SAEs are fitted here, on the driver, and shipped to the members
        (see the module docstring).
      cache_dir: Where synthetic models and SAEs are written (on the driver, and on every host).
      cluster_config: Replicas, the slice (or hosts per replica), their resources and placement, platform,
        address, retries.
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
        self._slice_wait_s = 0.0
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
        """`preemptions`, `worker_crashes`, `job_retries` and `oom_retries` of the last run, and `slice_wait_s`: the
        seconds replicas spent without a slice after losing theirs."""
        return {**fault_counts(self._events, self._job_retries, self._oom_retries),
                "slice_wait_s": round(self._slice_wait_s)}

    def start(self) -> None:
        """Fits the synthetic SAEs, starts (or joins) Ray and begins reserving every replica's slice; does nothing
        when already started. `run` calls it."""
        if self._gangs is not None:
            return
        worker_args, shipped = _synthetic_saes_to_ship(self._plan, self._cache_dir)
        self._owns_ray = connect_ray(self._cluster)
        try:
            shipped_ref = ray.put(shipped)
            self._gangs = [_Gang(f"replica-{index}", self._cluster, worker_args, shipped_ref, self._cache_dir)
                           for index in range(self._cluster.workers)]
            self._advance(self._gangs)
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
            self._loop(self._gangs, queue, on_failure, on_result)
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
            now = time.monotonic()
            self._slice_wait_s += sum(now - gang.lost_at for gang in self._gangs or [] if gang.lost_at is not None)
            self._oom_retries = self._faults.oom_retries

    def close(self) -> None:
        """Leaves `jax.distributed` on every replica, kills them, gives their slices back and leaves Ray."""
        for gang in self._gangs or []:
            gang.close()
        self._gangs = None
        if self._owns_ray:
            self._owns_ray = False
            ray.shutdown()

    def _loop(self, gangs: list[_Gang], queue: collections.deque[Task], on_failure: FailureCallback,
              on_result: ResultCallback) -> None:
        while queue or any(gang.state in ("busy", "settling") for gang in gangs):
            self._advance(gangs)
            for gang in gangs:
                if gang.state == "idle" and queue:
                    gang.submit(queue.popleft())
            live = [gang for gang in gangs if gang.state != "dead"]
            failed_start = [gang.startup_error for gang in gangs if gang.startup_error is not None]
            if not live and failed_start:
                raise failed_start[-1]  # no point's fault: the replicas could not start
            if not live:
                reason = "no slice replica left; last error: " + "; ".join(g.last_error for g in gangs)
                while queue:
                    task = queue.popleft()
                    on_failure(task.job, reason, task.attempt)
                return
            refs = [ref for gang in live for ref in gang.pending]
            if not refs:
                time.sleep(POLL_S)
                continue
            ready, _ = ray.wait(refs, num_returns=1, timeout=POLL_S)
            for ref in ready:
                gang = next(g for g in live if ref in g.pending)
                gang.pending.discard(ref)
                self._member_returned(gang, ref, on_result)

    def _advance(self, gangs: list[_Gang]) -> None:
        """Moves on the replicas that wait: for a slice (reserving), or for their failed members (settling)."""
        for gang in gangs:
            if gang.state == "settling" and gang.settled():
                self._gang_failed(gang)
            if gang.state != "reserving":
                continue
            taken = {g.reservation.slice_name for g in gangs if g is not gang and g.reservation.slice_name}
            if gang.reservation.poll(taken):
                if gang.lost_at is not None:
                    self._slice_wait_s += time.monotonic() - gang.lost_at
                    gang.lost_at = None
                _log.info("slice replica %s: reserved %s on %s", gang.name, gang.reservation.slice_name or "its hosts",
                          gang.reservation.node_ids)
                gang.create_members()
            elif time.monotonic() - gang.last_wait_log > WAIT_LOG_EVERY_S:
                gang.last_wait_log = time.monotonic()
                _log.warning("slice replica %s has waited %.0f s for %s (waiting without limit: %s)", gang.name,
                             time.monotonic() - gang.waiting_since, gang.reservation.describe(), _tpu_slices_seen())

    def _member_returned(self, gang: _Gang, ref: ray.ObjectRef, on_result: ResultCallback) -> None:
        try:
            value = ray.get(ref)
        except Exception as error:  # noqa: BLE001 - any member's failure ends the gang
            gang.failed(error)
            return
        gang.results[ref] = value
        if gang.pending or gang.state == "settling":
            return
        values = [gang.results[r] for r in gang.refs]
        if gang.state == "starting" and gang.coordinator is None:
            gang.join(cast(str, values[0]))
            return
        if gang.state == "starting":
            infos = cast(list[SliceMemberInfo], values)
            gang.infos, gang.state, gang.start_failures, gang.refs = infos, "idle", 0, []
            self.workers_seen.extend(infos)
            _log.info("slice replica %s ready on %d hosts", gang.name, len(values))
            return
        task, gang.task, gang.state, gang.refs = gang.task, None, "idle", []
        results = cast(list[Result], values[0])  # rank 0 is process 0: it reports
        on_result(task.job, with_fault_tags(results, task.lost_on_nodes, oom_retries=task.oom_retries))

    def _gang_failed(self, gang: _Gang) -> None:
        """Judges a settled gang's fault, hands its job to the fault policy and sends the gang to be rebuilt."""
        fault = classify_gang(gang.errors, gang.node_ids())
        was_starting, task = gang.settling_from == "starting", gang.task
        gang.last_error, gang.task = fault.message, None
        gang.startup_error = raised_startup_error(gang.errors) if was_starting else None
        gang.kill()
        _log.warning("slice replica %s failed (%s): %s", gang.name, type(fault).__name__, gang.last_error)
        if task is not None:
            memory_note = gang.infos[0].get("memory", "") if gang.infos else ""
            self._faults.handle(task, fault, gang.name, gang.batch_for(task), memory_note)
            if isinstance(fault, OutOfMemory):
                gang.batch_cap = task.batch_size
        preempted = isinstance(fault, PreemptedHost)
        if preempted:
            gang.reservation.release()  # a replacement slice has another name: reserve anew
            gang.lost_at = gang.lost_at or time.monotonic()
        gang.state, gang.waiting_since, gang.last_wait_log = "reserving", time.monotonic(), time.monotonic()
        if was_starting and not preempted:
            gang.start_failures += 1
            if gang.start_failures >= MAX_GANG_START_FAILURES:
                gang.state, gang.last_error = "dead", f"cannot start: {gang.last_error}"
                gang.reservation.release()


def node_death_window_s() -> float:
    """How long Ray may take to mark a lost node dead: its health checks (period x failures allowed) plus one
    check's timeout, from the cluster's configuration (30 s when Ray does not say)."""
    try:
        config = ray._config
        return (config.health_check_period_ms() * config.health_check_failure_threshold()
                + config.health_check_timeout_ms()) / 1000
    except Exception:  # noqa: BLE001 - a Ray without these settings: a generous default
        return 30.0


def _tpu_slices_seen() -> str:
    """The alive TPU slices of the cluster, in words (for a replica that waits for one)."""
    from ray.util.tpu import get_tpu_slice_name_from_node

    slices = collections.Counter(
        (get_tpu_slice_name_from_node(node), node.get("Labels", {}).get(ray._raylet.RAY_NODE_TPU_POD_TYPE_KEY))
        for node in ray.nodes() if node.get("Alive") and get_tpu_slice_name_from_node(node)
    )
    if not slices:
        return "the cluster has no TPU slice now"
    return "alive TPU slices: " + ", ".join(f"{name} ({pod}, {hosts} hosts)" for (name, pod), hosts in slices.items())


def _synthetic_saes_to_ship(sweep_plan: SweepPlan, cache_dir: Path) -> tuple[dict[str, Any], ShippedSAEs]:
    """The plan's worker arguments, and every synthetic SAE fitted here (on the driver's CPU) to ship to the
    members, who write it into their own caches (`received_saes`).

    Members of a gang cannot fit them: the calibration is a forward pass, which would have to be collective.
    """
    args = sweep_plan.worker_args()
    pending = {sae_id: file for sae_id, file in args["sae_files"].items() if file.path is None}
    if not pending:
        return args, {}
    from runner.execution.workers import load_host_model, write_pending_synthetic_saes

    loaded = load_host_model(sweep_plan.config, cache_dir, mesh=None)
    written = write_pending_synthetic_saes(loaded, sweep_plan.config, pending, cache_dir)
    return args, {sae_id: (str(file.path.relative_to(cache_dir)), file.path.read_bytes())
                  for sae_id, file in written.items()}
