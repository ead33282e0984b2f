"""`runner bench`: the batched sampler against the Gemma Scope tutorial's loop, on a synthetic model.

Both generate the same steering points (prompts from the bundled corpus, a mix of layers, features and scales)
for exactly `new_tokens` tokens each (EOS does not stop either, so the work is equal):

- runner: `SteeringSampler`, every point a batch row, one compiled program; timed after a warm-up call.
- tutorial (`runner.bench.tutorial`): one point at a time, timed twice over the same points: `cold` (after one
  warm-up point, recompilations included: what a notebook pays) and `warm` (a second pass, every program cached:
  its best case). The speedup is reported against the warm figure.
"""

from __future__ import annotations

import hashlib
import resource
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from penzai import pz

from runner.bench.tutorial import BENCH_LAYERS, BenchPoint, make_points, tutorial_generate
from runner.config.schema import LocalModelConfig
from runner.execution.workers import count_compilations
from runner.model import synthetic
from runner.model.loading import LoadedModel, load_model
from runner.nn.steering import MODE_CODES
from runner.sae.params import load_sae
from runner.sae.sources import write_synthetic_saes
from runner.steering.sampler import SamplingBatch, SteeringSampler, left_pad, prompt_bucket

#: Peak memory bandwidth (bytes/s) by device kind, for the roofline fraction on accelerators.
MEMORY_BANDWIDTH = {
    "H200": 4.8e12,
    "H100": 3.35e12,
    "A100": 2.0e12,
    "L4": 0.3e12,
    "TPU v4": 1.2e12,
    "TPU v5 lite": 0.819e12,
    "TPU v5e": 0.819e12,
    "TPU v5p": 2.765e12,
    "TPU v6 lite": 1.64e12,
    "TPU v6e": 1.64e12,
}


def runner_batches(
    points: list[BenchPoint], batch_size: int, prompt_len: int, temperature: float
) -> list[SamplingBatch]:
    """The points as sampler batches (the last one padded by repeating its final point)."""
    batches = []
    for start in range(0, len(points), batch_size):
        chunk = points[start : start + batch_size]
        chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))
        size = len(chunk)
        batches.append(
            SamplingBatch(
                prompt_tokens=left_pad([list(p.tokens) for p in chunk], prompt_len),
                target_layer=np.array([p.layer for p in chunk], np.int32),
                feature=np.array([p.feature for p in chunk], np.int32),
                value=np.array([p.scale for p in chunk], np.float32),
                mode=np.full(size, MODE_CODES["add"], np.int32),
                steer_from=np.zeros(size, np.int32),
                temperature=np.full(size, temperature, np.float32),
                top_k=np.zeros(size, np.int32),
                top_p=np.ones(size, np.float32),
                seed=np.array([p.seed for p in chunk], np.uint32),
                stream=np.zeros(size, np.uint32),
                probe_features=np.zeros(1, np.int32),
            )
        )
    return batches


def run_benchmark(
    *,
    preset: str = "small",
    points: int = 64,
    new_tokens: int = 32,
    batch_size: int | None = None,
    baseline_points: int | None = None,
    temperature: float = 0.7,
    cache_dir: Path,
) -> dict[str, Any]:
    """Runs both samplers and returns the figures that `runner bench` prints as one JSON line."""
    model_dir = synthetic.write_synthetic_model(cache_dir / "synthetic" / f"{preset}-seed0", preset, 0)
    loaded = load_model(LocalModelConfig(path=model_dir), cache_dir=cache_dir)
    arch = loaded.architecture
    width = 4 * arch.embedding_dim
    sae_paths = write_synthetic_saes(
        loaded, BENCH_LAYERS, cache_dir / "synthetic-saes" / f"bench-{preset}", width=width, target_l0=16, seed=0
    )
    saes = {layer: load_sae(path, sae_id="bench", layer=layer).sae for layer, path in sae_paths.items()}
    bench_points = make_points(loaded.tokenizer, points, width)
    batch_size = batch_size or min(64, points)
    prompt_len = prompt_bucket(max(len(p.tokens) for p in bench_points))
    batches = runner_batches(bench_points, batch_size, prompt_len, temperature)

    with count_compilations() as runner_compiles:
        sampler = SteeringSampler(
            loaded.model, saes, batch_size=batch_size, prompt_len=prompt_len, max_new_tokens=new_tokens, eos_id=-1
        )
        started = time.perf_counter()
        sampler(batches[0])
        warmup_seconds = time.perf_counter() - started
        started = time.perf_counter()
        outputs = [sampler(batch) for batch in batches]
        runner_seconds = time.perf_counter() - started
    tokens_digest = hashlib.sha256(b"".join(np.ascontiguousarray(o.tokens, np.int32).tobytes() for o in outputs))
    runner_tokens = points * new_tokens

    timed_points = bench_points[1 : min(baseline_points or 8, points - 1) + 1]

    def tutorial_pass() -> float:
        started = time.perf_counter()
        for point in timed_points:
            tutorial_generate(loaded, saes, point, new_tokens, temperature)
        return len(timed_points) * new_tokens / (time.perf_counter() - started)

    with count_compilations() as tutorial_compiles:
        tutorial_generate(loaded, saes, bench_points[0], new_tokens, temperature)  # warm-up
        tutorial_cold_rate = tutorial_pass()
    tutorial_rate = tutorial_pass()

    runner_rate = runner_tokens / runner_seconds
    device = jax.local_devices()[0]
    figures: dict[str, Any] = {
        "preset": preset,
        "device": f"{device.platform}:{device.device_kind}",
        "points": points,
        "new_tokens": new_tokens,
        "batch_size": batch_size,
        "prompt_bucket": prompt_len,
        "runner_tokens_per_s": round(runner_rate, 1),
        "runner_first_call_s": round(warmup_seconds, 2),
        "runner_program_compilations": sampler.compilations,
        "runner_tokens_sha256": tokens_digest.hexdigest()[:16],
        "runner_xla_compilations": runner_compiles[0],
        "tutorial_points_timed": len(timed_points),
        "tutorial_cold_tokens_per_s": round(tutorial_cold_rate, 1),
        "tutorial_warm_tokens_per_s": round(tutorial_rate, 1),
        "tutorial_xla_compilations": tutorial_compiles[0],
        "speedup": round(runner_rate / tutorial_rate, 1),
        "peak_host_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if device.platform != "cpu":
        figures.update(_accelerator_figures(device, loaded, batch_size, prompt_len + new_tokens, runner_rate))
    return figures


def _accelerator_figures(
    device: jax.Device, loaded: LoadedModel, batch_size: int, cache_len: int, tokens_per_s: float
) -> dict[str, Any]:
    stats = device.memory_stats() or {}
    arch = loaded.architecture
    parameter_bytes = sum(p.value.data_array.nbytes for p in pz.unbind_params(loaded.model)[1])
    activation_bytes = np.dtype(loaded.model.metadata.activation_dtype).itemsize
    bytes_per_step = parameter_bytes + arch.kv_cache_bytes(batch_size, cache_len, activation_bytes)
    steps_per_s = tokens_per_s / batch_size
    bandwidth = next((bw for kind, bw in MEMORY_BANDWIDTH.items() if kind in device.device_kind), None)
    figures = {"peak_device_mib": round(stats.get("peak_bytes_in_use", 0) / 2**20, 1)}
    if bandwidth:
        figures["roofline_fraction"] = round(bytes_per_step * steps_per_s / bandwidth, 4)
    return figures
