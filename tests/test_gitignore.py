"""What `runner run` writes in a checkout (the sqlite store with its write-ahead log, artifacts, leases, the spool)
stays out of git."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
WRITTEN = ["mlflow.db", "mlflow.db-wal", "mlflow.db-shm", "mlflow.db.runner-lease/0123456789abcdef.lock",
           "mlruns/1/meta.yaml", ".runner/spool/0123456789abcdef.jsonl"]


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")
def test_what_a_sweep_writes_in_the_working_directory_is_ignored() -> None:
    checked = subprocess.run(["git", "check-ignore", "--no-index", *WRITTEN], cwd=ROOT, capture_output=True,
                             text=True)
    assert checked.stdout.split() == WRITTEN, checked.stderr
