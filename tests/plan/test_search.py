"""runner.plan.search: the smallest scale that meets a target, the largest that keeps a bound, in few rounds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from runner.plan.search import Criterion, CurveSearch, SearchSettings, uniform_grid_generations

PROMPTS_X_SEEDS = [(prompt, seed) for prompt in range(3) for seed in range(2)]
CONCEPT = Criterion("steer/concept_rate", "at_least", 0.5)
FLUENCY = Criterion("steer/nll", "at_most", 1.0, above_baseline=True)


def concept_rate(scale: float, crossing: float, noise: float, rng: np.random.Generator) -> float:
    """A feature whose concept rate rises linearly through 0.5 at `crossing` (0 far below, 1 far above)."""
    return float(np.clip(0.5 + (scale - crossing) / 100 + rng.normal(0, noise), 0.0, 1.0))


def run(settings: SearchSettings, metrics_at, seed: int = 0) -> CurveSearch:
    """Drives a search round by round, evaluating every candidate on all (prompt, seed) samples."""
    rng = np.random.default_rng(seed)
    search = CurveSearch(settings)
    while not search.done:
        for scale in search.candidates():
            search.record(scale, {key: metrics_at(scale, key, rng) for key in PROMPTS_X_SEEDS})
        search.end_round()
    return search


def test_the_search_finds_the_crossing_within_tolerance_with_fewer_generations_than_a_grid() -> None:
    settings = SearchSettings(target=CONCEPT, keep=None, low=0, high=400, tolerance=5, max_rounds=8)
    search = run(settings, lambda scale, key, rng: {"steer/concept_rate": concept_rate(scale, 154.0, 0.01, rng)})
    summary = search.summary()
    grid = uniform_grid_generations(settings, len(PROMPTS_X_SEEDS))
    print(f"search: {summary.generations} generations in {summary.rounds} rounds, found {summary.found_scale}; "
          f"uniform grid of spacing 5 over [0, 400]: {grid} generations")
    assert summary.status == "found" and summary.converged
    # The interval (not just the mean) clears 0.5 within a few scale units above the true crossing.
    assert 154.0 <= summary.found_scale <= 154.0 + settings.tolerance + 2.0
    assert summary.bracket[1] - summary.bracket[0] <= settings.tolerance
    assert summary.target_at_found.low >= 0.5 and summary.target_at_found.n == len(PROMPTS_X_SEEDS)
    assert summary.generations < grid
    assert summary.rounds <= settings.max_rounds


def test_a_target_no_scale_reaches_ends_not_reached_with_the_best_scale_tried() -> None:
    settings = SearchSettings(target=CONCEPT, keep=None, low=0, high=100, tolerance=5, max_rounds=4, max_growth=2)
    capped = lambda scale, key, rng: {"steer/concept_rate": min(0.3, scale / 1000) + rng.normal(0, 0.001)}  # noqa: E731
    search = run(settings, capped)
    summary = search.summary()
    assert summary.status == "not_reached" and math.isnan(summary.found_scale)
    assert summary.rounds <= settings.max_rounds
    assert summary.best_scale == max(search.samples), "the highest scale tried has the best concept rate"
    assert max(search.samples) == 400, "the upper end doubled twice (max_growth) while the target was out of reach"


def test_a_straddling_interval_says_more_samples_are_needed() -> None:
    settings = SearchSettings(target=CONCEPT, keep=None, low=0, high=100, tolerance=5, max_rounds=3, max_growth=0)
    noisy = lambda scale, key, rng: {"steer/concept_rate": 0.5 + rng.normal(0, 0.3)}  # noqa: E731
    summary = run(settings, noisy).summary()
    assert summary.status == "inconclusive"


def test_the_bound_is_searched_from_the_other_side_against_the_paired_baseline() -> None:
    def metrics(scale, key, rng):
        prompt_offset = 2.0 * key[0]  # prompts differ in NLL; the paired difference cancels it
        return {"steer/concept_rate": concept_rate(scale, 100.0, 0.01, rng),
                "steer/nll": prompt_offset + scale / 80 + rng.normal(0, 0.01)}

    settings = SearchSettings(target=CONCEPT, keep=FLUENCY, low=0, high=400, tolerance=5, max_rounds=8)
    summary = run(settings, metrics).summary()
    # NLL rises 1.0 above the baseline at scale 80: the largest scale kept is just below it; the target (about
    # 100) is met only beyond the bound.
    assert 80 - settings.tolerance - 2 <= summary.kept_scale < 80
    assert summary.status == "bound_violated"
    assert summary.keep_at_kept is not None and summary.keep_at_kept.high <= 1.0


def test_replaying_the_recorded_rounds_gives_the_same_search() -> None:
    settings = SearchSettings(target=CONCEPT, keep=None, low=0, high=400, tolerance=5, max_rounds=8)
    finished = run(settings, lambda scale, key, rng: {"steer/concept_rate": concept_rate(scale, 230.0, 0.01, rng)})
    replayed = CurveSearch(settings)
    rounds = []
    while not replayed.done:  # a resumed driver replays rounds from the samples it reads back
        candidates = replayed.candidates()
        rounds.append(candidates)
        for scale in candidates:
            replayed.record(scale, finished.samples[scale])
        replayed.end_round()
    assert replayed.summary() == finished.summary()
    assert sorted(scale for round_ in rounds for scale in round_) == sorted(finished.samples)


def test_a_round_cannot_end_without_its_samples() -> None:
    search = CurveSearch(SearchSettings(target=CONCEPT, keep=None, low=0, high=10, tolerance=1, max_rounds=2))
    search.candidates()
    with pytest.raises(ValueError, match="without samples"):
        search.end_round()
