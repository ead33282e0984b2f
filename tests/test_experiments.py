"""Every experiment file shipped in experiments/ validates."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.config import load_experiment

EXPERIMENTS = sorted((Path(__file__).parent.parent / "experiments").glob("*.yaml"))


def test_the_shipped_experiments_are_found() -> None:
    assert {p.name for p in EXPERIMENTS} >= {"quickstart.yaml", "gemma2_2b_sf_steering.yaml"}


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_validates(path: Path) -> None:
    config = load_experiment(path)
    assert config.name and config.prompts


def test_tutorial_example_is_the_tutorial() -> None:
    config = load_experiment(Path(__file__).parent.parent / "experiments" / "gemma2_2b_sf_steering.yaml")
    assert (config.model.source, config.model.variant) == ("kaggle", "gemma2-2b")
    assert (config.sae.release, config.sae.width, config.sae.l0) == ("gemma-scope-2b-pt-res", "16k", 71)
    assert config.prompts == ("The most iconic structure on Earth is",)
    assert (config.steering.layers, config.steering.features, config.steering.scales) == ([20], [3124], [0.0, 154.0])
    assert (config.sampling.temperature, config.sampling.max_new_tokens, config.steering.seeds) == (0.5, 64, [3])
