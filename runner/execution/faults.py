"""Failures as data: what Ray raised for a job, classified once into a fault type, and one policy acting on it.

`classify` turns whatever a job's `ray.get` raised into one of:

- `PreemptedHost`: the worker went away (actor died, node died, worker crashed, objects lost) and one of its Ray
  nodes is no longer alive.
- `CrashedWorker`: the worker went away but its node is still alive: the job itself may have killed it.
- `OutOfMemory`: the job raised XLA's `RESOURCE_EXHAUSTED`, runner's `DeviceOutOfMemory` or Ray's
  `OutOfMemoryError` (`worker_died=False`), or Ray's memory monitor killed the worker (`worker_died=True`).
- `RecurringError`: the job raised `RecurringJobError`: retrying cannot help.
- `JobError`: anything else, the job's own error (a `RayTaskError`) or any other Ray error.

`classify_gang` does the same for a slice replica from what all its failed members raised.

A worker that cannot start (its checkpoint, tokenizer or SAEs do not load, its device does not come up) is not
a job's fault: `startup_error` turns what its start-up raised into a `WorkerStartupError`, classified on the worker
and carrying the first meaningful line of the cause (orbax's, sentencepiece's, XLA's), which the executor raises
instead of failing any point.

`FaultPolicy` decides the job's fate for every executor: a lost worker (a preemption, a crash) sends it back to
the front of the queue without using an attempt (after `max_worker_crashes` crashes it fails); out of memory
sends it back to the front with half the batch (the worker keeps the smaller size), down to 1, counted as an
`oom_retry`; a job error is retried at the back of the queue until its attempts run out; a recurring error fails
it at once. What happens to the worker stays with each executor.

Ray marks a node dead only after its health checks fail (seconds), so a loss judged right after it happened can
look like a crash: the lost nodes are kept with the task and judged again when its results come back and at the
end of the run (`fault_kinds`).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import re
import traceback
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar, Literal, assert_never

import ray
from ray import exceptions as ray_errors

from runner.errors import CheckpointError, RunnerError, SAEError, first_line
from runner.plan.points import Job
from runner.redaction import scrub
from runner.results import Result

if TYPE_CHECKING:
    from runner.execution.executor import FailureCallback

_log = logging.getLogger(__name__)

#: Errors that say the worker or its host went away, not that the job is wrong.
LOST_WORKER_ERRORS: tuple[type[ray_errors.RayError], ...] = (
    ray_errors.RayActorError,  # ActorDiedError, ActorUnavailableError
    ray_errors.NodeDiedError,
    ray_errors.WorkerCrashedError,
    ray_errors.ObjectLostError,  # OwnerDiedError, ObjectReconstructionFailedError, ...
    ray_errors.LocalRayletDiedError,
)
#: Tags of a point whose job lost its host to a preemption or its worker to a crash, or ran out of memory and was
#: run again with a smaller batch (absent: none).
TAG_PREEMPTIONS = "runner.preemptions"
TAG_WORKER_CRASHES = "runner.worker_crashes"
TAG_OOM_RETRIES = "runner.oom_retries"

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
#: The last line of a Python traceback that names the exception: `package.SomeError: message`.
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b.*")


class RecurringJobError(Exception):
    """Raised by a worker's job when running it again would fail the same way: its points fail without retries."""


class DeviceOutOfMemory(RuntimeError):
    """Raised by a worker when a program of its batch does not fit the memory its device has now (checked before
    the program runs, or XLA's `RESOURCE_EXHAUSTED` while it ran); the message names the model, the program, the
    batch and the bytes needed and available."""


# -------------------------------------------------------------------------------------------------------------
# The fault types


@dataclasses.dataclass(frozen=True)
class PreemptedHost:
    """The job's worker went away with its host (a Ray node of the worker is no longer alive)."""

    kind: ClassVar[str] = "preemption"
    message: str
    node_id: str | None


@dataclasses.dataclass(frozen=True)
class CrashedWorker:
    """The job's worker process died on a host that stayed up (maybe the job's doing: a crash in XLA, the OS)."""

    kind: ClassVar[str] = "worker_crash"
    message: str
    node_id: str | None


@dataclasses.dataclass(frozen=True)
class OutOfMemory:
    """The job ran out of memory: it raised (`worker_died=False`), or Ray killed its worker for it (`True`)."""

    message: str
    node_id: str | None
    worker_died: bool


@dataclasses.dataclass(frozen=True)
class JobError:
    """The job failed by itself, or Ray failed it for a reason that is neither a lost worker nor memory."""

    message: str


@dataclasses.dataclass(frozen=True)
class RecurringError:
    """The job failed in a way that will happen again on every retry (`RecurringJobError`)."""

    message: str


Fault = PreemptedHost | CrashedWorker | OutOfMemory | JobError | RecurringError
#: Asks Ray which nodes are alive now (tests pass their own).
AliveNodes = Callable[[], Collection[str]]


# -------------------------------------------------------------------------------------------------------------
# Start-up failures


#: What a worker could not start, by where its start-up failed.
StartupStage = Literal["checkpoint", "tokenizer", "sae", "device", "memory", "worker"]
_STAGE_WORDS: dict[str, str] = {
    "checkpoint": "cannot load the model checkpoint",
    "tokenizer": "cannot load the tokenizer",
    "sae": "cannot load an SAE",
    "device": "cannot start its accelerator",
    "memory": "out of memory while loading",
    "worker": "failed to start",
}
#: Where in a traceback a start-up failure happened (a path fragment of the frame's file), most specific first.
_STAGE_OF_FRAME: tuple[tuple[str, StartupStage], ...] = (
    ("sentencepiece", "tokenizer"),
    ("runner/model/tokenizer", "tokenizer"),
    ("runner/sae/", "sae"),
    ("runner/nn/jumprelu", "sae"),
    ("orbax", "checkpoint"),
    ("tensorstore", "checkpoint"),
    ("safetensors", "checkpoint"),
    ("runner/model/", "checkpoint"),
    ("jax/_src/xla_bridge", "device"),
    ("jaxlib", "device"),
)
#: A message that starts with its own status word (absl's `OUT_OF_RANGE:`, sentencepiece's `Internal:`).
_STATUS_PREFIX = re.compile(r"^[A-Z][A-Za-z_]*: ")
#: Longest cause line a start-up error keeps.
_MAX_LINE = 500


class WorkerStartupError(RunnerError):
    """A worker could not start: one line naming the worker, what failed (`stage`) and the cause's first
    meaningful line, credentials removed. Raised by the executor instead of failing the points.

    Attributes:
      stage: What failed: checkpoint, tokenizer, sae, device, memory, or worker (anything else).
      cause_line: The cause's line, as shown in the message.
      worker: The worker that failed.
    """

    def __init__(self, worker: str, stage: StartupStage, cause_line: str) -> None:
        super().__init__(f"{worker} {_STAGE_WORDS[stage]}: {cause_line}")
        self.worker, self.stage, self.cause_line = worker, stage, cause_line

    def __reduce__(self) -> tuple[type[WorkerStartupError], tuple[str, str, str]]:
        return type(self), (self.worker, self.stage, self.cause_line)


def startup_error(error: BaseException, worker: str) -> WorkerStartupError:
    """What a worker's start-up raised, as a `WorkerStartupError` (classified here, on the worker).

    The line kept is runner's own message when runner raised (`RunnerError` anywhere in the chain), else the
    first non-blank line of the innermost cause (e.g. orbax's `OUT_OF_RANGE: Error reading ...` under its
    generic `Encountered error while reading array index`), after its type unless it starts with a status word of
    its own. The stage comes from runner's error type, else from
    the innermost frame of the chain that belongs to a known library or part of runner.
    """
    chain = list(_causes(error))
    ours = next((cause for cause in chain if isinstance(cause, RunnerError)), None)
    if isinstance(ours, WorkerStartupError):
        return ours
    shown = ours if ours is not None else chain[-1]
    line = first_line(strip_ansi(str(shown))).removeprefix(f"{worker}: ")
    if ours is None and not _STATUS_PREFIX.match(line):  # `OUT_OF_RANGE: ...` says more than `ValueError`
        line = f"{type(shown).__name__}: {line}" if line else type(shown).__name__
    line = scrub(line)
    if len(line) > _MAX_LINE:
        line = line[: _MAX_LINE - 3] + "..."
    return WorkerStartupError(worker, _startup_stage(chain, ours), line)


def raised_startup_error(errors: Sequence[BaseException]) -> WorkerStartupError | None:
    """The `WorkerStartupError` among what a worker (or a gang's members) raised, unwrapped from Ray's task
    error, or None."""
    for error in errors:
        cause = error.cause if isinstance(error, ray_errors.RayTaskError) else error
        if isinstance(cause, WorkerStartupError):
            return cause
    return None


def _causes(error: BaseException) -> list[BaseException]:
    """`error` and its causes, outermost first (each exception once)."""
    chain: list[BaseException] = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _startup_stage(chain: Sequence[BaseException], ours: BaseException | None) -> StartupStage:
    if isinstance(ours, SAEError):
        return "sae"
    if is_out_of_memory(chain[-1]):
        return "memory"
    if ours is not None and type(ours).__name__ == "WorkerPlatformError":
        return "device"
    for cause in reversed(chain):
        frames = list(traceback.extract_tb(cause.__traceback__))
        for frame in reversed(frames):
            path = frame.filename.replace("\\", "/")
            stage = next((stage for fragment, stage in _STAGE_OF_FRAME if fragment in path), None)
            if stage is not None:
                return stage
    return "checkpoint" if isinstance(ours, CheckpointError) else "worker"


# -------------------------------------------------------------------------------------------------------------
# Classifying


def alive_ray_nodes() -> set[str]:
    """Ids of the Ray nodes alive now (none when Ray does not answer: every loss then counts as a preemption)."""
    try:
        return {node["NodeID"] for node in ray.nodes() if node.get("Alive")}
    except Exception:  # noqa: BLE001 - without an answer from Ray every loss counts as a preemption
        return set()


def classify(
    error: BaseException,
    node_ids: Sequence[str | None],
    alive_nodes: AliveNodes = alive_ray_nodes,
) -> Fault:
    """The fault of a job whose `ray.get` raised `error`.

    Args:
      error: What `ray.get` raised (any exception: one that is not Ray's is the job's own).
      node_ids: The Ray nodes of the job's worker (several for a slice replica; None: unknown). A replica is
        preempted when any of its nodes is; the loss is charged to the first dead one.
      alive_nodes: Asked only when the worker went away.
    """
    if isinstance(error, ray_errors.RayTaskError):
        cause = error.cause if error.cause is not None else error
        return _job_fault(cause, node_ids, f"{type(cause).__name__}: {cause}")
    if not isinstance(error, ray_errors.RayError):
        return _job_fault(error, node_ids, f"{type(error).__name__}: {error}")
    message = describe_ray_error(error)
    if isinstance(error, ray_errors.OutOfMemoryError):
        return OutOfMemory(message, _charged_node(node_ids, alive_nodes()), worker_died=True)
    if isinstance(error, LOST_WORKER_ERRORS):
        alive = alive_nodes()
        node_id = _charged_node(node_ids, alive)
        return CrashedWorker(message, node_id) if node_id in alive else PreemptedHost(message, node_id)
    return JobError(message)


def classify_gang(
    errors: Sequence[BaseException],
    node_ids: Sequence[str | None],
    alive_nodes: AliveNodes = alive_ray_nodes,
) -> Fault:
    """The fault of a slice replica (a gang running one SPMD program) from what its failed members raised.

    When one member goes away, the others fail in a collective (or hang) because of it: a node of the gang that is
    no longer alive makes the gang preempted, charged to that node, whatever the members raised; else a member that
    went away (or was killed for memory) is the gang's fault before any member's own error; else the first
    member's error is.

    Args:
      errors: What the failed members' `ray.get` raised, first failure first (at least one).
      node_ids: The Ray nodes of the gang's members.
      alive_nodes: Asked once.
    """
    alive = set(alive_nodes())
    faults = [classify(error, node_ids, lambda: alive) for error in errors]
    dead = [node for node in node_ids if node is not None and node not in alive]
    lost = [fault for fault in faults if not worker_survived(fault)]
    if dead:
        return PreemptedHost((lost or faults)[0].message, dead[0])
    return (lost or faults)[0]


def _job_fault(cause: BaseException, node_ids: Sequence[str | None], message: str) -> Fault:
    """The fault of an exception the job raised itself."""
    if isinstance(cause, RecurringJobError):
        return RecurringError(message)
    if is_out_of_memory(cause):
        return OutOfMemory(message, node_ids[0] if node_ids else None, worker_died=False)
    return JobError(message)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether a job's exception says it ran out of memory: XLA's `RESOURCE_EXHAUSTED`, `DeviceOutOfMemory` or
    Ray's `OutOfMemoryError`."""
    if isinstance(error, ray_errors.OutOfMemoryError | DeviceOutOfMemory):
        return True
    return isinstance(error, RuntimeError) and str(error).lstrip().startswith("RESOURCE_EXHAUSTED")


def _charged_node(node_ids: Sequence[str | None], alive: Collection[str]) -> str | None:
    """The first node of `node_ids` that is not alive, else the first one."""
    nodes = list(node_ids) or [None]
    return next((node for node in nodes if node not in alive), nodes[0])


def fault_kinds(node_ids: Sequence[str | None], alive_nodes: AliveNodes = alive_ray_nodes) -> list[str]:
    """The kind of each loss, judged now: `preemption` for a node no longer alive (or unknown), else
    `worker_crash`."""
    if not node_ids:
        return []
    alive = alive_nodes()
    return [CrashedWorker.kind if node_id in alive else PreemptedHost.kind for node_id in node_ids]


def worker_survived(fault: Fault) -> bool:
    """Whether the job's worker is still there after the fault (it raised, rather than went away)."""
    match fault:
        case PreemptedHost() | CrashedWorker() | OutOfMemory(worker_died=True):
            return False
        case _:
            return True


# -------------------------------------------------------------------------------------------------------------
# The policy


@dataclasses.dataclass
class Task:
    """A job waiting or running: `attempt` counts the job's own failures; `lost_on_nodes` holds the Ray node of
    each worker the job lost (a node that died meanwhile: a preemption; one still alive: a worker crash);
    `batch_size` is the most rows a worker may run it in (None: the worker's own choice), halved on each of its
    `oom_retries`."""

    job: Job
    attempt: int = 1
    lost_on_nodes: list[str | None] = dataclasses.field(default_factory=list)
    batch_size: int | None = None
    oom_retries: int = 0


#: What `FaultPolicy.handle` did with a task: back to the front of the queue, to the back with an attempt used,
#: or failed for good.
Decision = Literal["requeued", "retried", "failed"]


class FaultPolicy:
    """What happens to a job after a fault, for host and slice replicas alike.

    - A lost worker (`PreemptedHost`, `CrashedWorker`): the job goes back to the front of the queue without
      using an attempt. A preemption is requeued without limit; a worker that died on a node that is still
      alive may have been killed by the job itself, so after `max_worker_crashes` such losses the job fails.
    - `OutOfMemory` (raised, or the worker killed for it): back to the front of the queue, without using an
      attempt, with half the batch it ran at (`Task.batch_size`, which the executor also gives the worker for
      its later jobs); a job that ran out of memory at a batch of 1 fails, with the message.
    - The job's own error (`JobError`): retried `max_job_retries` more times at the back of the queue, then its
      points fail.
    - `RecurringError`: its points fail at once.

    Args:
      max_job_retries: Retries of a job that raised.
      max_worker_crashes: Worker crashes a job may cause before it fails.
      queue: The executor's queue of tasks.
      on_failure: Reports a job that failed for good.
      alive_nodes: The Ray nodes alive now (to count a job's crashes).
    """

    def __init__(
        self,
        max_job_retries: int,
        max_worker_crashes: int,
        queue: collections.deque[Task],
        on_failure: FailureCallback,
        alive_nodes: AliveNodes = alive_ray_nodes,
    ):
        self._max_job_retries = max_job_retries
        self._max_worker_crashes = max_worker_crashes
        self._queue = queue
        self._on_failure = on_failure
        self._alive_nodes = alive_nodes
        self._events: list[dict[str, str]] = []
        self.job_retries = 0
        self.oom_retries = 0

    def handle(self, task: Task, fault: Fault, worker: str, batch_size: int | None = None,
               memory_note: str = "") -> Decision:
        """Requeues, retries or fails `task` after `fault` on `worker`; returns which.

        Args:
          task: The job's task.
          fault: What happened (`classify`).
          worker: The worker's name.
          batch_size: The batch the worker ran the job at (for `OutOfMemory`; None: `task.batch_size`).
          memory_note: What the worker's memory looked like (its last plan), added to an out-of-memory failure.
        """
        match fault:
            case RecurringError(message=message):
                self._on_failure(task.job, message, task.attempt)
                return "failed"
            case PreemptedHost(message=message, node_id=node_id) | CrashedWorker(message=message, node_id=node_id):
                return self._worker_lost(task, worker, node_id, message)
            case OutOfMemory(message=message):
                return self._out_of_memory(task, worker, batch_size or task.batch_size, message, memory_note)
            case JobError(message=message):
                return self._job_raised(task, message)
            case _:
                assert_never(fault)

    def _job_raised(self, task: Task, error: str) -> Decision:
        if task.attempt > self._max_job_retries:
            self._on_failure(task.job, error, task.attempt)
            return "failed"
        _log.warning("job %s failed on attempt %d, retrying: %s", task.job.job_id, task.attempt, error)
        self.job_retries += 1
        self._queue.append(Task(task.job, task.attempt + 1, task.lost_on_nodes))
        return "retried"

    def _out_of_memory(self, task: Task, worker: str, batch_size: int | None, error: str, note: str) -> Decision:
        if batch_size is not None and batch_size <= 1:
            detail = f"; {note}" if note else ""
            self._on_failure(task.job, f"out of memory at a batch of 1 on {worker}: {error}{detail}", task.attempt)
            return "failed"
        smaller = max(1, batch_size // 2) if batch_size is not None else 1
        _log.warning("job %s ran out of memory on %s at a batch of %s; running it again at %d: %s",
                     task.job.job_id, worker, batch_size, smaller, error)
        task.batch_size, task.oom_retries = smaller, task.oom_retries + 1
        self.oom_retries += 1
        self._queue.appendleft(task)
        return "requeued"

    def _worker_lost(self, task: Task, worker: str, node_id: str | None, error: str) -> Decision:
        self._events.append({"job_id": task.job.job_id, "worker": worker, "node_id": node_id or "", "error": error})
        _log.warning("lost worker %s while it ran job %s: %s", worker, task.job.job_id, error)
        task.lost_on_nodes.append(node_id)
        crashes = fault_kinds(task.lost_on_nodes, self._alive_nodes).count(CrashedWorker.kind)
        if crashes >= self._max_worker_crashes:
            self._on_failure(task.job, f"crashed its worker {crashes} times on hosts that stayed up "
                             f"(cluster.max_worker_crashes={self._max_worker_crashes}); last: {error}", task.attempt)
            return "failed"
        self._queue.appendleft(task)
        return "requeued"

    def classified_events(self) -> list[dict[str, str]]:
        """Every lost-worker event with its `kind`, judged now that Ray has had time to notice dead nodes."""
        kinds = fault_kinds([event["node_id"] or None for event in self._events], self._alive_nodes)
        return [{**event, "kind": kind} for event, kind in zip(self._events, kinds, strict=True)]


def fault_counts(events: Sequence[Mapping[str, str]], job_retries: int, oom_retries: int = 0) -> dict[str, int]:
    """`preemptions`, `worker_crashes`, `job_retries` and `oom_retries` from classified lost-worker events and the
    policy's counts."""
    kinds = [event["kind"] for event in events]
    return {"preemptions": kinds.count(PreemptedHost.kind), "worker_crashes": kinds.count(CrashedWorker.kind),
            "job_retries": job_retries, "oom_retries": oom_retries}


def with_fault_tags(
    results: list[Result],
    lost_on_nodes: Sequence[str | None],
    alive_nodes: AliveNodes = alive_ray_nodes,
    oom_retries: int = 0,
) -> list[Result]:
    """Stamps `runner.preemptions` / `runner.worker_crashes` on the results of a job that lost workers, and
    `runner.oom_retries` on those of a job run again with a smaller batch."""
    tags: dict[str, str] = {}
    if lost_on_nodes:
        kinds = fault_kinds(lost_on_nodes, alive_nodes)
        tags = {TAG_PREEMPTIONS: str(kinds.count(PreemptedHost.kind)),
                TAG_WORKER_CRASHES: str(kinds.count(CrashedWorker.kind))}
    if oom_retries:
        tags[TAG_OOM_RETRIES] = str(oom_retries)
    if not tags:
        return results
    return [dataclasses.replace(result, tags={**result.tags, **tags}) for result in results]


# -------------------------------------------------------------------------------------------------------------
# Ray errors in one line


def strip_ansi(text: str) -> str:
    """`text` without the terminal colour codes Ray puts in its error messages."""
    return _ANSI.sub("", text)


def describe_ray_error(error: BaseException) -> str:
    """A Ray error in one line: for a worker whose `__init__` raised, the exception it raised (the traceback's
    last `SomeError: message` line, not whatever the traceback ends with)."""
    if isinstance(error, ray_errors.RayTaskError) and isinstance(error.cause, WorkerStartupError):
        return str(error.cause)
    lines = [line.strip() for line in strip_ansi(str(error)).splitlines() if line.strip()]
    if isinstance(error, ray_errors.RayActorError) and error.actor_init_failed and lines:
        named = [line for line in lines if _EXCEPTION_LINE.match(line)]
        return f"worker failed to start: {scrub((named or lines)[-1])}"
    return f"{type(error).__name__}: {scrub(lines[0]) if lines else ''}"
