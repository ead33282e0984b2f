"""SAE evaluation against plain numpy float64 references on the synthetic tiny model's activations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz

from runner.model.tokenizer import BOS_ID, EOS_ID, PAD_ID
from runner.nn import sites
from runner.sae.jumprelu import JumpReLUSAE
from runner.sae.sources import calibration_tokens
from runner.sae_eval import evaluate as sae_eval
from runner.tracking import plots

LAYERS = (1, 2)
#: The SAEs evaluated together: two at the residual stream, one at an MLP output, one at attention heads.
SITE_KEYS = ((1, "res"), (2, "res"), (1, "mlp"), (2, "att"))
BATCH_SIZE = 4  # 6 sequences: one full batch and one filled up with PAD rows
TABLE_SEQUENCES = 2


@pz.pytree_dataclass
class ReplaceResidual(pz.nn.Layer):
    """Replaces the residual stream by a fixed array: the hand-made splice the evaluation must reproduce."""

    value: pz.nx.NamedArray

    def __call__(self, x, **side_inputs):
        return self.value.astype(x.dtype)


@jax.jit
def _reference_capture(model, tokens):
    """Plain forward with Penzai's default positions (valid for these right-padded rows)."""
    logits, activations = sites.capture(model, pz.nx.wrap(tokens).tag("batch", "seq"), list(SITE_KEYS))
    at_sites = {key: value.unwrap("batch", "seq", "embedding") for key, value in activations.items()}
    return logits.unwrap("batch", "seq", "vocabulary"), at_sites


@jax.jit
def _reference_logits(model, tokens):
    return model(pz.nx.wrap(tokens).tag("batch", "seq")).unwrap("batch", "seq", "vocabulary")


@pytest.fixture(scope="module")
def eval_tokens(tiny_model) -> np.ndarray:
    """6 x 24 corpus windows, BOS first; row 1 right-padded, row 3 ends with EOS then padding."""
    tokens = calibration_tokens(tiny_model.tokenizer, num_sequences=6, seq_len=24).copy()
    tokens[1, 18:] = PAD_ID
    tokens[3, 17] = EOS_ID
    tokens[3, 18:] = PAD_ID
    return tokens


@pytest.fixture(scope="module")
def captured(tiny_model, eval_tokens):
    logits, residuals = _reference_capture(pz.freeze_params(tiny_model.model), jnp.asarray(eval_tokens))
    return np.asarray(logits, np.float64), {k: np.asarray(v, np.float64) for k, v in residuals.items()}


@pytest.fixture(scope="module")
def evaluation(tiny_model, tiny_saes, eval_tokens) -> dict[tuple[int, str], sae_eval.SAEEvalResult]:
    """The SAE of each layer evaluated at every site of `SITE_KEYS` (the tiny model's sites are all 64 wide)."""
    saes = {(layer, site): sae_eval.SiteSAE(layer, tiny_saes[layer], site) for layer, site in SITE_KEYS}
    return sae_eval.evaluate_saes(tiny_model, saes, eval_tokens, BATCH_SIZE, table_sequences=TABLE_SEQUENCES)


def ordinary(tokens: np.ndarray) -> np.ndarray:
    return ~np.isin(tokens, [PAD_ID, EOS_ID, BOS_ID])


def sae_reference(x: np.ndarray, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pre-activations, JumpReLU latents and reconstruction in float64."""
    w = {name: arrays[name].astype(np.float64) for name in arrays}
    pre = x @ w["W_enc"] + w["b_enc"]
    features = np.where(pre > w["threshold"], pre, 0.0)
    return pre, features, features @ w["W_dec"] + w["b_dec"]


def reference_sae_metrics(x: np.ndarray, tokens: np.ndarray, arrays: dict[str, np.ndarray]) -> dict[str, float]:
    pre, features, x_hat = sae_reference(x, arrays)
    mask = ordinary(tokens)
    xm, fm, hm = x[mask], features[mask], x_hat[mask]
    l0 = (pre[mask] > arrays["threshold"]).sum(-1)
    n = mask.sum()
    err = ((xm - hm) ** 2).sum()
    mean = xm.mean(0)
    fvu = (err / n) / ((xm**2).sum() / n - mean @ mean)
    x_norm, h_norm = np.linalg.norm(xm, axis=-1), np.linalg.norm(hm, axis=-1)
    density = (pre[mask] > arrays["threshold"]).mean(0)
    return {
        "sae/l0": l0.mean(),
        "sae/l0_p50": np.percentile(l0, 50, method="inverted_cdf"),
        "sae/l0_p90": np.percentile(l0, 90, method="inverted_cdf"),
        "sae/l0_max": l0.max(),
        "sae/l0_bos": (pre[tokens == BOS_ID] > arrays["threshold"]).sum(-1).mean(),
        "sae/l1": fm.sum(-1).mean(),
        "sae/fvu": fvu,
        "sae/explained_variance": 1 - fvu,
        "sae/mse_per_token": err / n,
        "sae/mse_per_element": err / (n * x.shape[-1]),
        "sae/cosine_similarity": np.mean((xm * hm).sum(-1) / (x_norm * h_norm)),
        "sae/l2_ratio": np.mean(h_norm / x_norm),
        "sae/relative_reconstruction_bias": (hm**2).sum() / (xm * hm).sum(),
        "density/n_dead": (density == 0).sum(),
        "density/over_1_percent": (density > 0.01).mean(),
        "density/over_10_percent": (density > 0.1).mean(),
        "density/mean_log10": np.log10(density + 1e-10).mean(),
        "density/n_tokens": n,
    }


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def reference_lm_metrics(clean, spliced, ablated, tokens) -> dict[str, float]:
    mask = ordinary(tokens)[:, :-1] & (tokens[:, 1:] != PAD_ID)
    targets = tokens[:, 1:]
    logp = {name: log_softmax(z[:, :-1]) for name, z in [("clean", clean), ("spliced", spliced), ("zero", ablated)]}
    ce = {name: -np.take_along_axis(lp, targets[..., None], -1)[..., 0][mask].mean() for name, lp in logp.items()}
    p_clean = np.exp(logp["clean"])
    kl = {name: (p_clean * (logp["clean"] - logp[name])).sum(-1)[mask].mean() for name in ("spliced", "zero")}
    return {
        "lm/ce_clean": ce["clean"],
        "lm/ce_spliced": ce["spliced"],
        "lm/ce_zero_ablated": ce["zero"],
        "lm/delta_loss": ce["spliced"] - ce["clean"],
        "lm/ce_loss_score": (ce["zero"] - ce["spliced"]) / (ce["zero"] - ce["clean"]),
        "lm/kl_spliced": kl["spliced"],
        "lm/kl_zero_ablated": kl["zero"],
        "lm/kl_score": (kl["zero"] - kl["spliced"]) / kl["zero"],
        "lm/n_tokens": mask.sum(),
    }


def test_capture_sites_matches_a_plain_capture_and_ignores_left_padding(tiny_model, eval_tokens, captured) -> None:
    frozen = pz.freeze_params(tiny_model.model)
    logits, activations = sae_eval.capture_sites_jit(frozen, jnp.asarray(eval_tokens), site_keys=SITE_KEYS)
    ref_logits, ref_activations = captured
    real = eval_tokens != PAD_ID
    np.testing.assert_allclose(np.asarray(logits)[real], ref_logits[real], atol=1e-5)
    for key in SITE_KEYS:
        np.testing.assert_allclose(np.asarray(activations[key])[real], ref_activations[key][real], atol=1e-5)
    # The same rows left-padded by 3 (last 3 tokens dropped) read as if unpadded.
    shift = 3
    left = np.full_like(eval_tokens, PAD_ID)
    left[:, shift:] = eval_tokens[:, :-shift]
    _, left_activations = sae_eval.capture_sites_jit(frozen, jnp.asarray(left), site_keys=SITE_KEYS)
    keep = real[:, :-shift]
    for key in ((2, "res"), (2, "att")):
        np.testing.assert_allclose(
            np.asarray(left_activations[key])[:, shift:][keep], ref_activations[key][:, :-shift][keep], atol=1e-4
        )


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


def test_bos_and_padding_never_enter_sae_metrics(tiny_saes, eval_tokens, captured) -> None:
    sae, tokens = tiny_saes[2], eval_tokens[:BATCH_SIZE]
    x = captured[1][(2, "res")][:BATCH_SIZE].astype(np.float32)
    changed = x.copy()
    special = ~ordinary(tokens)
    changed[special] = 40.0 * np.random.default_rng(0).standard_normal((special.sum(), x.shape[-1]))

    def metrics_of(resid: np.ndarray) -> dict[str, float]:
        sums = sae_eval.SAEMetricSums.empty(sae.d_in, sae.d_sae)
        sums.update(jax.device_get(sae_eval.sae_token_statistics(sae, jnp.asarray(resid), jnp.asarray(tokens))), tokens)
        return {**sums.finalize(), "density": sums.density()}

    before, after = metrics_of(x), metrics_of(changed)
    assert before.pop("sae/l0_bos") != after.pop("sae/l0_bos")
    np.testing.assert_array_equal(before.pop("density"), after.pop("density"))
    assert before == after

    # The splice keeps BOS/EOS/PAD activations and puts the reconstruction everywhere else.
    named = pz.nx.wrap(jnp.asarray(x)).tag("batch", "seq", "embedding")
    mask = pz.nx.wrap(jnp.asarray(~special)).tag("batch", "seq")
    out = np.asarray(sae_eval.SpliceSAEReconstruction(sae)(named, splice_mask=mask).unwrap("batch", "seq", "embedding"))
    np.testing.assert_array_equal(out[special], x[special])
    _, _, x_hat = sae_reference(x.astype(np.float64), sae.to_arrays())
    np.testing.assert_allclose(out[~special], x_hat[~special], rtol=1e-4, atol=1e-4)


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
