"""Errors that the CLI reports as one clear line (file, field, value, what is allowed)."""

from __future__ import annotations


def first_line(text: str) -> str:
    """The first non-blank line of `text`, stripped ("" when there is none): a long error message as a log line."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def error_line(error: BaseException) -> str:
    """An exception as one log line: `Type: first line of its message` (the type alone when it has none)."""
    return first_line(f"{type(error).__name__}: {error}") or type(error).__name__


class RunnerError(Exception):
    """Base class of every error a user can fix; the CLI prints `str(error)` alone and exits non-zero."""


class ConfigError(RunnerError):
    """An experiment file or override is invalid."""


class CheckpointError(RunnerError):
    """A model checkpoint is missing, malformed or inconsistent."""


class SAEError(RunnerError):
    """An SAE file is missing, malformed, or does not fit the model."""


class PlanError(RunnerError):
    """The sweep cannot run as asked (index out of range, prompt too long, batch does not fit)."""


class TrackingUnavailable(RunnerError):
    """The tracking server stayed unreachable for longer than `tracking.retry_timeout_s`."""
