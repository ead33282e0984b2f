"""The sweep's MLflow clients: batches cut to MLflow's per-call limits, independent requests in parallel."""

import threading

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from runner.tracking.clients import TrackingClients, log_batch


def test_a_large_batch_is_cut_to_mlflows_limits_and_all_of_it_logged(store, request) -> None:
    client = MlflowClient(store)
    run = client.create_run(client.create_experiment(request.node.name))
    calls = []
    original = client.log_batch

    def counted(run_id, metrics=(), params=(), tags=()):
        calls.append((len(metrics), len(params), len(tags)))
        return original(run_id, metrics=metrics, params=params, tags=tags)

    client.log_batch = counted
    log_batch(client, run.info.run_id, metrics=[Metric("m", float(i), 0, i) for i in range(2300)],
              params=[Param(f"p{i}", "v") for i in range(150)], tags=[RunTag(f"t{i}", "v") for i in range(30)])
    assert calls == [(870, 100, 30), (950, 50, 0), (480, 0, 0)], "<= 1000 metrics, 100 params and tags, 1000 in all"
    logged = MlflowClient(store).get_run(run.info.run_id).data
    assert len(logged.params) == 150 and len({k for k in logged.tags if k.startswith("t")}) == 30
    assert len(MlflowClient(store).get_metric_history(run.info.run_id, "m")) == 2300


def fail_on_three(_client, item: int) -> int:
    if item == 3:
        raise ValueError("bad item 3")
    return item


def test_requests_to_a_server_go_out_in_parallel_and_a_local_store_keeps_one_writer(store) -> None:
    server = TrackingClients("http://127.0.0.1:1", parallelism=4)
    barrier = threading.Barrier(4, timeout=10)

    def meet(client, item):
        barrier.wait()  # returns only when 4 calls are in flight at once
        return item * 2, client

    results = server.map(meet, [1, 2, 3, 4])
    assert [value for value, _ in results] == [2, 4, 6, 8]
    assert len({id(client) for _, client in results}) == 4, "a client per thread"
    with pytest.raises(ValueError, match="bad item 3"):
        server.map(fail_on_three, [1, 2, 3, 4])
    server.close()
    local = TrackingClients(store)
    assert local.parallelism == 1
    threads = local.map(lambda client, item: threading.current_thread(), [1, 2])
    assert threads == [threading.current_thread()] * 2
