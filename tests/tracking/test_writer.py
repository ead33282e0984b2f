"""A tracking server that goes away mid-sweep loses no result: the tracking thread retries with backoff, and what
it cannot log in time waits in a spool file that the next run logs without recomputing."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from runner.config.schema import load_experiment
from runner.driver import run_sweep, spool_path
from runner.errors import TrackingUnavailable
from runner.execution.local import LocalExecutor
from runner.plan.prepare import prepare_sweep
from runner.tracking.writer import Spool
from tests.mlflow_server import MlflowServer

#: 8 points in 4 jobs of 2 generations (no scale 0: no shared baselines).
GRID = {"layers": [1], "features": [3, 17], "scales": [10, 30], "seeds": [0, 1]}


@pytest.fixture(autouse=True)
def quick_http_failures(monkeypatch) -> None:
    """MLflow's HTTP client retries a refused call for minutes by default; the tracking thread retries instead
    (`runner run` sets the same)."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


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


def finished_children(server: MlflowServer, name: str) -> list:
    client = MlflowClient(server.url)
    experiment = client.get_experiment_by_name(name)
    return client.search_runs([experiment.experiment_id], "tags.`runner.role` = 'point'", max_results=100)


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
    runs = finished_children(server, "outage-short")
    assert sorted(run.data.tags["point_key"] for run in runs) == sorted(p.point_key for p in sweep_plan.points)
    assert {run.info.status for run in runs} == {"FINISHED"}
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
    runs = finished_children(server, "outage-long")
    assert sorted(run.data.tags["point_key"] for run in runs) == sorted(p.point_key for p in sweep_plan.points)
    assert {run.info.status for run in runs} == {"FINISHED"}
    assert MlflowClient(server.url).get_run(summary.parent_run_id).info.status == "FINISHED"
    assert not spool_path(tmp_path, sweep_plan.sweep_id).exists()

