"""A steering sweep end to end on the tiny model: YAML -> plan -> worker -> MLflow, reproducible and resumable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient
from typer.testing import CliRunner

from runner.cli import app
from runner.config.loading import load_experiment
from runner.driver import run_sweep
from runner.execution.local import LocalExecutor
from runner.execution.workers import SteeringWorker
from runner.plan.points import sweep_id
from runner.plan.prepare import outline, prepare_sweep
from runner.tracking.records import PointRecord
from runner.tracking.search import sweep_parent, sweep_records
from tests.mlflow_server import kill_process_group

STEERING = {"layers": [1, 2], "features": [3, 40], "scales": [0, 30], "seeds": [0]}


def write_experiment(tmp_path: Path, name: str = "sweep-test", **sampling) -> Path:
    config = {
        "name": name,
        "model": {"source": "synthetic", "preset": "tiny"},
        "sae": {"source": "synthetic", "target_l0": 16},
        "prompts": ["The most iconic structure on Earth is", "Once upon a time"],
        "steering": STEERING,
        "sampling": {"max_new_tokens": 6, "temperature": 0.0, "batch_size": 8, **sampling},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def child_runs(uri: str, experiment: str) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], "tags.runner.role != 'sweep'", max_results=1000)
    return [run for run in runs if "mlflow.parentRunId" in run.data.tags]


def point_records(config) -> list[PointRecord]:
    """The sweep's point records, read back from its parent run."""
    parent = sweep_parent(config.tracking.uri, config.tracking.experiment, sweep_id(config))
    return list(sweep_records(config.tracking.uri, parent).values())


def token_ids_by_point(config) -> dict[str, tuple[int, ...]]:
    return {record.point_key: record.token_ids for record in point_records(config)}


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory, cache_dir):
    tmp_path = tmp_path_factory.mktemp("sweep")
    config = load_experiment(write_experiment(tmp_path))
    plan = prepare_sweep(config, cache_dir)
    summary = run_sweep(plan, cache_dir=cache_dir)
    return config, plan, summary


def test_every_point_finishes_once_and_every_curve_is_a_finished_child_run(finished_sweep) -> None:
    config, plan, summary = finished_sweep
    assert summary.points_total == 2 * 2 * 2 * 2 == summary.points_finished
    records = point_records(config)
    assert sorted(record.point_key for record in records) == sorted(p.point_key for p in plan.points)
    assert {record.status for record in records} == {"FINISHED"}
    runs = child_runs(config.tracking.uri, config.name)
    assert sorted((run.data.params["layer"], run.data.params["feature"]) for run in runs) == [
        ("1", "3"), ("1", "40"), ("2", "3"), ("2", "40")]
    assert {run.info.status for run in runs} == {"FINISHED"}
    assert {run.data.metrics["curve/points_finished"] for run in runs} == {4.0}, "2 prompts x 2 scales"
    parent = MlflowClient(config.tracking.uri).get_run(summary.parent_run_id)
    assert parent.info.status == "FINISHED"


def test_validate_bounds_the_tokens_a_run_counts(finished_sweep) -> None:
    config, plan, summary = finished_sweep
    bound = outline(config).tokens
    assert bound == len(plan.points) * config.sampling.max_new_tokens
    assert 0 < summary.generated_tokens <= bound


def test_the_logged_config_of_synthetic_saes_has_no_gemma_scope_width(finished_sweep, tmp_path) -> None:
    config, _, summary = finished_sweep
    path = MlflowClient(config.tracking.uri).download_artifacts(summary.parent_run_id, "config/experiment.yaml",
                                                                str(tmp_path))
    logged = yaml.safe_load(Path(path).read_text())
    assert logged["sae"] == {"source": "synthetic", "site": "res", "width_features": None, "target_l0": 16.0,
                             "seed": 0}


def test_each_point_carries_its_params_and_metrics(finished_sweep) -> None:
    config, plan, _ = finished_sweep
    record = next(r for r in point_records(config) if r.params["scale"] == 30.0)
    assert {"model", "sae_id", "layer", "feature", "scale", "seed", "temperature", "prompt_index",
            "max_new_tokens"} <= set(record.params)
    assert record.params["model"] == "synthetic:tiny:seed0"
    assert record.params["sae_id"] == (f"synthetic:layer_{record.params['layer']}/width_256/target_l0_16/seed0"
                                       "@tiny:seed0")
    assert record.curve_key in {p.curve_key for p in plan.points} and record.worker
    metrics = record.metrics
    assert metrics["gen/measured_tokens"] > 0
    assert 0 < metrics["steer/l0"] < 256
    assert 0 <= metrics["steer/feature_firing_rate"] <= 1


def test_steering_changes_the_feature_reading(finished_sweep) -> None:
    config, _, _ = finished_sweep
    by_scale: dict[float, list[float]] = {0.0: [], 30.0: []}
    for record in point_records(config):
        by_scale[record.params["scale"]].append(record.metrics["steer/feature_activation"])
    assert min(by_scale[30.0]) > max(by_scale[0.0])


def test_greedy_sweep_is_reproducible_and_a_rerun_resumes(finished_sweep, tmp_path, cache_dir) -> None:
    config, plan, _ = finished_sweep
    again = load_experiment(write_experiment(tmp_path))  # same sweep, fresh tracking database
    summary = run_sweep(prepare_sweep(again, cache_dir), cache_dir=cache_dir)
    assert summary.points_finished == len(plan.points)
    assert token_ids_by_point(again) == token_ids_by_point(config)

    resumed = run_sweep(prepare_sweep(again, cache_dir), cache_dir=cache_dir)
    assert (resumed.points_skipped, resumed.points_finished) == (len(plan.points), 0)
    assert len(point_records(again)) == len(plan.points)
    assert len(child_runs(again.tracking.uri, again.name)) == 4


def test_a_whole_sweep_compiles_once(finished_sweep) -> None:
    _, plan, summary = finished_sweep
    assert len(plan.jobs) == 2 and summary.compilations == 1


def test_every_point_carries_the_judge_free_steering_metrics(finished_sweep) -> None:
    config, _, _ = finished_sweep
    records = point_records(config)
    expected = {"steer/nll", "steer/perplexity", "steer/kl_steered_base", "steer/kl_base_steered",
                "steer/concept_rate", "steer/concept_activation", "steer/logit_lens_mass", "gen/distinct_1",
                "gen/distinct_2", "gen/longest_repeat"}
    for record in records:
        assert expected <= set(record.metrics), sorted(expected - set(record.metrics))
    nll_by_scale: dict[float, list[float]] = {0.0: [], 30.0: []}
    for record in records:
        nll_by_scale[record.params["scale"]].append(record.metrics["steer/nll"])
        if record.params["scale"] == 0.0:
            assert abs(record.metrics["steer/kl_steered_base"]) < 1e-5
    # Steering pushes generations away from what the unsteered model expects: mean NLL rises with the scale.
    assert np.mean(nll_by_scale[30.0]) > np.mean(nll_by_scale[0.0])


def test_scale_zero_points_share_one_baseline_generation_per_prompt(finished_sweep) -> None:
    config, plan, _ = finished_sweep
    ids = token_ids_by_point(config)
    baselines: dict[int, set[tuple[int, ...]]] = {}
    for point in plan.points:
        if point.is_baseline:
            baselines.setdefault(point.prompt_index, set()).add(tuple(ids[point.point_key]))
    assert [len(generations) for generations in baselines.values()] == [1, 1]
    assert len({point.generation_key for point in plan.points}) == len(plan.points) - 8 + 2  # 8 baselines, 2 rows


# ---------------------------------------------------------------------------------------------------------------
# SAE evaluation sweeps

LAYER_SWEEP = Path(__file__).parent.parent / "experiments" / "synthetic_layer_sweep.yaml"


@pytest.fixture(scope="module")
def evaluation_sweep(tmp_path_factory, cache_dir):
    """The shipped synthetic layer sweep (4 layers x 3 target L0s), tracked in a fresh database."""
    tmp_path = tmp_path_factory.mktemp("evaluation")
    config = load_experiment(LAYER_SWEEP, [f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    plan = prepare_sweep(config, cache_dir)
    return config, plan, run_sweep(plan, cache_dir=cache_dir), tmp_path


def test_an_evaluation_sweep_logs_one_finished_run_per_sae(evaluation_sweep) -> None:
    config, plan, summary, _ = evaluation_sweep
    assert (summary.points_total, summary.points_finished, summary.points_failed) == (12, 12, 0)
    runs = child_runs(config.tracking.uri, config.name)
    assert sorted(run.data.tags["point_key"] for run in runs) == sorted(p.point_key for p in plan.points)
    for run in runs:
        params, metrics = run.data.params, run.data.metrics
        assert (params["site"], params["width"], params["text"]) == ("res", "256", "bundled:eval_text.txt")
        target = float(params["l0_target"])
        assert 0.5 * target < metrics["sae/l0"] < 1.5 * target, "calibrated on other text, near its target"
        assert metrics["density/n_tokens"] == 16 * 63, "BOS never counted"
        assert {"sae/fvu", "sae/cosine_similarity", "lm/delta_loss", "lm/kl_spliced", "lm/ce_loss_score",
                "density/n_dead", "density/mean_log10"} <= set(metrics)
    assert MlflowClient(config.tracking.uri).get_run(summary.parent_run_id).info.status == "FINISHED"


def test_each_sae_run_carries_its_density_histogram_and_top_features(evaluation_sweep) -> None:
    config, _, _, tmp_path = evaluation_sweep
    client = MlflowClient(config.tracking.uri)
    run = child_runs(config.tracking.uri, config.name)[0]
    files = {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
    assert files == {"density.npy", "density_histogram.png", "top_features.json", "l0_histogram.json"}
    local = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "artifacts")))
    density = np.load(local / "density.npy", allow_pickle=False)
    assert density.shape == (256,) and density.sum() == pytest.approx(run.data.metrics["sae/l0"], rel=1e-9)
    assert (local / "density_histogram.png").read_bytes()[:4] == b"\x89PNG"
    table = json.loads((local / "top_features.json").read_text())
    assert table["columns"][:3] == ["sequence", "position", "token"] and len(table["data"]) == 4 * 63
    assert sum(json.loads((local / "l0_histogram.json").read_text())) == 16 * 63


def test_the_parent_run_has_the_sae_table_and_the_frontier_and_by_layer_plots(evaluation_sweep) -> None:
    config, _, summary, tmp_path = evaluation_sweep
    client = MlflowClient(config.tracking.uri)
    files = {a.path for a in client.list_artifacts(summary.parent_run_id)}
    assert {"sae_metrics.json", "plots", "config"} <= files
    plots = {a.path for a in client.list_artifacts(summary.parent_run_id, "plots")}
    assert plots == {"plots/sae_frontier.png", "plots/sae_by_layer.png"}
    table = pd.read_json(client.download_artifacts(summary.parent_run_id, "sae_metrics.json", str(tmp_path)),
                         orient="split")
    assert len(table) == 12 and {"layer", "width", "l0_target", "sae/l0", "lm/delta_loss"} <= set(table.columns)
    # The frontier the plot draws: on every layer, more active latents reconstruct better.
    for _, layer in table.groupby("layer"):
        ordered = layer.sort_values("sae/l0")
        assert list(ordered["sae/fvu"]) == sorted(ordered["sae/fvu"], reverse=True)


def test_a_rerun_of_an_evaluation_sweep_skips_every_finished_sae(evaluation_sweep, cache_dir) -> None:
    config, plan, _, _ = evaluation_sweep
    again = run_sweep(prepare_sweep(config, cache_dir), cache_dir=cache_dir)
    assert (again.points_skipped, again.points_finished) == (len(plan.points), 0)
    assert len(child_runs(config.tracking.uri, config.name)) == len(plan.points)


def test_the_parent_run_records_the_config_without_the_credentials_of_its_tracking_uri(tmp_path) -> None:
    from runner.driver import _as_logged

    config = load_experiment(write_experiment(tmp_path))
    uri = "postgresql://db.internal/mlflow?user=runner&password=hunter2&sslmode=require"
    with_secret = config.model_copy(update={"tracking": config.tracking.model_copy(update={"uri": uri})})
    logged = _as_logged(with_secret).to_yaml()
    assert "hunter2" not in logged
    assert "postgresql://db.internal/mlflow?user=runner&password=***&sslmode=require" in logged
    assert _as_logged(config) is config, "a URI without secrets is logged as it is"


# ---------------------------------------------------------------------------------------------------------------
# Failures and a killed driver: every point exactly once


class FailingFirstJob(LocalExecutor):
    """Runs jobs locally, but the first job of the sweep raises (its points fail)."""

    def run(self, jobs, on_result, on_failure) -> None:
        def fail_first(job, results) -> None:
            if job is jobs[0]:
                on_failure(job, "RuntimeError: injected failure", 1)
            else:
                on_result(job, results)

        super().run(jobs, fail_first, on_failure)


def test_a_failed_point_runs_again_on_the_next_run_and_only_it(tmp_path, cache_dir) -> None:
    config = load_experiment(write_experiment(tmp_path, name="fails-once"))
    plan = prepare_sweep(config, cache_dir)
    worker = SteeringWorker(**plan.worker_args(), cache_dir=cache_dir)
    first = run_sweep(plan, cache_dir=cache_dir, executor=FailingFirstJob(plan, cache_dir, worker))
    failed = {point.point_key for point in plan.jobs[0].points}
    assert (first.points_finished, first.points_failed) == (16 - len(failed), len(failed))
    assert {r.point_key for r in point_records(config) if r.status == "FAILED"} == failed

    computed = []

    class Recording(LocalExecutor):
        def run(self, jobs, on_result, on_failure) -> None:
            computed.extend(point.point_key for job in jobs for point in job.points)
            super().run(jobs, on_result, on_failure)

    second = run_sweep(plan, cache_dir=cache_dir, executor=Recording(plan, cache_dir, worker))
    assert set(computed) == failed, "only the failed points run again"
    assert (second.points_finished, second.points_failed, second.points_skipped) == (len(failed), 0, 16 - len(failed))
    records = point_records(config)
    assert len(records) == 16 and {record.status for record in records} == {"FINISHED"}
    assert MlflowClient(config.tracking.uri).get_run(second.parent_run_id).info.status == "FINISHED"


def write_large_experiment(directory: Path) -> Path:
    """2,000 points on the tiny model: 2 prompts x 50 features x 10 scales x 2 seeds, 8 tokens each."""
    config = {
        "name": "killed-at-2000",
        "model": {"source": "synthetic", "preset": "tiny"},
        "sae": {"source": "synthetic", "target_l0": 16},
        "prompts": ["The most iconic structure on Earth is", "Once upon a time"],
        "steering": {"layers": [1], "features": list(range(50)), "scales": [0, 5, 10, 20, 30, 40, 60, 80, 120, 160],
                     "seeds": [0, 1]},
        "sampling": {"max_new_tokens": 8, "temperature": 0.7},
        "tracking": {"uri": "sqlite:///mlflow.db"},
        "cluster": {"workers": 1, "resources": {"CPU": 1}},
    }
    path = directory / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.long  # 2,000 points, about 100 s: tests/test_search_sweep.py and the Ray host tests kill smaller ones
def test_a_driver_killed_mid_sweep_finishes_every_point_exactly_once_when_run_again(tmp_path, cache_dir,
                                                                                   monkeypatch) -> None:
    path = write_large_experiment(tmp_path)
    config = load_experiment(path, ["tracking.uri=sqlite:///" + str(tmp_path / "mlflow.db")])
    command = [sys.executable, "-m", "runner.cli", "run", str(path), "--cache-dir", str(cache_dir)]
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    with (tmp_path / "first-run.log").open("w") as log:
        driver = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while len(list(tmp_path.glob("mlruns/*/*/artifacts/points/*.json"))) < 8:  # 8 of 32 jobs logged
                assert driver.poll() is None, (tmp_path / "first-run.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the sweep did not get going"
                time.sleep(0.05)
            driver.send_signal(signal.SIGKILL)
            driver.wait()
        finally:
            driver.kill()
            kill_process_group(driver.pid)  # the local Ray it started

    before = {record.point_key for record in point_records(config)}
    assert 8 * 50 < len(before) < 2000, f"killed mid-sweep ({len(before)} of 2000 logged)"
    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{2000 - len(before)} points finished, 0 failed, {len(before)} already done" in again.stdout

    monkeypatch.chdir(tmp_path)
    exported = CliRunner().invoke(app, ["export", str(path), "--format", "parquet", "--out", "points.parquet"])
    assert exported.exit_code == 0, exported.output
    frame = pd.read_parquet(tmp_path / "points.parquet")
    plan_keys = {point.point_key for point in prepare_sweep(config, cache_dir).points}
    assert len(frame) == 2000 and set(frame["point_key"]) == plan_keys, "every point exactly once"
    assert frame["run_id"].notna().all() and frame["run_id"].nunique() == 50, "each point in its curve's run"
    curves = child_runs(config.tracking.uri, config.name)
    assert len(curves) == 50 and {run.info.status for run in curves} == {"FINISHED"}
