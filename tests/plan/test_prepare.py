"""One planner: `runner validate`'s outline (offline facts) and `runner run`'s plan (resolved facts) agree on the
points, jobs, job size, SAE widths and memory of a sweep, so the two can never drift apart."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.config.loading import load_experiment
from runner.config.schema import ExperimentConfig
from runner.plan.facts import OfflineFacts, ResolvedFacts
from runner.plan.prepare import SweepPlan, outline, outline_of, plan_sweep, prepare_sweep

EXPERIMENTS = Path(__file__).parents[2] / "experiments"


def grid_cells(sweep_plan: SweepPlan) -> list[tuple]:
    """Each point without what only a resolved plan knows (SAE ids, links, the text's digest)."""
    if sweep_plan.config.kind == "steering":
        return [(p.prompt_index, p.layer, p.feature, p.scale, p.seed, p.generation_key == p.point_key)
                for p in sweep_plan.points]
    return [(p.layer, p.site, p.width, p.l0) for p in sweep_plan.points]


def widths_by_layer(sweep_plan: SweepPlan) -> list[tuple[int, int]]:
    return sorted((f.layer, sweep_plan.d_sae[sae_id]) for sae_id, f in sweep_plan.sae_files.items())


def assert_plans_agree(config: ExperimentConfig, cache_dir: Path) -> None:
    offline = plan_sweep(config, OfflineFacts(config))
    resolved = prepare_sweep(config, cache_dir)
    assert grid_cells(offline) == grid_cells(resolved)
    assert [len(job.points) for job in offline.jobs] == [len(job.points) for job in resolved.jobs]
    assert (offline.batch_size, offline.saes_per_job) == (resolved.batch_size, resolved.saes_per_job)
    assert offline.architecture == resolved.architecture
    assert widths_by_layer(offline) == widths_by_layer(resolved)
    assert offline.memory is not None and offline.memory == resolved.memory
    assert outline(config) == outline_of(resolved)


def test_a_synthetic_steering_sweep_has_one_plan_offline_and_resolved(cache_dir) -> None:
    config = load_experiment(EXPERIMENTS / "quickstart.yaml", ["prompts=['Once upon a time', 'The sky is']"])
    assert_plans_agree(config, cache_dir)


def test_a_synthetic_steering_sweep_with_an_explicit_batch_and_width_has_one_plan(cache_dir) -> None:
    config = load_experiment(EXPERIMENTS / "quickstart.yaml", [
        "prompts=['Once upon a time']", "sampling.batch_size=4", "sae.width_features=128", "model.dtype=bfloat16",
        "cluster.workers=2",
    ])
    assert_plans_agree(config, cache_dir)


def test_a_synthetic_evaluation_sweep_has_one_plan_offline_and_resolved(cache_dir) -> None:
    config = load_experiment(EXPERIMENTS / "synthetic_layer_sweep.yaml", ["sae_eval.widths=['256', '512']"])
    assert_plans_agree(config, cache_dir)


def test_a_local_synthetic_checkpoint_is_planned_in_float32_like_it_loads(tiny_model_dir, cache_dir) -> None:
    config = load_experiment(EXPERIMENTS / "quickstart.yaml", [
        f"model={{source: local, path: '{tiny_model_dir}'}}", "prompts=['Once upon a time']",
    ])
    assert OfflineFacts(config).is_synthetic and ResolvedFacts.read(config, cache_dir).is_synthetic
    assert_plans_agree(config, cache_dir)


def test_the_offline_plan_estimates_prompt_lengths_from_their_bytes() -> None:
    config = load_experiment(EXPERIMENTS / "quickstart.yaml")
    assert OfflineFacts(config).prompt_token_counts(["", "abc", "x" * 30, "é"]) == (1, 2, 11, 2)


def test_the_outline_of_an_unpublished_architecture_has_points_but_no_memory(tmp_path) -> None:
    config = load_experiment(EXPERIMENTS / "quickstart.yaml", [f"model={{source: local, path: '{tmp_path}'}}"])
    sweep_plan = plan_sweep(config, OfflineFacts(config))
    assert sweep_plan.architecture is None and sweep_plan.memory is None and sweep_plan.d_sae == {}
    summary = outline(config)
    assert (summary.points, summary.jobs, summary.memory_bytes) == (2 * 2 * 3 * 3, 1, None)


@pytest.mark.parametrize("saes_per_job", ["auto", 3])
def test_an_evaluation_of_every_layer_of_an_unknown_model_has_no_points_yet(tmp_path, saes_per_job) -> None:
    config = load_experiment(EXPERIMENTS / "synthetic_layer_sweep.yaml", [
        f"model={{source: local, path: '{tmp_path}'}}", f"sae_eval.saes_per_job={saes_per_job}",
    ])
    summary = outline(config)
    assert (summary.points, summary.jobs, summary.tokens, summary.memory_bytes) == (0, 0, 0, None)
    assert summary.grid.startswith("every layer (count known after download) x 1 widths x 3 L0s")
