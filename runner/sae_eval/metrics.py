"""The SAE evaluation's metrics: per-token SAE statistics on device, their float64 sums over batches on the host,
and the metrics those sums give (sparsity, reconstruction, density, spliced-in LM loss).

Definitions: `docs/metrics.md#masking-and-aggregation` (token-weighted global means over masked tokens, float64
sums divided once), `docs/metrics.md#sae-metrics`, `docs/metrics.md#splice-evaluation` and
`docs/metrics.md#feature-density`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike
from penzai import pz

from runner.lm_stats import next_token_loss_mask, special_token_mask, special_token_mask_on_device
from runner.model.tokenizer import BOS_ID
from runner.nn.jumprelu import LATENT_AXIS, JumpReLUSAE, jumprelu

#: `log10(density + DENSITY_EPSILON)` is what the density histogram bins.
DENSITY_EPSILON = 1e-10
DENSITY_HISTOGRAM_RANGE = (-10.0, 0.0)
DENSITY_HISTOGRAM_BINS = 50
#: Top features per position kept for the table artifact.
DEFAULT_TOP_FEATURES = 5
#: The per-token losses of the splice evaluation, as `SpliceLossSums.update` takes them.
LM_LOSS_NAMES = ("ce_clean", "ce_spliced", "ce_zero_ablated", "kl_spliced", "kl_zero_ablated")


@functools.partial(jax.jit, static_argnames="top_k")
def sae_token_statistics(
    sae: JumpReLUSAE, resid: jax.Array, tokens: jax.Array, top_k: int = DEFAULT_TOP_FEATURES
) -> dict[str, jax.Array]:
    """Per-token SAE quantities of one batch (float32, unmasked except the per-latent sums).

    Args:
      sae: The SAE.
      resid: `[B, S, D]` activations at its site (any float dtype; cast to float32).
      tokens: `[B, S]` token ids (for the special-token mask of the summed outputs).
      top_k: How many top latents to return per position.

    Returns:
      `l0`, `l1`, `squared_error` (`||x - x_hat||^2`), `x_sq` (`||x||^2`), `x_hat_sq`, `x_dot_x_hat`: `[B, S]`;
      `x_sum_per_sequence`: `[B, D]` masked sum of `x`; `fire_counts`: `[d_sae]` masked firing counts (int32);
      `top_ids`, `top_values`: `[B, S, top_k]`.
    """
    x = resid.astype(jnp.float32)
    named_x = pz.nx.wrap(x).tag("batch", "seq", "embedding")
    pre = sae.encoder.pre_activations(named_x)
    active_named = pre > sae.encoder.threshold
    features_named = jumprelu(pre, sae.encoder.threshold)
    x_hat = sae.decode(features_named).unwrap("batch", "seq", "embedding")
    features = features_named.unwrap("batch", "seq", LATENT_AXIS)
    active = active_named.unwrap("batch", "seq", LATENT_AXIS)
    mask = special_token_mask_on_device(tokens)
    top_values, top_ids = jax.lax.top_k(features, top_k)
    return {
        "l0": jnp.sum(active, axis=-1, dtype=jnp.int32),
        "l1": jnp.sum(features, axis=-1),
        "squared_error": jnp.sum(jnp.square(x - x_hat), axis=-1),
        "x_sq": jnp.sum(jnp.square(x), axis=-1),
        "x_hat_sq": jnp.sum(jnp.square(x_hat), axis=-1),
        "x_dot_x_hat": jnp.sum(x * x_hat, axis=-1),
        "x_sum_per_sequence": jnp.sum(jnp.where(mask[..., None], x, 0.0), axis=1),
        "fire_counts": jnp.sum(active & mask[..., None], axis=(0, 1), dtype=jnp.int32),
        "top_ids": top_ids.astype(jnp.int32),
        "top_values": top_values,
    }


def _safe_ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator != 0 else float("nan")


def _per_token_cosine_and_norm_ratio(stats: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """`cos(x, x_hat)` and `||x_hat|| / ||x||` per token (float64; 0 where a norm is zero)."""
    x_norm = np.sqrt(np.asarray(stats["x_sq"], np.float64))
    x_hat_norm = np.sqrt(np.asarray(stats["x_hat_sq"], np.float64))
    dot = np.asarray(stats["x_dot_x_hat"], np.float64)
    norm_product = x_norm * x_hat_norm
    cosine = np.divide(dot, norm_product, out=np.zeros_like(dot), where=norm_product > 0)
    ratio = np.divide(x_hat_norm, x_norm, out=np.zeros_like(dot), where=x_norm > 0)
    return cosine, ratio


@dataclasses.dataclass
class SAEMetricSums:
    """Float64 host sums of one SAE's statistics over the masked tokens of every batch seen so far.

    Attributes:
      n_tokens: Masked tokens (`sum M`).
      l0_sum, l1_sum: `sum M * l0_t`, `sum M * sum_i f[t, i]`.
      l0_histogram: `[d_sae + 1]` counts of masked tokens by L0 value (for p50/p90/max).
      bos_tokens, bos_l0_sum: BOS positions and their summed L0 (diagnostic only).
      squared_error_sum: `S_err = sum M ||x - x_hat||^2`.
      x_sum: `S_x = sum M x` (`[d_in]`).
      x_sq_sum: `S_xx = sum M ||x||^2`.
      cosine_sum, norm_ratio_sum: sums of `cos(x, x_hat)` and `||x_hat|| / ||x||`.
      x_hat_sq_sum, x_dot_x_hat_sum: `sum M ||x_hat||^2`, `sum M <x, x_hat>`.
      fire_counts: `[d_sae]` masked tokens on which each latent fires.
    """

    n_tokens: float
    l0_sum: float
    l1_sum: float
    l0_histogram: np.ndarray
    bos_tokens: float
    bos_l0_sum: float
    squared_error_sum: float
    x_sum: np.ndarray
    x_sq_sum: float
    cosine_sum: float
    norm_ratio_sum: float
    x_hat_sq_sum: float
    x_dot_x_hat_sum: float
    fire_counts: np.ndarray

    @classmethod
    def empty(cls, d_in: int, d_sae: int) -> SAEMetricSums:
        """All sums zero for an SAE of the given shape."""
        return cls(
            n_tokens=0.0,
            l0_sum=0.0,
            l1_sum=0.0,
            l0_histogram=np.zeros(d_sae + 1, np.int64),
            bos_tokens=0.0,
            bos_l0_sum=0.0,
            squared_error_sum=0.0,
            x_sum=np.zeros(d_in, np.float64),
            x_sq_sum=0.0,
            cosine_sum=0.0,
            norm_ratio_sum=0.0,
            x_hat_sq_sum=0.0,
            x_dot_x_hat_sum=0.0,
            fire_counts=np.zeros(d_sae, np.int64),
        )

    @property
    def d_sae(self) -> int:
        """Number of latents."""
        return int(self.fire_counts.shape[0])

    def update(self, stats: Mapping[str, ArrayLike], tokens: np.ndarray) -> None:
        """Adds one batch of `sae_token_statistics` (masked by the special tokens of `tokens`)."""
        tokens = np.asarray(tokens)
        mask = special_token_mask(tokens)
        weight = mask.astype(np.float64)

        def masked_sum(name: str) -> float:
            return float(np.sum(np.asarray(stats[name], np.float64) * weight))

        l0 = np.asarray(stats["l0"], np.int64)
        cosine, norm_ratio = _per_token_cosine_and_norm_ratio(stats)
        self.n_tokens += float(weight.sum())
        self.l0_sum += masked_sum("l0")
        self.l1_sum += masked_sum("l1")
        self.l0_histogram += np.bincount(l0[mask], minlength=self.d_sae + 1)
        is_bos = tokens == BOS_ID
        self.bos_tokens += float(is_bos.sum())
        self.bos_l0_sum += float(l0[is_bos].sum())
        self.squared_error_sum += masked_sum("squared_error")
        self.x_sum += np.asarray(stats["x_sum_per_sequence"], np.float64).sum(axis=0)
        self.x_sq_sum += masked_sum("x_sq")
        self.cosine_sum += float(np.sum(cosine * weight))
        self.norm_ratio_sum += float(np.sum(norm_ratio * weight))
        self.x_hat_sq_sum += masked_sum("x_hat_sq")
        self.x_dot_x_hat_sum += masked_sum("x_dot_x_hat")
        self.fire_counts += np.asarray(stats["fire_counts"], np.int64)

    def l0_percentile(self, percent: float) -> float:
        """Smallest L0 value whose cumulative share of masked tokens reaches `percent`% (inverted CDF)."""
        if self.n_tokens == 0:
            return float("nan")
        cumulative = np.cumsum(self.l0_histogram)
        return float(np.searchsorted(cumulative, percent / 100.0 * cumulative[-1], side="left"))

    def density(self) -> np.ndarray:
        """`[d_sae]` firing frequency of each latent over masked tokens (`count_i / N`)."""
        return self.fire_counts / max(self.n_tokens, 1.0)

    def log10_density_histogram(self, bins: int = DENSITY_HISTOGRAM_BINS) -> tuple[np.ndarray, np.ndarray]:
        """Counts and edges of `log10(density + 1e-10)` over `[-10, 0]` (values clipped into the range)."""
        return log10_density_histogram(self.density(), bins)

    def finalize(self) -> dict[str, float]:
        """The SAE metrics. Convention: `docs/metrics.md#sae-metrics` (token-weighted global means over masked
        tokens, float64 sums divided once; FVU is the conventional one, not the per-token "legacy" or
        variance-about-zero variants).

        - `sae/l0`, `sae/l0_p50`, `sae/l0_p90` (inverted-CDF percentiles), `sae/l0_max`: active latents per token;
          `sae/l0_bos`: mean L0 at BOS positions (diagnostic, excluded from everything else).
        - `sae/l1`: mean `sum_i f_i`.
        - `sae/fvu = (S_err/N) / (S_xx/N - ||S_x/N||^2)` (conventional, variance about the mean),
          `sae/explained_variance = 1 - fvu`, `sae/mse_per_token = S_err/N`, `sae/mse_per_element = S_err/(N d)`.
        - `sae/cosine_similarity`, `sae/l2_ratio`: mean per-token `cos(x, x_hat)` and `||x_hat||/||x||`.
        - `sae/relative_reconstruction_bias = sum ||x_hat||^2 / sum <x, x_hat>`.
        - `density/n_dead` (latents that never fired), `density/over_1_percent`, `density/over_10_percent`
          (fraction of latents with density > 1% and > 10%), `density/mean_log10` (mean of
          `log10(density + 1e-10)`), `density/n_tokens` (N, the window the density is over).
        """
        n = self.n_tokens
        mse_per_token = _safe_ratio(self.squared_error_sum, n)
        mean_x = self.x_sum / n if n else np.full_like(self.x_sum, np.nan)
        total_variance = _safe_ratio(self.x_sq_sum, n) - float(mean_x @ mean_x)
        fvu = _safe_ratio(mse_per_token, total_variance)
        density = self.density()
        nonzero_l0 = np.nonzero(self.l0_histogram)[0]
        return {
            "sae/l0": _safe_ratio(self.l0_sum, n),
            "sae/l0_p50": self.l0_percentile(50),
            "sae/l0_p90": self.l0_percentile(90),
            "sae/l0_max": float(nonzero_l0[-1]) if nonzero_l0.size else float("nan"),
            "sae/l0_bos": _safe_ratio(self.bos_l0_sum, self.bos_tokens),
            "sae/l1": _safe_ratio(self.l1_sum, n),
            "sae/fvu": fvu,
            "sae/explained_variance": 1.0 - fvu,
            "sae/mse_per_token": mse_per_token,
            "sae/mse_per_element": _safe_ratio(self.squared_error_sum, n * self.x_sum.shape[0]),
            "sae/cosine_similarity": _safe_ratio(self.cosine_sum, n),
            "sae/l2_ratio": _safe_ratio(self.norm_ratio_sum, n),
            "sae/relative_reconstruction_bias": _safe_ratio(self.x_hat_sq_sum, self.x_dot_x_hat_sum),
            "density/n_dead": float(np.sum(self.fire_counts == 0)),
            "density/over_1_percent": float(np.mean(density > 0.01)),
            "density/over_10_percent": float(np.mean(density > 0.10)),
            "density/mean_log10": float(np.mean(np.log10(density + DENSITY_EPSILON))),
            "density/n_tokens": float(n),
        }


def log10_density_histogram(density: np.ndarray, bins: int = DENSITY_HISTOGRAM_BINS) -> tuple[np.ndarray, np.ndarray]:
    """Counts `[bins]` and edges `[bins + 1]` of `log10(density + 1e-10)` on `[-10, 0]` (clipped into range).

    Convention: `docs/metrics.md#feature-density` (density over masked tokens).
    """
    values = np.clip(np.log10(np.asarray(density, np.float64) + DENSITY_EPSILON), *DENSITY_HISTOGRAM_RANGE)
    return np.histogram(values, bins=bins, range=DENSITY_HISTOGRAM_RANGE)




@dataclasses.dataclass
class SpliceLossSums:
    """Float64 host sums of the splice evaluation's per-token losses over the loss mask.

    Attributes:
      n_tokens: Positions in the loss mask.
      sums: Summed per-token value of each of `LM_LOSS_NAMES`.
    """

    n_tokens: float = 0.0
    sums: dict[str, float] = dataclasses.field(default_factory=lambda: {name: 0.0 for name in LM_LOSS_NAMES})

    def update(self, losses: Mapping[str, ArrayLike], tokens: np.ndarray) -> None:
        """Adds one batch of per-position `[B, S-1]` losses (`LM_LOSS_NAMES`), masked by
        `next_token_loss_mask(tokens)`."""
        weight = next_token_loss_mask(tokens).astype(np.float64)
        self.n_tokens += float(weight.sum())
        for name in LM_LOSS_NAMES:
            self.sums[name] += float(np.sum(np.asarray(losses[name], np.float64) * weight))

    def finalize(self) -> dict[str, float]:
        """LM metrics. Convention: `docs/metrics.md#splice-evaluation` (SAELens/SAEBench definitions): nats per
        token, means over `next_token_loss_mask` divided once.

        `lm/ce_clean`, `lm/ce_spliced`, `lm/ce_zero_ablated`; `lm/delta_loss = ce_spliced - ce_clean`;
        `lm/ce_loss_score = (ce_zero - ce_spliced) / (ce_zero - ce_clean)`; `lm/kl_spliced = KL(clean || spliced)`,
        `lm/kl_zero_ablated = KL(clean || ablated)`; `lm/kl_score = (kl_zero - kl_spliced) / kl_zero`.
        """
        mean = {name: _safe_ratio(total, self.n_tokens) for name, total in self.sums.items()}
        return {
            "lm/ce_clean": mean["ce_clean"],
            "lm/ce_spliced": mean["ce_spliced"],
            "lm/ce_zero_ablated": mean["ce_zero_ablated"],
            "lm/delta_loss": mean["ce_spliced"] - mean["ce_clean"],
            "lm/ce_loss_score": _safe_ratio(
                mean["ce_zero_ablated"] - mean["ce_spliced"], mean["ce_zero_ablated"] - mean["ce_clean"]
            ),
            "lm/kl_spliced": mean["kl_spliced"],
            "lm/kl_zero_ablated": mean["kl_zero_ablated"],
            "lm/kl_score": _safe_ratio(mean["kl_zero_ablated"] - mean["kl_spliced"], mean["kl_zero_ablated"]),
            "lm/n_tokens": float(self.n_tokens),
        }
