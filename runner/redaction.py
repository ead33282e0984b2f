"""Credentials out of free text: what runner logs, tags or prints of an error never carries a secret.

Pure Python (no runner imports), so that the tracking store, the executors and the CLI can all use it.
"""

from __future__ import annotations

import re

_SECRET_PATTERNS = (
    (re.compile(r"(\b[a-z][a-z0-9+.-]*://)[^/\s@]+@"), r"\1***@"),
    (re.compile(r"\b(hf|ghp|gho|github_pat|sk|xox[abp])_[A-Za-z0-9_-]{8,}"), r"\1_***"),
    (re.compile(r"(?i)\b(password|passwd|token|secret|api[_-]?key|authorization)(\s*[=:]\s*)\S+"), r"\1\2***"),
)


def scrub(text: str) -> str:
    """Removes URL credentials, API tokens and `password=...`-style values from free text before it is logged."""
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text
