"""The in-process executor: a job that runs out of memory runs again at half the batch, which the worker keeps."""

from __future__ import annotations

from mlflow import MlflowClient

from runner.config.schema import ExperimentConfig
from runner.driver import run_sweep
from runner.execution.local import LocalExecutor
from runner.execution.workers import SteeringWorker
from runner.plan.prepare import prepare_sweep
from runner.tracking.search import sweep_records

#: 2 prompts x 2 features x 4 non-zero scales = 16 generations: one job of 16.
SWEEP = {
    "name": "out-of-memory",
    "model": {"source": "synthetic", "preset": "tiny"},
    "sae": {"source": "synthetic"},
    "prompts": ["The most iconic structure on Earth is", "Once upon a time"],
    "steering": {"layers": [1], "features": [3, 40], "scales": [5, 10, 20, 40], "seeds": [0]},
    "sampling": {"max_new_tokens": 4, "temperature": 0.0},
}


class ShrinkingMemoryWorker(SteeringWorker):
    """A worker whose device has plenty of room while it fits its batch, then (another process took memory) room
    for a batch of at most `room_rows` rows: what its own programs need at that batch, measured while fitting."""

    room_rows = 5

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fitted_batch = self.batch_size
        self.batch_sizes_run: list[int] = []
        rows = self.room_rows
        self._measure(rows)
        room = max(self.memory.needs[(program, rows)] for program in ("steering sampler", "steering metrics"))
        self.memory.budget = lambda: room  # the device's usable bytes from now on

    def _run_chunk(self, points, attempt):
        results = super()._run_chunk(points, attempt)
        self.batch_sizes_run.append(self.batch_size)  # only chunks that ran
        return results


def test_a_job_out_of_memory_finishes_once_at_half_the_batch_with_oom_retries_counted(tmp_path, cache_dir) -> None:
    config = ExperimentConfig.model_validate({**SWEEP, "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}})
    sweep_plan = prepare_sweep(config, cache_dir)
    assert (len(sweep_plan.jobs), sweep_plan.batch_size) == (1, 16)
    worker = ShrinkingMemoryWorker(**sweep_plan.worker_args(), cache_dir=cache_dir)
    assert worker.fitted_batch == 16, "the whole job fitted while memory was plenty"

    summary = run_sweep(sweep_plan, cache_dir=cache_dir, executor=LocalExecutor(sweep_plan, cache_dir, worker),
                        output_dir=tmp_path)

    assert worker.batch_sizes_run == [4, 4, 4, 4], "16 did not fit, 8 did not either, 4 does: the job ran once at 4"
    assert worker.batch_size == 4, "the worker keeps the smaller batch"
    assert (summary.points_finished, summary.points_failed) == (16, 0)
    assert summary.faults["oom_retries"] == 2 and summary.faults["job_retries"] == 0
    client = MlflowClient(config.tracking.uri)
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    parent = client.search_runs([experiment.experiment_id], "tags.`runner.role` = 'sweep'")[0]
    assert parent.data.metrics["oom_retries"] == 2.0
    records = sweep_records(config.tracking.uri, parent)
    assert sorted(records) == sorted(p.point_key for p in sweep_plan.points)
    assert {record.status for record in records.values()} == {"FINISHED"}, "every point once, finished"
    assert {record.tags["runner.oom_retries"] for record in records.values()} == {"2"}
    assert {record.attempt for record in records.values()} == {1}, "running out of memory uses no attempt"


class NoRoomWorker(ShrinkingMemoryWorker):
    """Room for nothing after fitting."""

    def __init__(self, *args, **kwargs):
        SteeringWorker.__init__(self, *args, **kwargs)
        self.batch_sizes_run = []
        self.memory.budget = lambda: 0


def test_a_batch_of_1_that_does_not_fit_fails_with_the_model_program_and_bytes(tmp_path, cache_dir) -> None:
    config = ExperimentConfig.model_validate({**SWEEP, "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
                                              "steering": {**SWEEP["steering"], "scales": [5]}})
    sweep_plan = prepare_sweep(config, cache_dir)
    worker = NoRoomWorker(**sweep_plan.worker_args(), cache_dir=cache_dir)
    summary = run_sweep(sweep_plan, cache_dir=cache_dir, executor=LocalExecutor(sweep_plan, cache_dir, worker),
                        output_dir=tmp_path)
    assert (summary.points_finished, summary.points_failed) == (0, 4)
    assert summary.faults["oom_retries"] == 2, "4 -> 2 -> 1, then it fails"
    client = MlflowClient(config.tracking.uri)
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    parent = client.search_runs([experiment.experiment_id], "tags.`runner.role` = 'sweep'")[0]
    error = next(iter(sweep_records(config.tracking.uri, parent).values())).error
    assert error.startswith("out of memory at a batch of 1 on local: DeviceOutOfMemory: model synthetic:tiny:seed0: "
                            "the steering sampler at a batch of 1 needs ")
    assert "beyond the weights; 0.00 GiB available" in error
