"""MLflow tracking of a sweep, against a real sqlite store: layout, resume, retries, failure handling, artifacts."""

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from runner.config.schema import ExperimentConfig
from runner.plan.points import expand_points, sweep_id
from runner.results import PointResult
from runner.tracking.search import sweep_status
from runner.tracking.store import SweepTracker


@pytest.fixture
def sweep(store, request):
    """A tiny config (1 prompt x 1 layer x 2 features x 2 scales), its points and a tracker on a fresh experiment."""
    config = ExperimentConfig.model_validate(
        {
            "name": "demo",
            "model": {"source": "synthetic"},
            "sae": {"source": "synthetic"},
            "prompts": ["Tell me about"],
            "steering": {"layers": [1], "features": [3, 5], "scales": [0, 8]},
            "tracking": {"uri": store, "experiment": request.node.name},
        }
    )
    points = expand_points(config, {1: "synthetic-sae"}, lambda layer, feature: f"https://np/{layer}/{feature}")
    tracker = SweepTracker(store, config.tracking.experiment)
    return config, sweep_id(config), points, tracker


def result_for(point, text="hello world") -> PointResult:
    return PointResult(
        point_key=point.point_key,
        text=text,
        token_ids=(11, 12),
        metrics={"steer/nll": 1.0 + point.scale, "gen/distinct_1": 0.5},
        worker="w0",
    )


def children(client: MlflowClient, parent_id: str):
    experiment_id = client.get_run(parent_id).info.experiment_id
    return client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")


def test_sweep_logs_parent_and_one_child_per_point(sweep, tmp_path):
    config, sid, points, tracker = sweep
    with tracker.sweep(config, sid, len(points)) as parent_id:
        for point in points:
            tracker.log_point(point, result_for(point))

    client = MlflowClient(config.tracking.uri)
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.info.run_name == f"demo-{sid[:8]}"
    assert parent.data.tags["sweep_id"] == sid and parent.data.tags["runner.role"] == "sweep"
    assert parent.data.params == {"sweep_id": sid, "num_points": "4"}
    assert parent.data.metrics == {"points_total": 4.0, "points_finished": 4.0, "points_failed": 0.0}
    logged_config = Path(client.download_artifacts(parent_id, "config/experiment.yaml", str(tmp_path)))
    assert logged_config.read_text() == config.to_yaml()

    runs = {run.data.tags["point_key"]: run for run in children(client, parent_id)}
    assert set(runs) == {p.point_key for p in points}
    point = points[-1]
    child = runs[point.point_key]
    assert child.info.status == "FINISHED"
    assert child.info.run_name == "L1 f5 x8 s0 p0"
    assert child.data.tags["sweep_id"] == sid
    assert child.data.tags["runner.worker"] == "w0" and child.data.tags["runner.attempt"] == "1"
    assert child.data.tags["neuronpedia_url"] == "https://np/1/5"
    assert child.data.params == point.params()
    assert child.data.metrics == {"steer/nll": 9.0, "gen/distinct_1": 0.5}
    assert {a.path for a in client.list_artifacts(child.info.run_id)} == {"generation.txt", "generation.json"}
    generation_file = client.download_artifacts(child.info.run_id, "generation.json", str(tmp_path))
    generation = json.loads(Path(generation_file).read_text())
    assert generation == {"text": "hello world", "token_ids": [11, 12], "prompt": "Tell me about"}


def test_generations_table_loads_with_mlflow_and_plots_exist(sweep, tmp_path):
    config, sid, points, tracker = sweep
    with tracker.sweep(config, sid, len(points)) as parent_id:
        for point in points:
            tracker.log_point(point, result_for(point, text=f"text {point.feature} {point.scale}"))

    client = MlflowClient(config.tracking.uri)
    experiment_id = client.get_run(parent_id).info.experiment_id
    # What `mlflow.load_table` runs for the active experiment, without touching the fluent global state.
    table = client.load_table(experiment_id, "generations.json", run_ids=[parent_id], extra_columns=["run_id"])
    assert len(table) == 4
    assert set(table.columns) >= {"point_key", "prompt_index", "layer", "feature", "scale", "seed", "text",
                                  "steer/nll", "gen/distinct_1", "run_id"}
    row = table[(table.feature == 5) & (table.scale == 8.0)].iloc[0]
    assert row.text == "text 5 8.0" and row["steer/nll"] == 9.0 and row.point_key == points[-1].point_key

    plots = {a.path for a in client.list_artifacts(parent_id, "plots")}
    assert plots == {"plots/feature_3.png", "plots/feature_5.png"}
    png = Path(client.download_artifacts(parent_id, "plots/feature_3.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"path": "generations.json", "type": "table"} in json.loads(
        client.get_run(parent_id).data.tags["mlflow.loggedArtifacts"]
    )


def test_resume_reuses_the_parent_and_skips_finished_points(sweep):
    config, sid, points, tracker = sweep
    with pytest.raises(KeyboardInterrupt), tracker.sweep(config, sid, len(points)) as first_parent:
        tracker.log_point(points[0], result_for(points[0]))
        tracker.log_point(points[1], result_for(points[1]))
        raise KeyboardInterrupt
    client = MlflowClient(config.tracking.uri)
    assert client.get_run(first_parent).info.status == "KILLED"

    resumed = SweepTracker(config.tracking.uri, config.tracking.experiment)
    with resumed.sweep(config, sid, len(points)) as parent_id:
        assert parent_id == first_parent
        assert client.get_run(parent_id).info.status == "RUNNING"
        done = resumed.finished_point_keys()
        assert done == {points[0].point_key, points[1].point_key}
        for point in points:
            if point.point_key not in done:
                resumed.log_point(point, result_for(point))

    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["points_finished"] == 4.0
    assert len(children(client, parent_id)) == 4
    assert len(client.search_runs([parent.info.experiment_id], "tags.`runner.role` = 'sweep'")) == 1
    assert len(client.list_artifacts(parent_id, "config")) == 1
    table = client.load_table(parent.info.experiment_id, "generations.json", run_ids=[parent_id])
    assert sorted(table.point_key) == sorted(p.point_key for p in points), "earlier points are read back from MLflow"
    assert set(table.text) == {"hello world"}
    assert status_of(config, sid)["children"] == {"FINISHED": 4}


def status_of(config, sid):
    return sweep_status(config.tracking.uri, config.tracking.experiment, sid)


def test_a_failed_point_is_retried_in_the_same_run_and_never_finishes_twice(sweep):
    config, sid, points, tracker = sweep
    point = points[0]
    with tracker.sweep(config, sid, len(points)) as parent_id:
        failed_id = tracker.fail_point(point, "RuntimeError: OOM at https://user:hunter2@host/x", attempt=1)
        client = MlflowClient(config.tracking.uri)
        failed = client.get_run(failed_id)
        assert failed.info.status == "FAILED"
        assert failed.data.tags["runner.error"] == "RuntimeError: OOM at https://***@host/x"
        assert failed.data.params == point.params()

        retried = PointResult(point.point_key, "ok", (1,), {"nll": 2.0}, worker="w1", attempt=2)
        assert tracker.log_point(point, retried) == failed_id
        assert tracker.log_point(point, retried) == failed_id, "a duplicate delivery logs nothing new"
        assert tracker.fail_point(point, "late failure", attempt=3) == failed_id, "FINISHED is never downgraded"
    run = client.get_run(failed_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["runner.attempt"] == "2" and run.data.tags["runner.worker"] == "w1"
    assert "runner.error" not in run.data.tags
    point_runs = [r for r in children(client, parent_id) if r.data.tags["point_key"] == point.point_key]
    assert len(point_runs) == 1
    assert client.get_run(parent_id).info.status == "FAILED", "3 of 4 points never ran"
    assert status_of(config, sid) == {
        "experiment_id": run.info.experiment_id, "sweep_id": sid, "parent_run_id": parent_id,
        "parent_status": "FAILED", "num_points": 4, "children": {"FINISHED": 1},
    }


def test_an_exception_in_the_sweep_fails_the_parent_and_leaves_nothing_running(sweep):
    config, sid, points, tracker = sweep
    client = MlflowClient(config.tracking.uri)
    with pytest.raises(ValueError, match="boom"), tracker.sweep(config, sid, len(points)) as parent_id:
        tracker.log_point(points[0], result_for(points[0]))
        bad = PointResult(points[1].point_key, "x", (), {"bad key!": 1.0})  # MLflow rejects the metric name
        with pytest.raises(MlflowException):
            tracker.log_point(points[1], bad)
        tracker._start_child(parent_id, points[2], attempt=1, worker="w0")  # as if a worker died mid-point
        raise ValueError("boom")
    parent = client.get_run(parent_id)
    assert parent.info.status == "FAILED"
    assert parent.data.tags["runner.error"] == "ValueError: boom"
    statuses = sorted(run.info.status for run in children(client, parent_id))
    assert statuses == ["FAILED", "FAILED", "FINISHED"]
    assert parent.data.metrics["points_failed"] == 2.0


def test_a_closed_sweep_is_whole_in_the_database_file_alone(sweep, tmp_path):
    import shutil
    import sqlite3

    config, sid, points, tracker = sweep
    with tracker.sweep(config, sid, len(points)) as parent_id:
        for point in points:
            tracker.log_point(point, result_for(point))
    database = Path(config.tracking.uri.removeprefix("sqlite:///"))
    copy = tmp_path / "copy.db"
    shutil.copyfile(database, copy)  # without its -wal file, as a user copying mlflow.db would
    with sqlite3.connect(copy) as connection:
        statuses = dict(connection.execute("SELECT run_uuid, status FROM runs").fetchall())
    assert statuses[parent_id] == "FINISHED"
    assert [statuses[child.info.run_id] for child in children(MlflowClient(config.tracking.uri), parent_id)] == [
        "FINISHED"
    ] * len(points)
