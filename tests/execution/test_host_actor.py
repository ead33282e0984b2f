"""What runs on a worker host before it takes jobs: the JAX platform check and libtpu's stale lockfile."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from runner.config.schema import ExperimentConfig
from runner.execution.faults import WorkerStartupError
from runner.execution.host_actor import HostWorker, remove_stale_tpu_lockfile
from runner.plan.prepare import prepare_sweep

SWEEP = {
    "name": "host-actor-test",
    "model": {"source": "synthetic", "preset": "tiny"},
    "sae": {"source": "synthetic", "target_l0": 16},
    "prompts": ["Once upon a time"],
    "steering": {"layers": [1, 2], "features": [3, 17, 40], "scales": [10, 30], "seeds": [0]},
    "sampling": {"max_new_tokens": 6, "temperature": 0.0, "batch_size": 4},
}


def test_a_worker_refuses_to_run_on_a_platform_jax_did_not_give_it(cache_dir) -> None:
    sweep_plan = prepare_sweep(ExperimentConfig.model_validate(SWEEP), cache_dir)
    worker = HostWorker(sweep_plan.worker_args(), cache_dir=cache_dir, platform="gpu", name="worker-0")
    for call in (worker.info, worker.compilations, lambda: worker.run_job(sweep_plan.jobs[0], 1)):
        with pytest.raises(WorkerStartupError) as refused:
            call()
        assert refused.value.stage == "device"
        assert str(refused.value).startswith("worker-0@")
        assert str(refused.value).endswith("cannot start its accelerator: expected JAX platform 'gpu' but JAX runs on "
                                           "'cpu' (4 device(s)); is jax[cuda12] (runner[cuda]) installed on this host?")


def test_a_worker_whose_checkpoint_is_truncated_reports_orbaxs_cause_in_one_line(tmp_path, tiny_model_dir,
                                                                                 cache_dir) -> None:
    broken = tmp_path / "model"
    shutil.copytree(tiny_model_dir, broken)
    data = max((path for path in broken.rglob("*") if path.is_file()), key=lambda path: path.stat().st_size)
    os.truncate(data, data.stat().st_size // 2)  # a half-downloaded checkpoint: its metadata still reads
    config = ExperimentConfig.model_validate({**SWEEP, "model": {"source": "local", "path": str(broken)}})
    sweep_plan = prepare_sweep(config, cache_dir)
    worker = HostWorker(sweep_plan.worker_args(), cache_dir=cache_dir, platform="cpu", name="worker-0")
    with pytest.raises(WorkerStartupError) as refused:
        worker.info()
    assert refused.value.stage == "checkpoint"
    assert refused.value.cause_line.startswith("OUT_OF_RANGE: Error reading ")
    assert "\n" not in str(refused.value) and "is not valid for value of size" in str(refused.value)


def test_a_stale_tpu_lockfile_is_removed_only_when_no_process_holds_it(tmp_path) -> None:
    lockfile = tmp_path / "libtpu_lockfile"
    lockfile.write_text("")
    holder = subprocess.Popen([sys.executable, "-c", f"f = open({str(lockfile)!r}); print('open', flush=True); "
                               "import time; time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        assert not remove_stale_tpu_lockfile(lockfile) and lockfile.exists(), "a live holder keeps its lock"
    finally:
        holder.kill()
        holder.wait()
    assert remove_stale_tpu_lockfile(lockfile) and not lockfile.exists()
    assert not remove_stale_tpu_lockfile(lockfile), "nothing to remove"
