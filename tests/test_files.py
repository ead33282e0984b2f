"""runner.files: a file is replaced whole or not at all."""

from __future__ import annotations

import os

import pytest

from runner.files import atomic_path, write_bytes_atomically, write_text_atomically


def test_a_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "deep" / "out.txt"
    write_text_atomically(target, "first")
    write_text_atomically(target, "second ✓")
    assert target.read_text(encoding="utf-8") == "second ✓"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]
    assert oct(os.stat(target).st_mode & 0o777) == oct(0o644)


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = write_bytes_atomically(tmp_path / "out.bin", b"old")
    with pytest.raises(RuntimeError, match="interrupted"), atomic_path(target, suffix=".npz") as temporary:
        assert temporary.name.endswith(".npz") and temporary.parent == tmp_path
        temporary.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
