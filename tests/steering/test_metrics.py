"""Judge-free steering metrics against numpy float64 references and constructed cases with known answers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz

from runner.lm_stats import token_positions
from runner.model.tokenizer import BOS_ID, EOS_ID, PAD_ID
from runner.nn import measurement, steering
from runner.nn.jumprelu import JumpReLUSAE
from runner.sae.params import random_sae_arrays
from runner.sae.sources import calibration_tokens
from runner.steering import metrics as steering_metrics

PROMPT_LEN, GEN_LEN = 12, 10
LAYERS, FEATURES = [1, 2, 1], [7, 11, 3]
K = 10


@jax.jit
def _plain_capture(model, tokens):
    logits, residuals = measurement.capture(model, pz.nx.wrap(tokens).tag("batch", "seq"), [(1, "res"), (2, "res")])
    resid = {layer: value.unwrap("batch", "seq", "embedding") for (layer, _), value in residuals.items()}
    return logits.unwrap("batch", "seq", "vocabulary"), resid


@jax.jit
def _plain_steered_logits(model, inputs, tokens):
    return model(pz.nx.wrap(tokens).tag("batch", "seq"), steering=inputs).unwrap("batch", "seq", "vocabulary")


@jax.jit
def _padded_steered_logits(model, inputs, tokens):
    """Steered logits with padding at position -1, never attended to."""
    return model(
        pz.nx.wrap(tokens).tag("batch", "seq"),
        token_positions=pz.nx.wrap(token_positions(tokens)).tag("batch", "seq"),
        steering=inputs,
    ).unwrap("batch", "seq", "vocabulary")


@pytest.fixture(scope="module")
def windows(tiny_model) -> np.ndarray:
    return calibration_tokens(tiny_model.tokenizer, num_sequences=4, seq_len=24)


@pytest.fixture(scope="module")
def batch(windows) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prompts of 12, 9 and 6 tokens; generations of 10 tokens, 6 tokens + EOS, 4 tokens + EOS + junk."""
    prompts = [windows[0, :12], windows[1, :9], windows[2, :6]]
    prompt_tokens = np.full((3, PROMPT_LEN), PAD_ID, np.int32)
    for row, prompt in enumerate(prompts):
        prompt_tokens[row, PROMPT_LEN - len(prompt) :] = prompt
    generated = np.full((3, GEN_LEN), PAD_ID, np.int32)
    generated[0] = windows[3, 1:11]
    generated[1, :6], generated[1, 6] = windows[0, 12:18], EOS_ID
    generated[2, :4], generated[2, 4], generated[2, 5:8] = windows[1, 9:13], EOS_ID, windows[2, 6:9]
    return prompt_tokens, generated


@pytest.fixture(scope="module")
def patched(tiny_model, tiny_saes):
    return steering.add_steering_sites(tiny_model.model, {1: tiny_saes[1], 2: tiny_saes[2]})


def steering_inputs(values) -> steering.SteeringInputs:
    return steering.SteeringInputs.from_rows(LAYERS, FEATURES, values, ["add"] * 3, [0] * 3)


def unpadded_rows(prompt_tokens, generated) -> tuple[np.ndarray, list[int], list[list[int]]]:
    """Each row as prompt + generation up to its first EOS, starting at position 0, right-padded."""
    out = np.full((prompt_tokens.shape[0], PROMPT_LEN + GEN_LEN), PAD_ID, np.int32)
    prompt_lens, gens = [], []
    for row in range(prompt_tokens.shape[0]):
        prompt = [t for t in prompt_tokens[row] if t != PAD_ID]
        gen = []
        for token in generated[row]:
            if token in (EOS_ID, PAD_ID):
                break
            gen.append(int(token))
        out[row, : len(prompt) + len(gen)] = prompt + gen
        prompt_lens.append(len(prompt))
        gens.append(gen)
    return out, prompt_lens, gens


def input_embedding(loaded_model) -> np.ndarray:
    """`W_E [V, D]` read from the embedding lookup (Gemma2 ties the unembedding to it)."""
    lookup = pz.select(loaded_model.model).at_instances_of(pz.nn.EmbeddingLookup).get_sequence()[0]
    return np.asarray(lookup.table.embeddings.value.unwrap("vocabulary", "embedding"), np.float64)


def log_softmax(z: np.ndarray) -> np.ndarray:
    shifted = z - z.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_metrics_match_numpy_reference(tiny_model, tiny_saes, patched, batch) -> None:
    prompt_tokens, generated = batch
    inputs = steering_inputs([8.0, 4.0, 0.0])
    computed = steering_metrics.steering_generation_metrics(
        tiny_model.model, inputs, prompt_tokens, generated, tiny_saes, LAYERS, FEATURES, logit_lens_k=K
    )
    results = [row.metrics for row in computed]

    tokens, prompt_lens, gens = unpadded_rows(prompt_tokens, generated)
    base_logits, residuals = (
        jax.tree.map(lambda a: np.asarray(a, np.float64), out)
        for out in _plain_capture(pz.freeze_params(tiny_model.model), jnp.asarray(tokens))
    )
    steered_logits = np.asarray(
        _plain_steered_logits(pz.freeze_params(patched), inputs, jnp.asarray(tokens)), np.float64
    )
    unembedding = input_embedding(tiny_model)

    for row, metrics in enumerate(results):
        n_prompt, gen = prompt_lens[row], np.asarray(gens[row])
        predicting = np.arange(n_prompt - 1, n_prompt - 1 + len(gen))
        log_base, log_steered = log_softmax(base_logits[row, predicting]), log_softmax(steered_logits[row, predicting])
        arrays = tiny_saes[LAYERS[row]].to_arrays()
        feature = FEATURES[row]
        at_generation = residuals[LAYERS[row]][row, n_prompt : n_prompt + len(gen)]
        pre = at_generation @ arrays["W_enc"][:, feature].astype(np.float64) + arrays["b_enc"][feature]
        fires = pre > arrays["threshold"][feature]
        lens = np.argsort(-(unembedding @ arrays["W_dec"][feature].astype(np.float64)), kind="stable")[:K]
        nll = -log_base[np.arange(len(gen)), gen].mean()
        expected = {
            "steer/nll": nll,
            "steer/perplexity": np.exp(nll),
            "steer/kl_steered_base": (np.exp(log_steered) * (log_steered - log_base)).sum(-1).mean(),
            "steer/kl_base_steered": (np.exp(log_base) * (log_base - log_steered)).sum(-1).mean(),
            "steer/entropy_base": -(np.exp(log_base) * log_base).sum(-1).mean(),
            "steer/entropy_steered": -(np.exp(log_steered) * log_steered).sum(-1).mean(),
            "steer/concept_rate": fires.mean(),
            "steer/concept_activation": np.where(fires, pre, 0).mean(),
            "steer/logit_lens_mass": np.exp(log_base[:, lens]).sum(-1).mean(),
        }
        assert sorted(metrics) == sorted([*expected, "gen/distinct_1", "gen/distinct_2", "gen/longest_repeat"])
        for name, value in expected.items():
            assert metrics[name] == pytest.approx(value, rel=1e-4, abs=1e-5), (row, name)
        assert list(computed[row].logit_lens_tokens) == lens.tolist()
    assert [len(steering_metrics.measured_tokens(row)) for row in generated] == [10, 6, 4]
    assert results[0]["steer/kl_steered_base"] > 1e-3 and abs(results[2]["steer/kl_steered_base"]) < 1e-6


def test_kl_is_exactly_zero_at_scale_zero(tiny_model, tiny_saes, batch) -> None:
    results = steering_metrics.steering_generation_metrics(
        tiny_model.model, steering_inputs([0.0] * 3), *batch, tiny_saes, LAYERS, FEATURES
    )
    # Base and steered logits come from two passes: equal up to float32 rounding, not bit for bit.
    for metrics in (row.metrics for row in results):
        assert metrics["steer/kl_steered_base"] == pytest.approx(0.0, abs=1e-6)
        assert metrics["steer/kl_base_steered"] == pytest.approx(0.0, abs=1e-6)
        assert metrics["steer/entropy_base"] == pytest.approx(metrics["steer/entropy_steered"], abs=1e-5)


def test_top_logit_lens_tokens_match_numpy(tiny_model, tiny_saes) -> None:
    arrays = tiny_saes[2].to_arrays()
    unembedding = input_embedding(tiny_model)
    for feature in (0, 11, 200):
        scores = unembedding @ arrays["W_dec"][feature].astype(np.float64)
        expected = np.argsort(-scores, kind="stable")[:K].tolist()
        assert steering_metrics.top_logit_lens_tokens(tiny_model.model, tiny_saes[2], feature, K) == expected


@pytest.mark.parametrize(
    "tokens, distinct_1, distinct_2, longest",
    [
        ([7, 8, 9], 1.0, 1.0, 0),
        ([4, 4, 4, 4], 1 / 4, 1 / 3, 3),
        ([5, 6, 5, 6, 5, 6], 2 / 6, 2 / 5, 4),
        ([1, 2, 3, 9, 1, 2, 3, 8], 5 / 8, 5 / 7, 3),
        ([3, 4, 5, 3, 4], 3 / 5, 3 / 4, 2),
    ],
)
def test_repetition_metrics_on_hand_written_lists(tokens, distinct_1, distinct_2, longest) -> None:
    metrics = steering_metrics.repetition_metrics(tokens)
    expected = {"gen/distinct_1": distinct_1, "gen/distinct_2": distinct_2, "gen/longest_repeat": longest}
    assert metrics == pytest.approx(expected)


def test_sampler_sums_become_per_token_means() -> None:
    assert steering_metrics.steering_point_metrics(4, 10.0, 6.0, 3.0) == {
        "gen/measured_tokens": 4.0,
        "steer/l0": 2.5,
        "steer/feature_activation": 1.5,
        "steer/feature_firing_rate": 0.75,
    }
    assert steering_metrics.steering_point_metrics(0, 0.0, 0.0, 0.0) == {"gen/measured_tokens": 0.0}


def test_a_kl_that_rounds_below_zero_is_reported_as_zero() -> None:
    # What the teacher-forced program returns at scale 0: two passes equal up to float32 rounding, so a KL of
    # -1.7e-8 (the value a sweep logged); entropies are left as they are.
    prompt_len, generated = 2, np.asarray([[5, 6, EOS_ID]])
    per_position = {name: np.zeros((1, 5), np.float32) for name in
                    ("nll", "kl_steered_base", "kl_base_steered", "entropy_base", "entropy_steered")}
    per_position["kl_base_steered"][0, 1:3] = -1.7e-8
    per_position["kl_steered_base"][0, 1:3] = 2e-3
    per_position["entropy_base"][0, 1:3] = 1.5
    per_position.update(logit_lens_mass=np.zeros((1, 5)), concept=np.zeros((1, 5)), lens_tokens=np.zeros((1, K), int))
    (computed,) = steering_metrics._point_metrics(per_position, prompt_len, generated, [0])
    assert computed.metrics["steer/kl_base_steered"] == 0.0
    assert computed.metrics["steer/kl_steered_base"] == pytest.approx(2e-3)
    assert computed.metrics["steer/entropy_base"] == pytest.approx(1.5)


def test_generation_is_read_up_to_its_first_eos() -> None:
    generated = np.asarray([[5, 6, EOS_ID, 7, 8, PAD_ID], [9, 9, 9, 9, 9, 9], [EOS_ID, 4, 4, PAD_ID, PAD_ID, PAD_ID]])
    assert [steering_metrics.measured_tokens(row) for row in generated] == [[5, 6], [9] * 6, []]
    assert steering_metrics.repetition_metrics([]) == {"gen/longest_repeat": 0.0}


def test_concept_feature_fires_on_its_token_text_only(tiny_model, windows) -> None:
    """A feature built to read the residual direction of one repeated token fires on a generation made of that token
    and not on ordinary text, when the unsteered model re-reads prompt + generation."""
    layer, concept_token = 2, int(windows[0, 5])
    prompt = windows[0, :PROMPT_LEN]
    others = [t for t in windows[1:].ravel() if t not in (concept_token, BOS_ID)]
    generated = np.asarray([[concept_token] * GEN_LEN, others[:GEN_LEN], others[GEN_LEN : 2 * GEN_LEN]], np.int32)
    prompt_tokens = np.stack([prompt] * 3).astype(np.int32)

    full_text = jnp.asarray(np.concatenate([prompt_tokens, generated], 1))
    _, residuals = _plain_capture(pz.freeze_params(tiny_model.model), full_text)
    at_generation = np.asarray(residuals[layer], np.float64)[:, PROMPT_LEN:]
    direction = at_generation[0].mean(0) - at_generation[1:].reshape(-1, 64).mean(0)
    direction /= np.linalg.norm(direction)
    projection = at_generation @ direction
    assert projection[0].min() > projection[1:].max()  # the construction separates the texts
    arrays = random_sae_arrays(64, 8, seed=3)
    arrays["W_enc"][:, 0], arrays["W_dec"][0] = direction, direction
    arrays["threshold"][0] = (projection[0].min() + projection[1:].max()) / 2
    concept_sae = JumpReLUSAE.from_arrays(arrays)

    # Steered by 0: nothing changes, only the concept is read.
    unsteered = steering.SteeringInputs.from_rows([layer] * 3, [0] * 3, [0.0] * 3, ["add"] * 3, [0] * 3)
    results = [
        row.metrics
        for row in steering_metrics.steering_generation_metrics(
            tiny_model.model, unsteered, prompt_tokens, generated, {layer: concept_sae}, [layer] * 3, [0] * 3,
        )
    ]
    assert [r["steer/concept_rate"] for r in results] == [1.0, 0.0, 0.0]
    expected_activation = np.where(projection[0] > arrays["threshold"][0], projection[0], 0).mean()
    assert results[0]["steer/concept_activation"] == pytest.approx(expected_activation, rel=1e-4)
    assert results[1]["steer/concept_activation"] == 0.0


def greedy(patched, inputs: steering.SteeringInputs, prompt_tokens: np.ndarray) -> np.ndarray:
    """Greedy decoding by full forward passes over a fixed-size buffer (future slots are PAD, never attended)."""
    buffer = np.concatenate([prompt_tokens, np.full((prompt_tokens.shape[0], GEN_LEN), PAD_ID, np.int32)], 1)
    done = np.zeros(prompt_tokens.shape[0], bool)
    frozen = pz.freeze_params(patched)
    for step in range(GEN_LEN):
        logits = np.array(_padded_steered_logits(frozen, inputs, jnp.asarray(buffer))[:, PROMPT_LEN + step - 1])
        logits[:, PAD_ID] = -np.inf
        token = np.where(done, PAD_ID, logits.argmax(-1))
        buffer[:, PROMPT_LEN + step] = token
        done |= token == EOS_ID
    return buffer[:, PROMPT_LEN:]


def test_greedy_unsteered_generation_is_likelier_than_heavily_steered(tiny_model, tiny_saes, patched, batch) -> None:
    prompt_tokens, _ = batch
    unsteered, heavy = steering_inputs([0.0] * 3), steering_inputs([60.0] * 3)
    plain_generation = greedy(patched, unsteered, prompt_tokens)
    steered_generation = greedy(patched, heavy, prompt_tokens)
    assert (plain_generation != steered_generation).any()
    plain, steered = (
        [
            row.metrics
            for row in steering_metrics.steering_generation_metrics(
                tiny_model.model, heavy, prompt_tokens, generation, tiny_saes, LAYERS, FEATURES
            )
        ]
        for generation in (plain_generation, steered_generation)
    )
    for row in range(3):
        assert plain[row]["steer/nll"] < steered[row]["steer/nll"]
        assert steered[row]["steer/kl_steered_base"] > 0.1
