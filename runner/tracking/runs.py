"""What the two layouts of a sweep's child runs share: the open sweep they write to, and how a run is ended
while something else has gone wrong.

`runner.tracking.curve_runs` lays a steering sweep out (point records on the parent, a child run per curve);
`runner.tracking.point_runs` an SAE evaluation (a child run per SAE). `SweepTracker` opens the sweep and hands
each layout a `SweepRuns`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

from runner.errors import first_line
from runner.plan.points import Point
from runner.redaction import scrub
from runner.results import Result
from runner.tracking.clients import TrackingClients
from runner.tracking.layout import TAG_ERROR, TAG_PARENT, TAG_ROLE
from runner.tracking.search import search_all

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SweepRuns:
    """The open sweep a layout writes to.

    Attributes:
      clients: The sweep's MLflow clients.
      experiment_id: Its experiment.
      parent_run_id: Its parent run.
      parent_artifact_uri: Where the parent's artifacts go.
      sweep_id: `runner.plan.points.sweep_id` of its config.
    """

    clients: TrackingClients
    experiment_id: str
    parent_run_id: str
    parent_artifact_uri: str
    sweep_id: str

    def children(self, role: str, extra_filter: str = "") -> list[Run]:
        """The parent's (active) child runs of `role`, page after page."""
        query = f"tags.`{TAG_PARENT}` = '{self.parent_run_id}' AND tags.`{TAG_ROLE}` = '{role}'"
        if extra_filter:
            query += f" AND {extra_filter}"
        return search_all(self.clients.client, self.experiment_id, query)


class ChildRuns(Protocol):
    """A layout of a sweep's child runs (see the module docstring)."""

    def finished_point_keys(self) -> set[str]:
        """The points with a FINISHED result."""

    def point_counts(self) -> dict[str, int]:
        """`points_finished` and `points_failed`."""

    def counts(self) -> dict[str, int]:
        """The counts the parent shows when the sweep closes (`point_counts` and the layout's own)."""

    def log_results(self, points: list[Point], results: list[Result],
                    also: Callable[[MlflowClient], None] | None = None) -> None:
        """Logs finished points (a point that already finished keeps its first result) and makes the request
        `also` meanwhile."""

    def fail_points(self, points: list[Point], error: str, attempt: int,
                    also: Callable[[MlflowClient], None] | None = None) -> None:
        """Records points whose job failed (a point that already finished keeps its result) and makes the
        request `also` meanwhile."""

    def end_running(self, status: str) -> None:
        """Ends the child runs left RUNNING (a sweep that stops while one is being logged) with `status`."""

    def write_parent_files(self, directory: Path) -> list[str]:
        """Writes the parent's tables, plots and report into `directory`; returns the paths (relative to it) of
        the files that are MLflow tables."""


def terminate_quietly(client: MlflowClient, run_id: str, status: str, error: str) -> None:
    """Ends a run with an error tag; never raises (used while another error propagates)."""
    try:
        client.set_tag(run_id, TAG_ERROR, truncate(scrub(error)))
        client.set_terminated(run_id, status)
    except Exception as failure:  # noqa: BLE001 - the original error matters more
        _log.warning("could not mark run %s %s: %s", run_id, status, first_line(str(failure)))


def truncate(text: str) -> str:
    """`text` cut to what an MLflow tag holds."""
    return text if len(text) <= MAX_TAG_VAL_LENGTH else text[: MAX_TAG_VAL_LENGTH - 3] + "..."


def now_ms() -> int:
    """MLflow's timestamp of now."""
    return int(time.time() * 1000)
