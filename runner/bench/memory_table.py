"""`runner bench --memory-table`: the batch the planner picks, and the memory it expects, for Gemma2 2B, 9B and 27B
on accelerators this project has not run on, computed from XLA's compiled memory analysis with abstract inputs.

Nothing is measured on the hardware: the programs (the steering sampler and the steering metrics, with one 16k
SAE, prompt bucket 16, 32 new tokens) are compiled for `jax.ShapeDtypeStruct` weights, sharded over the host's
chips by the worker's own sharding rule. Each cell is `runner.plan.memory.fit_batch` against the accelerator's
published memory per chip (usable fraction 0.9), up to the planner's largest automatic batch (64):

- resident: the weights in the dtype the platform holds them (bfloat16 on TPU/GPU, float32 on CPU), per chip, plus
  the SAE (float32, replicated);
- beyond it, per batch: the compiled programs' temporaries, outputs and inputs, per chip.

Which compiler produced a cell is part of it (`compiler`):

- TPU rows, where libtpu is installed (`pip install -e ".[tpu]"`; it runs on any x86 Linux host): libtpu's own
  compiler, for compile-only devices of the host's topology (`jax.experimental.topologies`, `v5e:2x4`,
  `v6e:2x4`). These are the TPU's figures, without a TPU.
- Otherwise, and for the GPU and CPU rows: XLA's CPU backend, on 8 fake CPU devices
  (`--xla_force_host_platform_device_count=8`) for the 8-chip rows. With bfloat16 weights it hoists float32 copies
  of the weights out of the decode loop, which TPU and GPU compilers do not make: for TPU/GPU rows these cells are
  upper bounds.

Runs in a subprocess of its own, since the fake devices must be set before JAX starts.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
import time
from typing import Any

#: Fake CPU devices of the 8-chip rows.
FAKE_DEVICES = 8


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """A host the table plans for.

    Attributes:
      chips: Devices of the host the model is sharded over.
      bytes_per_chip: Published memory of one device.
      platform: `tpu`, `gpu` or `cpu` (which dtype the weights are held in).
      topology: For a TPU host, the topology libtpu compiles for (`jax.experimental.topologies`).
    """

    chips: int
    bytes_per_chip: int
    platform: str
    topology: str | None = None


#: v5e: 16 GiB HBM per chip; v6e (Trillium): 32 GiB; H100: 80 GB HBM3; the CPU host: this project's 24 GB machines.
ACCELERATORS: dict[str, Accelerator] = {
    "v5e-8": Accelerator(8, 16 * 2**30, "tpu", "v5e:2x4"),
    "v6e-8": Accelerator(8, 32 * 2**30, "tpu", "v6e:2x4"),
    "H100-80GB": Accelerator(1, 80 * 10**9, "gpu"),
    "CPU-24GB": Accelerator(1, 24 * 10**9, "cpu"),
}
#: The lines of the subprocess's stderr passed on: one per compiled batch (`_need`), not libtpu's warnings.
_PROGRESS_LINE = re.compile(r"^gemma2-\S+ \S+ \w+ batch \d+: ")
MODELS = ("gemma2-2b", "gemma2-9b", "gemma2-27b")
PROMPT_BUCKET, NEW_TOKENS, SAE_WIDTH, SAE_LAYER_FRACTION = 16, 32, 16384, 0.75


def run_memory_table(models: tuple[str, ...] = MODELS, timeout_s: float = 7200) -> dict[str, Any]:
    """Computes the table for `models` in a subprocess with `FAKE_DEVICES` fake CPU devices; returns its figures."""
    unknown = [model for model in models if model not in MODELS]
    if unknown:
        from runner.errors import ConfigError

        raise ConfigError(f"--models: {unknown} not allowed (allowed: {', '.join(MODELS)})")
    # JAX itself runs on the CPU; libtpu, where installed, only compiles (no TPU, no metadata server to ask).
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={FAKE_DEVICES}", "JAX_PLATFORMS": "cpu",
           "TPU_SKIP_MDS_QUERY": "1"}
    command = [sys.executable, "-c",
               f"import json, runner.bench.memory_table as t; print(json.dumps(t.table({tuple(models)!r})))"]
    # Each compiled batch is reported on stderr as it finishes (a 27B cell takes minutes); the last lines are kept
    # for the error.
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as child:
        timer = threading.Timer(timeout_s, child.kill)
        timer.start()
        stdout: list[str] = []
        output = threading.Thread(target=lambda: stdout.append(child.stdout.read()), daemon=True)
        output.start()
        last_lines: collections.deque[str] = collections.deque(maxlen=3)
        for line in child.stderr:
            last_lines.append(line.rstrip())
            if _PROGRESS_LINE.match(line):
                print(line.rstrip(), file=sys.stderr, flush=True)
        returncode = child.wait()
        timer.cancel()
        output.join()
    if returncode != 0:
        from runner.errors import RunnerError

        raise RunnerError(f"the memory table's subprocess failed ({returncode}): {' | '.join(last_lines)}")
    return json.loads(stdout[0].strip().splitlines()[-1])


def table(models: tuple[str, ...] = MODELS) -> dict[str, Any]:
    """Every (model, accelerator) cell of `models` (in this process, which must have `FAKE_DEVICES` CPU devices)."""
    import jax

    if len(jax.devices()) < FAKE_DEVICES:
        raise RuntimeError(f"needs {FAKE_DEVICES} devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    started = time.perf_counter()
    cells = [cell(model, name) for model in models for name in ACCELERATORS]
    return {"prompt_bucket": PROMPT_BUCKET, "new_tokens": NEW_TOKENS, "sae_width": SAE_WIDTH, "cells": cells,
            "seconds": round(time.perf_counter() - started)}


def cell(model: str, accelerator_name: str) -> dict[str, Any]:
    """One cell: the fitted batch and what it is expected to take per chip."""
    import jax.numpy as jnp

    from runner.model.architecture import PUBLISHED
    from runner.model.loading import abstract_gemma2
    from runner.plan import memory
    from runner.plan.prepare import MAX_AUTO_BATCH

    accelerator = ACCELERATORS[accelerator_name]
    arch = PUBLISHED[model]
    held = jnp.float32 if accelerator.platform == "cpu" else jnp.bfloat16
    mesh = _mesh(accelerator_name)
    resident = memory.unique_bytes(abstract_gemma2(arch, held, mesh=mesh)) + memory.sae_bytes(arch.embedding_dim,
                                                                                            SAE_WIDTH)
    usable = int(accelerator.bytes_per_chip * memory.USABLE_FRACTION)
    row: dict[str, Any] = {"model": model, "accelerator": accelerator_name, "chips": accelerator.chips,
                           "compiler": compiler(accelerator_name),
                           "memory_per_chip_gib": round(accelerator.bytes_per_chip / 2**30, 1),
                           "resident_per_chip_gib": round(resident / 2**30, 2)}
    if resident >= usable:
        return {**row, "batch_size": 0, "fits": False}
    # Activations in the dtype the weights are held in.
    need = functools.partial(_need, model, accelerator_name, held)
    estimate = memory.estimate_steering_memory(arch, prompt_len=PROMPT_BUCKET, max_new_tokens=NEW_TOKENS,
                                               parameter_bytes=4, activation_bytes=jnp.dtype(held).itemsize,
                                               sae_widths=[SAE_WIDTH])
    guess = estimate.largest_batch(int((usable - resident) / memory.USABLE_FRACTION), MAX_AUTO_BATCH) or 1
    try:
        fit = memory.fit_batch(need, usable - resident, MAX_AUTO_BATCH, guess)
    except memory.DoesNotFit as error:
        return {**row, "batch_size": 0, "fits": False, "need_at_1_gib": round(error.need / 2**30, 2)}
    return {**row, "fits": True, "batch_size": fit.batch_size,
            "expected_per_chip_gib": round((resident + fit.need) / 2**30, 2),
            "need_beyond_weights_gib": round(fit.need / 2**30, 3),
            "measured": {str(batch): round(bytes_ / 2**30, 3) for batch, bytes_ in sorted(fit.measured.items())}}


def libtpu_installed() -> bool:
    """Whether libtpu (the TPU compiler) is importable: then the TPU rows are compiled by it."""
    return importlib.util.find_spec("libtpu") is not None


def _compiled_by_libtpu(accelerator: Accelerator) -> bool:
    return accelerator.topology is not None and libtpu_installed()


def compiler(accelerator_name: str) -> str:
    """Which compiler produces the cells of `accelerator_name`, in words."""
    accelerator = ACCELERATORS[accelerator_name]
    if _compiled_by_libtpu(accelerator):
        return f"libtpu, compile-only {accelerator.topology} devices"
    fake_devices = f", {accelerator.chips} fake devices" if accelerator.chips > 1 else ""
    upper_bound = " (upper bound)" if accelerator.platform != "cpu" else ""
    return f"XLA CPU backend{fake_devices}{upper_bound}"


@functools.cache
def _mesh(accelerator_name: str) -> Any:
    import jax

    from runner.model.loading import make_host_mesh

    accelerator = ACCELERATORS[accelerator_name]
    if _compiled_by_libtpu(accelerator):
        from jax.experimental import topologies

        return make_host_mesh(list(topologies.get_topology_desc(accelerator.topology, "tpu").devices))
    return make_host_mesh(jax.devices()[:accelerator.chips]) if accelerator.chips > 1 else None


@functools.cache
def _need(model: str, accelerator_name: str, activation_dtype: Any, batch_size: int) -> int:
    """Per-chip bytes beyond the weights of the sampler and the metrics program at `batch_size` (the larger)."""
    import jax.numpy as jnp

    from runner.model.architecture import PUBLISHED
    from runner.model.loading import abstract_gemma2
    from runner.plan import memory
    from runner.sae_eval.evaluate import abstract_sae
    from runner.steering.metrics import SteeringMetricsProgram
    from runner.steering.sampler import SteeringSampler

    arch = PUBLISHED[model]
    mesh = _mesh(accelerator_name)
    # Weights as the platform holds them: bfloat16 on TPU/GPU (with bfloat16 activations), float32 on CPU.
    weights = abstract_gemma2(arch, activation_dtype, activation_dtype, mesh=mesh)
    saes = {int(arch.num_layers * SAE_LAYER_FRACTION): abstract_sae(arch.embedding_dim, SAE_WIDTH)}
    started = time.perf_counter()
    sampler = SteeringSampler(weights, saes, batch_size=batch_size, prompt_len=PROMPT_BUCKET,
                              max_new_tokens=NEW_TOKENS, mesh=mesh)
    metrics = SteeringMetricsProgram(weights, saes, num_generations=batch_size, seq_len=PROMPT_BUCKET + NEW_TOKENS,
                                     num_points=batch_size)
    needs = [memory.program_need(program.memory_analysis(), memory.argument_bytes(program.weights))
             for program in (sampler, metrics)]
    print(f"{model} {accelerator_name} {jnp.dtype(activation_dtype).name} batch {batch_size}: "
          f"{[round(n / 2**30, 3) for n in needs]} GiB ({time.perf_counter() - started:.0f} s)", file=sys.stderr,
          flush=True)
    return max(needs)
