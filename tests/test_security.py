"""Credentials never reach MLflow; YAML is loaded safely."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from runner.config.loading import load_experiment
from runner.driver import run_sweep
from runner.errors import ConfigError
from runner.plan.prepare import prepare_sweep

FAKE_SECRETS = {
    "KAGGLE_USERNAME": "kaggle-user-5f1e9c",
    "KAGGLE_KEY": "kagglekey0b7d4e2a9c1f",
    "HF_TOKEN": "hf_fAkEtOkEn4c8d2e6f0a",
    "MLFLOW_TRACKING_USERNAME": "mlflow-user-77a1",
    "MLFLOW_TRACKING_PASSWORD": "mlflow-pass-93e4b2",
}


def test_a_sweep_with_credentials_in_the_environment_logs_none_of_them(tmp_path, monkeypatch, cache_dir) -> None:
    for name, value in FAKE_SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)  # the sqlite store puts artifacts under ./mlruns
    config = {
        "name": "secrets",
        "model": {"source": "synthetic", "preset": "tiny"},
        "sae": {"source": "synthetic"},
        "prompts": ["The most iconic structure on Earth is"],
        "steering": {"layers": [1], "features": [2], "scales": [0, 10]},
        "sampling": {"max_new_tokens": 3},
        # Absolute: MLflow keeps one store per URI in a process, so a relative one would reach an earlier test's.
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }
    (tmp_path / "secrets.yaml").write_text(yaml.safe_dump(config))
    summary = run_sweep(prepare_sweep(load_experiment(tmp_path / "secrets.yaml"), cache_dir), cache_dir=cache_dir)
    assert summary.points_finished == 2

    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert any(path.name == "mlflow.db" for path in written)
    # The artifact tree is searched too: the point records on the parent, the curve run's table.
    assert any(path.parent.name == "points" and path.suffix == ".json" for path in written)
    assert any(path.name == "points.json" for path in written)
    for path in written:
        content = path.read_bytes()
        for name, value in FAKE_SECRETS.items():
            assert value.encode() not in content, f"{name} found in {path}"


def test_yaml_python_tags_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match=str(path)):
        load_experiment(path)


def test_tracking_uri_with_a_password_is_refused_without_echoing_it(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_text(
        "name: x\nmodel: {source: synthetic}\nsae: {source: synthetic}\nprompts: [a]\n"
        "steering: {layers: [0], features: [0], scales: [0]}\n"
        "tracking: {uri: 'http://admin:hunter2secret@mlflow:5000'}\n"
    )
    with pytest.raises(ConfigError) as raised:
        load_experiment(path)
    assert "hunter2secret" not in str(raised.value) and "MLFLOW_TRACKING_PASSWORD" in str(raised.value)
