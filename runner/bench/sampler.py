"""`runner bench`: the batched sampler against the Gemma Scope tutorial's loop, on a synthetic model.

Both generate the same steering points (prompts from the bundled corpus, a mix of layers, features and scales)
for exactly `new_tokens` tokens each (EOS does not stop either, so the work is equal):

- runner: `SteeringSampler`, every point a batch row, one compiled program; timed after a warm-up call.
- tutorial: one point at a time, the patched model rebuilt per point (a layer adding `scale * W_dec[i]` after
  block L), `KVCachingTransformerLM` with a jitted body, `temperature_sample_pyloop`. Its jitted body recompiles
  for every new prompt length, cache position and patched layer, so it is timed twice over the same points:
  `cold` (after one warm-up point, recompilations included: what a notebook pays) and `warm` (a second pass,
  every program cached: its best case). The speedup is reported against the warm figure.
"""

from __future__ import annotations

import dataclasses
import hashlib
import resource
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz
from penzai.models.transformer import sampling_mode, simple_decoding_loop
from penzai.toolshed import jit_wrapper

from runner.config.schema import LocalModelConfig
from runner.execution.workers import count_compilations
from runner.model import synthetic
from runner.model import tokenizer as tokenizer_lib
from runner.model.loading import LoadedModel, load_model
from runner.model.tokenizer import CORPUS_PATH
from runner.nn.sites import insert_after_block
from runner.nn.steering import MODE_CODES
from runner.sae.jumprelu import LATENT_AXIS, JumpReLUSAE, load_sae
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


def make_points(tokenizer: Any, count: int, d_sae: int) -> list[BenchPoint]:
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


# ---------------------------------------------------------------------------------------------------------------
# `runner bench --end-to-end`: the real command against the tutorial's loop over the same points

#: The sweep `runner bench --end-to-end` runs by default: 256 points on the synthetic small model.
END_TO_END_EXPERIMENT = Path(__file__).resolve().parents[2] / "experiments" / "small_feature_scale_sweep.yaml"


def run_end_to_end(
    *, experiment: Path, cache_dir: Path, tutorial_points: int = 16, compilation_cache: bool = True
) -> dict[str, Any]:
    """Times `runner run` on an experiment in a fresh directory and process (Ray start-up, a new MLflow database
    and its logging included), then the tutorial's loop on the same points, and returns the figures.

    The tutorial's loop is timed on every distinct (prompt, layer) of the sweep once (each costs it new XLA
    compilations: `cold`), then on `tutorial_points` points spread over the sweep again (`warm`: everything
    compiled). Over all points it would take `cold + (points - combinations) * warm` seconds (`tutorial_s`), at
    its very best `points * warm` (`tutorial_warm_s`).

    Raises:
      RunnerError: `runner run` failed (its last output lines are in the message).
    """
    import json
    import os
    import subprocess
    import sys
    import tempfile

    from runner.config.loading import load_experiment
    from runner.errors import RunnerError
    from runner.execution.workers import load_saes
    from runner.plan.prepare import prepare_sweep

    with tempfile.TemporaryDirectory(prefix="runner-bench-") as scratch:
        summary_path = Path(scratch) / "summary.json"
        command = [sys.executable, "-m", "runner.cli", "run", str(Path(experiment).resolve()), "--set",
                   "tracking.uri=sqlite:///mlflow.db", "--cache-dir", str(cache_dir), "--summary-json",
                   str(summary_path)]
        env = {**os.environ, **({} if compilation_cache else {"RUNNER_COMPILATION_CACHE": "0"})}
        started = time.perf_counter()
        finished = subprocess.run(command, cwd=scratch, env=env, capture_output=True, text=True)
        command_seconds = time.perf_counter() - started
        if finished.returncode != 0:
            tail = " | ".join((finished.stdout + finished.stderr).strip().splitlines()[-3:])
            raise RunnerError(f"runner run {experiment} failed ({finished.returncode}): {tail}")
        summary = json.loads(summary_path.read_text(encoding="utf-8"))

    config = load_experiment(Path(experiment))
    sweep_plan = prepare_sweep(config, cache_dir)
    loaded = load_model(config.model, cache_dir=cache_dir)
    saes = {sae.layer: sae.sae for sae in load_saes(loaded, config, sweep_plan.sae_files.values(), cache_dir).values()}
    new_tokens = config.sampling.max_new_tokens
    points = [
        BenchPoint(tuple(tokenizer_lib.encode_prompt(loaded.tokenizer, p.prompt)), p.layer, p.feature, p.scale, p.seed)
        for p in sweep_plan.points
    ]
    first_of_combination = {}
    for point in points:
        first_of_combination.setdefault((point.tokens, point.layer), point)
    started = time.perf_counter()
    for point in first_of_combination.values():
        tutorial_generate(loaded, saes, point, new_tokens, config.sampling.temperature)
    cold_seconds = time.perf_counter() - started
    sample = points[:: max(1, len(points) // tutorial_points)][:tutorial_points]
    started = time.perf_counter()
    for point in sample:
        tutorial_generate(loaded, saes, point, new_tokens, config.sampling.temperature)
    warm_per_point = (time.perf_counter() - started) / len(sample)
    tutorial_seconds = cold_seconds + (len(points) - len(first_of_combination)) * warm_per_point
    tutorial_warm_seconds = len(points) * warm_per_point
    return {
        "experiment": str(experiment),
        "points": len(points),
        "new_tokens_per_point": new_tokens,
        "compilation_cache": compilation_cache,
        "runner_command_s": round(command_seconds, 1),
        "runner_sweep_s": round(summary["seconds"], 1),
        "runner_generated_tokens": summary["generated_tokens"],
        "runner_points_finished": summary["points_finished"],
        "mlflow_logging_s": round(summary["tracking_seconds"], 1),
        "mlflow_not_overlapped_s": round(summary["tracking_wait_seconds"], 1),
        "mlflow_not_overlapped_share_of_sweep": round(summary["tracking_wait_seconds"] / summary["seconds"], 3),
        "tutorial_combinations": len(first_of_combination),
        "tutorial_cold_s": round(cold_seconds, 1),
        "tutorial_warm_s_per_point": round(warm_per_point, 3),
        "tutorial_s": round(tutorial_seconds, 1),
        "tutorial_warm_s": round(tutorial_warm_seconds, 1),
        "speedup": round(tutorial_seconds / command_seconds, 1),
        "speedup_vs_warm_tutorial": round(tutorial_warm_seconds / command_seconds, 1),
    }
