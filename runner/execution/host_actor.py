"""What runs on a worker host: the `HostWorker` Ray actor and its start-up checks.

Before a host's worker loads anything it removes a TPU lockfile that a crashed worker left behind, and asserts the
JAX platform it really got (a busy TPU makes JAX fall back to the CPU silently). The driver's SAE files are made
valid on this host, and the workers of one filesystem take turns writing synthetic SAEs.

A worker whose start-up fails does not die: it keeps the failure, classified here
(`runner.execution.faults.startup_error`), and raises it from every call. The driver thus gets a typed
`WorkerStartupError` with the cause's first meaningful line (Ray would pass on only the text of an exception
raised in `__init__`, traceback and all) and ends the sweep with it instead of failing points.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import filelock
import psutil
import ray

from runner.errors import RunnerError, first_line
from runner.execution.faults import WorkerStartupError, startup_error
from runner.plan.points import Job
from runner.results import Result
from runner.sae.sources import SAEFile

if TYPE_CHECKING:
    from runner.config.schema import ExperimentConfig
    from runner.execution.workers import Worker

_log = logging.getLogger(__name__)

#: libtpu's lock: only one process per host may hold the TPU; a crashed worker leaves the file behind.
TPU_LOCKFILE = Path("/tmp/libtpu_lockfile")


class WorkerPlatformError(RunnerError):
    """A worker's JAX did not get the platform the cluster config asks for."""


class WorkerInfo(TypedDict, total=False):
    """Where a worker runs, and the batch it chose with what it expects of memory (`memory`: one line)."""

    name: str
    hostname: str
    node_id: str
    pid: int
    platform: str
    device_count: int
    batch_size: int
    memory: str


def processes_holding(path: Path) -> list[int]:
    """Ids of the live processes that have `path` open (those this user may inspect)."""
    target = os.path.realpath(path)
    holders = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if any(file.path == target for file in process.open_files()):
                holders.append(process.pid)
    return holders


def remove_stale_tpu_lockfile(path: Path = TPU_LOCKFILE) -> bool:
    """Deletes libtpu's lockfile when no live process holds it open; returns whether it was deleted."""
    if not path.exists():
        return False
    holders = processes_holding(path)
    if holders:
        _log.warning("%s is held by process(es) %s; leaving it", path, holders)
        return False
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except PermissionError as error:
        _log.warning("cannot remove stale %s: %s", path, error)
        return False
    _log.warning("removed stale %s left by a dead process", path)
    return True


def check_jax_platform(expected: str, host: str) -> tuple[str, int]:
    """Returns (platform, device count) of this process's JAX; raises `WorkerPlatformError` unless `expected`."""
    import jax

    try:
        devices = jax.devices()
    except RuntimeError as error:
        raise WorkerPlatformError(
            f"{host}: JAX could not start platform {expected!r}: {first_line(str(error))}"
        ) from None
    platform = devices[0].platform
    if platform != expected:
        hint = {
            "tpu": f"; is another process holding the TPU ({TPU_LOCKFILE})?",
            "gpu": "; is jax[cuda12] (runner[cuda]) installed on this host?",
        }.get(expected, "")
        raise WorkerPlatformError(
            f"{host}: expected JAX platform {expected!r} but JAX runs on {platform!r} "
            f"({len(devices)} device(s)){hint}"
        )
    return platform, len(devices)


def localise_sae_files(config: ExperimentConfig, sae_files: Mapping[str, SAEFile]) -> dict[str, SAEFile]:
    """The driver's SAE files as seen from this host: Gemma Scope files missing here are downloaded again.

    Raises:
      RunnerError: A local SAE file of the driver does not exist on this host, or a download names another SAE.
    """
    from runner.sae.sources import resolve_sae_file

    files = dict(sae_files)
    missing = [key for key, f in files.items() if f.path is not None and not Path(f.path).is_file()]
    if not missing:
        return files
    if config.sae.source != "huggingface":
        paths = ", ".join(str(files[key].path) for key in missing)
        raise RunnerError(
            f"{socket.gethostname()}: SAE file(s) {paths} do not exist on this worker host (allowed: sae.path on a "
            "filesystem every host mounts at the same path, or sae.source huggingface)"
        )
    for key in missing:
        # Gemma Scope files are found by release, layer, width and the L0 the driver resolved.
        again = resolve_sae_file(config.sae, files[key].layer, width=files[key].width, l0=files[key].l0, model_id="")
        if again.sae_id != files[key].sae_id:
            raise RunnerError(f"layer {files[key].layer}: the driver resolved {files[key].sae_id} but this host got "
                              f"{again.sae_id}")
        files[key] = again
    return files


def _init_lock(cache_dir: Path) -> filelock.FileLock:
    """An exclusive lock shared by the workers of one host (and of one shared filesystem) while they start."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    return filelock.FileLock(cache_dir / ".runner-worker-init.lock")


class HostWorker:
    """One host's worker (`runner.execution.workers.SteeringWorker` or `SAEEvalWorker`) as a Ray actor
    (`ray.remote(HostWorker)`; `runner.execution.ray_hosts.RayExecutor` creates them).

    On start it removes a stale TPU lockfile (platform tpu), checks that JAX got `platform`, then loads the model
    and SAEs once. `__init__` runs again on every restart of the actor. If that fails, every call raises the
    failure as a `WorkerStartupError` (see the module docstring).

    Args:
      worker_args: What the worker class takes besides the cache directory and its name
        (`SweepPlan.worker_args()`: config, sae_files, batch_size, eval_tokens).
      cache_dir: Where synthetic models and SAEs are written.
      platform: The JAX platform this worker must run on: cpu, gpu or tpu.
      name: The worker's slot name, e.g. `worker-0`; results are tagged `<name>@<hostname>`.
      worker_class: The class doing the work; the sweep kind's (`runner.execution.workers.worker_class_for`) when
        None. It must be importable on the workers (or registered with `ray.cloudpickle.register_pickle_by_value`).
    """

    def __init__(
        self,
        worker_args: Mapping[str, Any],
        *,
        cache_dir: Path,
        platform: str,
        name: str,
        worker_class: type[Worker] | None = None,
    ):
        self.name = f"{name}@{socket.gethostname()}"
        self.platform, self.device_count = platform, 0
        self._startup_error: WorkerStartupError | None = None
        try:
            self._start(worker_args, cache_dir, platform, worker_class)
        except Exception as error:  # noqa: BLE001 - whatever start-up raised is reported by every call
            self._startup_error = startup_error(error, self.name)

    def _start(self, worker_args: Mapping[str, Any], cache_dir: Path, platform: str,
               worker_class: type[Worker] | None) -> None:
        if platform == "tpu":
            remove_stale_tpu_lockfile()
        self.platform, self.device_count = check_jax_platform(platform, self.name)
        config: ExperimentConfig = worker_args["config"]
        from runner.execution.workers import enable_compilation_cache, worker_class_for

        enable_compilation_cache(cache_dir)
        if worker_class is None:
            worker_class = worker_class_for(config.kind)
        sae_files = localise_sae_files(config, worker_args["sae_files"])
        # Synthetic SAEs are written by the first worker of a filesystem and reused by the others.
        writes_saes = any(f.path is None for f in sae_files.values())
        with _init_lock(cache_dir) if writes_saes else contextlib.nullcontext():
            self._worker = worker_class(
                **{**worker_args, "sae_files": sae_files}, cache_dir=cache_dir, worker_name=self.name
            )

    def _started(self) -> None:
        if self._startup_error is not None:
            raise self._startup_error

    def info(self) -> WorkerInfo:
        """Where this worker runs: name, hostname, Ray node id, process id, JAX platform and device count.

        Raises:
          WorkerStartupError: The worker could not start.
        """
        self._started()
        return WorkerInfo(
            name=self.name,
            hostname=socket.gethostname(),
            node_id=ray.get_runtime_context().get_node_id(),
            pid=os.getpid(),
            platform=self.platform,
            device_count=self.device_count,
            batch_size=self._worker.batch_size,
            memory=self._worker.memory_note,
        )

    def run_job(self, job: Job, attempt: int, batch_size: int | None = None) -> list[Result]:
        """Runs one job (in batches of at most `batch_size`, which the worker keeps for later jobs); every result
        names this worker and the attempt."""
        self._started()
        results = self._worker.run_job(job, attempt, batch_size)
        return [dataclasses.replace(result, worker=self.name, attempt=attempt) for result in results]

    def compilations(self) -> int:
        """Programs this worker compiled since it (re)started."""
        self._started()
        return self._worker.compilations
