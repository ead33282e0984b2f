"""Files written whole or not at all: a temporary sibling, renamed over the target once it is complete.

A reader (another worker, a resumed sweep, a user copying a cache) never sees a half-written file, and a writer
that fails or is killed leaves at most a hidden `.name.*` sibling behind, never a truncated target.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: Path, *, suffix: str = "") -> Iterator[Path]:
    """Yields a fresh temporary path next to `path` for the caller to write; when the block ends without an
    error it replaces `path` (atomically: same directory, same filesystem), else it is removed.

    The parent directory is created. The file is readable by others (0o644), like a file written in place.

    Args:
      path: The file to write.
      suffix: Ending of the temporary name, for writers that insist on one (`np.savez` appends `.npz` otherwise).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(handle)
    temporary = Path(name)
    try:
        os.chmod(temporary, 0o644)
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_bytes_atomically(path: Path, data: bytes) -> Path:
    """Writes `data` to `path` atomically (see `atomic_path`); returns `path`."""
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)
    return Path(path)


def write_text_atomically(path: Path, text: str) -> Path:
    """Writes UTF-8 `text` to `path` atomically (see `atomic_path`); returns `path`."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)
