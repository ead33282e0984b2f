"""SAE sources: Gemma Scope on Hugging Face, local trees, and calibrated synthetic SAEs."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz

from runner.config.schema import HuggingFaceSAEConfig, LocalSAEConfig, SyntheticSAEConfig
from runner.errors import ConfigError, SAEError
from runner.nn import measurement
from runner.sae.params import load_sae, random_sae_arrays, write_params_npz
from runner.sae.sources import calibration_tokens, resolve_sae_file, resolve_sae_files


def test_huggingface_sae_is_fetched_by_its_gemma_scope_path(monkeypatch, tmp_path: Path) -> None:
    """The real `hf_hub_download` call is made; the download itself is replaced (no network here)."""
    import huggingface_hub

    asked = []

    def hf_hub_download(repo_id: str, filename: str) -> str:
        asked.append((repo_id, filename))
        return str(write_params_npz(random_sae_arrays(8, 16, seed=0), tmp_path / filename))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    config = HuggingFaceSAEConfig(release="gemma-scope-2b-pt-res", width="16k", l0="canonical")
    files = resolve_sae_files(config, [20, 3], model_id="kaggle:gemma2-2b", embedding_dim=2304)
    assert asked == [
        ("google/gemma-scope-2b-pt-res", "layer_20/width_16k/average_l0_71/params.npz"),
        ("google/gemma-scope-2b-pt-res", "layer_3/width_16k/average_l0_59/params.npz"),
    ]
    assert files[20].sae_id == "gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71"
    assert files[20].neuronpedia_url(3124) == "https://www.neuronpedia.org/gemma-2-2b/20-gemmascope-res-16k/3124"


def test_an_mlp_sae_of_gemma_scope_links_its_neuronpedia_page(monkeypatch, tmp_path: Path) -> None:
    import huggingface_hub

    def hf_hub_download(repo_id: str, filename: str) -> str:
        return str(write_params_npz(random_sae_arrays(8, 16, seed=0), tmp_path / filename))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    config = HuggingFaceSAEConfig(release="gemma-scope-2b-pt-mlp", site="mlp")
    file = resolve_sae_files(config, [20], model_id="kaggle:gemma2-2b", embedding_dim=2304)[20]
    assert (file.site, file.sae_id) == ("mlp", "gemma-scope-2b-pt-mlp/layer_20/width_16k/average_l0_109")
    assert file.neuronpedia_url(7) == "https://www.neuronpedia.org/gemma-2-2b/20-gemmascope-mlp-16k/7"


def test_a_gemma_scope_l0_without_a_folder_is_refused_before_any_download(monkeypatch) -> None:
    import huggingface_hub

    def hf_hub_download(repo_id: str, filename: str) -> str:
        raise AssertionError(f"downloaded {filename}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    config = HuggingFaceSAEConfig(release="gemma-scope-2b-pt-res", l0=72)
    with pytest.raises(ConfigError, match=r"no layer_20/width_16k/average_l0_72 \(available: 22, 38, 71, 139, 294"):
        resolve_sae_files(config, [20], model_id="m", embedding_dim=2304)


def local_tree(root: Path, layer: int, l0s: list[int]) -> None:
    for l0 in l0s:
        folder = root / f"layer_{layer}" / "width_16k" / f"average_l0_{l0}"
        write_params_npz(random_sae_arrays(8, 16, seed=l0), folder / "params.npz")


def test_local_tree_canonical_is_the_l0_closest_to_100(tmp_path: Path) -> None:
    local_tree(tmp_path, 5, [22, 71, 139])
    config = LocalSAEConfig(path=tmp_path, width="16k", l0="canonical")
    files = resolve_sae_files(config, [5], model_id="m", embedding_dim=8)
    assert files[5].path == tmp_path / "layer_5" / "width_16k" / "average_l0_71" / "params.npz"
    explicit = LocalSAEConfig(path=tmp_path, width="16k", l0=139)
    assert resolve_sae_files(explicit, [5], model_id="m", embedding_dim=8)[5].path.parent.name == "average_l0_139"


def test_local_tree_errors_name_what_is_missing(tmp_path: Path) -> None:
    local_tree(tmp_path, 5, [22])
    with pytest.raises(SAEError, match=r"no average_l0_50 \(available: \[22\]\)"):
        resolve_sae_files(LocalSAEConfig(path=tmp_path, l0=50), [5], model_id="m", embedding_dim=8)
    with pytest.raises(SAEError, match="no SAE for layer 6 at width 16k"):
        resolve_sae_files(LocalSAEConfig(path=tmp_path), [6], model_id="m", embedding_dim=8)


def test_one_npz_file_serves_one_layer_only(tmp_path: Path) -> None:
    file = write_params_npz(random_sae_arrays(8, 16, seed=0), tmp_path / "params.npz")
    config = LocalSAEConfig(path=file)
    assert resolve_sae_files(config, [2], model_id="m", embedding_dim=8)[2].path == file
    with pytest.raises(SAEError, match="one params.npz given but 2 layers"):
        resolve_sae_files(config, [2, 3], model_id="m", embedding_dim=8)


def test_synthetic_saes_fire_near_the_requested_l0_on_unseen_text(tiny_model, tiny_sae_paths) -> None:
    loaded = {
        layer: load_sae(path, sae_id="s", layer=layer, expected_d_in=64) for layer, path in tiny_sae_paths.items()
    }
    for sae in loaded.values():
        arrays = sae.sae.to_arrays()
        np.testing.assert_allclose(np.linalg.norm(arrays["W_dec"], axis=1), 1.0, rtol=1e-5)
        assert sae.path.parent.parent.name == "width_256"
    # Held-out text: calibration used the corpus start; these windows come from further on.
    tokens = calibration_tokens(tiny_model.tokenizer, num_sequences=24, seq_len=64)[16:]
    _, residuals = measurement.capture(
        tiny_model.model, pz.nx.wrap(jnp.asarray(tokens)).tag("batch", "seq"), [(layer, "res") for layer in loaded]
    )
    for layer, sae in loaded.items():
        features = np.asarray(sae.sae.encode(residuals[(layer, "res")]).unwrap("batch", "seq", "sae_latent"))[:, 1:]
        mean_l0 = (features > 0).sum(-1).mean()
        assert 8 < mean_l0 < 32, (layer, mean_l0)  # calibrated to 16 on other text
        assert abs(int(sae.path.parent.name.removeprefix("average_l0_")) - 16) <= 2


@pytest.mark.parametrize(
    ("model_id", "site", "expected"),
    [
        ("synthetic:tiny:seed0", "res", "synthetic:layer_1/width_256/target_l0_16/seed0@tiny:seed0"),
        ("local:/models/tiny", "res", "synthetic:layer_1/width_256/target_l0_16/seed0@local:/models/tiny"),
        ("synthetic:small:seed3", "mlp", "synthetic-mlp:layer_1/width_256/target_l0_16/seed0@small:seed3"),
    ],
)
def test_a_synthetic_sae_id_names_its_source_once_then_its_folders_and_model(model_id, site, expected) -> None:
    file = resolve_sae_file(SyntheticSAEConfig(site=site), 1, width="256", l0=16, model_id=model_id)
    assert file.sae_id == expected
