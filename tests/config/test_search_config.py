"""The `search` section: a scale search per steering curve instead of a list of scales."""

import pytest

from runner.config.loading import load_experiment
from tests.config.experiment_files import MINIMAL, error_of, write

SEARCH = """\
name: demo
model: {source: synthetic}
sae: {source: synthetic}
prompts: ["The weather today is", "My favourite city is"]
steering: {layers: [1], features: [0, 3], seeds: [0, 1]}
search:
  target: {metric: steer/concept_rate, at_least: 0.5}
  keep: {metric: steer/nll, at_most_above_baseline: 1.0}
  scales: {low: 0, high: 400}
  tolerance: 5
  max_rounds: 8
"""


def test_a_search_replaces_the_scales_and_reads_its_bounds(tmp_path):
    config = load_experiment(write(tmp_path, SEARCH))
    search = config.search
    assert config.steering.scales is None
    assert search.target.bound == ("at_least", 0.5, False)
    assert search.keep.bound == ("at_most", 1.0, True)
    assert (search.scales.low, search.scales.high, search.tolerance, search.max_rounds) == (0.0, 400.0, 5.0, 8)
    assert (search.candidates_per_round, search.max_growth) == (3, 4), "documented defaults"
    again = load_experiment(write(tmp_path, config.to_yaml(), name="dump.yaml"))
    assert again == config
    assert "scales" not in config.canonical_dict()["steering"]


def test_a_grid_sweep_keeps_its_identity_without_a_search_section(tmp_path):
    config = load_experiment(write(tmp_path, MINIMAL))
    assert "search" not in config.canonical_dict()
    assert config.canonical_dict()["steering"]["scales"] == [0.0, 8.5]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("max_rounds: 8", "max_rounds: 8\n  rounds: 3"),
         "unknown field 'search.rounds' (allowed: target, keep, scales, "),
        (("seeds: [0, 1]}", "seeds: [0, 1], scales: [0, 1]}"),
         "steering.scales: is given with a 'search' section (allowed: one of them: the search chooses the scales)"),
        (("at_least: 0.5}", "at_least: 0.5, at_most: 0.9}"),
         "search.target: sets ['at_least', 'at_most'] (allowed: exactly one of at_least, at_most, "
         "at_least_above_baseline, at_most_above_baseline)"),
        (("metric: steer/concept_rate", "metric: steer/concept"), "search.target.metric: 'steer/concept' is not a "
         "steering metric (allowed: steer/concept_rate,"),
        (("{low: 0, high: 400}", "{low: 400, high: 0}"), "search.scales: low 400.0 is not below high 0.0"),
        (("tolerance: 5", "tolerance: 0"), "search.tolerance: 0 is not allowed (allowed: > 0.0)"),
        (("seeds: [0, 1]}", "seeds: [0, 1], mode: ablate}"), "steering.mode: 'ablate' has no scale to search"),
    ],
)
def test_a_bad_search_is_one_line_naming_field_value_and_what_is_allowed(tmp_path, change, expected):
    message = error_of(write(tmp_path, SEARCH.replace(*change)))
    assert expected in message, message


def test_steering_without_scales_or_search_says_what_is_needed(tmp_path):
    message = error_of(write(tmp_path, MINIMAL.replace(", scales: [0, 8.5]", "")))
    assert message == "steering.scales: is required (a list of scales), unless a 'search' section searches them"


def test_a_search_needs_a_steering_sweep(tmp_path):
    text = ("name: ev\nmodel: {source: synthetic}\nsae: {source: synthetic}\nsae_eval: {widths: ['64'], l0s: [8]}\n"
            "search: {target: {metric: steer/nll, at_most: 1}, scales: {high: 4}, tolerance: 1}\n")
    assert "search: searches steering scales (allowed only with a steering section)" in error_of(write(tmp_path, text))


COMBINATIONS = """\
name: combo
model: {source: synthetic}
sae: {source: synthetic}
prompts: ["The weather today is"]
steering:
  combinations:
    - [{layer: 1, feature: 7, scale: 12.5}, {layer: 3, feature: 9, scale: -20, mode: clamp}]
"""


def test_combinations_alone_need_no_grid_and_name_every_steered_layer(tmp_path):
    config = load_experiment(write(tmp_path, COMBINATIONS))
    steering = config.steering
    assert not steering.has_grid and steering.sae_layers == [1, 3] and steering.max_interventions == 2
    assert steering.combinations[0][1].mode == "clamp" and steering.combinations[0][0].mode is None
    assert load_experiment(write(tmp_path, config.to_yaml(), name="dump.yaml")) == config


def test_a_sweep_without_combinations_keeps_its_identity(tmp_path):
    assert "combinations" not in load_experiment(write(tmp_path, MINIMAL)).canonical_dict()["steering"]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("{layer: 3, feature: 9, scale: -20, mode: clamp}", "{layer: 1, feature: 7, scale: 3}"),
         "steering.combinations.0: steers (layer, feature) [(1, 7)] twice (allowed: each once per combination)"),
        (("    - [{layer: 1, feature: 7, scale: 12.5}, {layer: 3, feature: 9, scale: -20, mode: clamp}]",
          "    - [{layer: 1, feature: 7, scale: 12.5}]"), "steering.combinations.0: "),
        (("steering:\n", "steering:\n  scales: [0, 1]\n"), "steering.scales: has no grid to apply to"),
        (("steering:\n", "steering:\n  layers: [1]\n"), "steering.features: is required (a list, unless only"),
    ],
)
def test_bad_combinations_are_one_line_errors(tmp_path, change, expected):
    message = error_of(write(tmp_path, COMBINATIONS.replace(*change)))
    assert message.startswith(expected), message
