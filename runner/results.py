"""What a worker sends back for each point, as it travels to the tracker."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class PointResult:
    """The outcome of one steering point.

    Attributes:
      point_key: `SteeringPoint.point_key` of the point this result belongs to.
      text: The generated continuation (prompt excluded).
      token_ids: The generated token ids.
      metrics: Scalar metrics of the generation (names are MLflow metric keys).
      tags: Short texts about the point (MLflow tags), e.g. its feature's logit-lens tokens.
      worker: Which worker produced it (host name or actor id).
      attempt: 1 for the first try, incremented on each retry.
    """

    point_key: str
    text: str
    token_ids: tuple[int, ...]
    metrics: Mapping[str, float]
    tags: Mapping[str, str] = dataclasses.field(default_factory=dict)
    worker: str = "local"
    attempt: int = 1

    def __post_init__(self) -> None:
        # Normalise numpy scalars and lists so results pickle small and serialise to JSON as-is.
        object.__setattr__(self, "token_ids", tuple(int(t) for t in self.token_ids))
        object.__setattr__(self, "metrics", {str(k): float(v) for k, v in self.metrics.items()})
        object.__setattr__(self, "tags", {str(k): str(v) for k, v in self.tags.items()})

    @property
    def tokens(self) -> int:
        """Tokens generated."""
        return len(self.token_ids)


@dataclasses.dataclass(frozen=True)
class SAEMeasurement:
    """What an SAE evaluation measured for one SAE (`runner.sae_eval.evaluate.evaluate_saes`).

    Attributes:
      metrics: Scalar metrics (`sae/*`, `density/*`, `lm/*`; names are MLflow metric keys).
      density: `[d_sae]` firing frequency per latent (an artifact, not a metric).
      density_histogram: `[bins]` counts of `log10(density + 1e-10)`.
      density_histogram_edges: `[bins + 1]` bin edges on `[-10, 0]`.
      l0_histogram: `[d_sae + 1]` masked-token counts by L0.
      top_feature_rows: Table rows, one per masked position of the first sequences: `sequence`, `position`,
        `token` (id), `token_text`, `feature_ids` and `feature_values` (latents with `f > 0`, largest first;
        empty where L0 is 0).
    """

    metrics: Mapping[str, float]
    density: np.ndarray
    density_histogram: np.ndarray
    density_histogram_edges: np.ndarray
    l0_histogram: np.ndarray
    top_feature_rows: tuple[Mapping[str, Any], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "metrics", {str(k): float(v) for k, v in self.metrics.items()})
        object.__setattr__(self, "density", np.asarray(self.density, np.float64))
        object.__setattr__(self, "density_histogram", np.asarray(self.density_histogram, np.int64))
        object.__setattr__(self, "density_histogram_edges", np.asarray(self.density_histogram_edges, np.float64))
        object.__setattr__(self, "l0_histogram", np.asarray(self.l0_histogram, np.int64))
        object.__setattr__(self, "top_feature_rows", tuple(self.top_feature_rows))


@dataclasses.dataclass(frozen=True)
class SAEEvalPointResult:
    """The outcome of one SAE evaluation point.

    Attributes:
      point_key: `SAEEvalPoint.point_key` of the point this result belongs to.
      measurement: What was measured for the point's SAE.
      tags: Short texts about the point (MLflow tags).
      worker: Which worker produced it.
      attempt: 1 for the first try, incremented on each retry.
    """

    point_key: str
    measurement: SAEMeasurement
    tags: Mapping[str, str] = dataclasses.field(default_factory=dict)
    worker: str = "local"
    attempt: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "tags", {str(k): str(v) for k, v in self.tags.items()})

    @property
    def metrics(self) -> Mapping[str, float]:
        """The measurement's scalar metrics (what the point logs as MLflow metrics)."""
        return self.measurement.metrics

    @property
    def tokens(self) -> int:
        """Tokens the SAE was evaluated on (BOS and padding excluded)."""
        return int(self.metrics.get("density/n_tokens", 0))


@dataclasses.dataclass(frozen=True)
class FailedPoint:
    """A point of a job that could not be finished while the job's other points were (its result could not be
    made: an error that would happen again). The driver logs it FAILED with the error, once, without retries.

    Attributes:
      point_key: The point's key.
      error: What went wrong, in one line.
      tags: Short texts about the point (MLflow tags).
      worker: Which worker ran it.
      attempt: The attempt of its job.
    """

    point_key: str
    error: str
    tags: Mapping[str, str] = dataclasses.field(default_factory=dict)
    worker: str = "local"
    attempt: int = 1


Result = PointResult | SAEEvalPointResult
