"""The Gemma Scope tutorial's way of steering, as the baseline `runner bench` measures runner against.

One point at a time: the patched model rebuilt per point (a layer adding `scale * W_dec[i]` after block L), a
`KVCachingTransformerLM` with a jitted body, and `temperature_sample_pyloop`, which calls the model once per
token. Its jitted body recompiles for every new prompt length, cache position and patched layer.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from gemma import gm
from penzai import pz
from penzai.models.transformer import sampling_mode, simple_decoding_loop
from penzai.toolshed import jit_wrapper

from runner.model import tokenizer as tokenizer_lib
from runner.model.loading import LoadedModel
from runner.model.tokenizer import CORPUS_PATH
from runner.nn.jumprelu import LATENT_AXIS, JumpReLUSAE
from runner.nn.sites import insert_after_block

BENCH_LAYERS = (1, 2)
BENCH_SCALES = (0.0, 10.0, 20.0, 40.0)


@dataclasses.dataclass(frozen=True)
class BenchPoint:
    """One generation of the benchmark."""

    tokens: tuple[int, ...]
    layer: int
    feature: int
    scale: float
    seed: int


@pz.pytree_dataclass
class AddSteeringVector(pz.nn.Layer):
    """The tutorial's intervention: add a fixed vector to the residual stream."""

    vector: pz.nx.NamedArray

    def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        return x + self.vector.astype(x.dtype)


def make_points(tokenizer: gm.text.Gemma2Tokenizer, count: int, d_sae: int) -> list[BenchPoint]:
    """`count` steering points over corpus sentences, both bench layers, spread features and the bench scales."""
    sentences = [s.strip() for s in CORPUS_PATH.read_text(encoding="utf-8").split(".") if len(s.split()) >= 4]
    rng = np.random.default_rng(0)
    points = []
    for index in range(count):
        words = sentences[index % len(sentences)].split()[:10]
        points.append(
            BenchPoint(
                tokens=tuple(tokenizer_lib.encode_prompt(tokenizer, " ".join(words))),
                layer=BENCH_LAYERS[index % len(BENCH_LAYERS)],
                feature=int(rng.integers(d_sae)),
                scale=BENCH_SCALES[index % len(BENCH_SCALES)],
                seed=index,
            )
        )
    return points


def tutorial_generate(
    loaded: LoadedModel, saes: dict[int, JumpReLUSAE], point: BenchPoint, new_tokens: int, temperature: float
) -> np.ndarray:
    """One point the tutorial's way: patch, convert to KV-caching with a jitted body, sample in a Python loop."""
    w_dec = saes[point.layer].decoder.w_dec[{LATENT_AXIS: point.feature}]
    patched = insert_after_block(loaded.model, point.layer, AddSteeringVector(point.scale * w_dec))
    caching = sampling_mode.KVCachingTransformerLM.from_uncached(
        patched, cache_len=len(point.tokens) + new_tokens, batch_axes={"batch": 1}
    )
    caching = pz.select(caching).at(lambda model: model.body).apply(jit_wrapper.Jitted)
    prompt = pz.nx.wrap(jnp.asarray([point.tokens], jnp.int32)).tag("batch", "seq")
    out = simple_decoding_loop.temperature_sample_pyloop(
        caching, prompt, jax.random.key(point.seed), temperature=max(temperature, 1e-6), max_sampling_steps=new_tokens
    )
    return np.asarray(out.unwrap("batch", "seq"))
