"""Experiment files the config tests write, and the one-line error loading one gets."""

from pathlib import Path

import pytest

from runner.config.loading import load_experiment
from runner.errors import ConfigError

MINIMAL = """\
name: demo
model: {source: synthetic}
sae: {source: synthetic}
prompts: ["The weather today is", "My favourite city is"]
steering: {layers: [1], features: [0, 3], scales: [0, 8.5]}
"""


def write(directory: Path, text: str = MINIMAL, name: str = "x.yaml") -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path: Path, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as error:
        load_experiment(path, overrides or [])
    message = str(error.value)
    assert "\n" not in message, "every error is one line"
    assert message.startswith(f"{path}: "), "every error names the file first"
    return message[len(f"{path}: ") :]


EVALUATION = """\
name: layer-sweep
model: {source: synthetic}
sae: {source: huggingface, release: gemma-scope-2b-pt-res}
sae_eval: {widths: [16k, 65k], l0s: [canonical, 71]}
"""
