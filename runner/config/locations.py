"""Where a sweep may write: the checks on the tracking store an experiment names, the one parser of a
`sqlite:` tracking URI's database file, and the preflight of the files and directories a command will write."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from runner.config.schema import ExperimentConfig
from runner.errors import ConfigError


def sqlite_file(uri: str) -> str | None:
    """The database file of a `sqlite:///PATH` tracking URI as written, query string dropped: relative to the
    directory MLflow runs in (`sqlite:///mlflow.db`), or absolute (`sqlite:////data/mlflow.db`). None for other
    URIs (no `sqlite:///`: an in-memory database, or not SQLite)."""
    if not uri.startswith("sqlite:///"):
        return None
    return uri.removeprefix("sqlite:///").split("?", 1)[0]


def check_write_locations(config: ExperimentConfig, output_dir: Path, source: Path) -> None:
    """Refuses an experiment that would make runner write outside `output_dir` (the directory `runner run` works
    in; MLflow resolves a relative sqlite path against it, and keeps a local store's artifacts under it).

    What an experiment file can point a write at is its tracking store: a `sqlite:` database or a `file:` (or
    plain path) store must resolve, symbolic links followed, inside `output_dir`. Tracking servers (`http(s)://`)
    and other stores are not local writes. Paths the file reads from (model, SAEs, prompts, text) may be anywhere.

    Raises:
      ConfigError: One line naming the file, the field, the value and what is allowed.
    """
    uri = config.tracking.uri
    parts = urlsplit(uri)
    target = sqlite_file(uri)
    if target is None:
        if parts.scheme not in ("", "file"):
            return
        target = parts.path if parts.scheme == "file" else uri
    root = Path(os.path.realpath(output_dir))
    written = Path(os.path.realpath(root / target))
    if written != root and root not in written.parents:
        raise ConfigError(
            f"{source}: tracking.uri: {uri!r} would write {str(written)!r}, outside the output directory "
            f"{str(root)!r} (allowed: a store under it, e.g. sqlite:///mlflow.db, or an http(s):// tracking "
            "server; run runner from the directory the results belong in)"
        )


def check_output_dir(path: Path, what: str) -> Path:
    """Makes sure a command can write into the directory `path` (created with its parents if missing) before it
    starts any work; returns `path`.

    Raises:
      ConfigError: One line: `what` (the option or file naming the directory), the path and why it cannot be
        written (a parent that is a file, a read-only filesystem, no permission, `/proc`...).
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=path, prefix=".runner-write-check-")
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ConfigError(f"{what}: cannot write to the directory {str(path)!r}: {reason} (allowed: a directory "
                          "this user can create and write)") from None
    return path


def check_output_file(path: Path, what: str) -> Path:
    """Makes sure a command can write the file `path` (its directory is created if missing) before it starts any
    work; returns `path`.

    Raises:
      ConfigError: One line: `what`, the path and why it cannot be written (it is a directory, its directory
        cannot be written).
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what}: {str(path)!r} is a directory (allowed: a file path)")
    check_output_dir(path.parent if str(path.parent) else Path("."), what)
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"{what}: cannot write {str(path)!r}: permission denied (allowed: a file this user can "
                          "write)")
    return path
