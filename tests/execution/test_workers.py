"""The host worker: one compiled program for a whole sweep, shared baselines, one result per point in order."""

from __future__ import annotations

import jax
import pytest

from runner.config.schema import ExperimentConfig
from runner.execution.workers import SteeringWorker, sae_cache
from runner.plan.prepare import prepare_sweep
from runner.sae.params import load_sae

SWEEP = {
    "name": "worker-test",
    "model": {"source": "synthetic", "preset": "tiny"},
    "sae": {"source": "synthetic"},
    "prompts": ["The most iconic structure on Earth is"],
    "steering": {"layers": [0, 1, 3], "features": [2, 50, 100, 200], "scales": [0, 5, 10, 20, 40], "seeds": [0]},
    "sampling": {"max_new_tokens": 4, "temperature": 0.8, "batch_size": 16},
}


@pytest.fixture(scope="module")
def sweep_plan(cache_dir):
    return prepare_sweep(ExperimentConfig.model_validate(SWEEP), cache_dir)


def test_one_compilation_for_3_layers_x_4_features_x_5_scales(sweep_plan, cache_dir) -> None:
    assert len(sweep_plan.points) == 3 * 4 * 5
    worker = SteeringWorker(**sweep_plan.worker_args(), cache_dir=cache_dir)
    points = [point for job in sweep_plan.jobs for point in job.points]
    results = [result for job in sweep_plan.jobs for result in worker.run_job(job)]
    assert len(sweep_plan.jobs) > 1
    assert worker.compilations == 1
    assert [r.point_key for r in results] == [p.point_key for p in points]
    assert sorted(p.point_key for p in points) == sorted(p.point_key for p in sweep_plan.points)
    # The 12 scale-0 points share one unsteered generation: 48 steered rows + 1 baseline row in all.
    assert len({p.generation_key for p in sweep_plan.points}) == 49
    assert len({result.token_ids for result, point in zip(results, points, strict=True) if point.is_baseline}) == 1


def test_a_second_worker_of_the_sweep_reuses_the_traced_programs(sweep_plan, tmp_path) -> None:
    first = SteeringWorker(**sweep_plan.worker_args(), cache_dir=tmp_path)
    first_results = first.run_job(sweep_plan.jobs[0])
    assert (first.program_cache.hits, first.program_cache.misses) == (0, 2)  # the sampler and the metrics program

    second = SteeringWorker(**sweep_plan.worker_args(), cache_dir=tmp_path)
    second_results = second.run_job(sweep_plan.jobs[0])
    assert (second.program_cache.hits, second.program_cache.misses) == (2, 0)
    assert second.compilations == 1
    assert [(r.point_key, r.token_ids, r.metrics) for r in second_results] == [
        (r.point_key, r.token_ids, r.metrics) for r in first_results
    ]


def test_the_sae_cache_keeps_the_most_recent_saes_that_fit_and_always_the_last(tiny_sae_paths) -> None:
    saes = {layer: load_sae(path, sae_id=f"tiny/{layer}", layer=layer) for layer, path in tiny_sae_paths.items()}
    size = sum(leaf.nbytes for leaf in jax.tree.leaves(saes[0].sae))
    assert all(sum(leaf.nbytes for leaf in jax.tree.leaves(sae.sae)) == size for sae in saes.values())

    cache = sae_cache(int(2.5 * size))
    for layer in (0, 1):
        cache[f"tiny/{layer}"] = saes[layer]
    assert cache.get("tiny/0") is saes[0], "a read makes tiny/0 the most recent"
    cache["tiny/2"] = saes[2]
    assert sorted(cache) == ["tiny/0", "tiny/2"], "the least recently used goes first"

    small = sae_cache(size // 2)
    small["tiny/0"] = saes[0]
    assert list(small) == ["tiny/0"], "an SAE larger than the budget still stays"
    small["tiny/1"] = saes[1]
    assert list(small) == ["tiny/1"], "... until the next one"
    nothing = sae_cache(0)
    nothing["tiny/0"], nothing["tiny/1"] = saes[0], saes[1]
    assert list(nothing) == ["tiny/1"], "no budget at all: the last SAE stays"
