"""Joining or starting Ray for a sweep, from the driver: the driver's JAX kept on the CPU, the worker actors'
options, a fast check of a Ray address before `ray.init` would retry it for minutes, and watching the local Ray
that a sweep started for itself (`LocalRayWatch`)."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import sys
from typing import Any

import psutil
import ray

from runner.config.schema import ClusterConfig
from runner.errors import RunnerError, first_line
from runner.execution.faults import strip_ansi

#: `JAX_PLATFORMS` value for each `cluster.platform` (the `gpu` alias would also demand ROCm).
JAX_PLATFORMS_ENV = {"cpu": "cpu", "gpu": "cuda", "tpu": "tpu"}


def keep_driver_jax_on_cpu() -> None:
    """Makes this process's JAX use the CPU only, so the driver never takes a host's TPU or GPU.

    Effective until JAX first initialises its backends; call it before anything touches `jax.devices()`.
    """
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:
        sys.modules["jax"].config.update("jax_platforms", "cpu")


def ray_actor_options(cluster: ClusterConfig, max_restarts: int) -> dict[str, Any]:
    """`.options(...)` of one worker actor: the host's resources, its JAX platform, restarts but no task retries."""
    resources = dict(cluster.resources)
    options: dict[str, Any] = {
        "num_cpus": resources.pop("CPU", 0.0),
        "num_gpus": resources.pop("GPU", 0.0),
        "max_restarts": max_restarts,
        "max_task_retries": 0,  # the controller owns retries: a job is never run twice behind its back
        "scheduling_strategy": "SPREAD",
        "runtime_env": {"env_vars": {"JAX_PLATFORMS": JAX_PLATFORMS_ENV[cluster.jax_platform()]}},
    }
    if resources:
        options["resources"] = resources
    return options


def connect_ray(cluster: ClusterConfig) -> bool:
    """Starts a local Ray or joins `cluster.address` (or `RAY_ADDRESS`); returns whether it connected (and so must
    disconnect). A local Ray must have the resources one worker asks for.

    Raises:
      RunnerError: Ray cannot be started or joined, or this machine lacks a worker's resources.
    """
    if ray.is_initialized():
        return False
    address = cluster.address or os.environ.get("RAY_ADDRESS")
    try:
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            per_worker_cpus = cluster.resources.get("CPU", 0.0)
            hosts = cluster.workers * (cluster.hosts_per_replica if cluster.replica == "slice" else 1)
            num_cpus = max(os.cpu_count() or 1, math.ceil(hosts * per_worker_cpus))
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as error:
        _shutdown_quietly()
        where = f"Ray at {address!r}" if address else "a local Ray"
        raise RunnerError(
            f"cluster.address: cannot start or join {where}: {first_line(strip_ansi(str(error)))}"
        ) from None
    except BaseException:  # Ctrl-C while connecting
        _shutdown_quietly()
        raise
    if not address:
        available = ray.cluster_resources()
        short = {k: v for k, v in cluster.resources.items() if available.get(k, 0.0) < v}
        if short:
            ray.shutdown()
            have = {k: available.get(k, 0.0) for k in short}
            raise RunnerError(
                f"cluster.resources: a worker needs {short} but this machine has {have} (allowed: what this "
                "machine has, or cluster.address / --address of a Ray cluster with such hosts)"
            )
    return True


#: The processes of a local Ray node without which its workers cannot run: the node manager and the control store.
LOCAL_RAY_PROCESSES = ("raylet", "gcs_server")


class LocalRayDied(RunnerError):
    """The local Ray that runner started for the sweep lost a process its workers need (killed, e.g. by the
    kernel's out-of-memory killer). The sweep stops; running it again resumes it.

    Attributes:
      points_left: The sweep's points that had not come back when the node died.
    """

    def __init__(self, what: str, points_left: int) -> None:
        super().__init__(f"the local Ray node died: {what}; {points_left} of the sweep's points had not run")
        self.what, self.points_left = what, points_left

    def __reduce__(self) -> tuple[type[LocalRayDied], tuple[str, int]]:
        return type(self), (self.what, self.points_left)


class LocalRayWatch:
    """The processes of the local Ray this driver started (its descendants named in `LOCAL_RAY_PROCESSES`), found
    right after `ray.init`, and whether they still run."""

    def __init__(self) -> None:
        self._processes: dict[str, psutil.Process] = {}
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process().children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if child.name() in LOCAL_RAY_PROCESSES:
                        self._processes.setdefault(child.name(), child)

    @property
    def watched(self) -> list[str]:
        """Names of the processes watched (none when they could not be found)."""
        return sorted(self._processes)

    def what_died(self) -> str | None:
        """`its raylet (pid N) is gone (...)` for the first watched process that no longer runs, else None."""
        for name, process in sorted(self._processes.items()):
            try:
                alive = process.is_running() and process.status() != psutil.STATUS_ZOMBIE
            except psutil.Error:
                alive = False
            if not alive:
                return f"its {name} (pid {process.pid}) is gone (killed, perhaps by the kernel's out-of-memory killer)"
        return None


def _shutdown_quietly() -> None:
    with contextlib.suppress(Exception):
        if ray.is_initialized():
            ray.shutdown()


def check_ray_address_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fails fast on a `host:port` (or `ray://host:port`) nobody listens on; `ray.init` would retry for minutes.

    Raises:
      RunnerError: Nothing accepts a TCP connection there.
    """
    host_port = address.removeprefix("ray://")
    host, sep, port = host_port.rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto" and other forms Ray resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as error:
        raise RunnerError(f"cluster.address: cannot reach Ray at {address!r}: {error.strerror or error} (is the "
                          "cluster up, and is this its head's GCS port, usually 6379?)") from None
