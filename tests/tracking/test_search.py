"""Reading a sweep back from a real sqlite store: paged searches and the sweep summary."""

from mlflow import MlflowClient

from runner.tracking import search
from runner.tracking.search import search_all, sweep_status


def test_search_all_reads_every_page(store, request, monkeypatch):
    client = MlflowClient(store)
    experiment_id = client.create_experiment(request.node.name)
    for index in range(5):
        client.create_run(experiment_id, tags={"group": "a" if index < 4 else "b"})
    monkeypatch.setattr(search, "_PAGE", 2)

    assert len(search_all(client, experiment_id, "tags.group = 'a'")) == 4
    assert len(search_all(client, experiment_id, "")) == 5


def test_sweep_status_of_an_unknown_sweep_has_no_parent(store, request):
    sid = "0123456789abcdef"
    assert sweep_status(store, request.node.name, sid) == {
        "experiment_id": None, "sweep_id": sid, "parent_run_id": None, "parent_status": None, "num_points": None,
        "kind": None, "children": {}, "points": {},
    }
    experiment_id = MlflowClient(store).create_experiment(request.node.name)
    assert sweep_status(store, request.node.name, sid) == {
        "experiment_id": experiment_id, "sweep_id": sid, "parent_run_id": None, "parent_status": None,
        "num_points": None, "kind": None, "children": {}, "points": {},
    }


def test_reading_a_local_store_that_does_not_exist_does_not_create_it(tmp_path):
    database = tmp_path / "mlflow.db"
    summary = sweep_status(f"sqlite:///{database}", "nothing-yet", "0123456789abcdef")
    assert summary["parent_run_id"] is None and summary["children"] == {}
    assert not database.exists()
