"""One writer per sweep: the store reached first, the sweep leased to one driver, on sqlite and on a real
`mlflow server`; two `runner run` of one sweep at once end with every point FINISHED exactly once."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from runner.errors import TrackingUnavailable
from runner.tracking.lease import (
    LEASE_TAG_PREFIX,
    LeaseHeld,
    LeaseLost,
    Owner,
    ServerLease,
    claim_sweep,
    lease_dir,
    reach_store,
)
from runner.tracking.records import PointRecord
from runner.tracking.search import sweep_records
from tests.mlflow_server import MlflowServer, free_port, kill_process_group

SWEEP = "0123456789abcdef"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` for the module; yields its URL."""
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
    mlflow_server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    mlflow_server.start()
    try:
        yield mlflow_server.url
    finally:
        mlflow_server.stop()


# ---------------------------------------------------------------------------------------------------------------
# A local store


def test_a_local_store_leases_a_sweep_to_one_driver_at_a_time(tmp_path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = claim_sweep(uri, "x", SWEEP, retry_timeout_s=5)
    try:
        with pytest.raises(LeaseHeld) as refused:
            claim_sweep(uri, "x", SWEEP, retry_timeout_s=5)
        message = str(refused.value)
        assert message.startswith(f"sweep {SWEEP} is already running ({Owner.this_process().user}@"
                                  f"{socket.gethostname()}, pid {os.getpid()}, since ")
        assert "mlflow.db.runner-lease" in message and "the next run resumes the sweep" in message
        with pytest.raises(LeaseHeld, match="--take-over cannot break a local store's lock while its holder runs"):
            claim_sweep(uri, "x", SWEEP, retry_timeout_s=5, take_over=True)
        claim_sweep(uri, "x", "another-sweep-id", retry_timeout_s=5).release()  # other sweeps are not held up
    finally:
        first.release()
    assert not (lease_dir(uri) / f"{SWEEP}.owner.json").exists()
    claim_sweep(uri, "x", SWEEP, retry_timeout_s=5).release()


def test_the_lease_of_a_killed_driver_is_released_by_the_os(tmp_path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from runner.tracking.lease import claim_sweep; "
         f"lease = claim_sweep({uri!r}, 'x', {SWEEP!r}, retry_timeout_s=30); print('held', flush=True); "
         "time.sleep(120)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LeaseHeld, match=f"pid {holder.pid}"):
            claim_sweep(uri, "x", SWEEP, retry_timeout_s=5)
    finally:
        holder.kill()
        holder.wait()
    claim_sweep(uri, "x", SWEEP, retry_timeout_s=5).release()


def test_drivers_creating_one_new_sqlite_store_at_once_all_reach_it(tmp_path) -> None:
    database = tmp_path / "fresh.db"
    script = ("import sys, time; from runner.tracking.lease import reach_store; "
              f"time.sleep(max(0, float(sys.argv[1]) - time.time())); reach_store('sqlite:///{database}', 30)")
    start_at = str(time.time() + 8)  # after both interpreters have imported MLflow
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2]), "MLFLOW_LOGGING_LEVEL": "WARNING"}
    drivers = [subprocess.Popen([sys.executable, "-c", script, start_at], env=env, stderr=subprocess.PIPE,
                                text=True) for _ in range(2)]
    errors = [driver.communicate(timeout=120)[1] for driver in drivers]
    assert [driver.returncode for driver in drivers] == [0, 0], "\n".join(errors)
    with sqlite3.connect(database) as connection:
        assert connection.execute("select count(*) from experiments").fetchone() == (1,), "the Default experiment"


def test_an_unreachable_server_is_retried_then_refused_in_one_line_without_its_token(monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # each try fails at once: runner does the retrying
    uri = f"http://127.0.0.1:{free_port()}/?token=s3cr3t-t0k3n"
    retries: list[float] = []
    started = time.monotonic()
    with pytest.raises(TrackingUnavailable) as refused:
        reach_store(uri, 3.0, on_retry=lambda failure, pause: retries.append(pause), first_delay_s=0.5)
    assert time.monotonic() - started < 60
    message = str(refused.value)
    assert message.startswith(f"tracking.uri: http://127.0.0.1:{uri.split(':')[2].split('/')[0]}/?token=*** "
                              "unreachable for ")
    assert "(tracking.retry_timeout_s=3)" in message and "\n" not in message
    assert "s3cr3t" not in message and retries, "retried before giving up"


# ---------------------------------------------------------------------------------------------------------------
# A tracking server


def lease_tag(url: str, experiment: str, sweep: str = SWEEP) -> dict | None:
    client = MlflowClient(url)
    tags = client.get_experiment(client.get_experiment_by_name(experiment).experiment_id).tags
    key = LEASE_TAG_PREFIX + sweep
    return json.loads(tags[key]) if key in tags else None


def test_a_tracking_server_leases_a_sweep_on_its_experiment_and_releases_it(server, request) -> None:
    experiment = request.node.name
    lease = ServerLease.acquire(MlflowClient(server), experiment, SWEEP, heartbeat_s=0.1, settle_s=0.3)
    try:
        assert lease_tag(server, experiment)["pid"] == os.getpid()
        time.sleep(0.5)
        assert lease_tag(server, experiment, SWEEP + ".heartbeat")["time"] > lease_tag(server, experiment)["started"]
        with pytest.raises(LeaseHeld) as refused:
            ServerLease.acquire(MlflowClient(server), experiment, SWEEP, settle_s=0)
        message = str(refused.value)
        assert f"sweep {SWEEP} is already running (" in message and f"pid {os.getpid()}" in message
        assert "run again with --take-over if that run is gone" in message
    finally:
        lease.release()
    client = MlflowClient(server)
    tags = client.get_experiment(client.get_experiment_by_name(experiment).experiment_id).tags
    assert not [key for key in tags if key.startswith(LEASE_TAG_PREFIX)], "the lease and its heartbeat are gone"


def test_a_lease_released_before_its_first_heartbeat_leaves_no_tag(server, request) -> None:
    experiment = request.node.name
    lease = ServerLease.acquire(MlflowClient(server), experiment, SWEEP, heartbeat_s=60, settle_s=0.1)
    assert lease_tag(server, experiment, SWEEP + ".heartbeat") is None, "a short sweep never renewed its lease"
    lease.release()
    assert lease_tag(server, experiment) is None, "released, though it had no heartbeat tag to delete"


def test_a_lease_taken_over_is_lost_by_its_old_holder(server, request) -> None:
    experiment = request.node.name
    old = ServerLease.acquire(MlflowClient(server), experiment, SWEEP, heartbeat_s=0.2, settle_s=0)
    new = ServerLease.acquire(MlflowClient(server), experiment, SWEEP, take_over=True, settle_s=0.5)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                old.check()
            except LeaseLost as lost:
                assert str(lost).startswith(f"sweep {SWEEP} was taken over by ")
                break
            assert time.monotonic() < deadline, "the old holder never noticed"
            time.sleep(0.1)
        new.check()
        old.release()
        assert lease_tag(server, experiment) is not None, "the old holder leaves the new owner's lease alone"
    finally:
        new.release()


def test_a_stale_lease_or_one_whose_process_is_gone_is_taken_over_without_asking(server, request) -> None:
    experiment = request.node.name
    client = MlflowClient(server)
    stale = ServerLease.acquire(client, experiment, SWEEP, heartbeat_s=3600, settle_s=0)
    time.sleep(0.3)
    ServerLease.acquire(client, experiment, SWEEP, stale_after_s=0.1, settle_s=0).release()  # no heartbeat: stale
    stale.release()

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    gone = Owner.this_process()
    gone = Owner(**{**gone.__dict__, "pid": int(finished.stdout), "pid_started": 0.0})
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    client.set_experiment_tag(experiment_id, LEASE_TAG_PREFIX + SWEEP, gone.to_json())
    ServerLease.acquire(client, experiment, SWEEP, settle_s=0).release()  # its driver exited on this host

    # A lease this very process claimed for an earlier run but could not release (the server was away then).
    client.set_experiment_tag(experiment_id, LEASE_TAG_PREFIX + SWEEP, Owner.this_process().to_json())
    ServerLease.acquire(client, experiment, SWEEP, settle_s=0).release()


# ---------------------------------------------------------------------------------------------------------------
# Two `runner run` of one sweep at once


def write_sweep(directory: Path, model_dir: Path, sae_root: Path, uri: str) -> Path:
    config = {
        "name": "two-drivers",
        "model": {"source": "local", "path": str(model_dir)},
        "sae": {"source": "local", "path": str(sae_root), "width": "256", "l0": "canonical"},
        "prompts": ["Once upon a time"],
        "steering": {"layers": [1], "features": [3], "scales": [0, 30]},
        "sampling": {"max_new_tokens": 4, "batch_size": 2},
        "tracking": {"uri": uri},
    }
    path = directory / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_two_drivers_at_once(path: Path, cache_dir: Path) -> tuple[list[int], list[str], list[float]]:
    """Starts two `runner run` of `path` together; returns their exit codes, stderr and seconds to exit."""
    command = [sys.executable, "-m", "runner.cli", "run", str(path), "--cache-dir", str(cache_dir)]
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
           "PYTHONPATH": str(Path(__file__).parents[2]), "JAX_COMPILATION_CACHE_DIR": str(cache_dir / "jax-cache")}
    started = time.monotonic()
    drivers = [subprocess.Popen(command, cwd=path.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True) for _ in range(2)]
    try:
        seconds: list[float | None] = [None, None]
        while None in seconds:
            for index, driver in enumerate(drivers):
                if seconds[index] is None and driver.poll() is not None:
                    seconds[index] = time.monotonic() - started
            assert time.monotonic() - started < 400, "the drivers did not finish"
            time.sleep(0.1)
        errors = [driver.stderr.read() for driver in drivers]
        return [driver.returncode for driver in drivers], errors, seconds
    finally:
        for driver in drivers:
            driver.kill()
            kill_process_group(driver.pid)
            driver.wait()


def assert_one_ran_and_the_other_was_refused(codes: list[int], errors: list[str], seconds: list[float]) -> None:
    assert sorted(codes) == [0, 2], errors
    winner, loser = codes.index(0), codes.index(2)
    lines = [line for line in errors[loser].splitlines() if line.strip()]
    assert len(lines) == 1, errors[loser]
    assert lines[0].startswith("error: sweep ") and (" is already running (" in lines[0]
                                                     or " was claimed at the same moment by " in lines[0])
    assert seconds[loser] < seconds[winner], "the refused driver exits while the other still runs"


def point_records(uri: str) -> tuple[str, list[PointRecord]]:
    """The sweep's id and its point records (one per point), read back from its parent run."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("two-drivers")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`runner.role` = 'sweep'")
    return parent.data.tags["sweep_id"], list(sweep_records(uri, parent).values())


def test_two_runs_of_one_sweep_on_sqlite_run_it_once(tmp_path, tiny_model_dir, tiny_sae_paths, cache_dir) -> None:
    path = write_sweep(tmp_path, tiny_model_dir, cache_dir / "tiny-saes", "sqlite:///mlflow.db")
    assert_one_ran_and_the_other_was_refused(*run_two_drivers_at_once(path, cache_dir))
    _, records = point_records(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert len(records) == 2 and len({record.point_key for record in records}) == 2
    assert {record.status for record in records} == {"FINISHED"}


def test_two_runs_of_one_sweep_on_a_tracking_server_run_it_once(server, tmp_path, tiny_model_dir, tiny_sae_paths,
                                                               cache_dir) -> None:
    path = write_sweep(tmp_path, tiny_model_dir, cache_dir / "tiny-saes", server)
    codes, errors, seconds = run_two_drivers_at_once(path, cache_dir)
    assert_one_ran_and_the_other_was_refused(codes, errors, seconds)
    swept, records = point_records(server)
    assert len(records) == 2 and len({record.point_key for record in records}) == 2
    assert {record.status for record in records} == {"FINISHED"}
    left = lease_tag(server, "two-drivers", swept)
    assert left is None, f"the winner released it; left: {left}; codes {codes}; stderr: {[e[-1500:] for e in errors]}"


def test_a_driver_whose_sweep_was_taken_over_stops_without_touching_its_runs(server, tmp_path, tiny_model_dir,
                                                                            tiny_sae_paths, cache_dir) -> None:
    from runner.config.loading import load_experiment
    from runner.driver import run_sweep
    from runner.plan.prepare import prepare_sweep

    sweep_plan = prepare_sweep(load_experiment(write_sweep(tmp_path, tiny_model_dir, cache_dir / "tiny-saes",
                                                           server)), cache_dir)
    client = MlflowClient(server)
    old = ServerLease.acquire(client, "two-drivers", sweep_plan.sweep_id, heartbeat_s=0.1, settle_s=0)
    new = ServerLease.acquire(client, "two-drivers", sweep_plan.sweep_id, take_over=True, settle_s=0.3)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                old.check()
            except LeaseLost:
                break
            assert time.monotonic() < deadline
            time.sleep(0.1)
        experiment_id = client.get_experiment_by_name("two-drivers").experiment_id
        before = [(run.info.run_id, run.info.status) for run in client.search_runs([experiment_id])]
        with pytest.raises(LeaseLost):
            run_sweep(sweep_plan, cache_dir=cache_dir, lease=old)
        assert [(run.info.run_id, run.info.status) for run in client.search_runs([experiment_id])] == before
    finally:
        old.release()
        new.release()
