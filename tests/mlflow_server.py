"""A real `mlflow server` on loopback for tests (`runner.bench.tracking_server`, which the benchmark also uses):
sqlite backend, proxied artifacts, stoppable and restartable on the same port (to play a tracking server that goes
away mid-sweep), and a helper to read its REST API."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

from runner.bench.tracking_server import DIRECT, MlflowServer, free_port, kill_process_group

__all__ = ["DIRECT", "MlflowServer", "free_port", "kill_process_group", "rest"]


def rest(base: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """GET (or POST `body` as JSON) an MLflow REST endpoint; returns the JSON answer."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    with DIRECT.open(request, timeout=30) as response:
        return json.loads(response.read())
