"""Steering curves: which points form a curve, their means per scale with 95% intervals, the summaries and the
order from most to least steerable."""

import math

import numpy as np
import pandas as pd
import pytest

from runner.config.schema import ExperimentConfig
from runner.plan.points import expand_points
from runner.results import PointResult
from runner.tracking import curves
from runner.tracking.records import PointRecord


def sweep_points(mode: str = "add"):
    config = ExperimentConfig.model_validate({
        "name": "demo", "model": {"source": "synthetic"}, "sae": {"source": "synthetic"},
        "prompts": ["a", "b"],
        "steering": {"layers": [1, 2], "features": [3, 5], "scales": [20, 0, 10], "seeds": [0, 1], "mode": mode},
    })
    return expand_points(config, {1: "sae-1", 2: "sae-2"}, lambda layer, feature: f"https://np/{layer}/{feature}")


def test_a_curve_is_one_intervention_across_the_scales_prompts_and_seeds() -> None:
    points = sweep_points()
    plans = curves.plan_curves(points)
    assert len(plans) == 4
    plan = next(plan for plan in plans.values() if (plan.layer, plan.feature) == (2, 5))
    assert plan.point_keys == {p.point_key for p in points if (p.layer, p.feature) == (2, 5)}
    assert len(plan.point_keys) == 3 * 2 * 2
    assert plan.scales == (0.0, 10.0, 20.0) and plan.step(20) == 2
    assert (plan.run_name, plan.neuronpedia_url) == ("L2 f5", "https://np/2/5")
    assert plan.params["scales"] == "[0, 10, 20]" and plan.params["seeds"] == "[0, 1]"
    assert plan.params["prompts"] == "2" and plan.params["sae_id"] == "sae-2"
    assert not {"scale", "seed", "prompt_index"} & set(plan.params)
    clamped = curves.plan_curves(sweep_points("clamp"))
    assert next(iter(clamped.values())).run_name == "L1 f3 clamp"
    assert not set(clamped) & set(plans), "another mode is another curve"


def test_a_curve_run_gets_each_scale_s_mean_with_its_interval_and_sample_count() -> None:
    points = [p for p in sweep_points() if (p.layer, p.feature) == (1, 3)]
    records = [PointRecord.finished(point, PointResult(point.point_key, "x", (1,), {
        "steer/nll": float(point.scale) + point.seed + 2 * point.prompt_index, "steer/kl_steered_base": math.nan}))
        for point in points]
    intervals = curves.scale_intervals(records, ["steer/nll", "steer/kl_steered_base"])
    assert sorted(intervals) == [0.0, 10.0, 20.0]
    at_ten = intervals[10.0]["steer/nll"]
    samples = [10.0, 11.0, 12.0, 13.0]  # prompts 0/1 x seeds 0/1
    assert (at_ten.mean, at_ten.n) == (np.mean(samples), 4)
    assert at_ten.low == pytest.approx(np.mean(samples) - 3.182446305 * np.std(samples, ddof=1) / 2)
    assert "steer/kl_steered_base" not in intervals[10.0], "non-finite samples are left out"


def test_scale_statistics_of_a_points_table() -> None:
    frame = pd.DataFrame({"curve_key": ["c"] * 4, "scale": [0.0, 0.0, 10.0, 10.0],
                          "steer/nll": [1.0, 3.0, 5.0, np.nan]})
    stats = curves.scale_statistics(frame, ["steer/nll", "not/there"])
    assert list(stats.columns.get_level_values(0).unique()) == ["steer/nll"]
    assert stats.loc[("c", 0.0), ("steer/nll", "mean")] == 2.0 and stats.loc[("c", 0.0), ("steer/nll", "n")] == 2
    assert stats.loc[("c", 10.0), ("steer/nll", "n")] == 1 and np.isnan(stats.loc[("c", 10.0), ("steer/nll", "low")])


def test_the_summary_is_the_smallest_scale_that_reaches_a_concept_rate_of_one_half() -> None:
    means = {0.0: {"steer/concept_rate": 0.1, "steer/nll": 1.0}, -10.0: {"steer/concept_rate": 0.6},
             10.0: {"steer/concept_rate": 0.55, "steer/nll": 2.0, "steer/kl_steered_base": 0.3},
             40.0: {"steer/concept_rate": 0.9}}
    assert curves.summarize(means) == {
        "curve/max_concept_rate": 0.9, "curve/scale_at_max_concept_rate": 40.0,
        "curve/scale_at_concept_rate_0.5": -10.0}, "by magnitude, the negative first of a tie; no NLL or KL there"
    del means[-10.0]
    assert curves.summarize(means) == {
        "curve/max_concept_rate": 0.9, "curve/scale_at_max_concept_rate": 40.0,
        "curve/scale_at_concept_rate_0.5": 10.0, "curve/nll_at_concept_rate_0.5": 2.0,
        "curve/kl_at_concept_rate_0.5": 0.3}
    assert curves.summarize({0.0: {"steer/concept_rate": 0.2}}) == {
        "curve/max_concept_rate": 0.2, "curve/scale_at_max_concept_rate": 0.0}, "not reached: no scale"
    assert curves.summarize({0.0: {"steer/nll": 1.0}}) == {}


def test_curves_rank_by_the_scale_they_need_then_by_the_concept_rate_they_reach() -> None:
    summaries = {
        "late": {"curve/scale_at_concept_rate_0.5": 40.0, "curve/max_concept_rate": 0.9},
        "early": {"curve/scale_at_concept_rate_0.5": 10.0, "curve/max_concept_rate": 0.6},
        "close": {"curve/max_concept_rate": 0.45},
        "never": {"curve/max_concept_rate": 0.05},
        "unmeasured": {},
    }
    assert curves.rank_curves(summaries) == ["early", "late", "close", "never", "unmeasured"]
