"""One writer per sweep: the tracking store reached before anything starts, and the sweep leased to one driver.

`claim_sweep` is what a driver does first, before any model file is read or Ray starts:

1. It reaches a tracking server (`reach_store`), retrying a transient failure for `tracking.retry_timeout_s`. A
   local store (`sqlite:` or `file:`) needs no reaching to be leased: the driver opens it with `reach_store` when
   it opens the sweep, while Ray starts (MLflow's import and a new database's tables take seconds), and creates
   it there under an OS file lock, so that two drivers starting on a new database never race on MLflow's table
   creation.
2. It leases the sweep. On a local store the lease is an OS file lock (`filelock`) next to the store,
   `<store>.runner-lease/<sweep_id>.lock`, held for the whole run and released by the OS when the driver exits
   however it exits; who holds it is written beside it (`<sweep_id>.owner.json`). On any other store (a tracking
   server) the lease is an experiment tag, `runner.lease.<sweep_id>`, holding the owner, its host and process,
   and a second tag, `runner.lease.<sweep_id>.heartbeat`, the owner's token and the time it last renewed the lease
   (every `heartbeat_s`); the owner tag is written only when the lease is claimed, so a heartbeat never overwrites
   a new owner. A lease whose heartbeat is older than `stale_after_s`, or whose process is gone from this host, is
   stale and taken over; `take_over` takes it regardless. MLflow has no compare-and-set, so a driver writes its
   claim, waits `settle_s` and reads it back: of two drivers that claim at once, the last writer holds the lease
   and the other is refused.

A tracking server's lease lives on the experiment rather than on the sweep's parent run because a new sweep has no
parent run yet: the lease is what lets exactly one driver create it. A driver that finds its lease taken over
(`SweepLease.check`) stops without touching the sweep's runs, which now belong to the new owner.
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import filelock
import psutil
import tenacity

from runner.config.locations import sqlite_file
from runner.errors import RunnerError, TrackingUnavailable, first_line
from runner.files import write_text_atomically
from runner.redaction import redact_uri, scrub
from runner.tracking.layout import TAG_EXPERIMENT_KIND

if TYPE_CHECKING:
    # MLflow (seconds to import) is imported only to reach a store: a local store's lease is an OS lock.
    from mlflow import MlflowClient

_log = logging.getLogger(__name__)

#: The experiment tag of a sweep's lease on a tracking server (the sweep id follows), and the end of its heartbeat's.
LEASE_TAG_PREFIX = "runner.lease."
HEARTBEAT_SUFFIX = ".heartbeat"
#: How often a driver renews its lease on a tracking server, and how old a heartbeat makes a lease stale.
HEARTBEAT_S = 15.0
STALE_AFTER_S = 120.0
#: How long a driver waits between writing its claim and reading it back.
SETTLE_S = 1.0
#: Tokens of the server leases this process holds now; a lease this process took but no longer holds (its release
#: failed while the server was away) is stale to this process.
_HELD: set[str] = set()


class LeaseHeld(RunnerError):
    """Another driver runs the sweep."""


class LeaseLost(RunnerError):
    """The sweep was taken over by another driver while this one ran it."""


@dataclasses.dataclass(frozen=True)
class Owner:
    """Who holds a lease.

    Attributes:
      token: Unique to one driver run.
      user, host, pid: The driver's user, host name and process id.
      pid_started: The process's start time (epoch seconds), which tells a live process from a recycled pid.
      started: When the lease was taken (epoch seconds).
      heartbeat: When it was last renewed (epoch seconds; a local lease is never renewed).
    """

    token: str
    user: str
    host: str
    pid: int
    pid_started: float
    started: float
    heartbeat: float

    @classmethod
    def this_process(cls) -> Owner:
        """An owner record for this driver, now."""
        now = time.time()
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = "?"
        return cls(token=uuid.uuid4().hex, user=user, host=socket.gethostname(), pid=os.getpid(),
                   pid_started=psutil.Process().create_time(), started=now, heartbeat=now)

    def to_json(self) -> str:
        """The record as JSON."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Owner | None:
        """A record written by `to_json`, or None for anything else."""
        try:
            data = json.loads(text)
            return cls(**{field.name: data[field.name] for field in dataclasses.fields(cls)})
        except (ValueError, TypeError, KeyError):
            return None

    def is_gone(self) -> bool:
        """Whether this owner's process has ended (known only on its own host), or is this process, which no longer
        holds the lease (an earlier run of the sweep in this process could not release it)."""
        if self.host != socket.gethostname():
            return False
        if self.pid == os.getpid():
            return self.token not in _HELD
        try:
            return abs(psutil.Process(self.pid).create_time() - self.pid_started) > 1.0
        except psutil.NoSuchProcess:
            return True
        except psutil.Error:
            return False

    def describe(self, now: float | None = None) -> str:
        """`user@host, pid N, since HH:MM:SS` plus the heartbeat's age for a renewed lease."""
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        words = f"{self.user}@{self.host}, pid {self.pid}, since {since}"
        if self.heartbeat > self.started:
            words += f", last heartbeat {max((now or time.time()) - self.heartbeat, 0):.0f} s ago"
        return words


class SweepLease(Protocol):
    """A sweep leased to this driver."""

    def check(self) -> None:
        """Raises `LeaseLost` when another driver took the sweep over."""

    def release(self) -> None:
        """Gives the lease up (idempotent)."""


# -------------------------------------------------------------------------------------------------------------
# Reaching the store


def local_store_path(uri: str) -> Path | None:
    """The file or directory of a local tracking store (`sqlite:///PATH`, `file:PATH` or a plain path), relative
    to the working directory unless absolute; None for a tracking server or a database server."""
    database = sqlite_file(uri)
    if database is not None:
        return Path(database)
    parts = urlsplit(uri)
    if parts.scheme == "file":
        return Path(parts.path)
    if parts.scheme == "" or (len(parts.scheme) == 1 and uri[1:3] == ":\\"):  # a plain path
        return Path(uri)
    return None


def lease_dir(uri: str) -> Path | None:
    """Where a local store's locks live: `<store>.runner-lease/` next to it; None for other stores."""
    path = local_store_path(uri)
    return path.with_name(path.name + ".runner-lease") if path is not None else None


def reach_store(
    uri: str,
    retry_timeout_s: float,
    *,
    on_retry: Callable[[str, float], None] | None = None,
    first_delay_s: float = 1.0,
) -> MlflowClient:
    """Connects to the tracking store and makes one call, retrying transient failures (`is_transient`: refused
    connections, HTTP 5xx/429, a locked database) for `retry_timeout_s`; creates a local store that does not
    exist yet, under a file lock that makes its first creation by two drivers at once safe.

    Args:
      uri: `tracking.uri`.
      retry_timeout_s: How long an unreachable store is retried.
      on_retry: Called with (the failure in one line, seconds until the next try) before each pause.
      first_delay_s: The first pause; doubled after each try, at most 30 s.

    Raises:
      TrackingUnavailable: The store stayed unreachable for `retry_timeout_s`, or refused the call (a 4xx such as
        401: retrying cannot help); one line, credentials removed.
    """
    from mlflow import MlflowClient

    from runner.tracking.sqlite import tune_sqlite_tracking
    from runner.tracking.writer import is_transient

    started = time.monotonic()
    locks = lease_dir(uri)

    def call() -> MlflowClient:
        tune_sqlite_tracking(uri)
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)
        return client

    def reach() -> MlflowClient:
        if locks is None:
            return call()
        locks.mkdir(parents=True, exist_ok=True)
        with filelock.FileLock(locks / "store.lock"):
            return call()

    def before_sleep(state: tenacity.RetryCallState) -> None:
        if on_retry is not None:
            on_retry(_one_line(state.outcome.exception()), state.upcoming_sleep)

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(is_transient),
        stop=tenacity.stop_after_delay(retry_timeout_s),
        wait=tenacity.wait_exponential(multiplier=first_delay_s, max=30.0),
        before_sleep=before_sleep,
        reraise=True,
    )
    try:
        return retrying(reach)
    except Exception as error:  # noqa: BLE001 - every way of not reaching the store ends the same
        where = redact_uri(uri)
        if not is_transient(error):
            raise TrackingUnavailable(f"tracking.uri: {where} refused the connection: {_one_line(error)}") from None
        raise TrackingUnavailable(
            f"tracking.uri: {where} unreachable for {time.monotonic() - started:.0f} s "
            f"(tracking.retry_timeout_s={retry_timeout_s:g}): {_one_line(error)}"
        ) from None


def _one_line(error: BaseException) -> str:
    return first_line(scrub(f"{type(error).__name__}: {error}")) or type(error).__name__


# -------------------------------------------------------------------------------------------------------------
# Leasing a sweep


def claim_sweep(
    uri: str,
    experiment: str,
    sweep_id: str,
    *,
    retry_timeout_s: float,
    take_over: bool = False,
    on_retry: Callable[[str, float], None] | None = None,
) -> SweepLease:
    """Leases the sweep to this driver, reaching a tracking server first (see the module docstring).

    Raises:
      TrackingUnavailable: The tracking server cannot be reached.
      LeaseHeld: Another driver runs the sweep; one line naming it and how to take over.
    """
    locks = lease_dir(uri)
    if locks is not None:
        return LocalLease.acquire(locks, sweep_id, take_over=take_over)
    client = reach_store(uri, retry_timeout_s, on_retry=on_retry)
    return ServerLease.acquire(client, experiment, sweep_id, take_over=take_over)


class LocalLease:
    """A local store's lease: an OS file lock held for the run (see the module docstring). Use `acquire`."""

    def __init__(self, lock: filelock.FileLock, owner_file: Path, owner: Owner) -> None:
        self._lock, self._owner_file, self._owner = lock, owner_file, owner

    @classmethod
    def acquire(cls, locks: Path, sweep_id: str, *, take_over: bool = False) -> LocalLease:
        """Takes the sweep's lock without waiting.

        Raises:
          LeaseHeld: Another live process holds it (`take_over` cannot break an OS lock: its holder must end).
        """
        locks.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(locks / f"{sweep_id}.lock", timeout=0)
        owner_file = locks / f"{sweep_id}.owner.json"
        try:
            lock.acquire()
        except filelock.Timeout:
            holder = Owner.from_json(_read(owner_file))
            who = holder.describe() if holder is not None else "another process"
            hint = (f"stop that process (pid {holder.pid})" if holder is not None else "stop that process")
            advice = (f"--take-over cannot break a local store's lock while its holder runs: {hint} first"
                      if take_over else f"wait for it to finish, or {hint}; the next run resumes the sweep")
            raise LeaseHeld(f"sweep {sweep_id} is already running ({who}; it holds {lock.lock_file}): {advice}") \
                from None
        owner = Owner.this_process()
        try:
            write_text_atomically(owner_file, owner.to_json())
        except BaseException:
            lock.release()
            raise
        return cls(lock, owner_file, owner)

    def check(self) -> None:
        """Never lost: the OS holds the lock until this process releases it or ends."""

    def release(self) -> None:
        """Removes the owner record and releases the lock."""
        if not self._lock.is_locked:
            return
        with contextlib.suppress(OSError):
            if Owner.from_json(_read(self._owner_file)) == self._owner:
                self._owner_file.unlink()
        self._lock.release()


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return ""


class ServerLease:
    """A tracking server's lease: an experiment tag renewed by a heartbeat thread (see the module docstring).
    Use `acquire`."""

    def __init__(self, client: MlflowClient, experiment_id: str, sweep_id: str, owner: Owner, *,
                 heartbeat_s: float, stale_after_s: float) -> None:
        self._client, self._experiment_id, self._key = client, experiment_id, LEASE_TAG_PREFIX + sweep_id
        self._sweep_id, self._owner = sweep_id, owner
        self._heartbeat_s, self._stale_after_s = heartbeat_s, stale_after_s
        self._stop = threading.Event()
        self._lost_to: Owner | None = None
        _HELD.add(owner.token)
        self._thread = threading.Thread(target=self._renew, name="runner-lease", daemon=True)
        self._thread.start()

    @classmethod
    def acquire(
        cls,
        client: MlflowClient,
        experiment: str,
        sweep_id: str,
        *,
        take_over: bool = False,
        heartbeat_s: float = HEARTBEAT_S,
        stale_after_s: float = STALE_AFTER_S,
        settle_s: float = SETTLE_S,
    ) -> ServerLease:
        """Claims the sweep on the experiment (created if missing) unless a live lease holds it.

        Raises:
          LeaseHeld: Another driver's lease is fresh (and `take_over` is not given), or another driver claimed the
            sweep at the same moment and won.
        """
        experiment_id = _ensure_experiment(client, experiment)
        key = LEASE_TAG_PREFIX + sweep_id
        holder = _lease_on(client, experiment_id, key)
        now = time.time()
        if holder is not None and not take_over and not _is_stale(holder, now, stale_after_s):
            raise LeaseHeld(
                f"sweep {sweep_id} is already running ({holder.describe(now)}; lease tag {key} on experiment "
                f"{experiment!r}): wait for it to finish, or run again with --take-over if that run is gone (a "
                f"lease is taken over by itself {stale_after_s:.0f} s after its last heartbeat)"
            )
        if holder is not None:
            _log.warning("taking over sweep %s from %s", sweep_id, holder.describe(now))
        owner = Owner.this_process()
        _set_tag_despite_races(client, experiment_id, key, owner.to_json())
        time.sleep(settle_s)
        winner = _lease_on(client, experiment_id, key)
        if winner is None or winner.token != owner.token:
            who = winner.describe() if winner is not None else "a driver that released it at once"
            raise LeaseHeld(f"sweep {sweep_id} was claimed at the same moment by {who}; it runs the sweep")
        return cls(client, experiment_id, sweep_id, owner, heartbeat_s=heartbeat_s, stale_after_s=stale_after_s)

    def check(self) -> None:
        """Raises `LeaseLost` once the heartbeat found another owner on the lease."""
        if self._lost_to is not None:
            raise LeaseLost(
                f"sweep {self._sweep_id} was taken over by {self._lost_to.describe()}; this run stops and leaves "
                "the sweep's runs to it"
            )

    def release(self) -> None:
        """Stops the heartbeat and removes the lease tag if it is still this driver's, or the leftover claim of a
        driver that is gone (one that lost a claim race after writing its own claim)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        _HELD.discard(self._owner.token)
        if self._lost_to is not None:
            return
        try:
            holder = _lease_on(self._client, self._experiment_id, self._key)
            if holder is not None and (holder.token == self._owner.token or holder.is_gone()):
                _delete_tag_despite_races(self._client, self._experiment_id, self._key)
                _delete_tag_despite_races(self._client, self._experiment_id, self._key + HEARTBEAT_SUFFIX)
        except Exception as error:  # noqa: BLE001 - an unreleased lease goes stale by itself
            _log.warning("could not release the lease of sweep %s: %s", self._sweep_id, _one_line(error))

    def _renew(self) -> None:
        while not self._stop.wait(self._heartbeat_s):
            try:
                holder = _lease_on(self._client, self._experiment_id, self._key)
                if holder is not None and holder.token != self._owner.token:
                    self._lost_to = holder
                    _log.warning("sweep %s was taken over by %s", self._sweep_id, holder.describe())
                    return
                _set_tag_despite_races(self._client, self._experiment_id, self._key + HEARTBEAT_SUFFIX,
                                       json.dumps({"token": self._owner.token, "time": time.time()}))
            except Exception as error:  # noqa: BLE001 - the tracking thread deals with an unreachable server
                _log.warning("could not renew the lease of sweep %s: %s", self._sweep_id, _one_line(error))


def _is_write_race(error: BaseException) -> bool:
    """A tag write that lost to another driver's write of the same tag in the server's database (its upsert
    raised an integrity error), or a transient failure: worth trying again."""
    from runner.tracking.writer import is_transient

    text = str(error)
    return is_transient(error) or "IntegrityError" in text or "UNIQUE constraint" in text


@tenacity.retry(retry=tenacity.retry_if_exception(_is_write_race), stop=tenacity.stop_after_attempt(6),
                wait=tenacity.wait_random(0.1, 0.5), reraise=True)
def _set_tag_despite_races(client: MlflowClient, experiment_id: str, key: str, value: str) -> None:
    """Writes an experiment tag, again when two drivers' writes of it collided in the server's database."""
    client.set_experiment_tag(experiment_id, key, value)


@tenacity.retry(retry=tenacity.retry_if_exception(_is_write_race), stop=tenacity.stop_after_attempt(6),
                wait=tenacity.wait_random(0.1, 0.5), reraise=True)
def _delete_tag_despite_races(client: MlflowClient, experiment_id: str, key: str) -> None:
    """Deletes an experiment tag if it is there (a sweep shorter than one heartbeat has no heartbeat tag), again
    after a transient failure or a collision in the server's database."""
    from mlflow.exceptions import MlflowException

    try:
        client.delete_experiment_tag(experiment_id, key)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise


def _ensure_experiment(client: MlflowClient, name: str) -> str:
    """The experiment's id, creating it as the tracker would (a model-development experiment) if missing; another
    driver may create it meanwhile."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, tags={TAG_EXPERIMENT_KIND: "custom_model_development"})
        except MlflowException:
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    return experiment.experiment_id


def _lease_on(client: MlflowClient, experiment_id: str, key: str) -> Owner | None:
    """The lease's owner, its `heartbeat` the last one it wrote (its claim's time until it renews)."""
    tags: dict[str, Any] = client.get_experiment(experiment_id).tags
    owner = Owner.from_json(tags[key]) if key in tags else None
    if owner is None:
        return None
    try:
        beat = json.loads(tags.get(key + HEARTBEAT_SUFFIX, "{}"))
        if beat.get("token") == owner.token:
            return dataclasses.replace(owner, heartbeat=max(owner.heartbeat, float(beat["time"])))
    except (ValueError, TypeError, KeyError, AttributeError):
        pass  # a heartbeat that does not parse is no heartbeat
    return owner


def _is_stale(holder: Owner, now: float, stale_after_s: float) -> bool:
    return now - holder.heartbeat > stale_after_s or holder.is_gone()
