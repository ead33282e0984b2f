"""Plain numpy float64 references of the SAE evaluation, shared by its tests."""

from __future__ import annotations

import jax
import numpy as np
from penzai import pz

from runner.model.tokenizer import BOS_ID, EOS_ID, PAD_ID
from runner.nn import measurement

#: The SAEs evaluated together: two at the residual stream, one at an MLP output, one at attention heads.
SITE_KEYS = ((1, "res"), (2, "res"), (1, "mlp"), (2, "att"))
BATCH_SIZE = 4  # 6 sequences: one full batch and one filled up with PAD rows


@jax.jit
def reference_capture(model, tokens):
    """Plain forward with Penzai's default positions (valid for these right-padded rows)."""
    logits, activations = measurement.capture(model, pz.nx.wrap(tokens).tag("batch", "seq"), list(SITE_KEYS))
    at_sites = {key: value.unwrap("batch", "seq", "embedding") for key, value in activations.items()}
    return logits.unwrap("batch", "seq", "vocabulary"), at_sites


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
