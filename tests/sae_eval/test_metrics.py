"""The SAE metric sums: special tokens never enter them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from runner.sae_eval import metrics
from tests.sae_eval.references import BATCH_SIZE, ordinary


def test_bos_and_padding_never_enter_sae_metrics(tiny_saes, eval_tokens, captured) -> None:
    sae, tokens = tiny_saes[2], eval_tokens[:BATCH_SIZE]
    x = captured[1][(2, "res")][:BATCH_SIZE].astype(np.float32)
    changed = x.copy()
    special = ~ordinary(tokens)
    changed[special] = 40.0 * np.random.default_rng(0).standard_normal((special.sum(), x.shape[-1]))

    def metrics_of(resid: np.ndarray) -> dict[str, float]:
        sums = metrics.SAEMetricSums.empty(sae.d_in, sae.d_sae)
        sums.update(jax.device_get(metrics.sae_token_statistics(sae, jnp.asarray(resid), jnp.asarray(tokens))), tokens)
        return {**sums.finalize(), "density": sums.density()}

    before, after = metrics_of(x), metrics_of(changed)
    assert before.pop("sae/l0_bos") != after.pop("sae/l0_bos")
    np.testing.assert_array_equal(before.pop("density"), after.pop("density"))
    assert before == after
