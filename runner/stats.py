"""Uncertainty of a metric aggregated over prompts and seeds: the mean with a 95% Student-t interval.

A steering point's metric is one sample per (prompt, seed); the samples of a (layer, feature, scale) are
independent draws of the generation under that steering (distinct prompts, distinct random streams). Their mean
gets a two-sided Student-t interval, `mean ± t_{n-1, 1-α/2} · s / √n` (docs/metrics.md#uncertainty). The t
interval is the honest choice at the sample sizes sweeps have (a handful of prompts times seeds): a percentile
bootstrap of n < 10 samples covers the mean well below its nominal level, while the t interval keeps it for
normal samples and stays conservative for the bounded rates most steering metrics are. One sample gives an
unbounded interval: nothing can be concluded from it.

`paired_differences` pairs the samples of two scales by (prompt, seed): all scales of a (prompt, seed) share one
random stream, so a difference against the unsteered baseline cancels what the prompt and the stream add.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Iterable, Mapping
from typing import Any

import numpy as np
from scipy.special import stdtrit  # Student's t quantile; scipy.stats would take a second to import

CONFIDENCE = 0.95


@dataclasses.dataclass(frozen=True)
class Interval:
    """A mean and its confidence interval.

    Attributes:
      mean: The sample mean (NaN without samples).
      low, high: The interval's ends (infinite with fewer than two samples).
      n: Number of samples.
      confidence: The interval's nominal coverage.
    """

    mean: float
    low: float
    high: float
    n: int
    confidence: float = CONFIDENCE

    @property
    def half_width(self) -> float:
        """Half the interval's width."""
        return (self.high - self.low) / 2

    def at_least(self, threshold: float) -> bool | None:
        """True when the whole interval is at or above `threshold`, False when it is wholly below, None when it
        straddles the threshold (more samples are needed to tell)."""
        if self.low >= threshold:
            return True
        if self.high < threshold:
            return False
        return None

    def at_most(self, threshold: float) -> bool | None:
        """True when the whole interval is at or below `threshold`, False when it is wholly above, None when it
        straddles it."""
        if self.high <= threshold:
            return True
        if self.low > threshold:
            return False
        return None


def mean_interval(samples: Iterable[float], confidence: float = CONFIDENCE) -> Interval:
    """The mean of `samples` (NaNs dropped) with a two-sided Student-t interval at `confidence`."""
    values = np.asarray([value for value in samples if not math.isnan(value)], np.float64)
    n = int(values.size)
    if n == 0:
        return Interval(math.nan, -math.inf, math.inf, 0, confidence)
    mean = float(values.mean())
    if n == 1:
        return Interval(mean, -math.inf, math.inf, 1, confidence)
    low, high = interval_bounds(mean, values.std(ddof=1), n, confidence)
    return Interval(mean, float(low), float(high), n, confidence)


def interval_bounds(mean: Any, std: Any, count: Any, confidence: float = CONFIDENCE) -> tuple[np.ndarray, np.ndarray]:
    """The ends of the Student-t interval of means over `count` samples with standard deviation `std` (ddof 1),
    elementwise: `mean -/+ t(count - 1) * std / sqrt(count)`; NaN where fewer than two samples give no interval.
    (`mean_interval` of a table's columns at once.)"""
    mean, std, count = (np.asarray(value, np.float64) for value in (mean, std, count))
    half = stdtrit(np.maximum(count - 1, 1), 0.5 + confidence / 2) * std / np.sqrt(np.maximum(count, 1))
    half = np.where(count >= 2, half, np.nan)
    return mean - half, mean + half


def paired_differences(
    samples: Mapping[Hashable, float], baseline: Mapping[Hashable, float]
) -> list[float]:
    """`samples[k] - baseline[k]` for every key (e.g. `(prompt_index, seed)`) present in both."""
    return [samples[key] - baseline[key] for key in samples if key in baseline]
