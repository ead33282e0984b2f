"""Adaptive steering-scale search: for one steering curve (a layer and feature across scales), the smallest scale
that meets a target and the largest that keeps a fluency bound, found in rounds instead of a guessed grid.

A round evaluates a few candidate scales of every unfinished curve (each scale on all of the experiment's prompts
and seeds); the results narrow each curve's brackets, and the next round's candidates lie inside them. A scale
*meets* the target only when the 95% interval of its metric over prompts and seeds clears the threshold
(`runner.stats`), *fails* it when the interval lies wholly on the other side, and is *undecided* otherwise. The
target is assumed monotone in the scale: the search keeps the largest failing scale below the smallest meeting
one, and bisects between the meeting scale and its nearest evaluated neighbour below until they are `tolerance`
apart. When no scale up to the bracket's upper end meets the target, the upper end doubles (at most `max_growth`
times). The fluency bound is searched the same way from the other side (the largest scale that keeps it below the
smallest that breaks it).

Everything here is pure: a `CurveSearch` is a function of the samples recorded round by round, so a search
killed mid-way resumes by replaying the rounds whose points already finished.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Literal

from runner.config.schema import SearchConfig, SearchCriterionConfig
from runner.stats import CONFIDENCE, Interval, mean_interval, paired_differences

#: Samples of one scale: the metrics of each (prompt_index, seed).
ScaleSamples = Mapping[Hashable, Mapping[str, float]]
SearchStatus = Literal["found", "not_reached", "bound_violated", "inconclusive"]


@dataclasses.dataclass(frozen=True)
class Criterion:
    """What a curve's metric must do at a scale.

    Attributes:
      metric: A steering metric name (e.g. `steer/concept_rate`).
      direction: `at_least` (the metric must reach `threshold`) or `at_most` (stay at or below it).
      threshold: The bound.
      above_baseline: The bound is on the metric's difference from the unsteered baseline (scale 0), paired by
        prompt and seed (e.g. `steer/nll` at most 1.0 above the baseline's).
    """

    metric: str
    direction: Literal["at_least", "at_most"]
    threshold: float
    above_baseline: bool = False

    def judge(self, interval: Interval) -> bool | None:
        """True when the interval clears the bound, False when it lies wholly on the wrong side, else None."""
        if self.direction == "at_least":
            return interval.at_least(self.threshold)
        return interval.at_most(self.threshold)


@dataclasses.dataclass(frozen=True)
class SearchSettings:
    """How one curve is searched (the experiment's `search` section).

    Attributes:
      target: What "steering worked" means; the search finds the smallest scale that meets it.
      keep: A bound the steered generation must keep (e.g. its NLL); the search finds the largest scale within
        it. None: no bound.
      low, high: The scale bracket searched first.
      tolerance: A curve's scale is found once its bracket is this narrow.
      max_rounds: Rounds at most.
      candidates_per_round: Scales evaluated per bracket and round (the first round adds `low` and `high`).
      max_growth: Times the upper end may double while the target is not reached.
      confidence: Coverage of the intervals.
    """

    target: Criterion
    keep: Criterion | None
    low: float
    high: float
    tolerance: float
    max_rounds: int
    candidates_per_round: int = 3
    max_growth: int = 4
    confidence: float = CONFIDENCE

    @classmethod
    def from_config(cls, search: SearchConfig) -> SearchSettings:
        """The settings of an experiment's `search` section."""

        def criterion(config: SearchCriterionConfig) -> Criterion:
            direction, threshold, above_baseline = config.bound
            return Criterion(config.metric, direction, threshold, above_baseline)

        return cls(
            target=criterion(search.target),
            keep=criterion(search.keep) if search.keep is not None else None,
            low=search.scales.low,
            high=search.scales.high,
            tolerance=search.tolerance,
            max_rounds=search.max_rounds,
            candidates_per_round=search.candidates_per_round,
            max_growth=search.max_growth,
        )

    @property
    def needs_baseline(self) -> bool:
        """Whether scale 0 must be evaluated (a bound relative to the unsteered baseline)."""
        return self.target.above_baseline or (self.keep is not None and self.keep.above_baseline)


@dataclasses.dataclass(frozen=True)
class SearchSummary:
    """What the search concluded for one curve.

    Attributes:
      status: `found` (a scale meets the target within the bound), `bound_violated` (the smallest scale that
        meets the target breaks the bound), `not_reached` (no scale in range reaches the target), `inconclusive`
        (no scale's interval clears the target although some straddle it: more prompts or seeds are needed).
      found_scale: The smallest evaluated scale that meets the target (NaN when none does).
      kept_scale: The largest evaluated scale within the bound (NaN without a bound, or when none keeps it).
      best_scale: The scale with the best mean of the target metric (the answer when the target is not reached).
      target_at_found: The target metric's interval at `found_scale` (else at `best_scale`).
      keep_at_kept: The bound metric's interval at `kept_scale` (None without a bound).
      bracket: `(largest failing, found)` scales of the target, NaN where unknown.
      converged: Whether a scale was found and its bracket is within `tolerance`.
      rounds: Rounds run.
      generations: Generations evaluated (scales times prompts times seeds; a shared baseline counted once).
    """

    status: SearchStatus
    found_scale: float
    kept_scale: float
    best_scale: float
    target_at_found: Interval
    keep_at_kept: Interval | None
    bracket: tuple[float, float]
    converged: bool
    rounds: int
    generations: int


    def metrics(self) -> dict[str, float]:
        """The summary as MLflow metrics: `search/found_scale`, `search/kept_scale`, `search/best_scale`,
        `search/rounds`, `search/generations`, and the target metric at the found (else best) scale with its
        interval and sample count (`search/target_mean`, `_low`, `_high`, `_n`); the bound's at the kept scale
        likewise (`search/keep_*`). What is unknown (NaN, or an interval's infinite end) is left out."""
        metrics = {
            "search/found_scale": self.found_scale,
            "search/kept_scale": self.kept_scale,
            "search/best_scale": self.best_scale,
            "search/rounds": float(self.rounds),
            "search/generations": float(self.generations),
        }
        for prefix, interval in (("search/target", self.target_at_found), ("search/keep", self.keep_at_kept)):
            if interval is not None:
                metrics.update({f"{prefix}_mean": interval.mean, f"{prefix}_low": interval.low,
                                f"{prefix}_high": interval.high, f"{prefix}_n": float(interval.n)})
        return {name: value for name, value in metrics.items() if math.isfinite(value)}

    def tags(self, settings: SearchSettings) -> dict[str, str]:
        """`search/status`, and what the target and the bound were (`search/target`, `search/keep`)."""
        tags = {"search/status": self.status, "search/target": _describe(settings.target)}
        if settings.keep is not None:
            tags["search/keep"] = _describe(settings.keep)
        return tags


def _describe(criterion: Criterion) -> str:
    relative = " above baseline" if criterion.above_baseline else ""
    return f"{criterion.metric} {criterion.direction} {criterion.threshold:g}{relative}"


class CurveSearch:
    """The search of one curve: call `candidates()`, evaluate those scales, `record` their samples, `end_round()`,
    until `done`."""

    def __init__(self, settings: SearchSettings):
        self.settings = settings
        self.samples: dict[float, ScaleSamples] = {}
        self.rounds = 0
        self._high = float(settings.high)
        self._growth = 0
        self._planned: list[float] | None = None

    # -- rounds -------------------------------------------------------------------------------------------------

    def candidates(self) -> list[float]:
        """The scales the next round evaluates, smallest first (empty once the search is done)."""
        if self._planned is None:
            self._planned = [] if self.done else self._plan()
        return list(self._planned)

    def record(self, scale: float, samples: ScaleSamples) -> None:
        """Adds the samples of one evaluated scale (`(prompt_index, seed) -> metrics`)."""
        self.samples[float(scale)] = {key: dict(metrics) for key, metrics in samples.items()}

    def end_round(self) -> None:
        """Closes the round whose candidates were recorded; the next `candidates()` plans from everything so far."""
        missing = [scale for scale in self._planned or [] if scale not in self.samples]
        if missing:
            raise ValueError(f"round {self.rounds + 1} ended without samples for scales {missing}")
        self.rounds += 1
        if self._should_grow():
            self._growth += 1
            self._high *= 2
        self._planned = None

    @property
    def done(self) -> bool:
        """Whether the search has concluded (both brackets settled, the target out of reach, or no rounds left)."""
        if self.rounds >= self.settings.max_rounds:
            return True
        if self.rounds == 0:
            return False
        return self._high in self.samples and not self._target_candidates() and not self._keep_candidates()

    # -- judgement ----------------------------------------------------------------------------------------------

    def interval(self, criterion: Criterion, scale: float) -> Interval:
        """The interval of `criterion`'s metric at `scale` (its paired difference from scale 0 when the criterion
        is relative to the baseline)."""
        values = {key: metrics.get(criterion.metric, math.nan) for key, metrics in self.samples[scale].items()}
        if criterion.above_baseline:
            baseline = self.samples.get(0.0)
            if baseline is None:
                return mean_interval([], self.settings.confidence)
            base = {key: metrics.get(criterion.metric, math.nan) for key, metrics in baseline.items()}
            return mean_interval(paired_differences(values, base), self.settings.confidence)
        return mean_interval(values.values(), self.settings.confidence)

    def verdicts(self, criterion: Criterion) -> dict[float, bool | None]:
        """`criterion.judge` at every evaluated scale, by scale."""
        return {scale: criterion.judge(self.interval(criterion, scale)) for scale in sorted(self.samples)}

    def summary(self) -> SearchSummary:
        """What the search concluded so far (see `SearchSummary`)."""
        settings = self.settings
        target = self.verdicts(settings.target)
        found = self._found(target)
        means = {scale: self.interval(settings.target, scale).mean for scale in target}
        finite = {scale: mean for scale, mean in means.items() if not math.isnan(mean)}
        pick = max if settings.target.direction == "at_least" else min
        best = pick(finite, key=finite.__getitem__) if finite else math.nan
        kept = self._kept(self.verdicts(settings.keep)) if settings.keep is not None else None
        if found is not None:
            keeps = settings.keep is None or (kept is not None and found <= kept)
            status: SearchStatus = "found" if keeps else "bound_violated"
        else:
            status = "inconclusive" if any(verdict is None for verdict in target.values()) else "not_reached"
        failing = self._largest_failing_below(target, found if found is not None else math.inf)
        at = found if found is not None else best
        return SearchSummary(
            status=status,
            found_scale=found if found is not None else math.nan,
            kept_scale=kept if kept is not None else math.nan,
            best_scale=best,
            target_at_found=(self.interval(settings.target, at) if not math.isnan(at)
                             else mean_interval([], settings.confidence)),
            keep_at_kept=self.interval(settings.keep, kept) if settings.keep is not None and kept is not None else None,
            bracket=(failing if failing is not None else math.nan, found if found is not None else math.nan),
            converged=found is not None and not self._target_candidates(),
            rounds=self.rounds,
            generations=sum(len(samples) for samples in self.samples.values()),
        )

    # -- internals ----------------------------------------------------------------------------------------------

    def _plan(self) -> list[float]:
        if self.rounds == 0:
            settings, k = self.settings, self.settings.candidates_per_round
            first = {settings.low, settings.high}
            first |= {settings.low + (settings.high - settings.low) * i / (k + 1) for i in range(1, k + 1)}
            if settings.needs_baseline:
                first.add(0.0)
            return sorted(_rounded(scale) for scale in first)
        if self._high not in self.samples:  # the upper end just doubled
            return [self._high]
        return sorted(set(self._target_candidates()) | set(self._keep_candidates()))

    def _found(self, target: Mapping[float, bool | None]) -> float | None:
        meeting = [scale for scale, verdict in target.items() if verdict]
        return min(meeting) if meeting else None

    @staticmethod
    def _largest_failing_below(verdicts: Mapping[float, bool | None], limit: float) -> float | None:
        failing = [scale for scale, verdict in verdicts.items() if verdict is False and scale < limit]
        return max(failing) if failing else None

    @staticmethod
    def _kept(keep: Mapping[float, bool | None]) -> float | None:
        breaking = [scale for scale, verdict in keep.items() if verdict is False]
        limit = min(breaking) if breaking else math.inf
        keeping = [scale for scale, verdict in keep.items() if verdict and scale < limit]
        return max(keeping) if keeping else None

    def _target_candidates(self) -> list[float]:
        """Bisection points between the smallest meeting scale and its nearest evaluated scale below."""
        found = self._found(self.verdicts(self.settings.target))
        if found is None:
            return []
        below = [scale for scale in self.samples if scale < found]
        return self._between(max(below), found) if below else []

    def _keep_candidates(self) -> list[float]:
        """Bisection points between the largest scale within the bound and its nearest evaluated scale above."""
        if self.settings.keep is None:
            return []
        kept = self._kept(self.verdicts(self.settings.keep))
        if kept is None:
            return []
        above = [scale for scale in self.samples if scale > kept]
        return self._between(kept, min(above)) if above else []

    def _between(self, low: float, high: float) -> list[float]:
        if high - low <= self.settings.tolerance:
            return []
        k = self.settings.candidates_per_round
        points = {_rounded(low + (high - low) * i / (k + 1)) for i in range(1, k + 1)}
        return sorted(point for point in points if point not in self.samples and low < point < high)

    def _should_grow(self) -> bool:
        """After a round: no evaluated scale meets the target and the upper end failed it outright."""
        if self._growth >= self.settings.max_growth or self.rounds >= self.settings.max_rounds:
            return False
        if self._high not in self.samples:
            return False
        target = self.verdicts(self.settings.target)
        return self._found(target) is None and target[self._high] is False


def _rounded(scale: float) -> float:
    """Scales as logged: 6 significant digits, so a scale is the same float every time it is computed."""
    return float(f"{scale:.6g}")


def uniform_grid_generations(settings: SearchSettings, samples_per_scale: int) -> int:
    """Generations a uniform grid of `tolerance` spacing over `[low, high]` would take for one curve: the
    comparison the search is worth making against."""
    return (math.floor((settings.high - settings.low) / settings.tolerance + 1e-9) + 1) * samples_per_scale


def summaries(searches: Mapping[Hashable, CurveSearch]) -> dict[Hashable, SearchSummary]:
    """Each curve's summary, by curve."""
    return {curve: search.summary() for curve, search in searches.items()}


def next_round(searches: Mapping[Hashable, CurveSearch]) -> dict[Hashable, Sequence[float]]:
    """The candidate scales of every curve that is not done (the points of the next round, together)."""
    return {curve: search.candidates() for curve, search in searches.items() if not search.done}
