"""Memory of a batch: estimates that agree with XLA's compiled analysis, the batch that fits, refusals that say why."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from runner.errors import PlanError
from runner.model.architecture import PUBLISHED, Gemma2Architecture
from runner.model.loading import abstract_gemma2
from runner.plan import memory
from runner.plan.memory import BatchMemory, DoesNotFit, check_fits, estimate_steering_memory, fit_batch
from runner.sae_eval.evaluate import abstract_sae
from runner.steering.metrics import SteeringMetricsProgram
from runner.steering.sampler import SteeringSampler

GEMMA2_9B = Gemma2Architecture(42, 3584, 16, 8, 256, 14_336, 256_128, gating_is_d_by_f=False)


def test_the_estimate_counts_weights_once_and_the_kv_cache_per_row() -> None:
    estimate = estimate_steering_memory(
        GEMMA2_9B, prompt_len=64, max_new_tokens=960, parameter_bytes=2, activation_bytes=2, sae_widths=[16384]
    )
    assert 18e9 < estimate.weights < 19.5e9  # ~9.2B parameters in bf16 (the tied embedding once), one 16k SAE
    assert estimate.sae_weights == 2 * 3584 * 16384 * 4
    kv_cache_per_row = 2 * 8 * 256 * 1024 * 2 * 42  # the reference formula at cache_len 1024
    assert kv_cache_per_row < estimate.per_row < 2 * kv_cache_per_row


def test_the_largest_batch_whose_need_fits_the_usable_memory() -> None:
    estimate = BatchMemory(weights=10_000, per_row=100, fixed=500)
    # usable = 0.9 * 2000 = 1800 beyond the weights; 500 + 100 b <= 1800  ->  b <= 13
    assert estimate.largest_batch(2_000, at_most=64) == 13
    assert estimate.largest_batch(2_000, at_most=4) == 4
    assert estimate.largest_batch(600, at_most=64) == 0, "not even one row"


def linear_need(fixed: int, per_row: int, calls: list[int]):
    def need(batch: int) -> int:
        calls.append(batch)
        return fixed + per_row * batch
    return need


@pytest.mark.parametrize("guess", [1, 5, 20, 64])
def test_fit_finds_the_largest_fitting_batch_in_a_few_measurements(guess: int) -> None:
    calls: list[int] = []
    fit = fit_batch(linear_need(1_000, 37, calls), budget=1_000 + 37 * 23 + 10, at_most=64, guess=guess)
    assert fit.batch_size == 23 and fit.need == 1_000 + 37 * 23
    assert len(set(calls)) <= 4 and len(calls) == len(set(calls)), "each size measured once, few sizes"


def test_fit_takes_the_whole_job_when_it_fits_with_one_measurement() -> None:
    calls: list[int] = []
    fit = fit_batch(linear_need(1_000, 37, calls), budget=10**9, at_most=12, guess=12)
    assert (fit.batch_size, calls) == (12, [12])


def test_fit_steps_down_where_the_need_is_not_linear() -> None:
    needs = {1: 100, 2: 150, 4: 250, 8: 900, 16: 1800, 5: 700, 6: 760, 7: 820, 3: 200}
    fit = fit_batch(needs.__getitem__, budget=800, at_most=16, guess=16)
    assert (fit.batch_size, fit.need) == (6, 760), "the line through 8 and 16 says 7, which is measured too large"
    assert sorted(fit.measured) == [6, 7, 8, 16]


def test_fit_refuses_when_not_even_one_row_fits() -> None:
    with pytest.raises(DoesNotFit) as error:
        fit_batch(linear_need(1_000, 10, []), budget=900, at_most=8, guess=8)
    assert (error.value.need, error.value.budget) == (1_010, 900)


def test_a_model_too_large_for_the_device_is_refused_with_the_bytes_and_the_remedy() -> None:
    estimate = BatchMemory(weights=36 * 2**30, per_row=2**30)
    with pytest.raises(PlanError, match=r"kaggle:gemma2-9b \(float32\): a batch of 1 needs about 37.0 GiB .* "
                                        r"14.4 GiB usable.*model.dtype: bfloat16 halves the weights"):
        check_fits(estimate, 16 * 2**30, model="kaggle:gemma2-9b", dtype="float32", platform="tpu")
    with pytest.raises(PlanError) as on_cpu:
        check_fits(estimate, 16 * 2**30, model="kaggle:gemma2-9b", dtype="float32", platform="cpu")
    assert "bfloat16" not in str(on_cpu.value), "on CPU bfloat16 weights are held in float32: no remedy"
    check_fits(estimate, 64 * 2**30, model="kaggle:gemma2-9b", dtype="float32", platform="tpu")


def test_resident_bytes_count_a_shared_array_once_and_arguments_twice() -> None:
    table = jnp.zeros((4, 8), jnp.float32)
    tree = {"lookup": table, "decode": table, "norm": jnp.zeros(8, jnp.bfloat16)}
    assert memory.unique_bytes(tree) == 4 * 8 * 4 + 8 * 2
    assert memory.argument_bytes(tree) == 2 * 4 * 8 * 4 + 8 * 2


# ---------------------------------------------------------------------------------------------------------------
# The estimates against XLA's compiled memory analysis, at Gemma2-2B's widths and vocabulary (6 of its 26 blocks,
# abstract weights: nothing is allocated)

SIX_BLOCKS = dataclasses.replace(PUBLISHED["gemma2-2b"], num_layers=6)
#: (batch, prompt bucket, new tokens); the first two differ only in the batch, which gives each program's per row.
SHAPES = [(8, 16, 32), (32, 16, 32), (4, 64, 64)]


@pytest.fixture(scope="module")
def compiled_needs() -> dict[tuple[int, int, int], dict[str, int]]:
    model = abstract_gemma2(SIX_BLOCKS, jnp.float32)
    saes = {5: abstract_sae(SIX_BLOCKS.embedding_dim, 16384)}
    needs = {}
    for batch, prompt, new in SHAPES:
        sampler = SteeringSampler(model, saes, batch_size=batch, prompt_len=prompt, max_new_tokens=new)
        metrics = SteeringMetricsProgram(model, saes, num_generations=batch, seq_len=prompt + new, num_points=batch)
        needs[(batch, prompt, new)] = {
            "sampler": memory.program_need(sampler.memory_analysis(), memory.argument_bytes(sampler.weights)),
            "metrics": memory.program_need(metrics.memory_analysis(), memory.argument_bytes(metrics.weights)),
        }
    return needs


@pytest.mark.slow
@pytest.mark.parametrize("shape", SHAPES)
def test_the_planners_estimates_agree_with_the_compiled_programs_within_25_percent(compiled_needs, shape) -> None:
    batch, prompt, new = shape
    sampler = memory.estimate_sampler_memory(SIX_BLOCKS, prompt_len=prompt, max_new_tokens=new, parameter_bytes=4,
                                             activation_bytes=4)
    metrics = memory.estimate_metrics_memory(SIX_BLOCKS, seq_len=prompt + new, parameter_bytes=4, activation_bytes=4)
    compiled = compiled_needs[shape]
    assert sampler.need(batch) == pytest.approx(compiled["sampler"], rel=0.25)
    assert metrics.need(batch) == pytest.approx(compiled["metrics"], rel=0.25)
    # The batch the planner would pick for a budget is the one the compiled programs allow, within 25%.
    budget = compiled["sampler"] / memory.USABLE_FRACTION
    assert sampler.largest_batch(int(budget), at_most=10**6) == pytest.approx(batch, rel=0.25)


@pytest.mark.slow
def test_a_row_of_the_metrics_program_costs_no_more_than_a_row_of_the_sampler(compiled_needs) -> None:
    """At the 256,128-row vocabulary: the teacher-forced passes hold the logits of a few positions at a time."""
    small, large = compiled_needs[SHAPES[0]], compiled_needs[SHAPES[1]]
    rows = SHAPES[1][0] - SHAPES[0][0]
    sampler_row = (large["sampler"] - small["sampler"]) / rows
    metrics_row = (large["metrics"] - small["metrics"]) / rows
    assert sampler_row > 2**20 * 5, "the sampler's row holds its KV cache and decode-step logits"
    assert metrics_row <= sampler_row
    logits = SHAPES[1][0] * (SHAPES[1][1] + SHAPES[1][2]) * SIX_BLOCKS.vocab_size * 4
    assert large["metrics"] < logits, "less than one [batch, seq, vocabulary] float32 logits tensor in all"
    assert np.isfinite(metrics_row)
