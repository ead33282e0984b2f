"""Slice replicas on simulated TPU slices: reserved with Ray's own `slice_placement_group`, lost, rebuilt elsewhere.

Each simulated host is a `ray.cluster_utils.Cluster` node started with what a TPU VM of a multi-host v5e slice
gives Ray (GKE's TPU webhook sets these variables; a Cloud TPU VM's metadata server gives the same): `TPU_NAME`,
`TPU_WORKER_ID`, `TPU_ACCELERATOR_TYPE`, `TPU_TOPOLOGY` and `TPU: 4` chips. Ray's own TPU detection turns them into
the node's resources (`TPU-v5litepod-8-head` on worker 0) and labels (`ray.io/tpu-slice-name`, ...), as on a real
slice. JAX runs on 4 fake CPU devices per host under `jax.distributed`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
import yaml
from mlflow import MlflowClient
from ray.cluster_utils import Cluster

from runner.config.loading import load_experiment
from runner.driver import run_sweep
from runner.execution.slices import SliceExecutor, received_saes
from runner.plan.points import Job
from runner.plan.prepare import SweepPlan, prepare_sweep
from runner.results import PointResult
from runner.sae.sources import SAEFile
from runner.tracking.search import sweep_records

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

DEVICES_PER_HOST = 4
#: A v5e 2x4 slice on 4-chip hosts (GKE ct5lp-hightpu-4t, topology 2x4): 2 hosts, pod type v5litepod-8.
POD_TYPE, TOPOLOGY, HOSTS = "v5litepod-8", "2x4", 2
NODE_DEATH_DETECTION = {"health_check_period_ms": 500, "health_check_failure_threshold": 3}


@contextlib.contextmanager
def environment(variables: dict[str, str]) -> Iterator[None]:
    """`variables` set in this process's environment for the block (Ray reads a new node's TPU facts here)."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def add_tpu_slice(cluster: Cluster, slice_name: str, jax_cache: Path) -> list[Any]:
    """Adds the hosts of one simulated v5e 2x4 slice named `slice_name`; returns its nodes, by TPU worker id."""
    nodes = []
    for worker_id in range(HOSTS):
        tpu_env = {"TPU_NAME": slice_name, "TPU_WORKER_ID": str(worker_id), "TPU_ACCELERATOR_TYPE": POD_TYPE,
                   "TPU_TOPOLOGY": TOPOLOGY}
        with environment(tpu_env):  # what Ray's TPU detection reads when the node starts
            nodes.append(cluster.add_node(
                wait=False,
                num_cpus=1,
                resources={"TPU": 4},
                env_vars={  # what the node's workers see (Ray reads TPU_NAME there to name a reserved slice)
                    **tpu_env,
                    "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES_PER_HOST}",
                    "JAX_PLATFORMS": "cpu",
                    "JAX_COMPILATION_CACHE_DIR": str(jax_cache),
                    "RAY_USAGE_STATS_ENABLED": "0",
                },
            ))
    return nodes


def write_slice_experiment(directory: Path, address: str) -> Path:
    """Six steering points in three jobs of two, on one slice replica of the simulated v5e 2x4 slices."""
    config = {
        "name": "slice-test",
        "model": {"source": "synthetic", "preset": "tiny"},
        "sae": {"source": "synthetic", "target_l0": 16},
        "prompts": ["Once upon a time"],
        "steering": {"layers": [1], "features": [3, 17, 40], "scales": [10, 30], "seeds": [0]},
        "sampling": {"max_new_tokens": 4, "temperature": 0.0, "batch_size": 2},
        "tracking": {"uri": f"sqlite:///{directory / 'mlflow.db'}"},
        "cluster": {"workers": 1, "replica": "slice", "accelerator_version": "v5e", "slice_topology": TOPOLOGY,
                    "resources": {"TPU": 4}, "platform": "cpu", "address": address, "max_job_retries": 0},
    }
    path = directory / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class LosingSliceA(SliceExecutor):
    """A `SliceExecutor` that, after the first job's results, removes TPU worker 1 of the slice that ran it (the
    replica gets its next job on a slice with a dead host) and brings up a second slice under a new name."""

    def __init__(self, sweep_plan: SweepPlan, cache_dir: Path, *, cluster: Cluster, slice_a: list[Any],
                 jax_cache: Path):
        super().__init__(sweep_plan, cache_dir, sweep_plan.config.cluster)
        self.cluster, self.slice_a, self.jax_cache = cluster, slice_a, jax_cache
        self.removed: Any = None

    def run(self, jobs, on_result, on_failure) -> None:
        def lose_then_report(job: Job, results: list[PointResult]) -> None:
            on_result(job, results)
            if self.removed is None:
                self.removed = self.slice_a[1]
                self.cluster.remove_node(self.removed, allow_graceful=False)
                add_tpu_slice(self.cluster, "slice-b", self.jax_cache)

        super().run(jobs, lose_then_report, on_failure)


@pytest.fixture
def tpu_cluster() -> Iterator[Cluster]:
    """A head without CPUs; the test adds its slices."""
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 0, "_system_config": NODE_DEATH_DETECTION})
    try:
        yield cluster
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()


def test_a_slice_lost_mid_sweep_is_rebuilt_on_a_new_slice_and_every_point_finishes_once(
    tpu_cluster, tmp_path
) -> None:
    jax_cache, cache_dir = tmp_path / "jax-cache", tmp_path / "cache"
    slice_a = add_tpu_slice(tpu_cluster, "slice-a", jax_cache)
    tpu_cluster.wait_for_nodes()
    sweep_plan = prepare_sweep(load_experiment(write_slice_experiment(tmp_path, tpu_cluster.address)), cache_dir)
    assert len(sweep_plan.jobs) == 3

    # The simulated hosts advertise what Ray's TPU code reads on a real slice.
    ray.init(address=tpu_cluster.address)
    hosts = {node["Labels"].get("ray.io/tpu-worker-id"): node for node in ray.nodes()
             if node["Labels"].get("ray.io/tpu-slice-name") == "slice-a"}
    assert set(hosts) == {"0", "1"}
    assert {node["Labels"]["ray.io/tpu-pod-type"] for node in hosts.values()} == {POD_TYPE}
    assert hosts["0"]["Resources"].get(f"TPU-{POD_TYPE}-head") == 1 and f"TPU-{POD_TYPE}-head" not in hosts["1"][
        "Resources"]
    ray.shutdown()

    executor = LosingSliceA(sweep_plan, cache_dir, cluster=tpu_cluster, slice_a=slice_a, jax_cache=jax_cache)
    executor.start()  # fits the synthetic SAEs here, on the driver, and ships them
    shutil.rmtree(cache_dir / "synthetic-saes")  # the members must not need the driver's disk
    summary = run_sweep(sweep_plan, cache_dir=cache_dir, executor=executor, output_dir=tmp_path)

    assert executor.removed is not None
    assert (summary.points_finished, summary.points_failed) == (6, 0), "no job failed"
    assert {key: summary.faults[key] for key in ("preemptions", "worker_crashes", "job_retries")} == {
        "preemptions": 1, "worker_crashes": 0, "job_retries": 0}
    assert summary.faults["slice_wait_s"] >= 1, "the replica waited for the new slice, and the summary says so"
    assert [event["kind"] for event in executor.lost_host_events] == ["preemption"]

    # One gang on slice A, then one on slice B, each member TPU worker i = JAX process i on its own host.
    members = executor.workers_seen
    slice_a_nodes = [node.node_id for node in slice_a]
    first, second = members[:HOSTS], members[HOSTS:]
    assert len(members) == 2 * HOSTS
    assert [info["rank"] for info in first] == [info["process_index"] for info in first] == [0, 1]
    assert [info["rank"] for info in second] == [info["process_index"] for info in second] == [0, 1]
    assert [info["node_id"] for info in first] == slice_a_nodes, "member i on TPU worker i"
    assert not {info["node_id"] for info in second} & set(slice_a_nodes), "rebuilt on the new slice, not on A"
    assert {(info["device_count"], info["local_device_count"]) for info in members} == {
        (HOSTS * DEVICES_PER_HOST, DEVICES_PER_HOST)}

    # Every point exactly once; the job in flight at the loss carries the preemption and kept its attempt.
    client = MlflowClient(sweep_plan.config.tracking.uri)
    parent = client.get_run(summary.parent_run_id)
    records = list(sweep_records(sweep_plan.config.tracking.uri, parent).values())
    assert sorted(record.point_key for record in records) == sorted(p.point_key for p in sweep_plan.points)
    assert {record.status for record in records} == {"FINISHED"}
    assert {record.attempt for record in records} == {1}
    assert sum(record.tags.get("runner.preemptions") == "1" for record in records) == 2, "one job of two points"
    assert (parent.data.metrics["preemptions"], parent.data.metrics["job_retries"]) == (1.0, 0.0)
    assert parent.data.metrics["slice_wait_s"] >= 1


def test_a_member_writes_the_shipped_saes_into_its_own_cache(tmp_path) -> None:
    arrays = {"W_enc": np.ones((4, 8), np.float32)}
    np.savez(tmp_path / "driver.npz", **arrays)
    data = (tmp_path / "driver.npz").read_bytes()
    files = {"synthetic/1": SAEFile(layer=1, sae_id="synthetic/1", path=None, width="8", l0="16"),
             "hub/2": SAEFile(layer=2, sae_id="hub/2", path=tmp_path / "hub.npz")}
    member_cache = tmp_path / "member-cache"

    received = received_saes(files, {"synthetic/1": ("synthetic-saes/x/layer_1/params.npz", data)}, member_cache)

    assert received["synthetic/1"].path == member_cache / "synthetic-saes/x/layer_1/params.npz"
    assert received["synthetic/1"].path.read_bytes() == data
    assert received["hub/2"] == files["hub/2"], "files with a path are left alone"
    again = received_saes(files, {"synthetic/1": ("synthetic-saes/x/layer_1/params.npz", data)}, member_cache)
    assert again == received
