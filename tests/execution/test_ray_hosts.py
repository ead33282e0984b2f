"""Sweeps on Ray: spread over hosts, survive a lost host and a killed driver, fail only what fails, log over HTTP.

The module shares one `ray.cluster_utils.Cluster`: a head without CPUs and two simulated TPU hosts, each with
`TPU: 4` and JAX on 4 fake CPU devices. Workers compile into a shared persistent JAX cache, so only the first
sweep of the module pays for compiling.
"""

from __future__ import annotations

import _thread
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import ray
import yaml
from mlflow import MlflowClient
from ray.cluster_utils import Cluster
from typer.testing import CliRunner

from runner.cli import app
from runner.config.loading import load_experiment
from runner.driver import SweepSummary, run_sweep
from runner.execution.faults import WorkerStartupError
from runner.execution.ray_hosts import RayExecutor
from runner.execution.slices import SliceExecutor
from runner.execution.workers import SteeringWorker
from runner.plan.points import Job
from runner.plan.prepare import SweepPlan, prepare_sweep
from runner.results import FailedPoint, PointResult
from runner.tracking.records import PointRecord, read_batches
from runner.tracking.search import sweep_records
from tests.mlflow_server import DIRECT, MlflowServer, free_port, kill_process_group, rest

# Workers unpickle the test's worker subclasses by value: this module is not importable on Ray's workers.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

#: Three prompts in one prompt bucket (<= 16 tokens), so a worker compiles once per sweep.
SAME_BUCKET_PROMPTS = ["Once upon a time", "The weather today is", "My favourite city is"]
#: 20 tokens: the next prompt bucket, a second compilation.
LONG_PROMPT = "The most iconic structure on Earth is"
#: 2 prompts x 2 layers x 3 features x 2 scales = 24 points, 6 jobs of 4.
GRID = {"layers": [1, 2], "features": [3, 17, 40], "scales": [10, 30], "seeds": [0]}  # no scale 0: no shared baselines
#: JAX devices of each simulated host (fake CPU devices).
DEVICES_PER_HOST = 4
NODE_DEATH_DETECTION = {"health_check_period_ms": 500, "health_check_failure_threshold": 3}


# ---------------------------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A persistent JAX compilation cache shared by every worker process of this module."""
    return tmp_path_factory.mktemp("jax-cache")


def tpu_host_args(name: str, jax_cache: Path) -> dict[str, Any]:
    """`Cluster.add_node` arguments of a simulated 4-chip TPU host whose JAX runs on 4 fake CPU devices."""
    return {
        "num_cpus": 1,
        "resources": {"TPU": 4},
        "labels": {"runner-test/host": name},
        "env_vars": {
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES_PER_HOST}",
            "JAX_PLATFORMS": "cpu",
            "JAX_COMPILATION_CACHE_DIR": str(jax_cache),
            "RAY_USAGE_STATS_ENABLED": "0",
        },
    }


@pytest.fixture(scope="module")
def ray_cluster(jax_cache: Path) -> Iterator[Cluster]:
    """A 0-CPU head and two simulated TPU hosts; a test that removes a host adds a replacement."""
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "_system_config": NODE_DEATH_DETECTION},
    )
    try:
        for name in ("host-a", "host-b"):
            cluster.add_node(**tpu_host_args(name, jax_cache))
        cluster.wait_for_nodes()
        yield cluster
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()


def write_experiment(directory: Path, prompts: list[str], grid: dict[str, Any], *, cluster: dict[str, Any],
                     tracking_uri: str | None = None, batch_size: int = 4) -> Path:
    """A synthetic tiny-model experiment in `directory`, tracked in `directory/mlflow.db` by default."""
    config = {
        "name": "cluster-test",
        "model": {"source": "synthetic", "preset": "tiny"},
        "sae": {"source": "synthetic", "target_l0": 16},
        "prompts": prompts,
        "steering": grid,
        "sampling": {"max_new_tokens": 6, "temperature": 0.0, "batch_size": batch_size},
        "tracking": {"uri": tracking_uri or f"sqlite:///{directory / 'mlflow.db'}"},
        "cluster": cluster,
    }
    path = directory / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def on_test_cluster(ray_cluster: Cluster, **changes: Any) -> dict[str, Any]:
    """The `cluster:` section of a sweep on the two simulated TPU hosts."""
    return {"workers": 2, "resources": {"TPU": 4}, "platform": "cpu", "address": ray_cluster.address,
            "max_job_retries": 1, **changes}


def plan_sweep(directory: Path, cache_dir: Path, prompts: list[str], grid: dict[str, Any],
               cluster: dict[str, Any]) -> SweepPlan:
    return prepare_sweep(load_experiment(write_experiment(directory, prompts, grid, cluster=cluster)), cache_dir)


def child_runs(uri: str, experiment: str = "cluster-test") -> list:
    """Every child (steering curve) run of the experiment."""
    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    return client.search_runs([experiment_id], "tags.`runner.role` = 'curve'", max_results=1000)


def point_records(uri: str, experiment: str = "cluster-test") -> list[PointRecord]:
    """Every point's record in the experiment's sweep (one per point)."""
    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    (parent,) = client.search_runs([experiment_id], "tags.`runner.role` = 'sweep'")
    return list(sweep_records(uri, parent).values())


def assert_each_point_finished_exactly_once(sweep_plan: SweepPlan) -> list[PointRecord]:
    records = point_records(sweep_plan.config.tracking.uri)
    keys = sorted(record.point_key for record in records)
    assert keys == sorted(point.point_key for point in sweep_plan.points), "one record per point, no more"
    assert {record.status for record in records} == {"FINISHED"}
    assert {run.info.status for run in child_runs(sweep_plan.config.tracking.uri)} == {"FINISHED"}
    return records


class LoseAHostAfterTheFirstResult:
    """Wraps a `RayExecutor`: after the first job's results, kills the host of the worker that produced them
    (it is idle then, and gets the next job) and adds a replacement host."""

    def __init__(self, inner: RayExecutor, cluster: Cluster, jax_cache: Path):
        self.inner, self.cluster, self.jax_cache = inner, cluster, jax_cache
        self.removed_node_id: str | None = None

    @property
    def compilations(self) -> int:
        return self.inner.compilations

    def fault_counts(self) -> dict[str, int]:
        return self.inner.fault_counts()

    def start(self) -> None:
        self.inner.start()

    def close(self) -> None:
        self.inner.close()

    def run(self, jobs, on_result, on_failure) -> None:
        def remove_then_report(job: Job, results: list[PointResult]) -> None:
            on_result(job, results)
            if self.removed_node_id is None:
                worker = next(info for info in self.inner.workers_seen if info["name"] == results[0].worker)
                node = next(n for n in self.cluster.list_all_nodes() if n.node_id == worker["node_id"])
                self.cluster.remove_node(node, allow_graceful=False)
                self.removed_node_id = node.node_id
                self.cluster.add_node(wait=False, **tpu_host_args("host-c", self.jax_cache))

        self.inner.run(jobs, remove_then_report, on_failure)


class FailingWorker(SteeringWorker):
    """Raises on every attempt of a job holding an `always_failing` point and on the first of a `flaky` one, and
    kills its own process (the host stays up) on a job holding a `crashing` point."""

    always_failing: frozenset[str] = frozenset()
    flaky: frozenset[str] = frozenset()
    crashing: frozenset[str] = frozenset()

    def run_job(self, job: Job, attempt: int = 1, batch_size: int | None = None) -> list[PointResult | FailedPoint]:
        keys = {point.point_key for point in job.points}
        if keys & self.crashing:
            os._exit(1)
        if keys & self.always_failing or (attempt == 1 and keys & self.flaky):
            raise RuntimeError(f"injected failure on attempt {attempt}")
        return super().run_job(job, attempt, batch_size)


@pytest.fixture(scope="module")
def failing_sweep(ray_cluster, tmp_path_factory, cache_dir) -> tuple[SweepPlan, SweepSummary]:
    """A 24-point sweep on the test cluster whose job 1 always fails, job 2 fails once (1 retry allowed) and job
    3 crashes its worker process every time (2 crashes allowed)."""
    sweep_plan = plan_sweep(tmp_path_factory.mktemp("failing"), cache_dir, SAME_BUCKET_PROMPTS[:2], GRID,
                            on_test_cluster(ray_cluster, max_worker_crashes=2))
    worker_class = type("FailingWorker", (FailingWorker,), {
        "always_failing": frozenset(p.point_key for p in sweep_plan.jobs[1].points),
        "flaky": frozenset(p.point_key for p in sweep_plan.jobs[2].points),
        "crashing": frozenset(p.point_key for p in sweep_plan.jobs[3].points),
    })
    executor = RayExecutor(sweep_plan, cache_dir, sweep_plan.config.cluster, worker_class=worker_class)
    return sweep_plan, run_sweep(sweep_plan, cache_dir=cache_dir, executor=executor)


# ---------------------------------------------------------------------------------------------------------------
# Sweeps on the simulated TPU cluster


@pytest.fixture(scope="module")
def spread_sweep(ray_cluster, tmp_path_factory, cache_dir) -> tuple[SweepPlan, SweepSummary, RayExecutor]:
    """24 points on two host workers, one per simulated host."""
    sweep_plan = plan_sweep(tmp_path_factory.mktemp("spread"), cache_dir, SAME_BUCKET_PROMPTS[:2], GRID,
                            on_test_cluster(ray_cluster))
    executor = RayExecutor(sweep_plan, cache_dir, sweep_plan.config.cluster)
    # Both workers up first: each compiles at start, and a worker ready seconds earlier could take every job.
    assert len(executor.wait_for_workers()) == 2
    return sweep_plan, run_sweep(sweep_plan, cache_dir=cache_dir, executor=executor), executor


def test_a_sweep_spreads_over_both_hosts_and_finishes_every_point_once(spread_sweep) -> None:
    sweep_plan, summary, executor = spread_sweep
    assert (summary.points_finished, summary.points_failed) == (24, 0)
    records = assert_each_point_finished_exactly_once(sweep_plan)
    workers = {record.worker for record in records}
    assert len(workers) == 2, workers
    seen = executor.workers_seen
    assert len({info["node_id"] for info in seen}) == 2, "one worker per host"
    assert {(info["platform"], info["device_count"]) for info in seen} == {("cpu", DEVICES_PER_HOST)}
    assert executor.lost_host_events == []
    assert summary.compilations == 2, "each worker compiles its one shape once"
    assert not ray.is_initialized(), "the driver disconnects from a joined cluster"


def test_losing_a_host_mid_sweep_requeues_its_job_and_every_point_finishes_once(
    ray_cluster, jax_cache, tmp_path, cache_dir
) -> None:
    sweep_plan = plan_sweep(tmp_path, cache_dir, SAME_BUCKET_PROMPTS[1:3], GRID, on_test_cluster(ray_cluster))
    inner = RayExecutor(sweep_plan, cache_dir, sweep_plan.config.cluster)
    executor = LoseAHostAfterTheFirstResult(inner, ray_cluster, jax_cache)
    summary = run_sweep(sweep_plan, cache_dir=cache_dir, executor=executor)

    assert executor.removed_node_id is not None
    assert [event["kind"] for event in inner.lost_host_events] == ["preemption"], "the lost job was requeued"
    assert summary.faults == {"preemptions": 1, "worker_crashes": 0, "job_retries": 0, "oom_retries": 0}
    assert (summary.points_finished, summary.points_failed) == (24, 0)
    records = assert_each_point_finished_exactly_once(sweep_plan)
    assert {record.attempt for record in records} == {1}, "a lost host does not use an attempt"
    preempted = [record for record in records if record.tags.get("runner.preemptions") == "1"]
    assert len(preempted) == 4, "the requeued job's points carry the preemption"
    assert not any(record.tags.get("runner.worker_crashes", "0") != "0" for record in records)
    parent = MlflowClient(sweep_plan.config.tracking.uri).get_run(summary.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert (parent.data.metrics["preemptions"], parent.data.metrics["worker_crashes"]) == (1.0, 0.0)


def test_a_failing_job_fails_its_points_after_its_retries_and_the_rest_finish(failing_sweep) -> None:
    sweep_plan, summary = failing_sweep
    assert (summary.points_finished, summary.points_failed) == (16, 8)
    assert summary.faults == {"preemptions": 0, "worker_crashes": 2, "job_retries": 2, "oom_retries": 0}
    records = {record.point_key: record for record in point_records(sweep_plan.config.tracking.uri)}
    assert len(records) == 24, "one record per point, retries included"
    for index, job in enumerate(sweep_plan.jobs):
        for point in job.points:
            record = records[point.point_key]
            if index == 1:
                assert record.status == "FAILED"
                assert record.attempt == 2, "1 try + max_job_retries=1"
                assert "RuntimeError: injected failure on attempt 2" in record.error
            elif index == 3:
                assert record.status == "FAILED"
                assert record.attempt == 1, "a crashed worker does not use the job's attempts"
                assert "crashed its worker 2 times on hosts that stayed up" in record.error
            else:
                assert record.status == "FINISHED"
                assert record.attempt == (2 if index == 2 else 1)
    parent = MlflowClient(sweep_plan.config.tracking.uri).get_run(summary.parent_run_id)
    assert parent.info.status == "FAILED"


def test_ctrl_c_stops_the_workers_and_marks_the_sweep_killed(ray_cluster, tmp_path, cache_dir) -> None:
    grid = {"layers": [1], "features": [3, 40], "scales": [0, 30], "seeds": [0]}
    sweep_plan = plan_sweep(tmp_path, cache_dir, SAME_BUCKET_PROMPTS[:2], grid, on_test_cluster(ray_cluster))
    ctrl_c = threading.Thread(target=press_ctrl_c_once_connected, daemon=True)
    ctrl_c.start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep_plan, cache_dir=cache_dir,
                  executor=RayExecutor(sweep_plan, cache_dir, sweep_plan.config.cluster))

    ctrl_c.join()
    assert time.monotonic() - started < 30, "Ctrl-C is honoured while the driver waits on its workers"
    assert not ray.is_initialized(), "the driver let go of its workers"
    client = MlflowClient(sweep_plan.config.tracking.uri)
    parent = client.search_runs([client.get_experiment_by_name("cluster-test").experiment_id],
                                "tags.`runner.role` = 'sweep'")[0]
    assert parent.info.status == "KILLED"
    assert "RUNNING" not in {run.info.status for run in child_runs(sweep_plan.config.tracking.uri)}


def test_sigint_stops_a_sweep_whose_workers_crash_loop_within_seconds(ray_cluster, tmp_path, cache_dir) -> None:
    """Every job kills its worker (as Ray's memory monitor does); Ray restarts it, it loads the model again, the
    job is requeued and kills it again. A SIGINT to the driver meanwhile ends the sweep at once."""
    grid = {"layers": [1], "features": [3, 40], "scales": [10, 30], "seeds": [0]}
    sweep_plan = plan_sweep(tmp_path, cache_dir, SAME_BUCKET_PROMPTS[:2], grid,
                            on_test_cluster(ray_cluster, max_worker_crashes=1000))
    keys = frozenset(point.point_key for point in sweep_plan.points)
    executor = RayExecutor(sweep_plan, cache_dir, sweep_plan.config.cluster,
                           worker_class=type("CrashLooping", (FailingWorker,), {"crashing": keys}))
    sent_at: list[float] = []

    def sigint_once_workers_restarted() -> None:
        deadline = time.monotonic() + 180
        while len(executor.workers_seen) < 4 and time.monotonic() < deadline:  # both workers up twice: crashed once
            time.sleep(0.05)
        time.sleep(1.0)  # into the next round of crashes
        sent_at.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGINT)

    interrupter = threading.Thread(target=sigint_once_workers_restarted, daemon=True)
    interrupter.start()
    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep_plan, cache_dir=cache_dir, executor=executor)
    stopped_after = time.monotonic() - sent_at[0]
    interrupter.join()
    assert len(executor.workers_seen) >= 4, "the workers were restarted after crashing"
    assert stopped_after < 10, f"the sweep stopped {stopped_after:.1f} s after the SIGINT"
    assert not ray.is_initialized(), "the driver let go of its workers"
    client = MlflowClient(sweep_plan.config.tracking.uri)
    parent = client.search_runs([client.get_experiment_by_name("cluster-test").experiment_id],
                                "tags.`runner.role` = 'sweep'")[0]
    assert parent.info.status == "KILLED"
    assert "RUNNING" not in {run.info.status for run in child_runs(sweep_plan.config.tracking.uri)}


def press_ctrl_c_once_connected(delay_s: float = 2.0, give_up_s: float = 60.0) -> None:
    """Sends this process a KeyboardInterrupt `delay_s` after the driver has connected to Ray (never, if it
    does not connect within `give_up_s`)."""
    deadline = time.monotonic() + give_up_s
    while not ray.is_initialized():
        if time.monotonic() > deadline:
            return
        time.sleep(0.05)
    time.sleep(delay_s)
    _thread.interrupt_main()


def test_workers_on_a_platform_they_cannot_get_end_the_sweep_with_the_reason_and_fail_no_point(
    ray_cluster, tmp_path, cache_dir
) -> None:
    grid = {"layers": [1], "features": [3], "scales": [0, 30], "seeds": [0]}
    sweep_plan = plan_sweep(tmp_path, cache_dir, SAME_BUCKET_PROMPTS[:1], grid,
                            on_test_cluster(ray_cluster, platform="tpu"))
    with pytest.raises(WorkerStartupError) as refused:
        run_sweep(sweep_plan, cache_dir=cache_dir,
                  executor=RayExecutor(sweep_plan, cache_dir, sweep_plan.config.cluster))

    assert refused.value.stage == "device"
    assert " cannot start its accelerator: JAX could not start platform 'tpu': " in str(refused.value)
    assert child_runs(sweep_plan.config.tracking.uri) == [], "a worker's start-up is no point's failure"
    assert point_records(sweep_plan.config.tracking.uri) == [], "no point is recorded, FAILED or otherwise"
    client = MlflowClient(sweep_plan.config.tracking.uri)
    experiment_id = client.get_experiment_by_name("cluster-test").experiment_id
    (parent,) = client.search_runs([experiment_id], f"tags.sweep_id = '{sweep_plan.sweep_id}'")
    assert parent.info.status == "FAILED" and parent.data.tags["runner.error"].startswith("WorkerStartupError: ")


# ---------------------------------------------------------------------------------------------------------------
# The driver killed and resumed (CLI, local Ray)


def finished_records(directory: Path) -> dict[str, PointRecord]:
    """point_key -> record of the FINISHED points, read straight from the local store's artifact files."""
    files = directory.glob("mlruns/*/*/artifacts/points/*.json")
    return {key: record for key, record in read_batches(files).items() if record.status == "FINISHED"}


def some_point_finished(directory: Path) -> bool:
    """Whether the sweep's store already holds a finished point."""
    return bool(finished_records(directory))


def runner_cli_env(jax_cache: Path) -> dict[str, str]:
    """The environment of a `runner run` subprocess: local Ray workers shaped like the test cluster's hosts."""
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    return {**env, "JAX_COMPILATION_CACHE_DIR": str(jax_cache), "RAY_USAGE_STATS_ENABLED": "0",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES_PER_HOST}"}


def test_a_killed_driver_resumes_without_duplicates_or_reruns(ray_cluster, tmp_path, cache_dir, jax_cache) -> None:
    # The driver joins the test cluster; killing it kills its worker actor too (Ray ties actors to their owner).
    grid = {"layers": [1], "features": [3, 17, 40, 41], "scales": [0, 30], "seeds": [0]}
    path = write_experiment(tmp_path, [SAME_BUCKET_PROMPTS[0], LONG_PROMPT], grid,
                            cluster=on_test_cluster(ray_cluster, workers=1))
    command = [sys.executable, "-m", "runner.cli", "run", str(path), "--cache-dir", str(cache_dir)]
    log = (tmp_path / "first-run.log").open("w")
    driver = subprocess.Popen(command, env=runner_cli_env(jax_cache), stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 240
        while not some_point_finished(tmp_path):
            assert driver.poll() is None, (tmp_path / "first-run.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no point finished in time"
            time.sleep(0.05)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    finally:
        driver.kill()
        kill_process_group(driver.pid)
        log.close()

    before = finished_records(tmp_path)
    assert 0 < len(before) < 16, f"killed mid-sweep ({len(before)} of 16 finished)"
    resumed = subprocess.run([*command, "--resume"], env=runner_cli_env(jax_cache), capture_output=True,
                             text=True, timeout=300, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{16 - len(before)} points finished, 0 failed, {len(before)} already done" in resumed.stdout

    after = finished_records(tmp_path)
    assert set(after) == {p.point_key for p in prepare_sweep(load_experiment(path), cache_dir).points}
    assert {key: after[key] for key in before} == before, "finished points were not run again"
    runs = child_runs(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert len(runs) == 4 and len({run.data.tags["curve_key"] for run in runs}) == 4, "no duplicate curve runs"


# ---------------------------------------------------------------------------------------------------------------
# A real MLflow server over HTTP


@pytest.fixture()
def mlflow_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """`mlflow server` on a sqlite file and a free 127.0.0.1 port; yields its base URL."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    server = MlflowServer(tmp_path)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


def test_a_sweep_logged_to_an_mlflow_server_reads_back_through_its_rest_api(
    mlflow_server, ray_cluster, tmp_path, cache_dir
) -> None:
    grid = {"layers": [1], "features": [3, 40], "scales": [0, 30], "seeds": [0]}
    path = write_experiment(tmp_path, SAME_BUCKET_PROMPTS[:1], grid, cluster=on_test_cluster(ray_cluster),
                            tracking_uri=mlflow_server)
    sweep_plan = prepare_sweep(load_experiment(path), cache_dir)
    executor = RayExecutor(sweep_plan, cache_dir, sweep_plan.config.cluster)
    summary = run_sweep(sweep_plan, cache_dir=cache_dir, executor=executor)

    experiment = rest(mlflow_server, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=cluster-test")
    experiment_id = experiment["experiment"]["experiment_id"]
    assert experiment_id == summary.experiment_id
    search = {"experiment_ids": [experiment_id], "max_results": 100}
    children = rest(mlflow_server, "/api/2.0/mlflow/runs/search",
                    {**search, "filter": f"tags.`mlflow.parentRunId` = '{summary.parent_run_id}'"})["runs"]
    assert len(children) == 2, "a run per steering curve"
    point_keys = []
    for run in children:
        params = {param["key"]: param["value"] for param in run["data"]["params"]}
        metrics = {metric["key"]: metric["value"] for metric in run["data"]["metrics"]}
        assert run["info"]["status"] == "FINISHED"
        assert params["layer"] == "1" and params["scales"] == "[0, 30]"
        assert metrics["gen/num_tokens"] > 0 and "steer/l0" in metrics and metrics["curve/points_finished"] == 2
        query = urllib.parse.urlencode({"run_uuid": run["info"]["run_id"], "path": "points.json"})
        with DIRECT.open(f"{mlflow_server}/get-artifact?{query}", timeout=30) as response:
            table = json.loads(response.read())
        assert "token_ids" in table["columns"]
        point_keys += [row[table["columns"].index("point_key")] for row in table["data"]]
    assert sorted(point_keys) == sorted(point.point_key for point in sweep_plan.points)
    parent = rest(mlflow_server, f"/api/2.0/mlflow/runs/get?run_id={summary.parent_run_id}")["run"]
    assert parent["info"]["status"] == "FINISHED"


# ---------------------------------------------------------------------------------------------------------------
# `runner runs` and `runner export`


def test_runs_prints_the_parent_status_and_children_by_status(failing_sweep) -> None:
    sweep_plan, summary = failing_sweep
    result = CliRunner().invoke(app, ["runs", str(experiment_file(sweep_plan))])
    assert result.exit_code == 0, result.output
    assert f"parent run {summary.parent_run_id}: FAILED" in result.stdout
    assert "24 points: 16 FINISHED, 8 FAILED, 0 not started" in result.stdout


def test_run_refuses_an_unreachable_ray_address_before_creating_any_run(tmp_path, cache_dir, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = write_experiment(tmp_path, SAME_BUCKET_PROMPTS[:1], GRID, cluster={})
    address = f"127.0.0.1:{free_port()}"
    result = CliRunner().invoke(app, ["run", str(path), "--address", address, "--cache-dir", str(cache_dir)])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"error: cluster.address: cannot reach Ray at '{address}': Connection refused (is the cluster up, and is "
        "this its head's GCS port, usually 6379?)"
    ]
    assert not (tmp_path / "mlflow.db").exists()


def test_runs_says_when_a_sweep_has_not_started(tmp_path) -> None:
    path = write_experiment(tmp_path, SAME_BUCKET_PROMPTS[:1], GRID, cluster={})
    result = CliRunner().invoke(app, ["runs", str(path)])
    assert result.exit_code == 0, result.output
    assert "no runs yet" in result.stdout


@pytest.mark.parametrize("file_format", ["csv", "parquet"])
def test_export_writes_one_row_per_finished_point(failing_sweep, tmp_path, file_format) -> None:
    sweep_plan, _ = failing_sweep
    out = tmp_path / f"points.{file_format}"
    result = CliRunner().invoke(app, ["export", str(experiment_file(sweep_plan)), "--format", file_format,
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out, keep_default_na=False) if file_format == "csv" else pd.read_parquet(out)

    failed = {point.point_key for job in (sweep_plan.jobs[1], sweep_plan.jobs[3]) for point in job.points}
    expected = {point.point_key: point for point in sweep_plan.points if point.point_key not in failed}
    assert len(frame) == 16 and set(frame["point_key"]) == set(expected)
    assert {"run_id", "layer", "feature", "scale", "seed", "prompt", "text", "steer/l0"} <= set(frame.columns)
    for row in frame.itertuples(index=False):
        point = expected[row.point_key]
        assert (row.layer, row.feature, row.scale, row.prompt) == (point.layer, point.feature, point.scale,
                                                                  point.prompt)
        assert isinstance(row.text, str)
    assert f"wrote 16 rows to {out}" in result.stdout


def experiment_file(sweep_plan: SweepPlan) -> Path:
    """The YAML a sweep's plan was read from (written by `write_experiment` next to its database)."""
    return Path(sweep_plan.config.tracking.uri.removeprefix("sqlite:///")).parent / "experiment.yaml"


# ---------------------------------------------------------------------------------------------------------------
# A slice replica: one model spanning both simulated hosts (jax.distributed over loopback)


def token_ids_by_point(uri: str) -> dict[str, tuple[int, ...]]:
    """point_key -> generated token ids, read from the sweep's point records."""
    return {record.point_key: record.token_ids for record in point_records(uri)}


def test_a_slice_replica_spans_both_hosts_and_generates_the_single_process_tokens(
    ray_cluster, spread_sweep, tmp_path, cache_dir
) -> None:
    grid = {**GRID, "features": [3, 40]}  # 8 of the points of `spread_sweep`
    slice_cluster = on_test_cluster(ray_cluster, workers=1, replica="slice", hosts_per_replica=2)
    sweep_plan = plan_sweep(tmp_path, cache_dir, SAME_BUCKET_PROMPTS[:1], grid, slice_cluster)
    executor = SliceExecutor(sweep_plan, cache_dir, sweep_plan.config.cluster)
    summary = run_sweep(sweep_plan, cache_dir=cache_dir, executor=executor, output_dir=tmp_path)

    assert (summary.points_finished, summary.points_failed) == (8, 0)
    members = executor.workers_seen
    assert sorted(info["rank"] for info in members) == [0, 1]
    assert len({info["node_id"] for info in members}) == 2, "one member per host"
    assert {(info["device_count"], info["local_device_count"]) for info in members} == {(8, DEVICES_PER_HOST)}
    records = assert_each_point_finished_exactly_once(sweep_plan)
    assert {record.worker.split("@")[0] for record in records} == {"replica-0"}

    # The same points generated by single-process workers (one host's 4 devices each), greedy: the same tokens.
    single_plan = spread_sweep[0]
    sliced = token_ids_by_point(sweep_plan.config.tracking.uri)
    single = token_ids_by_point(single_plan.config.tracking.uri)
    assert set(sliced) < set(single) and len(sliced) == 8
    assert sliced == {key: single[key] for key in sliced} and all(len(ids) > 0 for ids in sliced.values())


def test_slice_replicas_that_cannot_get_their_platform_end_the_sweep_with_the_reason_and_fail_no_point(
    ray_cluster, tmp_path, cache_dir
) -> None:
    slice_cluster = on_test_cluster(ray_cluster, workers=1, replica="slice", hosts_per_replica=2, platform="tpu")
    sweep_plan = plan_sweep(tmp_path, cache_dir, SAME_BUCKET_PROMPTS[:1], {**GRID, "features": [3]}, slice_cluster)
    with pytest.raises(WorkerStartupError, match=r"replica-0/host-\d@.* cannot start its accelerator: "):
        run_sweep(sweep_plan, cache_dir=cache_dir, output_dir=tmp_path,
                  executor=SliceExecutor(sweep_plan, cache_dir, sweep_plan.config.cluster))
    assert child_runs(sweep_plan.config.tracking.uri) == [], "a replica's start-up is no point's failure"
