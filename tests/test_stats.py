"""runner.stats: means over prompts and seeds carry an honest 95% interval."""

from __future__ import annotations

import math

import numpy as np
import pytest

from runner.stats import Interval, interval_bounds, mean_interval, paired_differences


def test_the_interval_covers_the_true_mean_in_at_least_90_of_100_seeded_trials() -> None:
    true_mean, spread, samples = 0.4, 0.15, 6  # e.g. 3 prompts x 2 seeds of a concept rate
    covered = 0
    for trial in range(100):
        draws = np.random.default_rng(trial).normal(true_mean, spread, samples)
        interval = mean_interval(draws)
        covered += interval.low <= true_mean <= interval.high
    print(f"coverage of the 95% t-interval over 100 trials of n={samples}: {covered}")
    assert covered >= 90


def test_the_interval_is_a_t_interval_that_narrows_with_more_samples() -> None:
    values = [1.0, 2.0, 3.0, 4.0]
    interval = mean_interval(values)
    # mean 2.5, sample sd 1.291, t(3, 0.975) = 3.182: half-width 3.182 * 1.291 / 2
    assert interval.mean == pytest.approx(2.5)
    assert interval.half_width == pytest.approx(3.1824463 * 1.2909944 / 2, rel=1e-6)
    assert interval.n == 4
    wider = mean_interval(values[:2])
    assert wider.half_width > interval.half_width


def test_one_sample_concludes_nothing_and_none_has_no_mean() -> None:
    single = mean_interval([0.7])
    assert single.mean == 0.7 and math.isinf(single.low) and math.isinf(single.high)
    assert single.at_least(0.5) is None and single.at_most(0.5) is None
    empty = mean_interval([math.nan])
    assert empty.n == 0 and math.isnan(empty.mean)


def test_verdicts_need_the_whole_interval_on_one_side() -> None:
    interval = Interval(mean=0.6, low=0.55, high=0.65, n=4)
    assert interval.at_least(0.5) is True and interval.at_least(0.7) is False and interval.at_least(0.6) is None
    assert interval.at_most(0.7) is True and interval.at_most(0.5) is False and interval.at_most(0.6) is None


def test_differences_are_paired_by_prompt_and_seed() -> None:
    steered = {(0, 0): 3.0, (0, 1): 5.0, (1, 0): 4.0}
    baseline = {(0, 0): 2.5, (0, 1): 4.0, (2, 0): 9.9}
    assert paired_differences(steered, baseline) == [0.5, 1.0]


def test_the_interval_of_a_mean_is_students_t() -> None:
    low, high = interval_bounds([2.5], [np.std([1, 2, 3, 4], ddof=1)], [4])
    half = 3.182446305 * np.std([1, 2, 3, 4], ddof=1) / 2  # t(3) at 97.5%
    assert (low[0], high[0]) == pytest.approx((2.5 - half, 2.5 + half))
    single = interval_bounds([1.0], [np.nan], [1])
    assert np.isnan(single[0][0]) and np.isnan(single[1][0]), "one sample has no interval"


def test_the_interval_covers_the_true_mean_about_95_times_in_100() -> None:
    rng = np.random.default_rng(0)
    samples = rng.normal(3.0, 2.0, size=(2000, 6))
    low, high = interval_bounds(samples.mean(1), samples.std(1, ddof=1), np.full(2000, 6))
    assert 0.93 < np.mean((low <= 3.0) & (high >= 3.0)) < 0.97
