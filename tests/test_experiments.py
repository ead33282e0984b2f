"""Every experiment file shipped in experiments/ validates."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.config.loading import load_experiment
from runner.plan.prepare import outline

EXPERIMENTS = sorted((Path(__file__).parent.parent / "experiments").glob("*.yaml"))


def test_the_shipped_experiments_are_found() -> None:
    assert {p.name for p in EXPERIMENTS} >= {"quickstart.yaml", "gemma2_2b_sf_steering.yaml",
                                            "gemma2_2b_layer_sweep.yaml", "synthetic_layer_sweep.yaml"}


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_validates_and_has_a_plan(path: Path) -> None:
    config = load_experiment(path)
    assert config.name and (config.prompts if config.kind == "steering" else config.sae_eval.widths)
    summary = outline(config)
    assert summary.points > 0 and summary.jobs > 0
    if config.model.source == "local" and not Path(config.model.path).exists():
        # A rehearsal of real sizes on a model `runner synth` writes first: its header says how.
        bundle = Path(config.model.path).parent
        assert f"runner synth {bundle.parent.name}/{bundle.name} --preset" in path.read_text()
        assert summary.memory_bytes is None, "an unwritten local checkpoint's architecture is unknown"
        return
    assert summary.memory_bytes is not None, "every shipped model's architecture is known before download"


def test_the_layer_sweep_covers_all_26_layers_of_gemma2_2b_with_canonical_16k_saes() -> None:
    config = load_experiment(Path(__file__).parent.parent / "experiments" / "gemma2_2b_layer_sweep.yaml")
    assert (config.model.source, config.model.variant, config.sae.release) == ("kaggle", "gemma2-2b",
                                                                              "gemma-scope-2b-pt-res")
    assert (config.sae_eval.layers, config.sae_eval.widths, config.sae_eval.l0s) == ("all", ["16k"], ["canonical"])
    assert outline(config).points == 26


def test_tutorial_example_is_the_tutorial() -> None:
    config = load_experiment(Path(__file__).parent.parent / "experiments" / "gemma2_2b_sf_steering.yaml")
    assert (config.model.source, config.model.variant) == ("kaggle", "gemma2-2b")
    assert (config.sae.release, config.sae.width, config.sae.l0) == ("gemma-scope-2b-pt-res", "16k", 71)
    assert config.prompts == ("The most iconic structure on Earth is",)
    assert (config.steering.layers, config.steering.features, config.steering.scales) == ([20], [3124], [0.0, 154.0])
    assert (config.sampling.temperature, config.sampling.max_new_tokens, config.steering.seeds) == (0.5, 64, [3])
