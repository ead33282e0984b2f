"""Gemma Scope naming: canonical L0 table, repo and file paths, SAE ids, Neuronpedia links."""

import pytest

from runner.errors import ConfigError
from runner.sae import gemma_scope


@pytest.mark.parametrize(
    ("release", "width", "layer", "expected"),
    [
        ("gemma-scope-2b-pt-res", "16k", 20, 71),
        ("gemma-scope-2b-pt-res", "16k", 0, 105),
        ("gemma-scope-2b-pt-res", "16k", 25, 116),
        ("gemma-scope-2b-pt-res", "65k", 20, 114),
        ("gemma-scope-9b-pt-res", "16k", 20, 68),
        ("gemma-scope-9b-pt-res", "16k", 31, 114),
    ],
)
def test_canonical_l0_comes_from_the_reference_table(release, width, layer, expected):
    assert gemma_scope.resolve_l0(release, layer, width, "canonical") == expected


def test_tables_cover_every_2b_layer():
    assert sorted(gemma_scope.CANONICAL_L0[("gemma-scope-2b-pt-res", "16k")]) == list(range(26))
    assert sorted(gemma_scope.CANONICAL_L0[("gemma-scope-2b-pt-res", "65k")]) == list(range(26))


def test_an_explicit_l0_is_used_as_is():
    assert gemma_scope.resolve_l0("gemma-scope-9b-pt-res", 10, "131k", 22) == 22


def test_missing_canonical_entry_names_release_width_layer_and_asks_for_explicit_l0():
    with pytest.raises(ConfigError) as error:
        gemma_scope.resolve_l0("gemma-scope-9b-pt-res", 10, "16k", "canonical")
    message = str(error.value)
    assert "\n" not in message
    assert "'gemma-scope-9b-pt-res'" in message and "'16k'" in message and "layer 10" in message
    assert "l0:" in message


def test_repo_and_paths():
    assert gemma_scope.hf_repo_id("gemma-scope-2b-pt-res") == "google/gemma-scope-2b-pt-res"
    assert gemma_scope.params_path(20, "16k", 71) == "layer_20/width_16k/average_l0_71/params.npz"
    assert gemma_scope.sae_id("gemma-scope-2b-pt-res", 20, "16k", "canonical") == (
        "gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71"
    )


def test_unknown_release_is_a_config_error():
    with pytest.raises(ConfigError, match="gemma-scope-3b"):
        gemma_scope.hf_repo_id("gemma-scope-3b-pt-res")


def test_neuronpedia_url_of_the_tutorial_feature():
    url = gemma_scope.neuronpedia_url("gemma-scope-2b-pt-res", 20, "16k", 3124)
    assert url == "https://www.neuronpedia.org/gemma-2-2b/20-gemmascope-res-16k/3124"
    assert gemma_scope.neuronpedia_url("gemma-scope-9b-pt-res", 20, "16k", 1) == (
        "https://www.neuronpedia.org/gemma-2-9b/20-gemmascope-res-16k/1"
    )


def test_neuronpedia_url_is_none_for_unmapped_releases():
    assert gemma_scope.neuronpedia_url("gemma-scope-27b-pt-res", 20, "16k", 1) is None
    assert gemma_scope.neuronpedia_url("gemma-scope-2b-pt-mlp", 20, "16k", 1) is None
