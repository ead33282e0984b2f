"""Reading a sweep back from MLflow: its parent run, every child run (paged), and the summary `runner runs` and
`--resume` print."""

from __future__ import annotations

from pathlib import Path
from typing import TypedDict

from mlflow import MlflowClient
from mlflow.entities import Run

from runner.config.locations import sqlite_file
from runner.tracking.layout import TAG_PARENT, TAG_ROLE, TAG_SWEEP_ID

#: Runs per search call (MLflow's largest page is 50000; 1000 keeps each answer small).
_PAGE = 1000


class SweepSummary(TypedDict):
    """What `sweep_status` reports of a sweep.

    Attributes:
      experiment_id: The MLflow experiment, None when it does not exist.
      sweep_id: The sweep asked about.
      parent_run_id: The sweep's parent run, None when the sweep never started.
      parent_status: The parent run's status (e.g. "RUNNING", "FINISHED"), else None.
      num_points: The parent's `num_points` param, else None.
      children: Child run counts by status.
    """

    experiment_id: str | None
    sweep_id: str
    parent_run_id: str | None
    parent_status: str | None
    num_points: int | None
    children: dict[str, int]


def search_all(client: MlflowClient, experiment_id: str | None, query: str) -> list[Run]:
    """Every run of the experiment that matches the MLflow search `query`, page after page."""
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], query, max_results=_PAGE, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def find_sweep_parent(client: MlflowClient, experiment_id: str, sweep_id: str) -> Run | None:
    """The newest parent run of the sweep in the experiment, or None."""
    runs = client.search_runs(
        [experiment_id],
        f"tags.{TAG_SWEEP_ID} = '{sweep_id}' AND tags.`{TAG_ROLE}` = 'sweep'",
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    return runs[0] if runs else None


def sweep_status(uri: str, experiment_name: str, sweep_id: str) -> SweepSummary:
    """Summarises a sweep for `runner runs` and `--resume` checks (see `SweepSummary`). Without such an experiment
    or sweep, the ids, `parent_status` and `num_points` are None and `children` is empty. A local store that does
    not exist yet is not created (MLflow would create an empty one just to read it)."""
    summary = SweepSummary(experiment_id=None, sweep_id=sweep_id, parent_run_id=None, parent_status=None,
                           num_points=None, children={})
    database = sqlite_file(uri)
    if database is not None and not Path(database).exists():
        return summary
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return summary
    summary["experiment_id"] = experiment.experiment_id
    parent = find_sweep_parent(client, experiment.experiment_id, sweep_id)
    if parent is None:
        return summary
    counts: dict[str, int] = {}
    for run in search_all(client, experiment.experiment_id, f"tags.{TAG_PARENT} = '{parent.info.run_id}'"):
        counts[run.info.status] = counts.get(run.info.status, 0) + 1
    num_points = parent.data.params.get("num_points")
    summary.update(
        parent_run_id=parent.info.run_id,
        parent_status=parent.info.status,
        num_points=int(num_points) if num_points is not None else None,
        children=counts,
    )
    return summary
