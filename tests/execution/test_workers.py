"""The host worker: one compiled program for a whole sweep, shared baselines, one result per point in order; ids
the tokenizer does not know, and points whose result cannot be made."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import jax
import pytest

from runner.config.schema import ExperimentConfig
from runner.driver import run_sweep
from runner.execution.local import LocalExecutor
from runner.execution.workers import SteeringWorker, sae_cache
from runner.model import tokenizer as tokenizer_lib
from runner.plan.points import sweep_id
from runner.plan.prepare import prepare_sweep
from runner.sae.params import load_sae
from runner.tracking.records import PointRecord
from runner.tracking.search import sweep_parent, sweep_records

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


# ---------------------------------------------------------------------------------------------------------------
# A vocabulary larger than the tokenizer (Gemma2's Kaggle checkpoints: 256,128 rows, 256,000 pieces)

TOKENIZER_PIECES = 400  # the tiny model has 512 embedding rows


@pytest.fixture(scope="module")
def oversized_vocabulary_model(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model (512 embedding rows) with a tokenizer of 400 pieces."""
    directory = tmp_path_factory.mktemp("oversized-vocabulary") / "model"
    shutil.copytree(tiny_model_dir, directory)
    corpus = tokenizer_lib.CORPUS_PATH.read_text(encoding="utf-8").splitlines()
    tokenizer_lib.train_sentencepiece(corpus, TOKENIZER_PIECES, directory / "tokenizer.model")
    return directory


def sampled_sweep(tmp_path: Path, model_dir: Path, cache_dir: Path, **sampling) -> tuple[Any, dict[str, dict]]:
    """A temperature-1 sweep on `model_dir`, run and logged; returns the plan and each point's generation.json."""
    config = ExperimentConfig.model_validate({
        "name": "unknown-tokens",
        "model": {"source": "local", "path": str(model_dir)},
        "sae": {"source": "synthetic"},
        "prompts": ["The most iconic structure on Earth is", "Once upon a time"],
        "steering": {"layers": [1], "features": [3], "scales": [0, 20], "seeds": [0, 1]},
        "sampling": {"max_new_tokens": 12, "temperature": 1.0, **sampling},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    })
    sweep_plan = prepare_sweep(config, cache_dir)
    summary = run_sweep(sweep_plan, cache_dir=cache_dir, output_dir=tmp_path)
    assert (summary.points_finished, summary.points_failed) == (len(sweep_plan.points), 0)
    records = point_records(config)
    assert len(records) == len(sweep_plan.points) and {record.status for record in records} == {"FINISHED"}
    generations = {record.point_key: {"token_ids": list(record.token_ids), "text": record.text,
                                      "metrics": dict(record.metrics)} for record in records}
    return sweep_plan, generations


def point_records(config: ExperimentConfig) -> list[PointRecord]:
    """The sweep's point records, read back from its parent run."""
    parent = sweep_parent(config.tracking.uri, config.tracking.experiment, sweep_id(config))
    return list(sweep_records(config.tracking.uri, parent).values())


def test_ids_the_tokenizer_does_not_know_are_kept_and_shown_as_placeholders(
    oversized_vocabulary_model, tmp_path, cache_dir
) -> None:
    _, generations = sampled_sweep(tmp_path, oversized_vocabulary_model, cache_dir)
    unknown = [[token for token in g["token_ids"] if token >= TOKENIZER_PIECES] for g in generations.values()]
    assert sum(map(len, unknown)) > 0, "at temperature 1 a random model samples ids beyond the tokenizer"
    for generation, ids in zip(generations.values(), unknown, strict=True):
        assert generation["metrics"]["gen/unknown_tokens"] == len(ids)
        for token in ids:
            assert f"<unk-id:{token}>" in generation["text"]


def test_excluding_unknown_tokens_keeps_the_sampler_within_the_tokenizer(
    oversized_vocabulary_model, tmp_path, cache_dir
) -> None:
    sweep_plan, generations = sampled_sweep(tmp_path, oversized_vocabulary_model, cache_dir,
                                            exclude_unknown_tokens=True)
    assert all(point.exclude_unknown_tokens for point in sweep_plan.points)
    assert all(token < TOKENIZER_PIECES for g in generations.values() for token in g["token_ids"])
    assert all(g["metrics"]["gen/unknown_tokens"] == 0 and "<unk-id:" not in g["text"] for g in generations.values())
    assert sum(len(g["token_ids"]) for g in generations.values()) > 0


class BrokenPointWorker(SteeringWorker):
    """Cannot make the result of one point (as a decoder that raised on an unknown id once could not)."""

    broken: str = ""

    def _point_result(self, point, *args, **kwargs):
        if point.point_key == self.broken:
            raise IndexError("piece id is out of range.")
        return super()._point_result(point, *args, **kwargs)


def test_a_point_whose_result_cannot_be_made_fails_alone_once(sweep_plan, tmp_path, cache_dir) -> None:
    config = sweep_plan.config.model_copy(update={
        "tracking": sweep_plan.config.tracking.model_copy(update={"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}),
    })
    sweep = prepare_sweep(config, cache_dir)
    broken = sweep.points[5]
    worker_class = type("Broken", (BrokenPointWorker,), {"broken": broken.point_key})
    worker = worker_class(**sweep.worker_args(), cache_dir=cache_dir)
    summary = run_sweep(sweep, cache_dir=cache_dir, executor=LocalExecutor(sweep, cache_dir, worker),
                        output_dir=tmp_path)
    assert (summary.points_finished, summary.points_failed) == (len(sweep.points) - 1, 1)
    assert summary.faults["job_retries"] == 0
    failed = [record for record in point_records(config) if record.status == "FAILED"]
    assert [record.point_key for record in failed] == [broken.point_key]
    assert failed[0].error == "IndexError: piece id is out of range."
    assert failed[0].attempt == 1
