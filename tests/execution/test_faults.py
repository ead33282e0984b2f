"""Failures as data: one classifier for whatever a job's `ray.get` raises, one policy for both executors."""

from __future__ import annotations

import collections
import pickle

import jax.numpy as jnp
import pytest
import sentencepiece as spm
from ray import exceptions as ray_errors

from runner.errors import CheckpointError, SAEError
from runner.execution.faults import (
    CrashedWorker,
    DeviceOutOfMemory,
    FaultPolicy,
    JobError,
    OutOfMemory,
    PreemptedHost,
    RecurringError,
    RecurringJobError,
    Task,
    classify,
    classify_gang,
    describe_ray_error,
    fault_counts,
    startup_error,
    with_fault_tags,
    worker_survived,
)
from runner.plan.points import Job
from runner.results import PointResult

ALIVE = {"node-a", "node-b"}


def alive() -> set[str]:
    return ALIVE


def task_error(cause: Exception) -> ray_errors.RayTaskError:
    """What `ray.get` raises when the job raised `cause` (an instance of both `RayTaskError` and the cause's class)."""
    traceback = f"Traceback (most recent call last):\n{cause!r}"
    return ray_errors.RayTaskError("run_job", traceback, cause).as_instanceof_cause()


def xla_out_of_memory() -> Exception:
    """A real XLA `RESOURCE_EXHAUSTED`: a 16 TiB buffer."""
    try:
        jnp.zeros((2**42,), jnp.float32).block_until_ready()
    except Exception as error:  # noqa: BLE001 - the error is what the test wants
        return error
    raise AssertionError("allocated 16 TiB")


# ---------------------------------------------------------------------------------------------------------------
# classify


def test_the_jobs_own_exception_is_a_job_error_named_by_its_cause() -> None:
    fault = classify(task_error(RuntimeError("injected failure on attempt 1")), ["node-a"], alive)
    assert fault == JobError("RuntimeError: injected failure on attempt 1")
    assert worker_survived(fault)


def test_a_job_that_runs_out_of_memory_is_out_of_memory_and_its_worker_survives() -> None:
    xla = classify(task_error(xla_out_of_memory()), ["node-a"], alive)
    assert isinstance(xla, OutOfMemory) and not xla.worker_died and xla.node_id == "node-a"
    assert "RESOURCE_EXHAUSTED" in xla.message
    ray_oom = classify(task_error(ray_errors.OutOfMemoryError("the node is running low on memory")), ["node-a"],
                       alive)
    assert isinstance(ray_oom, OutOfMemory) and not ray_oom.worker_died
    assert worker_survived(xla) and worker_survived(ray_oom)


def test_a_worker_killed_by_rays_memory_monitor_is_out_of_memory_and_gone() -> None:
    fault = classify(ray_errors.OutOfMemoryError("Task was killed due to the node running low on memory."),
                     ["node-b"], alive)
    assert fault == OutOfMemory("OutOfMemoryError: Task was killed due to the node running low on memory.",
                                "node-b", worker_died=True)
    assert not worker_survived(fault)


@pytest.mark.parametrize("error", [
    ray_errors.ActorDiedError(),
    ray_errors.ActorUnavailableError("the actor is restarting", b"\x00" * 16),
    ray_errors.NodeDiedError("node gone"),
    ray_errors.WorkerCrashedError(),
    ray_errors.OwnerDiedError("ab" * 14, "", ""),
    ray_errors.LocalRayletDiedError(),
])
def test_a_lost_worker_is_a_preemption_on_a_dead_node_and_a_crash_on_a_live_one(error) -> None:
    crash = classify(error, ["node-a"], alive)
    assert crash == CrashedWorker(describe_ray_error(error), "node-a")
    preemption = classify(error, ["node-gone"], alive)
    assert preemption == PreemptedHost(describe_ray_error(error), "node-gone")
    assert not worker_survived(crash) and not worker_survived(preemption)
    assert isinstance(classify(error, [None], alive), PreemptedHost), "an unknown node counts as gone"


def test_a_slice_replica_is_preempted_when_any_of_its_hosts_is_and_the_loss_goes_to_that_host() -> None:
    error = ray_errors.ActorDiedError()
    assert classify(error, ["node-a", "node-gone", "node-b"], alive).node_id == "node-gone"
    assert classify(error, ["node-a", "node-b"], alive) == CrashedWorker(describe_ray_error(error), "node-a")


def test_any_other_ray_error_is_a_job_error_and_ray_is_not_asked_about_nodes() -> None:
    def no_questions() -> set[str]:
        raise AssertionError("only a lost worker needs the live nodes")

    for error in (ray_errors.RaySystemError("system failure"), ray_errors.TaskCancelledError(),
                  ray_errors.RuntimeEnvSetupError("pip failed")):
        fault = classify(error, ["node-a"], no_questions)
        assert fault == JobError(describe_ray_error(error)) and worker_survived(fault)
    assert classify(task_error(RuntimeError("x")), ["node-a"], no_questions) == JobError("RuntimeError: x")


def test_an_error_a_worker_says_will_recur_is_recurring() -> None:
    fault = classify(task_error(RecurringJobError("prompt 3 does not fit the context")), ["node-a"], alive)
    assert fault == RecurringError("RecurringJobError: prompt 3 does not fit the context")
    assert worker_survived(fault)


def test_an_exception_that_is_not_rays_is_classified_by_itself() -> None:
    assert classify(ValueError("bad"), ["node-a"], alive) == JobError("ValueError: bad")
    assert isinstance(classify(xla_out_of_memory(), ["node-a"], alive), OutOfMemory)
    too_big = classify(task_error(DeviceOutOfMemory("model m: the sampler at a batch of 8 needs 3 GiB")), ["node-a"],
                       alive)
    assert too_big == OutOfMemory("DeviceOutOfMemory: model m: the sampler at a batch of 8 needs 3 GiB", "node-a",
                                  worker_died=False)


def test_a_worker_that_failed_to_start_is_described_by_what_it_raised_without_colours() -> None:
    init_error = ray_errors.RayTaskError(
        "__init__", "Traceback (most recent call last):\n\x1b[31mWorkerPlatformError: expected tpu\x1b[0m\n",
        RuntimeError("expected tpu"),
    )
    assert describe_ray_error(ray_errors.ActorDiedError(init_error)) == (
        "worker failed to start: WorkerPlatformError: expected tpu"
    )
    assert describe_ray_error(ray_errors.NodeDiedError("\x1b[1mnode gone\x1b[0m\nmore")) == (
        "NodeDiedError: node gone"
    )


def test_an_init_failure_is_named_by_its_exception_line_not_by_what_the_traceback_ends_with() -> None:
    text = ("Traceback (most recent call last):\n  File \"loading.py\", line 186, in restore\n"
            "ValueError: OUT_OF_RANGE: Error reading kv_einsum\nwith its spec TensorStore({\n  'base': {...}\n})>.\n")
    init_error = ray_errors.RayTaskError("__init__", text, ValueError("OUT_OF_RANGE"))
    assert describe_ray_error(ray_errors.ActorDiedError(init_error)) == (
        "worker failed to start: ValueError: OUT_OF_RANGE: Error reading kv_einsum"
    )


# ---------------------------------------------------------------------------------------------------------------
# Start-up failures


def raised(function, *args) -> BaseException:
    try:
        function(*args)
    except Exception as error:  # noqa: BLE001 - the error is what the test wants
        return error
    raise AssertionError(f"{function.__name__} did not raise")


def test_a_tokenizer_that_sentencepiece_cannot_parse_is_a_tokenizer_failure(tmp_path) -> None:
    (tmp_path / "tokenizer.model").write_bytes(b"\x00not a model")
    error = startup_error(raised(lambda: spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))),
                          "worker-0@h")
    assert error.stage == "tokenizer"
    assert str(error).startswith("worker-0@h cannot load the tokenizer: Internal: could not parse ModelProto from")


def test_runners_own_message_wins_over_the_library_error_under_it() -> None:
    def load() -> None:
        try:
            raise ValueError("OUT_OF_RANGE: raw")
        except ValueError as cause:
            raise SAEError("/saes/layer_1/params.npz: W_dec has 3 non-finite values") from cause

    assert str(startup_error(raised(load), "w")) == (
        "w cannot load an SAE: /saes/layer_1/params.npz: W_dec has 3 non-finite values"
    )
    assert startup_error(CheckpointError("/models/x: checkpoint directory does not exist"), "w").stage == "checkpoint"


def test_running_out_of_memory_while_loading_is_a_memory_failure() -> None:
    error = startup_error(xla_out_of_memory(), "w")
    assert error.stage == "memory" and error.cause_line.startswith("RESOURCE_EXHAUSTED")


def test_a_start_up_failure_is_one_scrubbed_line_and_crosses_ray_intact() -> None:
    cause = RuntimeError("fetch https://bob:hunter2@hf.co/x?token=s3cr3t failed\nline two\nline three")
    error = startup_error(cause, "w")
    assert str(error) == "w failed to start: RuntimeError: fetch https://***@hf.co/x?token=*** failed"
    assert pickle.loads(pickle.dumps(error)).__dict__ == error.__dict__
    assert str(pickle.loads(pickle.dumps(error))) == str(error)
    assert describe_ray_error(task_error(error)) == str(error)
    assert startup_error(error, "w") is error, "a failure classified once is kept"


# ---------------------------------------------------------------------------------------------------------------
# The policy


def make_policy(max_job_retries: int = 1, max_worker_crashes: int = 2, nodes: set[str] | None = None):
    queue: collections.deque[Task] = collections.deque()
    failures: list[tuple[str, str, int]] = []
    policy = FaultPolicy(max_job_retries, max_worker_crashes, queue,
                         lambda job, error, attempt: failures.append((job.job_id, error, attempt)),
                         alive_nodes=lambda: ALIVE if nodes is None else nodes)
    return policy, queue, failures


def job(job_id: str) -> Job:
    return Job(job_id=job_id, points=())


def test_a_job_error_is_retried_at_the_back_with_an_attempt_then_fails() -> None:
    policy, queue, failures = make_policy(max_job_retries=1)
    queue.append(Task(job("other")))
    assert policy.handle(Task(job("j")), JobError("RuntimeError: boom"), "worker-0") == "retried"
    assert [(t.job.job_id, t.attempt) for t in queue] == [("other", 1), ("j", 2)]
    retried = queue.pop()
    assert policy.handle(retried, JobError("RuntimeError: boom again"), "worker-0") == "failed"
    assert failures == [("j", "RuntimeError: boom again", 2)]
    assert policy.job_retries == 1 and policy.classified_events() == []


def test_out_of_memory_reruns_the_job_first_at_half_the_batch_without_an_attempt() -> None:
    policy, queue, failures = make_policy(max_job_retries=0)
    queue.append(Task(job("other")))
    task = Task(job("j"))
    raised = OutOfMemory("DeviceOutOfMemory: model m: the steering sampler at a batch of 8 needs 2 GiB", "node-a",
                         worker_died=False)
    assert policy.handle(task, raised, "worker-0", batch_size=8) == "requeued"
    assert queue[0] is task and (task.batch_size, task.oom_retries, task.attempt) == (4, 1, 1)
    queue.popleft()
    killed = OutOfMemory("OutOfMemoryError: Task was killed due to the node running low on memory.", "node-b",
                         worker_died=True)
    assert policy.handle(task, killed, "worker-0") == "requeued", "the batch it ran at: the task's cap"
    assert (task.batch_size, task.oom_retries) == (2, 2)
    assert policy.oom_retries == 2 and policy.job_retries == 0 and failures == []
    assert policy.classified_events() == [], "running out of memory is neither a preemption nor a crash"


def test_out_of_memory_at_a_batch_of_1_fails_with_the_workers_line() -> None:
    policy, queue, failures = make_policy()
    fault = OutOfMemory("DeviceOutOfMemory: model m: the steering sampler at a batch of 1 needs 9.0 GiB beyond the "
                        "weights; 2.0 GiB available", "node-a", worker_died=False)
    assert policy.handle(Task(job("j")), fault, "worker-0", batch_size=1, memory_note="expected peak 12 GiB") \
        == "failed"
    assert failures == [("j", f"out of memory at a batch of 1 on worker-0: {fault.message}; expected peak 12 GiB",
                         1)]
    assert not queue


def test_a_preemption_requeues_the_job_at_the_front_without_an_attempt_and_without_limit() -> None:
    policy, queue, failures = make_policy(max_worker_crashes=1)
    queue.append(Task(job("other")))
    task = Task(job("j"))
    for _ in range(5):
        assert policy.handle(task, PreemptedHost("NodeDiedError: gone", "node-gone"), "worker-0") == "requeued"
        assert queue[0] is task and task.attempt == 1
        queue.popleft()
    assert failures == [] and task.lost_on_nodes == ["node-gone"] * 5
    assert [event["kind"] for event in policy.classified_events()] == ["preemption"] * 5


def test_a_job_that_keeps_crashing_its_worker_fails_after_max_worker_crashes() -> None:
    policy, queue, failures = make_policy(max_worker_crashes=2)
    task = Task(job("j"))
    assert policy.handle(task, CrashedWorker("ActorDiedError: died", "node-a"), "worker-0") == "requeued"
    assert queue.popleft() is task
    assert policy.handle(task, CrashedWorker("WorkerCrashedError: segfault", "node-b"), "worker-1") == "failed"
    assert failures == [("j", "crashed its worker 2 times on hosts that stayed up (cluster.max_worker_crashes=2); "
                         "last: WorkerCrashedError: segfault", 1)]
    assert not queue and policy.job_retries == 0


def test_a_recurring_error_fails_at_once() -> None:
    policy, queue, failures = make_policy(max_job_retries=5)
    assert policy.handle(Task(job("j")), RecurringError("RecurringJobError: never fits"), "worker-0") == "failed"
    assert failures == [("j", "RecurringJobError: never fits", 1)] and not queue and policy.job_retries == 0


def test_a_loss_that_looked_like_a_crash_is_counted_as_a_preemption_once_ray_knows_the_node_died() -> None:
    nodes = {"node-a"}
    policy, queue, _ = make_policy(nodes=nodes)
    policy.handle(Task(job("j")), CrashedWorker("ActorDiedError: died", "node-a"), "worker-0")
    assert [event["kind"] for event in policy.classified_events()] == ["worker_crash"]
    nodes.clear()  # Ray's health checks have failed meanwhile
    events = policy.classified_events()
    assert events == [{"job_id": "j", "worker": "worker-0", "node_id": "node-a", "error": "ActorDiedError: died",
                       "kind": "preemption"}]
    assert fault_counts(events, policy.job_retries) == {"preemptions": 1, "worker_crashes": 0, "job_retries": 0,
                                                        "oom_retries": 0}


def test_fault_tags_count_a_jobs_preemptions_and_crashes() -> None:
    result = PointResult(point_key="p", text="", token_ids=(), metrics={}, tags={"logit_lens_tokens": "[]"})
    assert with_fault_tags([result], [], alive) == [result]
    (tagged,) = with_fault_tags([result], ["node-gone", "node-a", None], alive)
    assert tagged.tags == {"logit_lens_tokens": "[]", "runner.preemptions": "2", "runner.worker_crashes": "1"}
    (shrunk,) = with_fault_tags([result], [], alive, oom_retries=2)
    assert shrunk.tags == {"logit_lens_tokens": "[]", "runner.oom_retries": "2"}


# ---------------------------------------------------------------------------------------------------------------
# classify_gang: a slice replica judged by all its failed members


def test_a_gang_with_a_dead_host_is_preempted_even_when_a_survivor_raised_first() -> None:
    collective_failed = task_error(RuntimeError("Gloo: connection closed by peer"))
    fault = classify_gang([collective_failed], ["node-a", "node-gone"], alive)
    assert fault == PreemptedHost("RuntimeError: Gloo: connection closed by peer", "node-gone")


def test_a_gang_member_that_went_away_beats_a_survivors_error_on_live_hosts() -> None:
    fault = classify_gang([task_error(RuntimeError("Gloo: timeout")), ray_errors.ActorDiedError()],
                          ["node-a", "node-b"], alive)
    assert isinstance(fault, CrashedWorker) and fault.node_id == "node-a"


def test_a_gang_whose_members_all_raised_on_live_hosts_failed_by_its_own_error() -> None:
    errors = [task_error(ValueError("bad job")), task_error(ValueError("bad job"))]
    assert classify_gang(errors, ["node-a", "node-b"], alive) == JobError("ValueError: bad job")
