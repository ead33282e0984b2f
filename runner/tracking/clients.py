"""The sweep's MLflow clients: requests to a tracking server go out in parallel, a local store keeps one writer.

MLflow has no request that creates or ends several runs at once, so what is independent (the curve runs one job
completes, the files of the parent's close) is sent over several connections at a time, each thread with a client
of its own. A sqlite store takes one writer at a time: there every request is made in turn on the caller's thread.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.store.artifact.artifact_repo import ArtifactRepository
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.utils.validation import MAX_ENTITIES_PER_BATCH, MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH

_T = TypeVar("_T")
_R = TypeVar("_R")

#: Requests in flight at once to a tracking server (as many as `mlflow server` has workers by default; more only
#: queued up behind them in measurements here).
SERVER_PARALLELISM = 4


def is_server(uri: str) -> bool:
    """Whether `uri` is a tracking server (HTTP), as opposed to a local store."""
    return uri.startswith(("http://", "https://"))


class TrackingClients:
    """`client` for this thread, and `map` to make independent requests at once (see the module docstring).

    Args:
      uri: The tracking URI.
      parallelism: Requests in flight at once; default `SERVER_PARALLELISM` for a server, 1 for a local store.
    """

    def __init__(self, uri: str, parallelism: int | None = None) -> None:
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        self.parallelism = parallelism if parallelism is not None else (SERVER_PARALLELISM if is_server(uri) else 1)
        self._local = threading.local()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def map(self, function: Callable[[MlflowClient, _T], _R], items: Sequence[_T]) -> list[_R]:
        """`function(client, item)` for every item, at most `parallelism` at once, each thread with its own
        client; the results in order. Every call ends before the first error, if any, is raised."""
        if self.parallelism <= 1 or len(items) <= 1:
            return [function(self.client, item) for item in items]
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.parallelism, thread_name_prefix="runner-mlflow")
        futures = [self._pool.submit(self._call, function, item) for item in items]
        concurrent.futures.wait(futures)
        return [future.result() for future in futures]

    def _call(self, function: Callable[[MlflowClient, _T], _R], item: _T) -> _R:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = MlflowClient(tracking_uri=self.uri)
        return function(client, item)

    def artifacts(self, artifact_uri: str) -> ArtifactRepository:
        """The artifact store of a run, straight from its artifact URI (`MlflowClient.log_artifact` would read
        the run first: one more request)."""
        return get_artifact_repository(artifact_uri, tracking_uri=self.uri)

    def close(self) -> None:
        """Ends the request threads."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def log_batch(client: MlflowClient, run_id: str, *, metrics: Sequence[Metric] = (), params: Sequence[Param] = (),
              tags: Sequence[RunTag] = ()) -> None:
    """Logs metrics, params and tags in as few `log_batch` calls as MLflow's per-call limits allow (1,000
    metrics, 100 params, 100 tags, 1,000 in all)."""
    metrics, params, tags = list(metrics), list(params), list(tags)
    while metrics or params or tags:
        some_params, some_tags = params[:MAX_PARAMS_TAGS_PER_BATCH], tags[:MAX_PARAMS_TAGS_PER_BATCH]
        room = min(MAX_METRICS_PER_BATCH, MAX_ENTITIES_PER_BATCH - len(some_params) - len(some_tags))
        client.log_batch(run_id, metrics=metrics[:room], params=some_params, tags=some_tags)
        metrics, params, tags = metrics[room:], params[len(some_params):], tags[len(some_tags):]
