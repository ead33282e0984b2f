"""SAE evaluation against plain numpy float64 references on the synthetic tiny model's activations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz

from runner.nn import sites
from runner.nn.jumprelu import JumpReLUSAE
from runner.results import SAEMeasurement
from runner.sae_eval import evaluate as sae_eval
from runner.tracking import plots
from tests.sae_eval.references import (
    BATCH_SIZE,
    SITE_KEYS,
    ordinary,
    reference_lm_metrics,
    reference_sae_metrics,
    sae_reference,
)

TABLE_SEQUENCES = 2


@pz.pytree_dataclass
class ReplaceResidual(pz.nn.Layer):
    """Replaces the residual stream by a fixed array: the hand-made splice the evaluation must reproduce."""

    value: pz.nx.NamedArray

    def __call__(self, x, **side_inputs):
        return self.value.astype(x.dtype)


@jax.jit
def _reference_logits(model, tokens):
    return model(pz.nx.wrap(tokens).tag("batch", "seq")).unwrap("batch", "seq", "vocabulary")


@pytest.fixture(scope="module")
def evaluation(tiny_model, tiny_saes, eval_tokens) -> dict[tuple[int, str], SAEMeasurement]:
    """The SAE of each layer evaluated at every site of `SITE_KEYS` (the tiny model's sites are all 64 wide)."""
    saes = {(layer, site): sae_eval.SiteSAE(layer, tiny_saes[layer], site) for layer, site in SITE_KEYS}
    return sae_eval.evaluate_saes(tiny_model, saes, eval_tokens, BATCH_SIZE, table_sequences=TABLE_SEQUENCES)


@pytest.mark.parametrize("site_key", SITE_KEYS)
def test_sae_metrics_match_numpy_reference(tiny_saes, eval_tokens, captured, evaluation, site_key) -> None:
    arrays = tiny_saes[site_key[0]].to_arrays()
    expected = reference_sae_metrics(captured[1][site_key], eval_tokens, arrays)
    metrics = evaluation[site_key].metrics
    counts = ("sae/l0", "sae/l0_p50", "sae/l0_p90", "sae/l0_max", "sae/l0_bos", "density/n_dead", "density/n_tokens")
    for name in counts:
        assert metrics[name] == pytest.approx(expected[name], rel=1e-12), name
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, rel=2e-5, abs=1e-6), name


@pytest.mark.parametrize("site_key", SITE_KEYS)
def test_density_vector_histogram_and_l0_identity(tiny_saes, eval_tokens, captured, evaluation, site_key) -> None:
    layer = site_key[0]
    arrays = tiny_saes[layer].to_arrays()
    pre, _, _ = sae_reference(captured[1][site_key], arrays)
    density = (pre[ordinary(eval_tokens)] > arrays["threshold"]).mean(0)
    result = evaluation[site_key]
    np.testing.assert_allclose(result.density, density, rtol=1e-12)
    assert result.density.sum() == pytest.approx(result.metrics["sae/l0"], rel=1e-12)
    counts, edges = np.histogram(np.log10(density + 1e-10), bins=50, range=(-10, 0))
    np.testing.assert_array_equal(result.density_histogram, counts)
    np.testing.assert_allclose(result.density_histogram_edges, edges)
    assert result.density_histogram.sum() == tiny_saes[layer].d_sae
    assert result.l0_histogram.sum() == ordinary(eval_tokens).sum()


@pytest.mark.parametrize("site_key", SITE_KEYS)
def test_lm_metrics_match_numpy_reference(tiny_model, tiny_saes, eval_tokens, captured, evaluation, site_key) -> None:
    """The splice and the zero-ablation re-run only the blocks they affect; the reference patches the whole model."""
    layer, site = site_key
    x = captured[1][site_key]
    _, _, x_hat = sae_reference(x, tiny_saes[layer].to_arrays())
    spliced_site = np.where(ordinary(eval_tokens)[..., None], x_hat, x).astype(np.float32)

    def logits_with_site(value: np.ndarray) -> np.ndarray:
        site_value = pz.nx.wrap(jnp.asarray(value)).tag("batch", "seq", "embedding")
        patched = sites.insert_at_site(tiny_model.model, layer, site, ReplaceResidual(site_value))
        return np.asarray(_reference_logits(pz.freeze_params(patched), jnp.asarray(eval_tokens)), np.float64)

    expected = reference_lm_metrics(
        captured[0], logits_with_site(spliced_site), logits_with_site(np.zeros_like(spliced_site)), eval_tokens
    )
    for name, value in expected.items():
        assert evaluation[site_key].metrics[name] == pytest.approx(value, rel=1e-4, abs=2e-5), name
    assert evaluation[site_key].metrics["lm/kl_spliced"] > 1e-3  # the random SAE is far from exact


def test_saes_of_one_site_share_its_ablation_and_match_their_lone_evaluation(tiny_model, tiny_saes, eval_tokens,
                                                                             evaluation) -> None:
    together = sae_eval.evaluate_saes(
        tiny_model,
        {"own": sae_eval.SiteSAE(2, tiny_saes[2]), "other": sae_eval.SiteSAE(2, tiny_saes[3])},
        eval_tokens, BATCH_SIZE,
    )
    assert together["own"].metrics["lm/ce_zero_ablated"] == together["other"].metrics["lm/ce_zero_ablated"]
    assert together["own"].metrics["sae/fvu"] != together["other"].metrics["sae/fvu"]
    for name, value in evaluation[(2, "res")].metrics.items():
        assert together["own"].metrics[name] == pytest.approx(value, rel=1e-6, abs=1e-9), name


def identity_sae(d_in: int) -> JumpReLUSAE:
    """`f = [relu(x), relu(-x)]`, `x_hat = f @ [I; -I] = x`: an SAE that reconstructs exactly."""
    eye = np.eye(d_in, dtype=np.float32)
    return JumpReLUSAE.from_arrays(
        {
            "W_enc": np.concatenate([eye, -eye], axis=1),
            "W_dec": np.concatenate([eye, -eye], axis=0),
            "b_enc": np.zeros(2 * d_in, np.float32),
            "b_dec": np.zeros(d_in, np.float32),
            "threshold": np.zeros(2 * d_in, np.float32),
        }
    )


def test_exact_sae_has_zero_error_delta_loss_and_kl(tiny_model, eval_tokens) -> None:
    metrics = sae_eval.evaluate_saes(tiny_model, {1: sae_eval.SiteSAE(1, identity_sae(64))}, eval_tokens,
                                     BATCH_SIZE)[1].metrics
    assert metrics["sae/fvu"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["sae/explained_variance"] == pytest.approx(1.0, abs=1e-12)
    assert metrics["sae/mse_per_token"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["sae/cosine_similarity"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["sae/l2_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["sae/relative_reconstruction_bias"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["lm/delta_loss"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["lm/kl_spliced"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["lm/ce_loss_score"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["lm/kl_score"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["lm/kl_zero_ablated"] > 0.01


def test_top_feature_table_rows(tiny_saes, eval_tokens, captured, evaluation) -> None:
    _, features, _ = sae_reference(captured[1][(2, "res")], tiny_saes[2].to_arrays())
    rows = evaluation[(2, "res")].top_feature_rows
    mask = ordinary(eval_tokens[:TABLE_SEQUENCES])
    masked_positions = [tuple(map(int, p)) for p in zip(*np.nonzero(mask), strict=True)]
    assert [(r["sequence"], r["position"]) for r in rows] == masked_positions
    for row in rows:
        f = features[row["sequence"], row["position"]]
        order = np.argsort(-f, kind="stable")[:5]
        order = order[f[order] > 0]
        assert row["token"] == eval_tokens[row["sequence"], row["position"]]
        assert row["feature_ids"] == order.tolist()
        np.testing.assert_allclose(row["feature_values"], f[order], rtol=1e-4)
    assert not any("feature" in name or "top" in name for name in evaluation[(2, "res")].metrics)  # table only


def test_density_histogram_png(tmp_path, evaluation) -> None:
    result = evaluation[(1, "res")]
    path = plots.write_density_histogram(
        result.density_histogram, result.density_histogram_edges, tmp_path / "density.png", title="layer 1", dead=0
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 1000
