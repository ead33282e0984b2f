"""Credentials out of free text and URIs: what runner logs, tags or prints never carries a secret.

`scrub` cleans free text (error messages, log lines): the user info of any URL, API tokens, `password=...`-style
values and URL query parameters named like a secret. `redact_uri` cleans one URI that runner prints or logs (a
tracking URI). `scrub_log_records` makes every log record of this process pass through `scrub`.

Pure Python (no runner imports), so that the tracking store, the executors and the CLI can all use it.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

#: Words that make a query parameter (or a `name=value` pair) a secret, matched anywhere in its name, any case:
#: `token`, `access_token`, `api_key`, `X-Amz-Signature`, `sig`, `auth`, `password`, `client_secret`...
SECRET_NAME_WORDS = ("token", "key", "pass", "pwd", "secret", "sig", "auth", "credential", "session", "cookie")
_SECRET_NAME = "|".join(SECRET_NAME_WORDS)
_MASK = "***"

_SECRET_PATTERNS = (
    (re.compile(r"(\b[a-z][a-z0-9+.-]*://)[^/\s@]+@"), rf"\1{_MASK}@"),
    (re.compile(r"\b(hf|ghp|gho|github_pat|sk|xox[abp])_[A-Za-z0-9_-]{8,}"), rf"\1_{_MASK}"),
    # A URL's query parameter named like a secret: ?token=abc&page=2 -> ?token=***&page=2
    (re.compile(rf"(?i)([?&;][^=&;#\s]*(?:{_SECRET_NAME})[^=&;#\s]*=)[^&;#\s]+"), rf"\1{_MASK}"),
    (re.compile(r"(?i)\b(password|passwd|token|secret|api[_-]?key|authorization)(\s*[=:]\s*)[^\s&;]+"),
     rf"\1\2{_MASK}"),
)


def scrub(text: str) -> str:
    """Removes URL credentials, API tokens, secret query parameters and `password=...`-style values from free
    text before it is logged, tagged or printed."""
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def is_secret_name(name: str) -> bool:
    """Whether a query parameter (or field) named `name` holds a secret (see `SECRET_NAME_WORDS`)."""
    lowered = name.lower()
    return any(word in lowered for word in SECRET_NAME_WORDS)


def redact_uri(uri: str) -> str:
    """`uri` as it may be printed or logged: user info replaced by `***`, and the value of every query parameter
    named like a secret replaced by `***` (other parameters, the path and the fragment are kept)."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return scrub(uri)
    netloc, query = parts.netloc, parts.query
    if "@" in netloc:
        netloc = f"{_MASK}@{netloc.rpartition('@')[2]}"
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(is_secret_name(name) for name, _ in pairs):
        query = urlencode([(name, _MASK if is_secret_name(name) else value) for name, value in pairs], safe="*")
    if (netloc, query) == (parts.netloc, parts.query):
        return uri  # rebuilt, `sqlite:///x.db` would lose a slash
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def scrub_log_records() -> None:
    """Makes every log record this process creates from now on, whichever library emits it, carry a message
    passed through `scrub` (a log record factory, so that every handler sees the scrubbed text). Idempotent."""
    factory = logging.getLogRecordFactory()
    if getattr(factory, "runner_scrubs", False):
        return

    def scrubbed_record(*args: object, **kwargs: object) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is the handler's to report
            return record
        cleaned = scrub(message)
        if cleaned != message:
            record.msg, record.args = cleaned, ()
        return record

    scrubbed_record.runner_scrubs = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(scrubbed_record)
