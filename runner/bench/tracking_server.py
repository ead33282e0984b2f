"""A real `mlflow server` on loopback: a sqlite backend and proxied artifacts in one directory, stoppable and
restartable on the same port. `runner bench --end-to-end --tracking server` logs to one; the tests use it to play
a tracking server that goes away mid-sweep."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

#: Talks to 127.0.0.1 directly, whatever proxy the environment sets.
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def kill_process_group(session_id: int) -> None:
    """SIGKILLs what is left of a process group this process started."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(session_id, signal.SIGKILL)


class MlflowServer:
    """`mlflow server` over `directory/server.db` and `directory/artifacts` on a fixed free port.

    Args:
      directory: Where the server's database, artifacts and logs go.
      workers: The server's worker processes (`mlflow server --workers`); None: MLflow's default (4).
    """

    def __init__(self, directory: Path, workers: int | None = 1) -> None:
        self.directory = Path(directory)
        self.workers = workers
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen | None = None
        self._starts = 0

    def start(self, timeout_s: float = 120.0) -> None:
        """Starts the server and waits until `/health` answers.

        Raises:
          RuntimeError: The server exited or did not answer within `timeout_s` (with the end of its log).
        """
        self._starts += 1
        log = self.directory / f"server-{self._starts}.log"
        workers = ["--workers", str(self.workers)] if self.workers is not None else []
        with log.open("w") as output:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                 f"sqlite:///{self.directory / 'server.db'}", "--artifacts-destination",
                 str(self.directory / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port), *workers],
                cwd=self.directory, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
            )
        deadline = time.monotonic() + timeout_s
        while True:
            if self._process.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
                self.stop()
                raise RuntimeError(f"mlflow server on port {self.port} did not come up: {tail}")
            try:
                with DIRECT.open(self.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.3)

    def stop(self) -> None:
        """Stops the server (and the workers it started); waits until the port is closed."""
        if self._process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._process.pid, signal.SIGTERM)
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass  # a slow shutdown on a loaded machine: what is left is killed below
        finally:
            kill_process_group(self._process.pid)
            self._process.wait()
            self._process = None

    def __enter__(self) -> MlflowServer:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()
