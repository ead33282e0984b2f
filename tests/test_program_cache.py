"""Traced programs kept on disk: a later cache reuses a trace only for the same program on the same arguments."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz

from runner.execution.workers import COMPILATION_CACHE_ENV, program_cache_for
from runner.program_cache import SUFFIX, ProgramCache, program_key


class Counter:
    """A function of (tiny model, tokens) that counts how often it is traced."""

    def __init__(self) -> None:
        self.traces = 0

    def __call__(self, model, tokens):
        self.traces += 1
        return {"logits": model(pz.nx.wrap(tokens).tag("batch", "seq")).unwrap("batch", "seq", "vocabulary")}


@pytest.fixture(scope="module")
def frozen_model(tiny_model):
    return pz.freeze_params(tiny_model.model)


@pytest.fixture(scope="module")
def tokens():
    return jnp.asarray(np.random.default_rng(0).integers(3, 500, size=(2, 8)), jnp.int32)


def test_a_second_cache_reuses_the_trace_and_computes_the_same(tmp_path, frozen_model, tokens) -> None:
    function = Counter()
    first = ProgramCache(tmp_path)
    program = first.lower("logits", function, (frozen_model, tokens), static={"k": 1}).compile()
    assert (first.hits, first.misses, function.traces) == (0, 1, 1)
    assert len(list(tmp_path.glob(f"*{SUFFIX}"))) == 1

    second = ProgramCache(tmp_path)
    reused = second.lower("logits", function, (frozen_model, tokens), static={"k": 1}).compile()
    assert (second.hits, second.misses, function.traces) == (1, 0, 1)  # not traced again

    expected = jax.jit(Counter())(frozen_model, tokens)["logits"]
    np.testing.assert_array_equal(np.asarray(program(frozen_model, tokens)["logits"]), np.asarray(expected))
    np.testing.assert_array_equal(np.asarray(reused(frozen_model, tokens)["logits"]), np.asarray(expected))


def test_another_static_setting_name_or_shape_traces_again(tmp_path, frozen_model, tokens) -> None:
    ProgramCache(tmp_path).lower("logits", Counter(), (frozen_model, tokens), static={"k": 1})
    for name, static, args in [
        ("logits", {"k": 2}, (frozen_model, tokens)),
        ("other", {"k": 1}, (frozen_model, tokens)),
        ("logits", {"k": 1}, (frozen_model, tokens[:, :4])),
        ("logits", {"k": 1}, (frozen_model, tokens.astype(jnp.int16))),
    ]:
        cache = ProgramCache(tmp_path)
        cache.lower(name, Counter(), args, static=static)
        assert (cache.hits, cache.misses) == (0, 1), (name, static)


def test_the_key_covers_the_argument_structure_and_the_models_static_fields(frozen_model, tokens) -> None:
    key = program_key("logits", {}, (frozen_model, tokens))
    assert program_key("logits", {}, (frozen_model.body, tokens)) != key
    metadata = frozen_model.metadata
    other_metadata = dataclasses.replace(
        frozen_model, metadata=dataclasses.replace(metadata, vocab_size=metadata.vocab_size + 1)
    )
    assert program_key("logits", {}, (other_metadata, tokens)) != key
    assert program_key("logits", {}, (frozen_model, tokens)) == key


def test_a_damaged_trace_is_traced_again_and_replaced(tmp_path, frozen_model, tokens) -> None:
    ProgramCache(tmp_path).lower("logits", Counter(), (frozen_model, tokens), static={})
    (path,) = tmp_path.glob(f"*{SUFFIX}")
    path.write_bytes(b"not a serialized program")

    again = ProgramCache(tmp_path)
    function = Counter()
    program = again.lower("logits", function, (frozen_model, tokens), static={}).compile()
    assert (again.hits, again.misses, function.traces) == (0, 1, 1)
    assert program(frozen_model, tokens)["logits"].shape == (2, 8, 512)
    later = ProgramCache(tmp_path)
    later.lower("logits", Counter(), (frozen_model, tokens), static={})
    assert later.hits == 1
    assert not list(tmp_path.glob("*.partial"))


def test_the_key_does_not_depend_on_the_process() -> None:
    # Penzai keeps functions in static fields (Gemma2's gelu); their reprs carry the address, which changes.
    script = textwrap.dedent(
        """
        import functools, json, jax, jax.numpy as jnp
        from penzai import pz
        from runner.program_cache import program_key
        layer = pz.nn.Elementwise(functools.partial(jax.nn.gelu, approximate=True))
        print(json.dumps(program_key("gelu", {"n": 3}, (layer, jax.ShapeDtypeStruct((2, 3), jnp.float32)))))
        """
    )
    keys = {json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                      check=True).stdout) for _ in range(2)}
    assert len(keys) == 1


def test_without_a_directory_it_is_plain_jit(frozen_model, tokens) -> None:
    function = Counter()
    cache = ProgramCache(None)
    program = cache.lower("logits", function, (frozen_model, tokens), static={}).compile()
    assert (cache.hits, cache.misses, function.traces) == (0, 0, 1)
    expected = jax.jit(Counter())(frozen_model, tokens)["logits"]
    np.testing.assert_array_equal(np.asarray(program(frozen_model, tokens)["logits"]), np.asarray(expected))


def test_workers_keep_traces_next_to_their_cache_unless_caching_is_off(tmp_path, monkeypatch) -> None:
    assert program_cache_for(tmp_path).directory == tmp_path / "traced-programs"
    monkeypatch.setenv(COMPILATION_CACHE_ENV, "0")
    assert program_cache_for(tmp_path).directory is None
