"""Batch memory estimates choose the largest batch that fits, and refuse when nothing fits."""

from __future__ import annotations

import pytest

from runner.errors import PlanError
from runner.model.architecture import Gemma2Architecture
from runner.plan.memory import BatchMemory, estimate_batch_memory, largest_fitting_batch

GEMMA2_9B = Gemma2Architecture(42, 3584, 16, 8, 256, 14_336, 256_128, gating_is_d_by_f=False)


def test_estimate_counts_weights_and_the_kv_cache() -> None:
    estimate = estimate_batch_memory(
        GEMMA2_9B, prompt_len=64, max_new_tokens=960, parameter_bytes=2, activation_bytes=2, sae_widths=[16384]
    )
    assert 18e9 < estimate.weights < 19.5e9  # ~9.2B parameters in bf16, plus one 16k SAE
    kv_cache_per_row = 2 * 8 * 256 * 1024 * 2 * 42  # the reference formula at cache_len 1024
    assert kv_cache_per_row < estimate.per_row < 3 * kv_cache_per_row


def test_largest_fitting_batch() -> None:
    memory = BatchMemory(weights=1_000, per_row=100)
    # usable = 0.9 * 3000 = 2700; total(b) = (1000 + 100 b) * 1.25 <= 2700  ->  b <= 11.6
    assert largest_fitting_batch(memory, 3_000, at_most=64) == 11
    assert largest_fitting_batch(memory, 3_000, at_most=4) == 4


def test_refuses_when_even_one_row_does_not_fit() -> None:
    with pytest.raises(PlanError, match="a batch of 1 needs about"):
        largest_fitting_batch(BatchMemory(weights=10 * 2**30, per_row=2**30), 8 * 2**30, at_most=8)
