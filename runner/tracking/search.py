"""Reading a sweep back from MLflow: its parent run, every child run (paged), its point records, and the summary
`runner runs` and `--resume` print."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TypedDict

from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

from runner.config.locations import sqlite_file
from runner.tracking.layout import TAG_KIND, TAG_PARENT, TAG_ROLE, TAG_SWEEP_ID
from runner.tracking.records import PointRecord, download_records, status_counts

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
      kind: The sweep's kind ("steering" or "sae_eval"), else None.
      children: Child run counts by status (a steering sweep's curve runs, an SAE evaluation's SAE runs).
      points: Point counts by status (FINISHED, FAILED; points not logged yet are in neither).
    """

    experiment_id: str | None
    sweep_id: str
    parent_run_id: str | None
    parent_status: str | None
    num_points: int | None
    kind: str | None
    children: dict[str, int]
    points: dict[str, int]


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


def sweep_records(uri: str, parent: Run) -> dict[str, PointRecord]:
    """A steering sweep's point records (`runner.tracking.records`), one per point, read from its parent run."""
    with tempfile.TemporaryDirectory(prefix="runner-records-") as scratch:
        return download_records(get_artifact_repository(parent.info.artifact_uri, tracking_uri=uri), Path(scratch))


def sweep_status(uri: str, experiment_name: str, sweep_id: str, *, count_points: bool = True) -> SweepSummary:
    """Summarises a sweep for `runner runs` and `--resume` checks (see `SweepSummary`). Without such an experiment
    or sweep, the ids, `parent_status`, `num_points` and `kind` are None and the counts are empty. Without
    `count_points`, a steering sweep's records are not read (its `points` stay empty). A local store that does not
    exist yet is not created (MLflow would create an empty one just to read it)."""
    summary = SweepSummary(experiment_id=None, sweep_id=sweep_id, parent_run_id=None, parent_status=None,
                           num_points=None, kind=None, children={}, points={})
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
    kind = parent.data.tags.get(TAG_KIND)
    summary.update(
        parent_run_id=parent.info.run_id,
        parent_status=parent.info.status,
        num_points=int(num_points) if num_points is not None else None,
        kind=kind,
        children=counts,
        points=(status_counts(sweep_records(uri, parent)) if count_points else {}) if kind == "steering" else counts,
    )
    return summary


def sweep_parent(uri: str, experiment_name: str, sweep_id: str) -> Run | None:
    """The sweep's parent run (read as `sweep_status` reads it), or None when the sweep has no runs."""
    status = sweep_status(uri, experiment_name, sweep_id, count_points=False)
    if status["parent_run_id"] is None:
        return None
    return MlflowClient(tracking_uri=uri).get_run(status["parent_run_id"])
