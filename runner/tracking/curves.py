"""Steering curves, the unit a researcher compares: one intervention (layer, feature, mode, steering positions)
across the sweep's scales, aggregated over its prompts and seeds.

- `plan_curves`: the curves a sweep's points form, each with the points it needs and its MLflow params.
- `scale_statistics`: per curve and scale, each metric's mean over the finished points, the 95% interval of that
  mean (Student's t over the prompts x seeds, `runner.stats.interval_bounds`) and the number of points.
- `summarize`: a curve's summary metrics (`curve/*`): the smallest scale at which the mean `steer/concept_rate`
  reaches 0.5, the NLL and KL there, and the largest concept rate reached.
- `rank_curves`: the curves from most to least steerable by those summaries.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from runner.plan.points import SteeringPoint
from runner.stats import Interval, interval_bounds, mean_interval

if TYPE_CHECKING:
    import pandas as pd

    from runner.tracking.records import PointRecord

SCALE_METRIC = "steer/scale"
#: A curve run's per-scale count of the samples (prompts x seeds) its means and intervals are over.
SAMPLES_METRIC = "steer/samples"
CONCEPT_METRIC = "steer/concept_rate"
NLL_METRIC = "steer/nll"
KL_METRIC = "steer/kl_steered_base"
#: The mean concept rate at which a curve counts as steered.
CONCEPT_TARGET = 0.5
SCALE_AT_TARGET = f"curve/scale_at_concept_rate_{CONCEPT_TARGET:g}"
NLL_AT_TARGET = f"curve/nll_at_concept_rate_{CONCEPT_TARGET:g}"
KL_AT_TARGET = f"curve/kl_at_concept_rate_{CONCEPT_TARGET:g}"
MAX_CONCEPT = "curve/max_concept_rate"
SCALE_AT_MAX_CONCEPT = "curve/scale_at_max_concept_rate"
POINTS_FINISHED = "curve/points_finished"
POINTS_FAILED = "curve/points_failed"
#: The metrics a curve run logs per scale (its steps): the main steering metrics. Every metric of every point is
#: in the run's points table.
CURVE_METRICS = (
    "steer/feature_activation",
    CONCEPT_METRIC,
    "steer/logit_lens_mass",
    "steer/l0",
    NLL_METRIC,
    KL_METRIC,
    "gen/distinct_2",
    "gen/num_tokens",
)
#: Point params that vary along a curve, so are not the curve run's params.
_ALONG_THE_CURVE = ("scale", "seed", "prompt_index")
_MAX_PARAM_CHARS = 6000


@dataclasses.dataclass(frozen=True)
class CurvePlan:
    """One steering curve of a sweep, as planned.

    Attributes:
      curve_key: `SteeringPoint.curve_key` of its points.
      layer, feature, mode, positions: The intervention.
      neuronpedia_url: The feature's dashboard, when known.
      scales: The sweep's scales on this curve, ascending; a run's metric step `i` is `scales[i]`.
      point_keys: Every point of the curve (its scales x prompts x seeds).
      params: The curve run's MLflow params: the points' params that do not vary along the curve, and the scales,
        seeds and number of prompts.
    """

    curve_key: str
    layer: int
    feature: int
    mode: str
    positions: str
    neuronpedia_url: str | None
    scales: tuple[float, ...]
    point_keys: frozenset[str]
    params: Mapping[str, str]

    @property
    def run_name(self) -> str:
        """`L20 f3124` (with the mode and positions when they are not `add` and `all`)."""
        extras = [part for part, default in ((self.mode, "add"), (self.positions, "all")) if part != default]
        return " ".join([f"L{self.layer} f{self.feature}", *extras])

    def step(self, scale: float) -> int:
        """The metric step of `scale` on this curve."""
        return self.scales.index(float(scale))


def plan_curves(points: Iterable[SteeringPoint]) -> dict[str, CurvePlan]:
    """The curves `points` form, in the order their first points come."""
    grouped: dict[str, list[SteeringPoint]] = {}
    for point in points:
        grouped.setdefault(point.curve_key, []).append(point)
    return {key: _curve_plan(key, members) for key, members in grouped.items()}


def _curve_plan(key: str, points: Sequence[SteeringPoint]) -> CurvePlan:
    first = points[0]
    scales = tuple(sorted({point.scale for point in points}))
    params = {name: value for name, value in first.params().items() if name not in _ALONG_THE_CURVE}
    params.update(
        scales=_param_text(json.dumps([_number(scale) for scale in scales])),
        seeds=_param_text(json.dumps(sorted({point.seed for point in points}))),
        prompts=str(len({point.prompt_index for point in points})),
        num_points=str(len(points)),
    )
    return CurvePlan(key, first.layer, first.feature, first.mode, first.positions, first.neuronpedia_url, scales,
                     frozenset(point.point_key for point in points), params)


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def _param_text(text: str) -> str:
    return text if len(text) <= _MAX_PARAM_CHARS else text[: _MAX_PARAM_CHARS - 3] + "..."


def scale_statistics(frame: pd.DataFrame, metrics: Sequence[str], by: Sequence[str] = ("curve_key", "scale")
                     ) -> pd.DataFrame:
    """Per group of `by` (a curve and scale by default) of a points table (`records_frame`): for each of `metrics`
    the table has, its `mean`, the `low` and `high` ends of its 95% interval (`runner.stats.interval_bounds`) and
    the count `n`. Columns are (metric, statistic)."""
    import pandas as pd

    metrics = [metric for metric in metrics if metric in frame.columns]
    grouped = frame.groupby(list(by), sort=True)[metrics]
    mean, std, count = grouped.mean(), grouped.std(ddof=1), grouped.count()
    parts = {}
    for metric in metrics:
        low, high = interval_bounds(mean[metric], std[metric], count[metric])
        parts[metric] = pd.DataFrame({"mean": mean[metric], "low": low, "high": high, "n": count[metric]},
                                     index=mean.index)
    return pd.concat(parts, axis=1) if parts else pd.DataFrame(index=mean.index)


def scale_means(records: Sequence[PointRecord]) -> dict[float, dict[str, float]]:
    """Per scale, each metric's mean over the finished `records` (prompts x seeds); a metric that is not finite on
    some point is left out of that scale."""
    sums: dict[float, dict[str, list[float]]] = {}
    for record in records:
        by_metric = sums.setdefault(float(record.params["scale"]), {})
        for name, value in record.metrics.items():
            by_metric.setdefault(name, []).append(value)
    return {scale: {name: math.fsum(values) / len(values) for name, values in by_metric.items()
                    if all(math.isfinite(value) for value in values)}
            for scale, by_metric in sorted(sums.items())}


def scale_intervals(records: Sequence[PointRecord], metrics: Sequence[str]) -> dict[float, dict[str, Interval]]:
    """Per scale, each of `metrics`' mean over the finished `records` (prompts x seeds) with its 95% Student-t
    interval and sample count (`runner.stats.mean_interval`; non-finite values are left out)."""
    values: dict[float, dict[str, list[float]]] = {}
    for record in records:
        by_metric = values.setdefault(float(record.params["scale"]), {})
        for name in metrics:
            value = record.metrics.get(name)
            if value is not None and math.isfinite(value):
                by_metric.setdefault(name, []).append(value)
    return {scale: {name: mean_interval(samples) for name, samples in by_metric.items()}
            for scale, by_metric in sorted(values.items())}


def summarize(means: Mapping[float, Mapping[str, float]]) -> dict[str, float]:
    """A curve's summary metrics from its per-scale means (`scale -> metric -> mean`).

    `curve/scale_at_concept_rate_0.5` is the smallest scale (by magnitude) whose mean `steer/concept_rate` is at
    least 0.5, with `curve/nll_at_concept_rate_0.5` and `curve/kl_at_concept_rate_0.5` (`steer/nll`,
    `steer/kl_steered_base`) there; the three are left out when no scale reaches it. `curve/max_concept_rate` is
    the largest mean concept rate, at `curve/scale_at_max_concept_rate` (the smallest such scale).
    """
    rates = {scale: values[CONCEPT_METRIC] for scale, values in means.items()
             if CONCEPT_METRIC in values and not math.isnan(values[CONCEPT_METRIC])}
    if not rates:
        return {}
    by_magnitude = sorted(rates, key=lambda scale: (abs(scale), scale))
    best = max(rates.values())
    summary = {MAX_CONCEPT: best, SCALE_AT_MAX_CONCEPT: next(s for s in by_magnitude if rates[s] == best)}
    reached = next((scale for scale in by_magnitude if rates[scale] >= CONCEPT_TARGET), None)
    if reached is not None:
        summary[SCALE_AT_TARGET] = reached
        for name, metric in ((NLL_AT_TARGET, NLL_METRIC), (KL_AT_TARGET, KL_METRIC)):
            if metric in means[reached]:
                summary[name] = means[reached][metric]
    return summary


def rank_curves(summaries: Mapping[str, Mapping[str, float]]) -> list[str]:
    """Curve keys from most to least steerable: those that reach the target first, by the scale they need
    (smallest first), then the rest by their largest concept rate (largest first)."""
    def order(key: str) -> tuple[float, float, float]:
        summary = summaries[key]
        scale = summary.get(SCALE_AT_TARGET)
        return (0.0 if scale is not None else 1.0, abs(scale) if scale is not None else 0.0,
                -summary.get(MAX_CONCEPT, -math.inf))

    return sorted(summaries, key=order)
