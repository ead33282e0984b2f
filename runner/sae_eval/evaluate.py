"""SAE evaluation over a set of token sequences: reconstruction, sparsity, density and spliced-in LM loss.

Conventions follow the project's Gemma Scope metrics sheet (`/work/shared/reference/gemma-scope-metrics.md`):

- Sites: `res`, `mlp` and `att` of block L (`runner.nn.sites`); the splice and the zero-ablation change only the
  site, and the model is re-run from the first block the change affects (`sites.suffix_from_block`).
- Special-token mask `M[b, t] = token not in {PAD 0, EOS 1, BOS 2}`: BOS, EOS and padding never enter an SAE
  metric (`sae/l0_bos` is the only, diagnostic, exception).
- Every scalar is a token-weighted global mean over masked tokens: per-token quantities are computed in float32
  on device, summed in float64 on the host over all batches, and divided once in `finalize`.
- Token positions: padding gets position -1 (masked out of attention, as Penzai's KV-caching model does) and the
  other tokens count up from 0, so left- and right-padded rows both read as if unpadded.
- Logits: as the Penzai Gemma2 model returns them (tanh soft-capped), cast to float32. Per-token
  `ce[t] = logsumexp(z_t) - z_t[token_{t+1}]`; vocabulary sums other than `logsumexp` run over vocabulary chunks so
  that no `[B, S, V]` intermediate beyond the logits themselves is needed (V = 256k).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz
from penzai.models.transformer import model_parts

from runner.lm_stats import SPECIAL_TOKEN_IDS, special_token_mask
from runner.model.tokenizer import BOS_ID, PAD_ID
from runner.nn import sites
from runner.sae.jumprelu import LATENT_AXIS, JumpReLUSAE

#: Vocabulary entries processed at once by the chunked vocabulary sums.
DEFAULT_VOCAB_CHUNK = 32768
#: `log10(density + DENSITY_EPSILON)` is what the density histogram bins.
DENSITY_EPSILON = 1e-10
DENSITY_HISTOGRAM_RANGE = (-10.0, 0.0)
DENSITY_HISTOGRAM_BINS = 50
#: Top features per position kept for the table artifact.
DEFAULT_TOP_FEATURES = 5
#: Sequences (from the start of the evaluation set) whose per-token top features go into the table.
DEFAULT_TABLE_SEQUENCES = 4

SPLICE_MASK_INPUT = "splice_mask"


# ----------------------------------------------------------------------------------------------------------------
# Forward passes


def token_positions(tokens: jax.Array) -> jax.Array:
    """`[..., S]` positions: -1 at padding, else the count of non-pad tokens before (Penzai's KV-cache rule)."""
    tokens = jnp.asarray(tokens)
    not_pad = tokens != PAD_ID
    return jnp.where(not_pad, jnp.cumsum(not_pad, axis=-1) - 1, -1).astype(jnp.int32)


def named_tokens(tokens: jax.Array) -> tuple[pz.nx.NamedArray, pz.nx.NamedArray]:
    """`[B, S]` token ids as `{batch, seq}` named arrays of the tokens and of their `token_positions`."""
    tokens = jnp.asarray(tokens, jnp.int32)
    return (
        pz.nx.wrap(tokens).tag("batch", "seq"),
        pz.nx.wrap(token_positions(tokens)).tag("batch", "seq"),
    )


SiteKey = tuple[int, str]


def capture_sites(
    model: model_parts.TransformerLM, tokens: jax.Array, site_keys: Sequence[SiteKey]
) -> tuple[jax.Array, dict[SiteKey, jax.Array]]:
    """One forward pass returning the logits and the activation at every `(layer, site)` in `site_keys`.

    `(-1, "res")` is the residual stream entering block 0 (the scaled embeddings). Jittable
    (`capture_sites_jit`, with `site_keys` a tuple and the model through `pz.freeze_params`).

    Args:
      model: The Penzai Gemma2 model.
      tokens: `[B, S]` token ids (BOS first; PAD anywhere gets position -1 and is not attended to).
      site_keys: The activations to capture (`runner.nn.sites`).

    Returns:
      `[B, S, V]` logits (the model's dtype, soft-capped) and `{(layer, site): [B, S, D]}` activations.
    """
    named, positions = named_tokens(tokens)
    inside = [key for key in site_keys if key[0] >= 0]
    logits, activations = sites.capture(model, named, inside, token_positions=positions)
    if (-1, "res") in site_keys:
        activations[(-1, "res")] = sites.embedded_tokens(model, named, token_positions=positions)
    return (
        logits.unwrap("batch", "seq", "vocabulary"),
        {key: value.unwrap("batch", "seq", "embedding") for key, value in activations.items()},
    )


#: `capture_sites` compiled (pass `site_keys` as a tuple, the model through `pz.freeze_params`).
capture_sites_jit = jax.jit(capture_sites, static_argnames="site_keys")


@pz.pytree_dataclass
class SpliceSAEReconstruction(pz.nn.Layer):
    """Replaces the site's activation by the SAE reconstruction where the side input `splice_mask` is True.

    Positions outside the mask (BOS, EOS, padding) keep their original activation. The SAE runs in float32 and
    its output is cast back to the stream's dtype.

    Attributes:
      sae: The SAE whose reconstruction is spliced in.
    """

    sae: JumpReLUSAE

    def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        reconstruction = self.sae(x).astype(x.dtype)
        return pz.nx.nmap(jnp.where)(side_inputs[SPLICE_MASK_INPUT], reconstruction, x)


@pz.pytree_dataclass
class ZeroAblate(pz.nn.Layer):
    """Sets the site's activation to zero at every position (the splice evaluation's worst-case baseline)."""

    def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        return pz.nx.nmap(jnp.zeros_like)(x)


def patched_suffix(model: model_parts.TransformerLM, layer: int, site: str, patch: pz.nn.Layer) -> pz.nn.Layer:
    """The part of the model that `patch` at `(layer, site)` changes: it takes the residual stream entering block
    `sites.entry_point(layer, site)` (capture it at `entry_capture(layer, site)`) and returns the logits."""
    patched = sites.insert_at_site(model, layer, site, patch)
    return sites.suffix_from_block(patched, sites.entry_point(layer, site))


def entry_capture(layer: int, site: str) -> SiteKey:
    """The capture holding the input of `patched_suffix(model, layer, site, ...)`."""
    return sites.block_input_site(sites.entry_point(layer, site))


def _suffix_logits(suffix: pz.nn.Layer, entry: jax.Array, tokens: jax.Array) -> jax.Array:
    named, positions = named_tokens(tokens)
    mask = pz.nx.wrap(~jnp.isin(named.unwrap("batch", "seq"), jnp.asarray(SPECIAL_TOKEN_IDS))).tag("batch", "seq")
    logits = suffix(
        pz.nx.wrap(entry).tag("batch", "seq", "embedding"), token_positions=positions, **{SPLICE_MASK_INPUT: mask}
    )
    return logits.unwrap("batch", "seq", "vocabulary")


# ----------------------------------------------------------------------------------------------------------------
# Vocabulary statistics (shared with `runner.steering.metrics`)


def _vocab_slices(vocab_size: int, chunk: int) -> list[slice]:
    return [slice(start, min(start + chunk, vocab_size)) for start in range(0, vocab_size, chunk)]


def logit_pair_statistics(
    p_logits: jax.Array, q_logits: jax.Array, vocab_chunk: int = DEFAULT_VOCAB_CHUNK
) -> dict[str, jax.Array]:
    """Per-position divergences between two next-token distributions given by logits `[..., V]` (float32 math).

    Returns `{log_partition_p, log_partition_q, kl_pq, kl_qp, entropy_p, entropy_q}`, each `[...]`, with
    `kl_pq = KL(p || q) = sum_v p_v (log p_v - log q_v)` in nats. Sums over the vocabulary run chunk by chunk.
    Identical logits give exactly 0 for both KLs.
    """
    lse_p = jax.nn.logsumexp(p_logits.astype(jnp.float32), axis=-1)
    lse_q = jax.nn.logsumexp(q_logits.astype(jnp.float32), axis=-1)
    kl_pq = kl_qp = entropy_p = entropy_q = jnp.zeros_like(lse_p)
    for vocab in _vocab_slices(p_logits.shape[-1], vocab_chunk):
        log_p = p_logits[..., vocab].astype(jnp.float32) - lse_p[..., None]
        log_q = q_logits[..., vocab].astype(jnp.float32) - lse_q[..., None]
        prob_p, prob_q = jnp.exp(log_p), jnp.exp(log_q)
        kl_pq = kl_pq + jnp.sum(prob_p * (log_p - log_q), axis=-1)
        kl_qp = kl_qp + jnp.sum(prob_q * (log_q - log_p), axis=-1)
        entropy_p = entropy_p - jnp.sum(prob_p * log_p, axis=-1)
        entropy_q = entropy_q - jnp.sum(prob_q * log_q, axis=-1)
    return {
        "log_partition_p": lse_p,
        "log_partition_q": lse_q,
        "kl_pq": kl_pq,
        "kl_qp": kl_qp,
        "entropy_p": entropy_p,
        "entropy_q": entropy_q,
    }


def cross_entropy_from_partition(logits: jax.Array, log_partition: jax.Array, targets: jax.Array) -> jax.Array:
    """`logsumexp(z) - z[target]` per position, from precomputed `log_partition = logsumexp(z)` (float32)."""
    target_logits = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return log_partition - target_logits.astype(jnp.float32)


def next_token_loss_mask(tokens: np.ndarray) -> np.ndarray:
    """`[B, S-1]` positions whose next-token loss counts: `M[:, :-1] & (tokens[:, 1:] != PAD)`.

    Predicting from BOS, EOS or padding never counts; predicting an EOS does.
    """
    tokens = np.asarray(tokens)
    return special_token_mask(tokens)[:, :-1] & (tokens[:, 1:] != PAD_ID)


@jax.jit
def clean_token_losses(clean_logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Per-position `[B, S-1]` next-token CE of the clean pass (unmasked: combine with `next_token_loss_mask`)."""
    clean = clean_logits[:, :-1].astype(jnp.float32)
    return cross_entropy_from_partition(clean, jax.nn.logsumexp(clean, axis=-1), tokens[:, 1:])


@functools.partial(jax.jit, static_argnames="vocab_chunk")
def patched_token_losses(
    suffix: pz.nn.Layer,
    entry: jax.Array,
    tokens: jax.Array,
    clean_logits: jax.Array,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
) -> dict[str, jax.Array]:
    """Runs a `patched_suffix` on its captured input; returns per-position `[B, S-1]` `ce` (next-token CE of the
    patched logits) and `kl` (KL(clean || patched)). Unmasked: combine with `next_token_loss_mask`."""
    patched = _suffix_logits(suffix, entry, tokens)[:, :-1]
    pair = logit_pair_statistics(clean_logits[:, :-1], patched, vocab_chunk)
    return {"ce": cross_entropy_from_partition(patched, pair["log_partition_q"], tokens[:, 1:]), "kl": pair["kl_pq"]}


# ----------------------------------------------------------------------------------------------------------------
# SAE statistics


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
    features_named = pz.nx.nmap(jnp.where)(active_named, pre, 0.0)
    x_hat = sae.decode(features_named).unwrap("batch", "seq", "embedding")
    features = features_named.unwrap("batch", "seq", LATENT_AXIS)
    active = active_named.unwrap("batch", "seq", LATENT_AXIS)
    mask = ~jnp.isin(tokens, jnp.asarray(SPECIAL_TOKEN_IDS))
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

    def update(self, stats: Mapping[str, Any], tokens: np.ndarray) -> None:
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
        """The SAE metrics. Convention: metrics sheet "Masking and aggregation" + "SAE metrics" (token-weighted
        global means over masked tokens, float64 sums divided once; FVU is the conventional one, not the per-token
        "legacy" or variance-about-zero variants).

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

    Convention: metrics sheet "Feature density" (density over masked tokens).
    """
    values = np.clip(np.log10(np.asarray(density, np.float64) + DENSITY_EPSILON), *DENSITY_HISTOGRAM_RANGE)
    return np.histogram(values, bins=bins, range=DENSITY_HISTOGRAM_RANGE)


LM_LOSS_NAMES = ("ce_clean", "ce_spliced", "ce_zero_ablated", "kl_spliced", "kl_zero_ablated")


@dataclasses.dataclass
class SpliceLossSums:
    """Float64 host sums of the splice evaluation's per-token losses over the loss mask.

    Attributes:
      n_tokens: Positions in the loss mask.
      sums: Summed per-token value of each of `LM_LOSS_NAMES`.
    """

    n_tokens: float = 0.0
    sums: dict[str, float] = dataclasses.field(default_factory=lambda: {name: 0.0 for name in LM_LOSS_NAMES})

    def update(self, losses: Mapping[str, Any], tokens: np.ndarray) -> None:
        """Adds one batch of `splice_token_losses`, masked by `next_token_loss_mask(tokens)`."""
        weight = next_token_loss_mask(tokens).astype(np.float64)
        self.n_tokens += float(weight.sum())
        for name in LM_LOSS_NAMES:
            self.sums[name] += float(np.sum(np.asarray(losses[name], np.float64) * weight))

    def finalize(self) -> dict[str, float]:
        """LM metrics. Convention: metrics sheet "Splice evaluation" (SAELens/SAEBench definitions): nats per token,
        means over `next_token_loss_mask` divided once.

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


# ----------------------------------------------------------------------------------------------------------------
# Evaluation driver


@dataclasses.dataclass(frozen=True)
class SiteSAE:
    """An SAE to evaluate and where it reads.

    Attributes:
      layer: The block of its site.
      sae: The SAE.
      site: `res`, `mlp` or `att` (`runner.nn.sites`).
    """

    layer: int
    sae: JumpReLUSAE
    site: str = "res"


@dataclasses.dataclass(frozen=True)
class SAEEvalResult:
    """Everything measured for one SAE.

    Attributes:
      layer, site: Where the SAE reads.
      metrics: Scalar metrics (`sae/*`, `density/*`, `lm/*`) for MLflow.
      density: `[d_sae]` firing frequency per latent (an artifact, not a metric).
      density_histogram: `[bins]` counts of `log10(density + 1e-10)`.
      density_histogram_edges: `[bins + 1]` bin edges on `[-10, 0]`.
      l0_histogram: `[d_sae + 1]` masked-token counts by L0.
      top_feature_rows: Table rows, one per masked position of the first sequences: `sequence`, `position`,
        `token` (id), `token_text`, `feature_ids` and `feature_values` (latents with `f > 0`, largest first;
        empty where L0 is 0).
    """

    layer: int
    site: str
    metrics: dict[str, float]
    density: np.ndarray
    density_histogram: np.ndarray
    density_histogram_edges: np.ndarray
    l0_histogram: np.ndarray
    top_feature_rows: list[dict[str, Any]]


def top_feature_rows(
    tokens: np.ndarray,
    top_ids: np.ndarray,
    top_values: np.ndarray,
    first_sequence: int,
    tokenizer: Any | None = None,
) -> list[dict[str, Any]]:
    """Table rows of the per-token top latents at every masked position of a batch (see `SAEEvalResult`).

    Args:
      tokens: `[B, S]` token ids of the rows to tabulate.
      top_ids, top_values: `[B, S, k]` from `sae_token_statistics`.
      first_sequence: Index of row 0 in the evaluation set.
      tokenizer: Decodes `token_text` when given.
    """
    tokens = np.asarray(tokens)
    mask = special_token_mask(tokens)
    rows = []
    for row, position in zip(*np.nonzero(mask), strict=True):
        positive = top_values[row, position] > 0
        token = int(tokens[row, position])
        rows.append(
            {
                "sequence": int(first_sequence + row),
                "position": int(position),
                "token": token,
                "token_text": tokenizer.decode([token]) if tokenizer is not None else "",
                "feature_ids": [int(i) for i in top_ids[row, position][positive]],
                "feature_values": [float(v) for v in top_values[row, position][positive]],
            }
        )
    return rows


def _pad_rows(tokens: np.ndarray, batch_size: int) -> np.ndarray:
    """Appends all-PAD rows up to `batch_size` (they carry no masked token and change no metric)."""
    missing = batch_size - tokens.shape[0]
    if missing <= 0:
        return tokens
    return np.concatenate([tokens, np.full((missing, tokens.shape[1]), PAD_ID, tokens.dtype)])


def evaluate_saes(
    loaded_model: Any,
    saes: Mapping[Hashable, SiteSAE],
    tokens: np.ndarray,
    batch_size: int,
    *,
    top_features: int = DEFAULT_TOP_FEATURES,
    table_sequences: int = DEFAULT_TABLE_SEQUENCES,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
) -> dict[Hashable, SAEEvalResult]:
    """Evaluates every SAE on `tokens`, following the metrics sheet's conventions.

    Per batch: one clean forward captures every site and every patched suffix's input, and serves every SAE;
    then, per SAE, the model from the first affected block on with the reconstruction spliced in at masked
    positions, and per distinct `(layer, site)`, the same with the site zero-ablated at all positions (shared by
    the SAEs of that site). The last batch is filled up with all-PAD rows so one compiled program serves every
    batch.

    Args:
      loaded_model: `runner.model.loading.LoadedModel` (or anything with `.model` and optionally `.tokenizer`).
      saes: The SAEs to evaluate, by any key (the results use the same keys).
      tokens: `[N, T]` int token ids, BOS first, PAD 0 allowed (masked out, not attended to).
      batch_size: Sequences per forward pass.
      top_features: Latents per position in the top-feature table.
      table_sequences: How many leading sequences go into the table.
      vocab_chunk: Vocabulary chunk of the KL sums.

    Returns:
      `{key: SAEEvalResult}`.
    """
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [N, T], got shape {tokens.shape}")
    if not saes:
        return {}
    base = loaded_model.model
    tokenizer = getattr(loaded_model, "tokenizer", None)
    site_keys = sorted({(item.layer, item.site) for item in saes.values()})
    captures = tuple(sorted(set(site_keys) | {entry_capture(*key) for key in site_keys}))
    frozen = pz.freeze_params(base)
    spliced = {key: pz.freeze_params(patched_suffix(base, item.layer, item.site, SpliceSAEReconstruction(item.sae)))
               for key, item in saes.items()}
    ablated = {site_key: pz.freeze_params(patched_suffix(base, *site_key, ZeroAblate())) for site_key in site_keys}
    sae_sums = {key: SAEMetricSums.empty(item.sae.d_in, item.sae.d_sae) for key, item in saes.items()}
    loss_sums = {key: SpliceLossSums() for key in saes}
    tables: dict[Hashable, list[dict[str, Any]]] = {key: [] for key in saes}
    top_k = min(top_features, min(item.sae.d_sae for item in saes.values()))

    for start in range(0, tokens.shape[0], batch_size):
        batch = _pad_rows(tokens[start : start + batch_size], batch_size)
        device_batch = jnp.asarray(batch)
        clean_logits, activations = capture_sites_jit(frozen, device_batch, site_keys=captures)
        ce_clean = clean_token_losses(clean_logits, device_batch)
        zero_ablated = {
            site_key: patched_token_losses(
                ablated[site_key], activations[entry_capture(*site_key)], device_batch, clean_logits,
                vocab_chunk=vocab_chunk,
            )
            for site_key in site_keys
        }
        table_rows = max(0, min(table_sequences - start, batch.shape[0]))
        for key, item in saes.items():
            site_key = (item.layer, item.site)
            stats = jax.device_get(sae_token_statistics(item.sae, activations[site_key], device_batch, top_k=top_k))
            sae_sums[key].update(stats, batch)
            if table_rows:
                tables[key].extend(
                    top_feature_rows(
                        batch[:table_rows], stats["top_ids"][:table_rows], stats["top_values"][:table_rows], start,
                        tokenizer,
                    )
                )
            splice = patched_token_losses(
                spliced[key], activations[entry_capture(*site_key)], device_batch, clean_logits,
                vocab_chunk=vocab_chunk,
            )
            losses = {
                "ce_clean": ce_clean,
                "ce_spliced": splice["ce"],
                "kl_spliced": splice["kl"],
                "ce_zero_ablated": zero_ablated[site_key]["ce"],
                "kl_zero_ablated": zero_ablated[site_key]["kl"],
            }
            loss_sums[key].update(jax.device_get(losses), batch)

    results = {}
    for key, item in saes.items():
        counts, edges = sae_sums[key].log10_density_histogram()
        results[key] = SAEEvalResult(
            layer=item.layer,
            site=item.site,
            metrics={**sae_sums[key].finalize(), **loss_sums[key].finalize()},
            density=sae_sums[key].density(),
            density_histogram=counts,
            density_histogram_edges=edges,
            l0_histogram=sae_sums[key].l0_histogram.copy(),
            top_feature_rows=tables[key],
        )
    return results
