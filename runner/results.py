"""What one steered generation produced, as it travels from a worker back to the tracker."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping


@dataclasses.dataclass(frozen=True)
class PointResult:
    """The outcome of one steering point.

    Attributes:
      point_key: `SteeringPoint.point_key` of the point this result belongs to.
      text: The generated continuation (prompt excluded).
      token_ids: The generated token ids.
      metrics: Scalar metrics of the generation (names are MLflow metric keys).
      worker: Which worker produced it (host name or actor id).
      attempt: 1 for the first try, incremented on each retry.
    """

    point_key: str
    text: str
    token_ids: tuple[int, ...]
    metrics: Mapping[str, float]
    worker: str = "local"
    attempt: int = 1

    def __post_init__(self) -> None:
        # Normalise numpy scalars and lists so results pickle small and serialise to JSON as-is.
        object.__setattr__(self, "token_ids", tuple(int(t) for t in self.token_ids))
        object.__setattr__(self, "metrics", {str(k): float(v) for k, v in self.metrics.items()})
