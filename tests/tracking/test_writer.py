"""A tracking server that goes away mid-sweep loses no result: the tracking thread retries with backoff, and what
it cannot log in time waits in a spool file that the next run logs without recomputing.

The first tests drive the thread with a stand-in tracker (fast); the last ones start a real `mlflow server`.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path

import pytest
import requests
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE, RESOURCE_EXHAUSTED

from runner.config.loading import load_experiment
from runner.driver import run_sweep, spool_path
from runner.errors import TrackingUnavailable
from runner.execution.local import LocalExecutor
from runner.plan.points import SteeringPoint
from runner.plan.prepare import prepare_sweep
from runner.results import PointResult
from runner.tracking.export import finished_points_frame
from runner.tracking.spool import Spool
from runner.tracking.writer import RetryPolicy, TrackingWriter, is_transient
from tests.mlflow_server import MlflowServer

#: 8 points in 4 jobs of 2 generations (no scale 0: no shared baselines).
GRID = {"layers": [1], "features": [3, 17], "scales": [10, 30], "seeds": [0, 1]}


@pytest.fixture(autouse=True)
def quick_http_failures(monkeypatch) -> None:
    """MLflow's HTTP client retries a refused call for minutes by default; the tracking thread retries instead
    (`runner run` sets the same)."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


class StandInTracker:
    """Takes the `SweepTracker`'s place: `log_results` raises the next of `failures` (each after `slow_s` for the
    first), or every time `always` when given, else records the points."""

    uri = "http://tracking.example"

    def __init__(self, failures=(), *, always: BaseException | None = None, slow_s: float = 0.0) -> None:
        self.failures, self.always, self.slow_s = list(failures), always, slow_s
        self.calls = 0
        self.logged: list[str] = []
        self.failed: list[tuple[str, str, int]] = []

    def log_results(self, points, results) -> None:
        self.calls += 1
        if self.calls == 1:
            time.sleep(self.slow_s)
        if self.always is not None:
            raise self.always
        if self.failures:
            raise self.failures.pop(0)
        self.logged.extend(point.point_key for point in points)

    def fail_points(self, points, error: str, attempt: int) -> None:
        self.failed.extend((point.point_key, error, attempt) for point in points)


def steering_point(feature: int) -> SteeringPoint:
    return SteeringPoint(prompt_index=0, prompt="Once upon a time", layer=1, feature=feature, scale=8.0, seed=0,
                         mode="add", positions="all", temperature=0.0, top_k=None, top_p=None, max_new_tokens=2,
                         model_id="tiny", sae_id="synthetic")


def result_of(point: SteeringPoint) -> PointResult:
    return PointResult(point.point_key, "hi", (1, 2), {"steer/nll": 1.0})


def writer_for(tracker: StandInTracker, tmp_path: Path, policy: RetryPolicy, logged: list) -> TrackingWriter:
    return TrackingWriter(tracker, Spool(tmp_path / "spool.jsonl"), policy, lambda *counts: logged.append(counts))


def pauses(caplog) -> list[float]:
    """The pauses the tracking thread announced, in seconds."""
    return [record.args[1] for record in caplog.records if record.getMessage().startswith("tracking server unreach")]


@pytest.mark.parametrize(
    ("first_delay_s", "max_delay_s", "expected"),
    [(0.01, 0.03, [0.01, 0.02, 0.03, 0.03]), (0.02, 0.01, [0.02, 0.01, 0.01, 0.01])],
    ids=["doubling-up-to-the-longest", "a-longer-first-pause-is-kept"],
)
def test_transient_failures_are_retried_with_backoff_until_the_result_is_logged(
    tmp_path, caplog, first_delay_s, max_delay_s, expected
) -> None:
    caplog.set_level(logging.WARNING, logger="runner.tracking.writer")
    point = steering_point(3)
    failures = [ConnectionError("refused"), MlflowException("busy", error_code=INTERNAL_ERROR),
                sqlite3.OperationalError("database is locked"), OSError("reset")]
    tracker, logged = StandInTracker(failures), []
    writer = writer_for(tracker, tmp_path, RetryPolicy(first_delay_s, max_delay_s, give_up_after_s=60), logged)
    writer.put_results([point], [result_of(point)])
    writer.put_failure([steering_point(5)], "RuntimeError: OOM", attempt=2)
    writer.close()

    assert tracker.logged == [point.point_key] and tracker.calls == 5
    assert tracker.failed == [(steering_point(5).point_key, "RuntimeError: OOM", 2)]
    assert logged == [(1, 0, 2), (0, 1, 0)]
    assert pauses(caplog) == pytest.approx(expected)
    assert not (tmp_path / "spool.jsonl").exists()


def test_a_refused_result_stops_the_sweep_at_once_and_waits_in_the_spool(tmp_path) -> None:
    point = steering_point(3)
    tracker = StandInTracker([MlflowException("bad metric name", error_code=INVALID_PARAMETER_VALUE)])
    writer = writer_for(tracker, tmp_path, RetryPolicy(first_delay_s=0.01), [])
    writer.put_results([point], [result_of(point)])

    with pytest.raises(TrackingUnavailable, match=r"^tracking.uri: http://tracking.example refused a result: "
                                                  r"MlflowException: bad metric name; 1 finished results are kept"):
        writer.close()
    assert tracker.calls == 1
    assert Spool(tmp_path / "spool.jsonl").read() == [result_of(point)]


def test_retrying_gives_up_the_retry_timeout_after_the_first_failure(tmp_path) -> None:
    first, second = steering_point(3), steering_point(5)
    # The first try fails after longer than the whole retry timeout: it is retried all the same.
    tracker = StandInTracker(always=ConnectionError("refused"), slow_s=0.3)
    writer = writer_for(tracker, tmp_path, RetryPolicy(first_delay_s=0.01, max_delay_s=0.02, give_up_after_s=0.2),
                        [])
    writer.put_results([first], [result_of(first)])
    writer.put_results([second], [result_of(second)])  # queued while the first is retried; never tried

    with pytest.raises(TrackingUnavailable, match=r"^tracking.uri: http://tracking.example unreachable for 0 s "
                                                  r"\(tracking.retry_timeout_s=0.2\); last error: ConnectionError: "
                                                  r"refused; 2 finished results are kept in .*spool.jsonl"):
        writer.close()
    assert tracker.calls >= 2, "retried after the slow first failure"
    assert Spool(tmp_path / "spool.jsonl").read() == [result_of(first), result_of(second)]
    with pytest.raises(TrackingUnavailable, match="unreachable for"):
        writer.put_results([first], [result_of(first)])


def test_abandoning_ends_the_pause_at_once_and_keeps_the_result(tmp_path) -> None:
    point = steering_point(3)
    tracker = StandInTracker(always=ConnectionError("refused"))
    writer = writer_for(tracker, tmp_path, RetryPolicy(first_delay_s=60, give_up_after_s=600), [])
    writer.put_results([point], [result_of(point)])
    deadline = time.monotonic() + 30
    while tracker.calls == 0 and time.monotonic() < deadline:
        time.sleep(0.01)

    started = time.monotonic()
    writer.close(abandon=True)  # not TrackingUnavailable: the sweep stops for another reason
    assert time.monotonic() - started < 5
    assert tracker.calls == 1
    assert Spool(tmp_path / "spool.jsonl").read() == [result_of(point)]


def chained(error: BaseException, cause: BaseException) -> BaseException:
    error.__cause__ = cause
    return error


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (MlflowException("unavailable", error_code=INTERNAL_ERROR), True),
        (MlflowException("slow down", error_code=RESOURCE_EXHAUSTED), True),
        (MlflowException("bad", error_code=INVALID_PARAMETER_VALUE), False),
        (ConnectionRefusedError("refused"), True),
        (TimeoutError("timed out"), True),
        (sqlite3.OperationalError("database is locked"), True),
        (chained(RuntimeError("wrapped"), requests.exceptions.ConnectionError("reset")), True),
        (ValueError("bad value"), False),
    ],
)
def test_is_transient_tells_an_unreachable_store_from_a_refusal(error, transient) -> None:
    assert is_transient(error) is transient


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> MlflowServer:
    """One real `mlflow server` for the module; tests stop and restart it on the same port."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def write_experiment(directory: Path, name: str, tracking_uri: str, retry_timeout_s: float) -> Path:
    config = {
        "name": name,
        "model": {"source": "synthetic", "preset": "tiny"},
        "sae": {"source": "synthetic"},
        "prompts": ["Once upon a time"],
        "steering": GRID,
        "sampling": {"max_new_tokens": 4, "temperature": 0.0, "batch_size": 2},
        "tracking": {"uri": tracking_uri or "sqlite:///unused.db", "retry_timeout_s": retry_timeout_s},
    }
    path = directory / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def plan_against(server: MlflowServer, directory: Path, cache_dir: Path, name: str, retry_timeout_s: float):
    return prepare_sweep(load_experiment(write_experiment(directory, name, server.url, retry_timeout_s)), cache_dir)


class StopTheServerAfterTheFirstJob(LocalExecutor):
    """Runs jobs locally; once the first job's results are handed to the tracking thread, stops the server, and
    restarts it `restart_after_s` later (never, when None; `stop=False`: leaves it alone). Records the points it
    computed. The tests share one worker (one model and compiled programs)."""

    def __init__(self, sweep_plan, cache_dir, server: MlflowServer, restart_after_s: float | None, worker=None,
                 stop: bool = True):
        super().__init__(sweep_plan, cache_dir, worker)
        self.server, self.restart_after_s, self.stop = server, restart_after_s, stop
        self.computed: list[str] = []
        self.restarted = threading.Event()

    def run(self, jobs, on_result, on_failure) -> None:
        def stop_after_first(job, results) -> None:
            self.computed.extend(point.point_key for point in job.points)
            on_result(job, results)
            if self.stop and len(self.computed) == len(job.points):
                self.server.stop()
                if self.restart_after_s is not None:
                    threading.Timer(self.restart_after_s, self._restart).start()

        super().run(jobs, stop_after_first, on_failure)

    def _restart(self) -> None:
        self.server.start()
        self.restarted.set()


def exported_points(server: MlflowServer, sweep_plan) -> list[str]:
    """The point keys `runner export` reads back from the server (one row per finished point)."""
    return list(finished_points_frame(sweep_plan.config)["point_key"])


def curve_run_statuses(server: MlflowServer, name: str) -> list[str]:
    client = MlflowClient(server.url)
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id], "tags.`runner.role` = 'curve'", max_results=100)
    return sorted(run.info.status for run in runs)


@pytest.fixture(scope="module")
def worker(tmp_path_factory, cache_dir):
    """One worker for every sweep of the module (they share model, SAEs, prompts and shapes)."""
    from runner.execution.workers import SteeringWorker

    sweep_plan = prepare_sweep(load_experiment(write_experiment(tmp_path_factory.mktemp("worker"), "x", "",
                                                                  120)), cache_dir)
    return SteeringWorker(**sweep_plan.worker_args(), cache_dir=cache_dir)


def test_a_server_that_comes_back_gets_every_result_once(server, worker, tmp_path, cache_dir) -> None:
    sweep_plan = plan_against(server, tmp_path, cache_dir, "outage-short", retry_timeout_s=60)
    executor = StopTheServerAfterTheFirstJob(sweep_plan, cache_dir, server, restart_after_s=3.0, worker=worker)
    summary = run_sweep(sweep_plan, cache_dir=cache_dir, executor=executor, output_dir=tmp_path)

    assert executor.restarted.is_set(), "the server was down while results were waiting"
    assert (summary.points_finished, summary.points_failed) == (8, 0)
    assert sorted(exported_points(server, sweep_plan)) == sorted(p.point_key for p in sweep_plan.points)
    assert curve_run_statuses(server, "outage-short") == ["FINISHED"] * 2
    assert MlflowClient(server.url).get_run(summary.parent_run_id).info.status == "FINISHED"
    assert not spool_path(tmp_path, sweep_plan.sweep_id).exists()


def test_a_server_down_too_long_stops_the_sweep_and_the_rerun_logs_the_spool_without_recomputing(
    server, worker, tmp_path, cache_dir
) -> None:
    sweep_plan = plan_against(server, tmp_path, cache_dir, "outage-long", retry_timeout_s=3)
    executor = StopTheServerAfterTheFirstJob(sweep_plan, cache_dir, server, restart_after_s=None, worker=worker)
    started = time.monotonic()
    with pytest.raises(TrackingUnavailable, match=r"unreachable for \d+ s \(tracking.retry_timeout_s=3\).*finished "
                                                  r"results are kept in .*\.jsonl"):
        run_sweep(sweep_plan, cache_dir=cache_dir, executor=executor, output_dir=tmp_path)
    assert time.monotonic() - started < 120
    spooled = Spool(spool_path(tmp_path, sweep_plan.sweep_id)).read()
    assert spooled and {r.point_key for r in spooled} <= set(executor.computed)

    server.start()
    again = StopTheServerAfterTheFirstJob(sweep_plan, cache_dir, server, restart_after_s=None, worker=worker,
                                          stop=False)
    summary = run_sweep(sweep_plan, cache_dir=cache_dir, executor=again, output_dir=tmp_path)

    assert summary.points_from_spool == len(spooled)
    assert not set(again.computed) & {r.point_key for r in spooled}, "spooled results are not computed again"
    assert sorted(exported_points(server, sweep_plan)) == sorted(p.point_key for p in sweep_plan.points)
    assert curve_run_statuses(server, "outage-long") == ["FINISHED"] * 2
    assert MlflowClient(server.url).get_run(summary.parent_run_id).info.status == "FINISHED"
    assert not spool_path(tmp_path, sweep_plan.sweep_id).exists()

