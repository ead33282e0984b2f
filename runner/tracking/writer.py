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
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import tenacity
from mlflow.exceptions import MlflowException

from runner.errors import TrackingUnavailable, error_line
from runner.plan.points import Point
from runner.redaction import scrub
from runner.results import Result
from runner.tracking.spool import Spool
from runner.tracking.store import SweepTracker

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


@dataclasses.dataclass(frozen=True)
class _Logged:
    points: tuple[Point, ...]
    results: tuple[Result, ...]


@dataclasses.dataclass(frozen=True)
class _Failed:
    points: tuple[Point, ...]
    error: str
    attempt: int


_Item = _Logged | _Failed


class _Abandoned(Exception):
    """Raised out of a pause between two tries when the writer is abandoned."""


class _GiveUpAfter(tenacity.stop.stop_base):
    """Stops retrying `seconds` after the first failure; tenacity's `stop_after_delay` would count from the start
    of the first try, which may have logged several points before it failed."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.first_failure = 0.0
        self.unreachable_for = 0.0

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        """Whether to stop after the try that just failed."""
        if retry_state.attempt_number == 1:
            self.first_failure = retry_state.outcome_timestamp
        self.unreachable_for = retry_state.outcome_timestamp - self.first_failure
        return self.unreachable_for >= self.seconds


class TrackingWriter:
    """Logs results and failures on a thread of its own (see the module docstring). Only transient failures
    (`is_transient`) are retried; a store that refuses a result stops the sweep at once, the result kept in the
    spool.

    Args:
      tracker: The open sweep's tracker; only this thread calls it until `close` returns.
      spool: Where results that could not be logged are kept.
      policy: Retries and backoff.
      on_logged: Called after each logged item (results: finished count and tokens; failures: failed count).
    """

    def __init__(self, tracker: SweepTracker, spool: Spool, policy: RetryPolicy, on_logged: LoggedCallback) -> None:
        self._tracker = tracker
        self._spool = spool
        self._policy = policy
        self._on_logged = on_logged
        self._queue: queue.Queue[_Item | None] = queue.Queue()  # None: stop
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
        self._queue.put(None)
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
        while (item := self._queue.get()) is not None:
            if self._gave_up is not None:
                self._keep(item)
            elif self._abandon.is_set():
                if not self._try_once(item):
                    self._keep(item)
            else:
                self._log_with_retries(item)

    def _keep(self, item: _Item) -> None:
        if isinstance(item, _Logged):
            self._unlogged.extend(item.results)

    def _try_once(self, item: _Item) -> bool:
        try:
            self._log(item)
        except Exception as error:  # noqa: BLE001 - kept for the next run
            _log.warning("could not log to the tracking server while stopping: %s", _one_line(error))
            return False
        return True

    def _log_with_retries(self, item: _Item) -> None:
        """Logs `item`, retrying transient failures as the policy says; an item given up on is kept."""
        give_up = _GiveUpAfter(self._policy.give_up_after_s)
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(is_transient),
            stop=give_up | tenacity.stop_when_event_set(self._abandon),
            # The first pause is `first_delay_s` even where `max_delay_s` is shorter (a short retry_timeout_s).
            wait=tenacity.wait_chain(
                tenacity.wait_fixed(self._policy.first_delay_s),
                tenacity.wait_exponential(multiplier=self._policy.first_delay_s, max=self._policy.max_delay_s),
            ),
            before_sleep=_warn_retrying,
            sleep=self._pause,
            reraise=True,
        )
        try:
            retrying(self._log, item)
        except _Abandoned:
            self._keep(item)
        except Exception as error:  # noqa: BLE001 - refused at once, or still unreachable when retrying stopped
            self._keep(item)
            if not is_transient(error):
                self._gave_up = f"tracking.uri: {self._tracker.uri} refused a result: {_one_line(error)}"
            else:
                self._gave_up = (
                    f"tracking.uri: {self._tracker.uri} unreachable for {give_up.unreachable_for:.0f} s "
                    f"(tracking.retry_timeout_s={self._policy.give_up_after_s:g}); last error: {_one_line(error)}"
                )

    def _pause(self, seconds: float) -> None:
        """The pause between two tries, cut short (raising `_Abandoned`) when the writer is abandoned."""
        if self._abandon.wait(seconds):
            raise _Abandoned

    def _log(self, item: _Item) -> None:
        started = time.perf_counter()
        try:
            if isinstance(item, _Logged):
                self._tracker.log_results(item.points, item.results)
                self._on_logged(len(item.results), 0, sum(result.tokens for result in item.results))
            else:
                self._tracker.fail_points(item.points, item.error, attempt=item.attempt)
                self._on_logged(0, len(item.points), 0)
        finally:
            self.busy_seconds += time.perf_counter() - started


def is_transient(error: BaseException) -> bool:
    """Whether a tracking call that raised `error` may succeed when tried again: the server or database was
    unreachable, overloaded or busy (HTTP 5xx or 429, a refused or broken connection, a locked sqlite file), as
    opposed to a request the store refused (HTTP 4xx), which fails the same way every time."""
    if isinstance(error, MlflowException):
        return error.get_http_status_code() >= 500 or error.get_http_status_code() == 429
    return isinstance(error, (OSError, ConnectionError, TimeoutError, sqlite3.OperationalError)) or any(
        type(cause).__module__.split(".")[0] in ("requests", "urllib3", "sqlalchemy")
        for cause in _causes(error)
    )


def _causes(error: BaseException | None) -> Iterator[BaseException]:
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def _warn_retrying(retry_state: tenacity.RetryCallState) -> None:
    error = retry_state.outcome.exception()
    _log.warning("tracking server unreachable (%s); retrying in %.0f s", _one_line(error), retry_state.upcoming_sleep)


def _one_line(error: BaseException) -> str:
    return scrub(error_line(error))
