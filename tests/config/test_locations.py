"""Where a sweep may write: the tracking store stays inside the output directory."""

import pytest

from runner.config.loading import load_experiment
from runner.config.locations import check_write_locations, sqlite_file
from runner.errors import ConfigError
from tests.config.experiment_files import MINIMAL, write


@pytest.mark.parametrize(
    ("uri", "allowed"),
    [
        ("sqlite:///mlflow.db", True),
        ("sqlite:///runs/sweeps.db", True),
        ("http://127.0.0.1:5000", True),
        ("databricks", True),
        ("sqlite:///../outside.db", False),
        ("sqlite:////tmp/elsewhere/mlflow.db", False),
        ("file:///etc/mlruns", False),
        ("../mlruns", False),
        ("sqlite:///link/mlflow.db", False),  # a symbolic link inside that leads outside
    ],
)
def test_the_tracking_store_cannot_write_outside_the_output_directory(tmp_path, uri, allowed):
    output_dir = tmp_path / "work"
    output_dir.mkdir()
    (output_dir / "link").symlink_to(tmp_path)
    config = load_experiment(write(output_dir, MINIMAL + f"tracking: {{uri: '{uri}'}}\n"))
    if allowed:
        check_write_locations(config, output_dir, output_dir / "x.yaml")
        return
    with pytest.raises(ConfigError) as error:
        check_write_locations(config, output_dir, output_dir / "x.yaml")
    message = str(error.value)
    assert message.startswith(f"{output_dir / 'x.yaml'}: tracking.uri: {uri!r} would write ") and "\n" not in message
    assert f"outside the output directory {str(output_dir.resolve())!r}" in message


@pytest.mark.parametrize(
    ("uri", "database"),
    [
        ("sqlite:///mlflow.db", "mlflow.db"),
        ("sqlite:///runs/sweeps.db?timeout=30", "runs/sweeps.db"),
        ("sqlite:////data/mlflow.db", "/data/mlflow.db"),
        ("sqlite://", None),
        ("http://127.0.0.1:5000", None),
        ("file:///tmp/mlruns", None),
    ],
)
def test_a_sqlite_uri_names_its_database_file_as_written(uri, database):
    assert sqlite_file(uri) == database
