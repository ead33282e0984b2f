"""SQLite tracking databases (`sqlite:///` URIs): the write-ahead log that makes logging fast, and folding that
log back into the `.db` file when a sweep closes."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from typing import TYPE_CHECKING

from runner.config.locations import sqlite_file

if TYPE_CHECKING:
    from sqlalchemy.engine.interfaces import DBAPIConnection
    from sqlalchemy.pool import ConnectionPoolEntry

_log = logging.getLogger(__name__)

#: Set to 0 to leave a sqlite tracking database in its default rollback-journal mode (e.g. on a network filesystem,
#: where SQLite's write-ahead log does not work).
SQLITE_WAL_ENV = "RUNNER_SQLITE_WAL"
_tuned_sqlite_files: set[str] = set()


def tune_sqlite_tracking(uri: str) -> None:
    """Makes this process's connections to a `sqlite:///` tracking database use SQLite's write-ahead log with
    `synchronous=NORMAL`.

    MLflow commits every call (several per child run); in the default journal mode each commit syncs the file
    twice, which made logging a point ~4x slower here. WAL is SQLite's own answer: a crash of this process loses
    nothing, a power failure at most the last commits, and readers (the MLflow UI) never block the sweep. The mode
    is stored in the database file. Does nothing for other URIs or with `RUNNER_SQLITE_WAL=0`.
    """
    path = _sqlite_file(uri)
    if path is None or os.environ.get(SQLITE_WAL_ENV, "1") == "0":
        return
    if not _tuned_sqlite_files:
        from sqlalchemy import event
        from sqlalchemy.engine import Engine

        event.listen(Engine, "connect", _set_sqlite_pragmas)
    _tuned_sqlite_files.add(path)


def checkpoint_sqlite_tracking(uri: str) -> None:
    """Moves what the write-ahead log of a tuned `sqlite:///` tracking database holds into the database file and
    empties the log, so that the `.db` file alone has every run (e.g. when it is copied). Never raises: the data is
    safe in the log either way."""
    path = _sqlite_file(uri)
    if path not in _tuned_sqlite_files:
        return
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=10.0)) as connection:
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except sqlite3.Error as error:
        _log.warning("could not fold the write-ahead log into %s: %s", path, error)


def _sqlite_file(uri: str) -> str | None:
    """The real path of a `sqlite:///` tracking database, else None."""
    database = sqlite_file(uri)
    return os.path.realpath(database) if database is not None else None


def _set_sqlite_pragmas(connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
    """SQLAlchemy's `connect` event: switches a new connection to a tuned database to the write-ahead log."""
    if not isinstance(connection, sqlite3.Connection):
        return
    cursor = connection.cursor()
    try:
        files = {os.path.realpath(row[2]) for row in cursor.execute("PRAGMA database_list") if row[2]}
        if files & _tuned_sqlite_files:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()
