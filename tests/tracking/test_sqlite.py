"""A sqlite tracking database runs in SQLite's write-ahead log unless told not to."""

import contextlib
import shutil
import sqlite3

import sqlalchemy

from runner.tracking.sqlite import SQLITE_WAL_ENV, checkpoint_sqlite_tracking, tune_sqlite_tracking


def journal_mode(path) -> str:
    with contextlib.closing(sqlite3.connect(path)) as connection:
        return connection.execute("PRAGMA journal_mode").fetchone()[0]


def connect_once(uri: str) -> None:
    """Opens a connection as MLflow's store does (through SQLAlchemy) and writes to the database."""
    engine = sqlalchemy.create_engine(uri)
    with engine.begin() as connection:
        connection.execute(sqlalchemy.text("CREATE TABLE IF NOT EXISTS runs (id INTEGER)"))
        connection.execute(sqlalchemy.text("INSERT INTO runs VALUES (1)"))
    engine.dispose()


def rows_in_a_copy_of_the_file_alone(path, copy) -> list:
    shutil.copyfile(path, copy)  # without its -wal file, as a user copying mlflow.db would
    with contextlib.closing(sqlite3.connect(copy)) as connection:
        tables = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        return connection.execute("SELECT id FROM runs").fetchall() if tables else []


def test_a_tuned_database_uses_the_write_ahead_log_and_is_whole_after_a_checkpoint(tmp_path):
    path = tmp_path / "mlflow.db"
    uri = f"sqlite:///{path}"
    tune_sqlite_tracking(uri)
    engine = sqlalchemy.create_engine(uri)
    try:
        with engine.connect() as connection:  # the pool keeps it open, as MLflow's store does during a sweep
            connection.execute(sqlalchemy.text("CREATE TABLE runs (id INTEGER)"))
            connection.execute(sqlalchemy.text("INSERT INTO runs VALUES (1)"))
            connection.commit()
            assert journal_mode(path) == "wal"
            assert rows_in_a_copy_of_the_file_alone(path, tmp_path / "before.db") == []

            checkpoint_sqlite_tracking(uri)
            assert rows_in_a_copy_of_the_file_alone(path, tmp_path / "after.db") == [(1,)]
    finally:
        engine.dispose()


def test_other_databases_and_the_opt_out_keep_the_rollback_journal(tmp_path, monkeypatch):
    tune_sqlite_tracking(f"sqlite:///{tmp_path / 'tuned.db'}")  # the listener is installed
    untouched = tmp_path / "other.db"
    connect_once(f"sqlite:///{untouched}")
    assert journal_mode(untouched) == "delete"

    monkeypatch.setenv(SQLITE_WAL_ENV, "0")
    opted_out = tmp_path / "opted-out.db"
    tune_sqlite_tracking(f"sqlite:///{opted_out}")
    connect_once(f"sqlite:///{opted_out}")
    assert journal_mode(opted_out) == "delete"
