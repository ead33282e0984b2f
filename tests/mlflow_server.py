"""A real `mlflow server` on loopback for tests: sqlite backend, proxied artifacts, stoppable and restartable on
the same port (to play a tracking server that goes away mid-sweep)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

#: Talks to 127.0.0.1 directly, whatever proxy the environment sets.
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def kill_process_group(session_id: int) -> None:
    """SIGKILLs what is left of a process group a test started."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(session_id, signal.SIGKILL)


def rest(base: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """GET (or POST `body` as JSON) an MLflow REST endpoint; returns the JSON answer."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    with DIRECT.open(request, timeout=30) as response:
        return json.loads(response.read())


class MlflowServer:
    """`mlflow server` over `directory/server.db` and `directory/artifacts` on a fixed free port."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen | None = None
        self._starts = 0

    def start(self, timeout_s: float = 120.0) -> None:
        """Starts the server and waits until `/health` answers."""
        self._starts += 1
        log = self.directory / f"server-{self._starts}.log"
        self._process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
             f"sqlite:///{self.directory / 'server.db'}", "--artifacts-destination", str(self.directory / "artifacts"),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            cwd=self.directory, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
        )
        deadline = time.monotonic() + timeout_s
        while True:
            assert self._process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow server did not come up"
            try:
                with DIRECT.open(self.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.3)

    def stop(self) -> None:
        """Stops the server (and the uvicorn workers it started); waits until the port is closed."""
        if self._process is None:
            return
        os.killpg(self._process.pid, signal.SIGTERM)
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass  # a slow shutdown on a loaded machine: what is left is killed below
        finally:
            kill_process_group(self._process.pid)
            self._process.wait()
            self._process = None
