"""Gemma Scope naming: the registry (releases, widths, L0 folders, canonical L0s), repo and file paths, SAE ids,
Neuronpedia links."""

import pytest

from runner import gemma_scope
from runner.errors import ConfigError


@pytest.mark.parametrize(
    ("release", "width", "layer", "expected"),
    [
        ("gemma-scope-2b-pt-res", "16k", 20, 71),
        ("gemma-scope-2b-pt-res", "16k", 0, 105),
        ("gemma-scope-2b-pt-res", "16k", 25, 116),
        ("gemma-scope-2b-pt-res", "65k", 20, 114),
        ("gemma-scope-9b-pt-res", "16k", 20, 68),
        ("gemma-scope-9b-pt-res", "16k", 31, 114),
        ("gemma-scope-2b-pt-mlp", "16k", 0, 119),
        ("gemma-scope-2b-pt-att", "65k", 3, 83),
        ("gemma-scope-9b-pt-res", "131k", 3, 103),
    ],
)
def test_canonical_l0_comes_from_the_registry(release, width, layer, expected):
    assert gemma_scope.resolve_l0(release, layer, width, "canonical") == expected


def test_the_registry_covers_every_2b_layer_at_the_tutorial_widths_and_every_9b_layer_at_16k():
    for release, width, layers in [("gemma-scope-2b-pt-res", "16k", 26), ("gemma-scope-2b-pt-res", "65k", 26),
                                   ("gemma-scope-2b-pt-mlp", "16k", 26), ("gemma-scope-2b-pt-att", "65k", 26),
                                   ("gemma-scope-9b-pt-res", "16k", 42)]:
        assert gemma_scope.sae_layers(release, width) == tuple(range(layers)), (release, width)
        assert all(gemma_scope.l0_problem(release, layer, width, "canonical") is None for layer in range(layers))


def test_releases_and_widths_come_from_the_registry():
    assert gemma_scope.RELEASES[:3] == ("gemma-scope-2b-pt-res", "gemma-scope-2b-pt-mlp", "gemma-scope-2b-pt-att")
    assert "gemma-scope-27b-pt-res" in gemma_scope.RELEASES
    assert gemma_scope.WIDTHS == ("16k", "32k", "65k", "131k", "262k", "524k", "1m")
    assert gemma_scope.release_widths("gemma-scope-9b-pt-mlp") == ("16k", "131k")


def test_an_explicit_l0_is_used_as_is():
    assert gemma_scope.resolve_l0("gemma-scope-9b-pt-res", 10, "131k", 27) == 27


def test_an_l0_without_a_folder_is_refused_naming_the_folders_that_exist():
    with pytest.raises(ConfigError) as error:
        gemma_scope.resolve_l0("gemma-scope-2b-pt-res", 20, "16k", 72)
    assert str(error.value) == (
        "sae.l0: 'gemma-scope-2b-pt-res' has no layer_20/width_16k/average_l0_72 (available: 22, 38, 71, 139, 294, "
        "or canonical)"
    )


def test_a_layer_without_saes_of_the_width_is_refused_naming_the_layers_that_have_them():
    with pytest.raises(ConfigError, match=r"has no width_32k SAE for layer 3 \(layers with one: 12\)"):
        gemma_scope.resolve_l0("gemma-scope-2b-pt-res", 3, "32k", "canonical")


def test_missing_canonical_entry_names_release_width_layer_and_asks_for_explicit_l0():
    with pytest.raises(ConfigError) as error:
        gemma_scope.resolve_l0("gemma-scope-2b-pt-res", 12, "131k", "canonical")
    message = str(error.value)
    assert "\n" not in message
    assert "'gemma-scope-2b-pt-res'" in message and "'131k'" in message and "layer 12" in message
    assert "l0:" in message and "available: 12, 20, 36, 67, 129, 264" in message


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


def test_neuronpedia_url_of_every_site_and_release():
    assert gemma_scope.neuronpedia_url("gemma-scope-2b-pt-mlp", 5, "65k", 42) == (
        "https://www.neuronpedia.org/gemma-2-2b/5-gemmascope-mlp-65k/42"
    )
    assert gemma_scope.neuronpedia_url("gemma-scope-9b-pt-att", 20, "16k", 1) == (
        "https://www.neuronpedia.org/gemma-2-9b/20-gemmascope-att-16k/1"
    )
    assert gemma_scope.neuronpedia_url("gemma-scope-27b-pt-res", 22, "131k", 7) == (
        "https://www.neuronpedia.org/gemma-2-27b/22-gemmascope-res-131k/7"
    )
    assert gemma_scope.neuronpedia_url("gemma-scope-9b-it-res", 9, "16k", 7) == (
        "https://www.neuronpedia.org/gemma-2-9b-it/9-gemmascope-res-16k/7"
    )
