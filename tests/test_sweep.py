"""A steering sweep end to end on the tiny model: YAML -> plan -> worker -> MLflow, reproducible and resumable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from runner.config import load_experiment
from runner.sweep import prepare_sweep, run_sweep

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


def token_ids_by_point(uri: str, experiment: str, scratch: Path) -> dict[str, list[int]]:
    client = MlflowClient(uri)
    ids = {}
    for run in child_runs(uri, experiment):
        path = client.download_artifacts(run.info.run_id, "generation.json", str(scratch))
        ids[run.data.tags["point_key"]] = json.loads(Path(path).read_text())["token_ids"]
    return ids


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory, cache_dir):
    tmp_path = tmp_path_factory.mktemp("sweep")
    config = load_experiment(write_experiment(tmp_path))
    plan = prepare_sweep(config, cache_dir)
    summary = run_sweep(plan, cache_dir=cache_dir)
    return config, plan, summary


def test_every_point_is_one_finished_child_run(finished_sweep) -> None:
    config, plan, summary = finished_sweep
    assert summary.points_total == 2 * 2 * 2 * 2 == summary.points_finished
    runs = child_runs(config.tracking.uri, config.name)
    assert sorted(run.data.tags["point_key"] for run in runs) == sorted(p.point_key for p in plan.points)
    assert {run.info.status for run in runs} == {"FINISHED"}
    parent = MlflowClient(config.tracking.uri).get_run(summary.parent_run_id)
    assert parent.info.status == "FINISHED"


def test_child_runs_carry_params_tags_and_metrics(finished_sweep) -> None:
    config, plan, _ = finished_sweep
    run = next(r for r in child_runs(config.tracking.uri, config.name) if r.data.params["scale"] == "30.0")
    params = run.data.params
    assert {"model", "sae_id", "layer", "feature", "scale", "seed", "temperature", "prompt_index",
            "max_new_tokens"} <= set(params)
    assert params["model"] == "synthetic:tiny:seed0" and params["sae_id"].startswith("synthetic:")
    assert run.data.tags["sweep_id"] == plan.sweep_id
    metrics = run.data.metrics
    assert metrics["gen/measured_tokens"] > 0
    assert 0 < metrics["steer/l0"] < 256
    assert 0 <= metrics["steer/feature_firing_rate"] <= 1


def test_steering_changes_the_feature_reading(finished_sweep) -> None:
    config, _, _ = finished_sweep
    by_scale: dict[str, list[float]] = {"0.0": [], "30.0": []}
    for run in child_runs(config.tracking.uri, config.name):
        by_scale[run.data.params["scale"]].append(run.data.metrics["steer/feature_activation"])
    assert min(by_scale["30.0"]) > max(by_scale["0.0"])


def test_greedy_sweep_is_reproducible_and_a_rerun_resumes(finished_sweep, tmp_path, cache_dir) -> None:
    config, plan, _ = finished_sweep
    again = load_experiment(write_experiment(tmp_path))  # same sweep, fresh tracking database
    summary = run_sweep(prepare_sweep(again, cache_dir), cache_dir=cache_dir)
    assert summary.points_finished == len(plan.points)
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    assert token_ids_by_point(again.tracking.uri, again.name, second) == token_ids_by_point(
        config.tracking.uri, config.name, first
    )

    resumed = run_sweep(prepare_sweep(again, cache_dir), cache_dir=cache_dir)
    assert (resumed.points_skipped, resumed.points_finished) == (len(plan.points), 0)
    assert len(child_runs(again.tracking.uri, again.name)) == len(plan.points)


def test_a_whole_sweep_compiles_once(finished_sweep) -> None:
    _, plan, summary = finished_sweep
    assert len(plan.jobs) == 2 and summary.compilations == 1


def test_every_point_carries_the_judge_free_steering_metrics(finished_sweep) -> None:
    config, _, _ = finished_sweep
    runs = child_runs(config.tracking.uri, config.name)
    expected = {"steer/nll", "steer/perplexity", "steer/kl_steered_base", "steer/kl_base_steered",
                "steer/concept_rate", "steer/concept_activation", "steer/logit_lens_mass", "gen/distinct_1",
                "gen/distinct_2", "gen/longest_repeat"}
    for run in runs:
        assert expected <= set(run.data.metrics), sorted(expected - set(run.data.metrics))
    nll_by_scale: dict[str, list[float]] = {"0.0": [], "30.0": []}
    for run in runs:
        nll_by_scale[run.data.params["scale"]].append(run.data.metrics["steer/nll"])
        if run.data.params["scale"] == "0.0":
            assert abs(run.data.metrics["steer/kl_steered_base"]) < 1e-5
    # Steering pushes generations away from what the unsteered model expects: mean NLL rises with the scale.
    assert sum(nll_by_scale["30.0"]) / len(nll_by_scale["30.0"]) > sum(nll_by_scale["0.0"]) / len(nll_by_scale["0.0"])


def test_scale_zero_points_share_one_baseline_generation_per_prompt(finished_sweep, tmp_path) -> None:
    config, plan, _ = finished_sweep
    ids = token_ids_by_point(config.tracking.uri, config.name, tmp_path)
    baselines: dict[int, set[tuple[int, ...]]] = {}
    for point in plan.points:
        if point.is_baseline:
            baselines.setdefault(point.prompt_index, set()).add(tuple(ids[point.point_key]))
    assert [len(generations) for generations in baselines.values()] == [1, 1]
    assert len({point.generation_key for point in plan.points}) == len(plan.points) - 8 + 2  # 8 baselines, 2 rows
