"""The driver's tracking thread: every result reaches MLflow once, in order, or waits in a spool file.

The controller loop hands results and failures over without blocking, so workers are never held up by logging.
One thread logs them through the `SweepTracker` (still the only MLflow writer of the sweep), retrying with
exponential backoff while the tracking server is unreachable. When it has retried one item for
`tracking.retry_timeout_s` it gives up: the sweep stops, and the results it holds are written to a spool file
(JSON lines). The next run of the same sweep logs the spooled results before it computes anything, so no finished
result is lost or computed twice.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runner.errors import TrackingUnavailable, first_line
from runner.files import write_text_atomically
from runner.plan.points import Point
from runner.results import PointResult, Result, SAEEvalPointResult, SAEMeasurement
from runner.tracking.store import SweepTracker, is_transient, scrub

_log = logging.getLogger(__name__)

#: `on_logged(finished, failed, tokens)`: called on the tracking thread after each item it logged.
LoggedCallback = Callable[[int, int, int], None]


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How long and how often the tracking thread retries a call that failed.

    Attributes:
      first_delay_s: Pause after the first failure; doubled after each further one.
      max_delay_s: Longest pause between two tries.
      give_up_after_s: Retrying one item stops this long after its first failure.
    """

    first_delay_s: float = 1.0
    max_delay_s: float = 30.0
    give_up_after_s: float = 600.0


class Spool:
    """Finished results that could not be logged yet, one JSON object per line, for one sweep."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def read(self) -> list[Result]:
        """The spooled results (none when there is no spool file)."""
        if not self.path.is_file():
            return []
        lines = self.path.read_text(encoding="utf-8").splitlines()
        return [result_from_record(json.loads(line)) for line in lines if line.strip()]

    def write(self, results: Sequence[Result]) -> None:
        """Replaces the spool with `results` (atomically; an empty list removes the file)."""
        if not results:
            self.clear()
            return
        write_text_atomically(self.path, "".join(json.dumps(result_record(result)) + "\n" for result in results))

    def clear(self) -> None:
        """Removes the spool file."""
        self.path.unlink(missing_ok=True)


def result_record(result: Result) -> dict[str, Any]:
    """A result as JSON-safe data (arrays as lists; an SAE measurement's fields beside the point's)."""
    fields = _plain_fields(result)
    if isinstance(result, SAEEvalPointResult):
        fields.update(_plain_fields(fields.pop("measurement")))
    kind = "steering" if isinstance(result, PointResult) else "sae_eval"
    return {"kind": kind, **json.loads(json.dumps(fields))}


def _plain_fields(instance: PointResult | SAEEvalPointResult | SAEMeasurement) -> dict[str, Any]:
    return {
        field.name: (value.tolist() if isinstance(value, np.ndarray) else value)
        for field in dataclasses.fields(instance)
        for value in [getattr(instance, field.name)]
    }


def result_from_record(record: dict[str, Any]) -> Result:
    """The inverse of `result_record`."""
    fields = {key: value for key, value in record.items() if key != "kind"}
    if record["kind"] == "steering":
        return PointResult(**fields)
    measured = [field.name for field in dataclasses.fields(SAEMeasurement) if field.name in fields]
    measurement = SAEMeasurement(**{name: fields.pop(name) for name in measured})
    return SAEEvalPointResult(measurement=measurement, **fields)


@dataclasses.dataclass(frozen=True)
class _Logged:
    points: tuple[Point, ...]
    results: tuple[Result, ...]


@dataclasses.dataclass(frozen=True)
class _Failed:
    points: tuple[Point, ...]
    error: str
    attempt: int


_STOP = object()


class TrackingWriter:
    """Logs results and failures on a thread of its own (see the module docstring). Only transient failures
    (`tracking.is_transient`) are retried; a store that refuses a result stops the sweep at once, the result
    kept in the spool.

    Args:
      tracker: The open sweep's tracker; only this thread calls it until `close` returns.
      spool: Where results that could not be logged are kept.
      policy: Retries and backoff.
      on_logged: Called after each logged item (results: finished count and tokens; failures: failed count).
    """

    def __init__(self, tracker: SweepTracker, spool: Spool, policy: RetryPolicy, on_logged: LoggedCallback):
        self._tracker = tracker
        self._spool = spool
        self._policy = policy
        self._on_logged = on_logged
        self._queue: queue.Queue[Any] = queue.Queue()
        self._abandon = threading.Event()
        self._gave_up: str | None = None
        self._unlogged: list[Result] = []
        self.busy_seconds = 0.0
        self._thread = threading.Thread(target=self._run, name="runner-tracking", daemon=True)
        self._thread.start()

    def put_results(self, points: Sequence[Point], results: Sequence[Result]) -> None:
        """Queues a job's results (one per point, in order); raises `TrackingUnavailable` once the thread gave up."""
        self.raise_if_gave_up()
        self._queue.put(_Logged(tuple(points), tuple(results)))

    def put_failure(self, points: Sequence[Point], error: str, attempt: int) -> None:
        """Queues a failed job's points."""
        self.raise_if_gave_up()
        self._queue.put(_Failed(tuple(points), error, attempt))

    def raise_if_gave_up(self) -> None:
        """Raises `TrackingUnavailable` when the tracking server stayed unreachable too long."""
        if self._gave_up is not None:
            raise TrackingUnavailable(self._gave_up)

    def close(self, *, abandon: bool = False) -> None:
        """Waits until everything queued is logged (or given up on), then stops the thread.

        With `abandon` (Ctrl-C, another error), items that fail are not retried. Whatever is left unlogged goes
        to the spool; `TrackingUnavailable` is raised if that happened because the tracking server was
        unreachable.
        """
        if abandon:
            self._abandon.set()
        self._queue.put(_STOP)
        self._thread.join()
        if self._unlogged:
            self._spool.write(self._unlogged)
            _log.warning("%d finished results kept in %s for the next run", len(self._unlogged), self._spool.path)
        if self._gave_up is not None:
            raise TrackingUnavailable(
                f"{self._gave_up}; {len(self._unlogged)} finished results are kept in {self._spool.path}: run the "
                "same command again once the tracking server is back to log them without recomputing"
            )

    # -- the thread ------------------------------------------------------------------------------------------

    def _run(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            if self._gave_up is not None:
                self._keep(item)
            elif self._abandon.is_set():
                if not self._try_once(item):
                    self._keep(item)
            else:
                self._log_with_retries(item)

    def _keep(self, item: Any) -> None:
        if isinstance(item, _Logged):
            self._unlogged.extend(item.results)

    def _try_once(self, item: Any) -> bool:
        try:
            self._log(item)
        except Exception as error:  # noqa: BLE001 - kept for the next run
            _log.warning("could not log to the tracking server while stopping: %s", _one_line(error))
            return False
        return True

    def _log_with_retries(self, item: Any) -> None:
        first_failure: float | None = None
        delay = self._policy.first_delay_s
        while True:
            try:
                self._log(item)
                return
            except Exception as error:  # noqa: BLE001 - the tracking store's failures are sorted below
                now = time.monotonic()
                first_failure = now if first_failure is None else first_failure
                if not is_transient(error):
                    self._gave_up = f"tracking.uri: {self._tracker.uri} refused a result: {_one_line(error)}"
                    self._keep(item)
                    return
                if now - first_failure >= self._policy.give_up_after_s or self._abandon.is_set():
                    self._gave_up = (
                        f"tracking.uri: {self._tracker.uri} unreachable for {now - first_failure:.0f} s "
                        f"(tracking.retry_timeout_s={self._policy.give_up_after_s:g}); last error: {_one_line(error)}"
                    )
                    self._keep(item)
                    return
                _log.warning("tracking server unreachable (%s); retrying in %.0f s", _one_line(error), delay)
                if self._abandon.wait(delay):
                    self._keep(item)
                    return
                delay = min(2 * delay, self._policy.max_delay_s)

    def _log(self, item: Any) -> None:
        started = time.perf_counter()
        try:
            if isinstance(item, _Logged):
                for point, result in zip(item.points, item.results, strict=True):
                    self._tracker.log_point(point, result)
                self._on_logged(len(item.results), 0, sum(result.tokens for result in item.results))
            else:
                for point in item.points:
                    self._tracker.fail_point(point, item.error, attempt=item.attempt)
                self._on_logged(0, len(item.points), 0)
        finally:
            self.busy_seconds += time.perf_counter() - started


def _one_line(error: BaseException) -> str:
    return first_line(scrub(f"{type(error).__name__}: {error}")) or type(error).__name__
