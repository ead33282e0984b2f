"""`runner bench --utilization`: how well the batched sampler uses the machine, at real sizes.

For each dtype and batch size: the sampler's tokens/s (one timed call after compiling, EOS ignored so every row
makes every token), XLA's compiled memory analysis of the program, the process's peak resident memory while it
ran, and two utilizations:

- model FLOPs per second over this machine's dense matmul rate, which the bench measures in the same run (a
  large float32 `jnp.dot`);
- at batch 1, the bytes a decode step reads (every weight once, the KV cache so far) per second over the
  device's memory bandwidth: on CPU measured in the same run with a large copy, on GPU/TPU the published figure.

On CPU bfloat16 weights are held in float32 (`runner.model.loading.held_parameter_dtype`), so the bfloat16 rows
run the float32 program on the same (rounded) values; the compiled analysis of the sampler kept in bfloat16
(`native_bfloat16`) is reported beside them, for abstract weights, without running it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import psutil
from penzai import pz

from runner.bench.sampler import MEMORY_BANDWIDTH
from runner.config.schema import LocalModelConfig
from runner.model import synthetic
from runner.model.architecture import Gemma2Architecture
from runner.model.loading import LoadedModel, abstract_gemma2, load_model
from runner.model.tokenizer import encode_prompt
from runner.nn.jumprelu import JumpReLUSAE
from runner.nn.steering import MODE_CODES
from runner.plan import memory
from runner.sae.params import random_sae_arrays
from runner.sae.sources import width_latents
from runner.steering.sampler import SamplingBatch, SteeringSampler, left_pad, prompt_bucket

#: The prompt every row continues (its bucket: 16 tokens).
PROMPT = "The most iconic structure on Earth is"


@contextlib.contextmanager
def peak_rss() -> Iterator[list[int]]:
    """Samples this process's resident set every 20 ms inside the block; `peak[0]` is the largest seen."""
    peak = [psutil.Process().memory_info().rss]
    stop = threading.Event()

    def watch() -> None:
        process = psutil.Process()
        while not stop.wait(0.02):
            peak[0] = max(peak[0], process.memory_info().rss)

    thread = threading.Thread(target=watch, name="runner-bench-rss", daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], psutil.Process().memory_info().rss)


def matmul_flops_per_s(size: int = 4096, repeats: int = 3) -> float:
    """This machine's dense float32 matmul rate: the best of `repeats` timed `jnp.dot`s of two `size` squares."""
    a = jnp.ones((size, size), jnp.float32)
    b = jnp.ones((size, size), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        dot(a, b).block_until_ready()
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def host_copy_bytes_per_s(num_bytes: int = 2**30, repeats: int = 3) -> float:
    """This host's memory bandwidth: bytes read plus written per second by the best of `repeats` copies of a
    `num_bytes` array."""
    source = np.ones(num_bytes // 8, np.float64)
    target = np.empty_like(source)
    np.copyto(target, source)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        np.copyto(target, source)
        best = min(best, time.perf_counter() - started)
    return 2 * source.nbytes / best


def model_flops_per_token(arch: Gemma2Architecture, context: float, sae_width: int) -> float:
    """Matmul FLOPs of one generated token: every block's projections, the unembedding (the embedding lookup is a
    gather), attention over `context` positions, and a steering site's SAE encoder (its measurements)."""
    per_block = arch.parameter_count() - arch.vocab_size * arch.embedding_dim - arch.embedding_dim
    weights = per_block + arch.vocab_size * arch.embedding_dim
    attention = 4 * arch.num_layers * arch.num_query_heads * arch.head_dim * context
    return 2 * weights + attention + 2 * arch.embedding_dim * sae_width


def parameter_bytes(model: Any) -> int:
    """Bytes of a loaded model's distinct parameter values (`pz.Parameter` leaves hold them)."""
    return memory.unique_bytes([parameter.value for parameter in pz.unbind_params(model)[1]])


def decode_step_bytes(loaded: LoadedModel, sae: JumpReLUSAE, batch_size: int, context: float) -> int:
    """Bytes a decode step reads: every weight once (the unembedding reads the whole embedding table), the SAE of
    the steering site, and the KV cache of `context` positions."""
    arch = loaded.architecture
    weights = parameter_bytes(loaded.model) + memory.unique_bytes(sae)
    activation = jnp.dtype(loaded.model.metadata.activation_dtype).itemsize
    return int(weights + arch.kv_cache_bytes(batch_size, int(context), activation))


def _batch(tokens: list[int], batch_size: int, layer: int, prompt_len: int) -> SamplingBatch:
    rows = np.zeros(batch_size, np.int32)
    return SamplingBatch(
        prompt_tokens=left_pad([tokens] * batch_size, prompt_len),
        target_layer=np.full(batch_size, layer, np.int32),
        feature=np.arange(batch_size, dtype=np.int32) % 16,
        value=np.linspace(0.0, 150.0, batch_size, dtype=np.float32),
        mode=np.full(batch_size, MODE_CODES["add"], np.int32),
        steer_from=rows,
        temperature=np.full(batch_size, 0.7, np.float32),
        top_k=rows,
        top_p=np.ones(batch_size, np.float32),
        seed=np.arange(batch_size, dtype=np.uint32),
        stream=rows.astype(np.uint32),
        probe_features=np.zeros(1, np.int32),
    )


def _analysis(compiled_analysis: Any, weights: Any) -> dict[str, float]:
    gib = 2**30
    return {
        "arguments_gib": round(compiled_analysis.argument_size_in_bytes / gib, 3),
        "temporaries_gib": round(compiled_analysis.temp_size_in_bytes / gib, 3),
        "outputs_gib": round(compiled_analysis.output_size_in_bytes / gib, 6),
        "need_beyond_weights_gib": round(
            memory.program_need(compiled_analysis, memory.argument_bytes(weights)) / gib, 3
        ),
    }


def native_bfloat16_analysis(arch: Gemma2Architecture, sae_width: int, layer: int, batch_size: int, prompt_len: int,
                             new_tokens: int) -> dict[str, float]:
    """XLA's analysis of the sampler with its weights kept in bfloat16 on this backend (abstract weights)."""
    from runner.sae_eval.evaluate import abstract_sae

    model = abstract_gemma2(arch, jnp.bfloat16)
    sampler = SteeringSampler(model, {layer: abstract_sae(arch.embedding_dim, sae_width)}, batch_size=batch_size,
                              prompt_len=prompt_len, max_new_tokens=new_tokens, eos_id=-1)
    return _analysis(sampler.memory_analysis(), sampler.weights)


def run_utilization(
    *,
    preset: str,
    cache_dir: Path,
    dtypes: Sequence[str] = ("float32", "bfloat16"),
    batch_sizes: Sequence[int] = (1, 8, 32),
    new_tokens: int = 32,
    model_dir: Path | None = None,
) -> dict[str, Any]:
    """Runs the utilization benchmark (module docstring) and returns its figures as one JSON-able dict."""
    spec = synthetic.PRESETS[preset]
    model_dir = model_dir or synthetic.write_synthetic_model(cache_dir / "synthetic" / f"{preset}-seed0", preset, 0)
    device = jax.local_devices()[0]
    figures: dict[str, Any] = {
        "preset": preset,
        "device": f"{device.platform}:{device.device_kind}",
        "host_cpus": psutil.cpu_count(),
        "host_load_average_1m": round(psutil.getloadavg()[0], 2),
        "new_tokens": new_tokens,
        "prompt": PROMPT,
    }
    flops_rate = matmul_flops_per_s()
    figures["matmul_gflops_per_s"] = round(flops_rate / 1e9, 1)
    if device.platform == "cpu":
        bandwidth = host_copy_bytes_per_s()
        figures["copy_gb_per_s"] = round(bandwidth / 1e9, 2)
    else:
        bandwidth = next((bw for kind, bw in MEMORY_BANDWIDTH.items() if kind in device.device_kind), None)
        figures["published_gb_per_s"] = round(bandwidth / 1e9, 1) if bandwidth else None
    width = width_latents(spec.sae_width) if spec.sae_width else 4 * spec.architecture.embedding_dim
    rows = []
    for dtype in dtypes:
        with peak_rss() as load_peak:
            started = time.perf_counter()
            loaded = load_model(LocalModelConfig(path=model_dir, dtype=dtype), cache_dir=cache_dir)
            load_seconds = time.perf_counter() - started
        arch = loaded.architecture
        layer = arch.num_layers * 3 // 4
        sae = JumpReLUSAE.from_arrays(random_sae_arrays(arch.embedding_dim, width, seed=0))
        tokens = encode_prompt(loaded.tokenizer, PROMPT)
        prompt_len = prompt_bucket(len(tokens))
        model_bytes = parameter_bytes(loaded.model)
        for batch_size in batch_sizes:
            sampler = SteeringSampler(loaded.model, {layer: sae}, batch_size=batch_size, prompt_len=prompt_len,
                                      max_new_tokens=new_tokens, eos_id=-1)
            started = time.perf_counter()
            analysis = _analysis(sampler.memory_analysis(), sampler.weights)
            compile_seconds = time.perf_counter() - started
            batch = _batch(tokens, batch_size, layer, prompt_len)
            with peak_rss() as run_peak:
                started = time.perf_counter()
                output = sampler(batch)
                seconds = time.perf_counter() - started
            generated = batch_size * new_tokens
            tokens_per_s = generated / seconds
            context = len(tokens) + new_tokens / 2
            row = {
                "dtype": dtype,
                "held_dtype": loaded.held_dtype,
                "batch_size": batch_size,
                "tokens_per_s": round(tokens_per_s, 2),
                "seconds": round(seconds, 2),
                "decode_steps": output.decode_steps,
                "compile_s": round(compile_seconds, 1),
                "load_s": round(load_seconds, 1),
                "model_gib": round(model_bytes / 2**30, 3),
                "compiled": analysis,
                "peak_rss_gib": round(max(run_peak[0], load_peak[0]) / 2**30, 2),
                "peak_rss_while_running_gib": round(run_peak[0] / 2**30, 2),
                "peak_rss_while_loading_gib": round(load_peak[0] / 2**30, 2),
                "mfu": round(tokens_per_s * model_flops_per_token(arch, context, width) / flops_rate, 4),
            }
            if batch_size == 1 and bandwidth:
                steps_per_s = output.decode_steps / seconds
                row["bandwidth_utilization"] = round(
                    steps_per_s * decode_step_bytes(loaded, sae, 1, context) / bandwidth, 3
                )
            if dtype == "bfloat16" and device.platform == "cpu" and batch_size == batch_sizes[0]:
                row["native_bfloat16"] = native_bfloat16_analysis(arch, width, layer, batch_size, prompt_len,
                                                                  new_tokens)
            rows.append(row)
            del sampler
        del loaded
    figures["rows"] = rows
    return figures
