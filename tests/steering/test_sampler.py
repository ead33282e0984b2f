"""The batched, fully jitted steering sampler: equal to simple references, one program per shape."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz
from penzai.toolshed.save_intermediates import SaveIntermediate

from runner.model import tokenizer as tokenizer_lib
from runner.nn import steering
from runner.nn.jumprelu import LATENT_AXIS
from runner.steering.sampler import SamplingBatch, SteeringSampler, left_pad, prompt_bucket, sample_next_tokens

PROMPTS = ["The most iconic structure on Earth is", "Once upon a time", "The river ran"]
NEW_TOKENS = 10
PROMPT_LEN = 32
PROBES = (5, 21, 100)


@pytest.fixture(scope="module")
def encoded(tiny_model) -> list[list[int]]:
    return [tokenizer_lib.encode_prompt(tiny_model.tokenizer, text) for text in PROMPTS]


def make_batch(rows: list[dict], prompt_len: int) -> SamplingBatch:
    """Rows are dicts of tokens, layer, feature, value, mode, and optional sampling fields."""

    def column(name, default, dtype):
        return np.array([row.get(name, default) for row in rows], dtype)

    return SamplingBatch(
        prompt_tokens=left_pad([row["tokens"] for row in rows], prompt_len),
        target_layer=column("layer", steering.NO_LAYER, np.int32),
        feature=column("feature", 0, np.int32),
        value=column("value", 0.0, np.float32),
        mode=np.array([steering.MODE_CODES[row.get("mode", "add")] for row in rows], np.int32),
        steer_from=column("steer_from", 0, np.int32),
        temperature=column("temperature", 0.0, np.float32),
        top_k=column("top_k", 0, np.int32),
        top_p=column("top_p", 1.0, np.float32),
        seed=column("seed", 0, np.uint32),
        stream=column("stream", 0, np.uint32),
        probe_features=np.asarray(PROBES, np.int32),
    )


@pytest.fixture(scope="module")
def sampler(tiny_model, tiny_saes):
    """`sampler(batch_size, eos_id)`: samplers shared by the module's tests (each compiles once)."""
    built: dict[tuple[int, int], SteeringSampler] = {}

    def get(batch_size: int, eos_id: int = -1) -> SteeringSampler:
        if (batch_size, eos_id) not in built:
            built[batch_size, eos_id] = SteeringSampler(
                tiny_model.model, tiny_saes, batch_size=batch_size, prompt_len=PROMPT_LEN,
                max_new_tokens=NEW_TOKENS, eos_id=eos_id, num_probes=len(PROBES),
            )
        return built[batch_size, eos_id]

    return get


def filled(rows: list[dict], batch_size: int = 8) -> list[dict]:
    """Pads a list of rows to the batch size by repeating its last row."""
    return rows + [rows[-1]] * (batch_size - len(rows))


@jax.jit
def full_forward(model, tokens: jax.Array, side_inputs: dict) -> jax.Array:
    return model(pz.nx.wrap(tokens).tag("batch", "seq"), **side_inputs).unwrap("batch", "seq", "vocabulary")


def reference_greedy(model, prompt: list[int], steps: int, **side_inputs) -> list[int]:
    """The plainest possible decoder: the full (uncached) model over the whole sequence at every step.

    The sequence is right-padded to a fixed length so one compiled forward serves every step; the model is
    causal, so positions before the padding do not see it.
    """
    tokens = list(prompt)
    for _ in range(steps):
        padded = tokens + [tokenizer_lib.PAD_ID] * (len(prompt) + steps - len(tokens))
        logits = np.asarray(full_forward(pz.freeze_params(model), jnp.asarray([padded], jnp.int32), side_inputs))
        last = logits[0, len(tokens) - 1].copy()
        last[tokenizer_lib.PAD_ID] = -np.inf
        tokens.append(int(last.argmax()))
    return tokens[len(prompt):]


def test_unsteered_rows_equal_a_plain_greedy_decode(tiny_model, sampler, encoded) -> None:
    rows = [{"tokens": t} for t in encoded] + [{"tokens": encoded[0], "layer": 2, "feature": 4, "value": 0.0}]
    out = sampler(8)(make_batch(filled(rows), PROMPT_LEN))
    for row, prompt in enumerate(encoded):
        assert out.tokens[row].tolist() == reference_greedy(tiny_model.model, prompt, NEW_TOKENS)
    assert out.tokens[3].tolist() == out.tokens[0].tolist()  # scale 0 is the unsteered model


def test_steered_rows_equal_a_plain_greedy_decode_of_the_patched_model(
    tiny_model, tiny_saes, sampler, encoded
) -> None:
    row = {"tokens": encoded[1], "layer": 1, "feature": 9, "value": 25.0}
    out = sampler(1)(make_batch([row], PROMPT_LEN))
    patched = steering.add_steering_sites(tiny_model.model, tiny_saes)
    inputs = steering.SteeringInputs.from_rows([1], [9], [25.0], ["add"], [0])
    expected = reference_greedy(patched, encoded[1], NEW_TOKENS, steering=inputs)
    assert out.tokens[0].tolist() == expected
    assert expected != reference_greedy(tiny_model.model, encoded[1], NEW_TOKENS)


def test_batched_generation_equals_one_point_at_a_time(sampler, encoded) -> None:
    rows = [
        {"tokens": encoded[0], "layer": 1, "feature": 3, "value": 30.0, "mode": "add"},
        {"tokens": encoded[1], "layer": 3, "feature": 8, "value": -20.0, "mode": "add"},
        {"tokens": encoded[2], "layer": 2, "feature": 5, "value": 15.0, "mode": "clamp"},
        {"tokens": encoded[0], "layer": 2, "feature": 5, "value": 0.0, "mode": "ablate"},
        {"tokens": encoded[1], "layer": 0, "feature": 100, "value": 40.0, "mode": "add", "steer_from": 1},
    ]
    together = sampler(8)(make_batch(filled(rows), PROMPT_LEN))
    alone = sampler(1)
    for index, row in enumerate(rows):
        single = alone(make_batch([row], PROMPT_LEN))
        np.testing.assert_array_equal(together.tokens[index], single.tokens[0])
        for name, total in together.totals.items():
            np.testing.assert_allclose(total[index], single.totals[name][0], rtol=1e-5, err_msg=name)
    assert alone.compilations == 1


def test_one_compilation_for_any_mix_of_points(sampler, encoded) -> None:
    program = sampler(8)
    rng = np.random.default_rng(0)
    for _ in range(3):
        rows = [
            {
                "tokens": encoded[rng.integers(3)],
                "layer": int(rng.integers(4)),
                "feature": int(rng.integers(256)),
                "value": float(rng.normal() * 20),
                "mode": str(rng.choice(["add", "clamp", "ablate"])),
                "temperature": float(rng.choice([0.0, 0.7])),
                "top_k": int(rng.choice([0, 5])),
                "top_p": float(rng.choice([1.0, 0.9])),
                "seed": int(rng.integers(100)),
            }
            for _ in range(8)
        ]
        program(make_batch(rows, PROMPT_LEN))
    assert program.compilations == 1


def test_eos_stops_the_row_pads_after_it_and_ends_the_loop_early(sampler, encoded) -> None:
    row = {"tokens": encoded[0], "layer": 1}
    free = sampler(1)(make_batch([row], PROMPT_LEN))
    assert free.decode_steps == NEW_TOKENS
    stop_token = int(free.tokens[0, 3])  # pretend this token is EOS: the row must stop at its first occurrence
    first = free.tokens[0].tolist().index(stop_token)
    stopped = sampler(1, eos_id=stop_token)(make_batch([row], PROMPT_LEN))
    assert stopped.tokens[0, : first + 1].tolist() == free.tokens[0, : first + 1].tolist()
    assert np.all(stopped.tokens[0, first + 1 :] == tokenizer_lib.PAD_ID)
    assert stopped.decode_steps == first + 1  # every row is done: no further decode steps run
    assert stopped.totals["tokens"][0] == first  # EOS itself is not measured


def test_a_points_randomness_does_not_depend_on_its_row_or_batch(sampler, encoded) -> None:
    point = {"tokens": encoded[2], "layer": 1, "feature": 3, "value": 10.0, "temperature": 1.0, "seed": 7, "stream": 99}
    alone = sampler(1)(make_batch([point], PROMPT_LEN)).tokens[0]
    others = [{"tokens": encoded[i % 3], "temperature": 1.0, "seed": i, "stream": i} for i in range(7)]
    crowded = sampler(8)(make_batch(others[:5] + [point] + others[5:], PROMPT_LEN)).tokens[5]
    np.testing.assert_array_equal(alone, crowded)
    other_seed = sampler(1)(make_batch([{**point, "seed": 8}], PROMPT_LEN)).tokens[0]
    assert other_seed.tolist() != alone.tolist()


def test_measurements_match_a_teacher_forced_reread(tiny_model, tiny_saes, sampler, encoded) -> None:
    layer, feature, value = 2, 21, 12.0
    row = {"tokens": encoded[0], "layer": layer, "feature": feature, "value": value}
    out = sampler(1)(make_batch([row], PROMPT_LEN))
    sequence = encoded[0] + out.tokens[0].tolist()

    saved = pz.StateVariable(value=None)
    probe = (
        pz.select(steering.add_steering_sites(tiny_model.model, tiny_saes))
        .at_instances_of(steering.SteeringSite)
        .where(lambda site: site.layer_index == layer)
        .insert_after(SaveIntermediate(saved))
    )
    probe(
        pz.nx.wrap(jnp.asarray([sequence], jnp.int32)).tag("batch", "seq"),
        steering=steering.SteeringInputs.from_rows([layer], [feature], [value], ["add"], [0]),
    )
    generated = slice(len(encoded[0]), len(sequence))
    f = np.asarray(tiny_saes[layer].encode(saved.value).unwrap("batch", "seq", LATENT_AXIS))[0, generated]
    assert out.totals["tokens"][0] == NEW_TOKENS
    assert out.totals["l0"][0] / NEW_TOKENS == pytest.approx((f > 0).sum(-1).mean(), abs=0.2)
    assert out.totals["feature_activation"][0] / NEW_TOKENS == pytest.approx(f[:, feature].mean(), rel=1e-3)
    assert out.totals["feature_fires"][0] == (f[:, feature] > 0).sum()


def test_sampling_filters_and_the_pad_token() -> None:
    logits = jnp.asarray([[9.0, 1.0, 3.0, 2.0, 0.5]] * 3)
    keys = jax.random.split(jax.random.key(0), 3)
    greedy = sample_next_tokens(logits, keys, jnp.zeros(3), jnp.zeros(3, jnp.int32), jnp.ones(3))
    assert greedy.tolist() == [2, 2, 2]  # token 0 (pad) has the largest logit but is never produced
    draws = np.stack([
        sample_next_tokens(logits, jax.random.split(jax.random.key(i), 3), jnp.full(3, 5.0),
                           jnp.asarray([1, 2, 0]), jnp.asarray([1.0, 1.0, 0.01]))
        for i in range(50)
    ])
    assert set(draws[:, 0].tolist()) == {2}  # top-k 1
    assert set(draws[:, 1].tolist()) == {2, 3}  # top-k 2 at high temperature: both survivors appear
    assert set(draws[:, 2].tolist()) == {2}  # top-p tiny keeps the most likely token only
    assert tokenizer_lib.PAD_ID not in draws


def test_prompt_buckets() -> None:
    assert [prompt_bucket(n) for n in (1, 16, 17, 33, 100)] == [16, 16, 32, 64, 128]


def test_an_unsteered_row_measures_every_layer_and_probe_like_a_scale_zero_row(sampler, encoded) -> None:
    """The shared baseline: one unsteered row gives, at each site and for each probe feature, exactly the
    measurements of a scale-0 row steering that layer with that feature."""
    baseline = {"tokens": encoded[0]}
    scale_zero = [{"tokens": encoded[0], "layer": layer, "feature": feature, "value": 0.0}
                  for layer in (1, 3) for feature in PROBES[:2]]
    out = sampler(8)(make_batch(filled([baseline] + scale_zero), PROMPT_LEN))
    for row, point in enumerate(scale_zero, start=1):
        np.testing.assert_array_equal(out.tokens[row], out.tokens[0])
        site = out.baseline[point["layer"]]
        probe = PROBES.index(point["feature"])
        assert site["baseline_tokens"][0] == out.totals["tokens"][row] == NEW_TOKENS
        assert site["baseline_l0"][0] == pytest.approx(out.totals["l0"][row])
        assert site["probe_activation"][0, probe] == pytest.approx(out.totals["feature_activation"][row], rel=1e-5)
        assert site["probe_fires"][0, probe] == out.totals["feature_fires"][row]
    assert out.totals["tokens"][0] == 0  # the unsteered row is measured only as a baseline
