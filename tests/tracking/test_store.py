"""MLflow tracking of a sweep against a real sqlite store: a steering sweep's point records and curve runs, the
parent's tables, plots and report, resume, failures, and an SAE evaluation's run per SAE."""

import json
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from runner.config.schema import ExperimentConfig
from runner.plan.points import SAEEvalPoint, expand_points, sweep_id
from runner.results import PointResult, SAEEvalPointResult, SAEMeasurement
from runner.tracking.search import sweep_parent, sweep_records, sweep_status
from runner.tracking.store import SweepTracker

SCALES = [0, 8, 16]


@pytest.fixture
def sweep(store, request):
    """A small config (2 prompts x 1 layer x 2 features x 3 scales x 2 seeds: 24 points, 2 curves), its points
    and a tracker on a fresh experiment."""
    config = ExperimentConfig.model_validate(
        {
            "name": "demo",
            "model": {"source": "synthetic"},
            "sae": {"source": "synthetic"},
            "prompts": ["Tell me about", "Once upon a time"],
            "steering": {"layers": [1], "features": [3, 5], "scales": SCALES, "seeds": [0, 1]},
            "tracking": {"uri": store, "experiment": request.node.name},
        }
    )
    points = expand_points(config, {1: "synthetic-sae"}, lambda layer, feature: f"https://np/{layer}/{feature}")
    tracker = SweepTracker(store, config.tracking.experiment)
    return config, sweep_id(config), points, tracker


def concept_rate(point) -> float:
    """Feature 5 steers (its rate crosses 0.5 between scales 8 and 16), feature 3 does not."""
    return (0.02 if point.feature == 3 else 0.05) * point.scale + 0.01 * point.prompt_index + 0.02 * point.seed


def result_for(point, text=None) -> PointResult:
    return PointResult(
        point_key=point.point_key,
        text=text if text is not None else f"p{point.prompt_index} s{point.seed} f{point.feature} x{point.scale:g}",
        token_ids=(11, 12, point.feature),
        metrics={"steer/concept_rate": concept_rate(point), "steer/nll": 1.0 + point.scale / 8,
                 "steer/kl_steered_base": point.scale / 100, "gen/distinct_1": 0.5},
        tags={"logit_lens_tokens": json.dumps(["tok", f"f{point.feature}"])},
        worker="w0",
    )


def jobs_of(points, size=5):
    return [points[start:start + size] for start in range(0, len(points), size)]


def log_all(tracker, points) -> None:
    for job in jobs_of(points):
        tracker.log_results(job, [result_for(point) for point in job])


def curve_runs(client: MlflowClient, parent_id: str):
    experiment_id = client.get_run(parent_id).info.experiment_id
    return client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")


def test_each_curve_is_a_child_run_with_its_means_per_scale_as_metric_steps(sweep):
    config, sid, points, tracker = sweep
    with tracker.sweep(config, sid, points) as parent_id:
        log_all(tracker, points)

    client = MlflowClient(config.tracking.uri)
    runs = {run.data.params["feature"]: run for run in curve_runs(client, parent_id)}
    assert sorted(runs) == ["3", "5"] and len(curve_runs(client, parent_id)) == 2
    run = runs["5"]
    assert run.info.status == "FINISHED" and run.info.run_name == "L1 f5"
    assert run.data.tags["runner.role"] == "curve" and run.data.tags["sweep_id"] == sid
    assert run.data.tags["neuronpedia_url"] == "https://np/1/5"
    assert json.loads(run.data.tags["logit_lens_tokens"]) == ["tok", "f5"]
    assert run.data.params == {"model": "synthetic:tiny:seed0", "sae_id": "synthetic-sae", "layer": "1",
                               "feature": "5", "temperature": "0.0", "top_k": "None", "top_p": "None",
                               "mode": "add", "positions": "all", "max_new_tokens": "32", "scales": "[0, 8, 16]",
                               "seeds": "[0, 1]", "prompts": "2", "num_points": "12", "dtype": "",
                               "exclude_unknown_tokens": "False"}

    history = client.get_metric_history(run.info.run_id, "steer/concept_rate")
    of_feature = [p for p in points if p.feature == 5]
    expected = [np.mean([concept_rate(p) for p in of_feature if p.scale == scale]) for scale in SCALES]
    assert [m.step for m in history] == [0, 1, 2]
    assert [m.value for m in history] == pytest.approx(expected), "the mean over 2 prompts x 2 seeds"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "steer/scale")] == [0.0, 8.0, 16.0]
    metrics = run.data.metrics
    assert metrics["curve/scale_at_concept_rate_0.5"] == 16.0
    assert metrics["curve/nll_at_concept_rate_0.5"] == pytest.approx(3.0)
    assert metrics["curve/kl_at_concept_rate_0.5"] == pytest.approx(0.16)
    assert metrics["curve/max_concept_rate"] == pytest.approx(expected[-1])
    assert (metrics["curve/points_finished"], metrics["curve/points_failed"]) == (12.0, 0.0)
    assert "curve/scale_at_concept_rate_0.5" not in runs["3"].data.metrics, "feature 3 never reaches 0.5"

    table = client.load_table(run.info.experiment_id, "points.json", run_ids=[run.info.run_id])
    assert len(table) == 12 and set(table.point_key) == {p.point_key for p in of_feature}
    row = table[(table.prompt_index == 1) & (table.scale == 8.0) & (table.seed == 1)].iloc[0]
    assert row.text == "p1 s1 f5 x8" and list(row.token_ids) == [11, 12, 5] and row.worker == "w0"
    assert row["steer/concept_rate"] == pytest.approx(0.4 + 0.01 + 0.02)


def test_the_parent_holds_the_records_the_sweep_tables_plots_and_report(sweep, tmp_path):
    config, sid, points, tracker = sweep
    with tracker.sweep(config, sid, points) as parent_id:
        log_all(tracker, points)

    client = MlflowClient(config.tracking.uri)
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["sweep_id"] == sid and parent.data.tags["runner.kind"] == "steering"
    assert parent.data.params == {"sweep_id": sid, "num_points": "24"}
    assert parent.data.metrics == {"points_total": 24.0, "points_finished": 24.0, "points_failed": 0.0,
                                   "curves_total": 2.0, "curves_logged": 2.0}
    records = client.list_artifacts(parent_id, "points")
    assert len(records) == len(jobs_of(points)), "one record file per logged batch"
    assert Path(client.download_artifacts(parent_id, "config/experiment.yaml", str(tmp_path))).read_text() == \
        config.to_yaml()

    generations = client.load_table(parent.info.experiment_id, "generations.parquet", run_ids=[parent_id])
    assert sorted(generations.point_key) == sorted(p.point_key for p in points)
    curves = client.load_table(parent.info.experiment_id, "curves.json", run_ids=[parent_id])
    by_feature = {row.feature: row for row in curves.itertuples()}
    assert by_feature[5].run_id in {run.info.run_id for run in curve_runs(client, parent_id)}
    assert by_feature[5]._asdict()["points_finished"] == 12
    logged = json.loads(parent.data.tags["mlflow.loggedArtifacts"])
    assert [entry["path"] for entry in logged] == ["generations.parquet", "curves.json"]

    assert {a.path for a in client.list_artifacts(parent_id, "plots")} == {
        "plots/heatmap_layer1_p1.png", "plots/steerability_layer1.png"}
    report = Path(client.download_artifacts(parent_id, "report.html", str(tmp_path))).read_text()
    assert "Layer 1, feature 5" in report and "p1 s1 f5 x8" in report


def test_a_retried_batch_replaces_its_record_file_and_logs_nothing_twice(sweep):
    config, sid, points, tracker = sweep
    with tracker.sweep(config, sid, points) as parent_id:
        job = points[:12]  # the first prompt's points: half of each curve
        tracker.log_results(job, [result_for(point) for point in job])
        tracker.log_results(job, [result_for(point, text="a second delivery") for point in job])
        log_all(tracker, points[12:])

    client = MlflowClient(config.tracking.uri)
    parent = client.get_run(parent_id)
    records = sweep_records(config.tracking.uri, parent)
    assert sorted(records) == sorted(p.point_key for p in points)
    assert {records[p.point_key].text for p in job} == {result_for(p).text for p in job}, "the first result stays"
    assert len(client.list_artifacts(parent_id, "points")) == 1 + len(jobs_of(points[12:]))
    assert len(curve_runs(client, parent_id)) == 2


def test_a_rerun_skips_finished_points_and_every_point_is_logged_once(sweep):
    config, sid, points, tracker = sweep
    with pytest.raises(KeyboardInterrupt), tracker.sweep(config, sid, points) as first_parent:
        log_all(tracker, points[:10])
        raise KeyboardInterrupt
    client = MlflowClient(config.tracking.uri)
    assert client.get_run(first_parent).info.status == "KILLED"
    assert status_of(config, sid)["points"] == {"FINISHED": 10}

    resumed = SweepTracker(config.tracking.uri, config.tracking.experiment)
    with resumed.sweep(config, sid, points) as parent_id:
        assert parent_id == first_parent
        assert client.get_run(parent_id).info.status == "RUNNING"
        done = resumed.finished_point_keys()
        assert done == {point.point_key for point in points[:10]}
        log_all(resumed, [point for point in points if point.point_key not in done])

    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["points_finished"] == 24.0
    assert len(client.search_runs([parent.info.experiment_id], "tags.`runner.role` = 'sweep'")) == 1
    assert len(curve_runs(client, parent_id)) == 2
    table = client.load_table(parent.info.experiment_id, "generations.parquet", run_ids=[parent_id])
    assert sorted(table.point_key) == sorted(p.point_key for p in points), "earlier points read back from MLflow"
    status = status_of(config, sid)
    assert (status["points"], status["children"], status["kind"]) == ({"FINISHED": 24}, {"FINISHED": 2}, "steering")


def status_of(config, sid):
    return sweep_status(config.tracking.uri, config.tracking.experiment, sid)


def test_a_failed_point_fails_its_curve_and_runs_again_on_the_next_run(sweep):
    config, sid, points, tracker = sweep
    failing = [point for point in points if point.feature == 5 and point.scale == 16.0 and point.prompt_index == 0]
    with tracker.sweep(config, sid, points) as parent_id:
        log_all(tracker, [point for point in points if point not in failing])
        tracker.fail_points(failing, "RuntimeError: OOM at https://user:hunter2@host/x", attempt=2)
    client = MlflowClient(config.tracking.uri)
    failed_curve = next(run for run in curve_runs(client, parent_id) if run.data.params["feature"] == "5")
    assert failed_curve.info.status == "FAILED"
    assert failed_curve.data.tags["runner.error"] == \
        "2 of 12 points failed; the first: RuntimeError: OOM at https://***@host/x"
    assert failed_curve.data.metrics["curve/points_failed"] == 2.0
    assert client.get_run(parent_id).info.status == "FAILED"
    assert status_of(config, sid)["points"] == {"FINISHED": 22, "FAILED": 2}

    rerun = SweepTracker(config.tracking.uri, config.tracking.experiment)
    with rerun.sweep(config, sid, points):
        assert {p.point_key for p in points} - rerun.finished_point_keys() == {p.point_key for p in failing}
        rerun.log_results(failing, [result_for(point) for point in failing])
    runs = curve_runs(client, parent_id)
    assert len(runs) == 2 and {run.info.status for run in runs} == {"FINISHED"}
    assert client.get_run(failed_curve.info.run_id).info.lifecycle_stage == "deleted", "the stale run is replaced"
    assert client.get_run(parent_id).info.status == "FINISHED"
    assert status_of(config, sid)["points"] == {"FINISHED": 24}


def test_a_finished_point_is_never_failed_or_logged_again(sweep):
    config, sid, points, tracker = sweep
    with tracker.sweep(config, sid, points) as parent_id:
        log_all(tracker, points)
        tracker.fail_points(points[:2], "RuntimeError: a late failure", attempt=3)
        tracker.log_results(points[:2], [result_for(point, text="again") for point in points[:2]])
    client = MlflowClient(config.tracking.uri)
    records = sweep_records(config.tracking.uri, client.get_run(parent_id))
    assert {records[point.point_key].text for point in points[:2]} == {result_for(point).text for point in points[:2]}
    assert len(client.list_artifacts(parent_id, "points")) == len(jobs_of(points)), "nothing new to record"
    assert status_of(config, sid)["points"] == {"FINISHED": 24}


def test_a_curve_whose_run_was_lost_is_logged_when_the_sweep_reopens(sweep):
    config, sid, points, tracker = sweep
    with tracker.sweep(config, sid, points) as parent_id:
        log_all(tracker, points)
    client = MlflowClient(config.tracking.uri)
    lost = next(run for run in curve_runs(client, parent_id) if run.data.params["feature"] == "3")
    client.delete_run(lost.info.run_id)  # as if the driver died between the records and this curve's run

    reopened = SweepTracker(config.tracking.uri, config.tracking.experiment)
    with reopened.sweep(config, sid, points):
        assert reopened.finished_point_keys() == {point.point_key for point in points}
    runs = {run.data.params["feature"]: run for run in curve_runs(client, parent_id)}
    assert sorted(runs) == ["3", "5"] and runs["3"].info.run_id != lost.info.run_id
    assert runs["3"].info.status == "FINISHED" and runs["3"].data.metrics["curve/points_finished"] == 12.0


def test_an_exception_in_the_sweep_fails_the_parent_and_leaves_nothing_running(sweep):
    config, sid, points, tracker = sweep
    client = MlflowClient(config.tracking.uri)
    with pytest.raises(ValueError, match="boom"), tracker.sweep(config, sid, points) as parent_id:
        log_all(tracker, [point for point in points if point.feature == 3])
        raise ValueError("boom")
    parent = client.get_run(parent_id)
    assert parent.info.status == "FAILED"
    assert parent.data.tags["runner.error"] == "ValueError: boom"
    assert [run.info.status for run in curve_runs(client, parent_id)] == ["FINISHED"], "feature 3's curve"
    assert (parent.data.metrics["points_finished"], parent.data.metrics["curves_logged"]) == (12.0, 1.0)
    assert sweep_parent(config.tracking.uri, config.tracking.experiment, sid).info.run_id == parent_id


def test_a_closed_sweep_is_whole_in_the_database_file_alone(sweep, tmp_path):
    import shutil
    import sqlite3

    config, sid, points, tracker = sweep
    with tracker.sweep(config, sid, points) as parent_id:
        log_all(tracker, points)
    database = Path(config.tracking.uri.removeprefix("sqlite:///"))
    copy = tmp_path / "copy.db"
    shutil.copyfile(database, copy)  # without its -wal file, as a user copying mlflow.db would
    with sqlite3.connect(copy) as connection:
        statuses = dict(connection.execute("SELECT run_uuid, status FROM runs").fetchall())
    assert statuses[parent_id] == "FINISHED"
    assert [statuses[run.info.run_id] for run in curve_runs(MlflowClient(config.tracking.uri), parent_id)] == [
        "FINISHED"
    ] * 2


# ---------------------------------------------------------------------------------------------------------------
# An SAE evaluation sweep: a child run per SAE


@pytest.fixture
def sae_sweep(store, request):
    config = ExperimentConfig.model_validate(
        {
            "name": "sae-demo",
            "model": {"source": "synthetic"},
            "sae": {"source": "synthetic"},
            "sae_eval": {"layers": [0, 1], "widths": ["256"], "l0s": [16]},
            "tracking": {"uri": store, "experiment": request.node.name},
        }
    )
    points = [SAEEvalPoint(layer=layer, site="res", width="256", l0="16", sae_id=f"synthetic/{layer}",
                           model_id="synthetic:tiny:seed0", text="bundled", text_digest="d", context_length=8,
                           num_sequences=2) for layer in (0, 1)]
    return config, sweep_id(config), points, SweepTracker(store, config.tracking.experiment)


def sae_result(point, attempt=1) -> SAEEvalPointResult:
    measurement = SAEMeasurement(
        {"sae/l0": 15.0 + point.layer, "sae/fvu": 0.2, "lm/delta_loss": 0.1, "density/n_dead": 3.0},
        density=np.full(4, 0.25), density_histogram=np.array([1, 3]), density_histogram_edges=np.array([-10., -1, 0]),
        l0_histogram=np.array([0, 1, 2]), top_feature_rows=({"sequence": 0, "position": 1, "token": 5,
                                                             "token_text": "a", "feature_ids": [1],
                                                             "feature_values": [0.5]},))
    return SAEEvalPointResult(point.point_key, measurement, worker="w1", attempt=attempt)


def test_an_sae_evaluation_keeps_a_run_per_sae_and_reuses_the_run_of_a_failed_one(sae_sweep):
    config, sid, points, tracker = sae_sweep
    with tracker.sweep(config, sid, points) as parent_id:
        tracker.fail_points(points[:1], "RuntimeError: OOM at https://user:hunter2@host/x", attempt=1)
        client = MlflowClient(config.tracking.uri)
        (failed,) = curve_runs(client, parent_id)
        assert failed.info.status == "FAILED"
        assert failed.data.tags["runner.error"] == "RuntimeError: OOM at https://***@host/x"
        tracker.log_results(points, [sae_result(point, attempt=2) for point in points])
        tracker.log_results(points[:1], [sae_result(points[0], attempt=3)])  # a duplicate delivery
    runs = {run.data.tags["point_key"]: run for run in curve_runs(client, parent_id)}
    assert len(runs) == 2 and runs[points[0].point_key].info.run_id == failed.info.run_id
    run = runs[points[0].point_key]
    assert run.info.status == "FINISHED" and run.data.tags["runner.role"] == "point"
    assert run.data.tags["runner.attempt"] == "2" and "runner.error" not in run.data.tags
    assert run.data.params == points[0].params()
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {
        "density.npy", "density_histogram.png", "top_features.json", "l0_histogram.json"}
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["runner.kind"] == "sae_eval"
    assert {a.path for a in client.list_artifacts(parent_id, "plots")} == {
        "plots/sae_frontier.png", "plots/sae_by_layer.png"}
    table = client.load_table(parent.info.experiment_id, "sae_metrics.json", run_ids=[parent_id])
    assert list(table.layer) == [0, 1] and list(table["sae/l0"]) == [15.0, 16.0]
    assert status_of(config, sid)["points"] == {"FINISHED": 2}
