"""Host workers: load the model and SAEs once, then turn jobs of points into results.

A worker owns one host (all of its local accelerators, or the CPU in tests). `SteeringWorker` keeps one compiled
`SteeringSampler` per (batch size, prompt bucket, max_new_tokens), so a sweep compiles once per shape;
`SAEEvalWorker` evaluates a job's SAEs over the sweep's evaluation tokens, sharing the clean forward passes. The
Ray actors (`runner.execution.host_actor`, `runner.execution.slices`) wrap these classes; a local run uses them
directly.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import cachetools
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from runner.config.schema import ExperimentConfig
from runner.errors import PlanError, first_line
from runner.execution.faults import DeviceOutOfMemory, RecurringJobError, is_out_of_memory
from runner.model import tokenizer as tokenizer_lib
from runner.model.loading import LoadedModel, load_model, make_host_mesh
from runner.nn import sites
from runner.nn import steering as steering_lib
from runner.nn.steering import MODE_CODES, NO_LAYER
from runner.plan import memory
from runner.plan import points as plan
from runner.plan.points import Job, SAEEvalPoint, SteeringPoint
from runner.program_cache import ProgramCache
from runner.results import FailedPoint, PointResult, SAEEvalPointResult
from runner.sae.params import LoadedSAE, load_sae
from runner.sae.sources import SAEFile, width_latents, write_synthetic_saes
from runner.sae_eval import evaluate as sae_eval
from runner.sae_eval.text_sets import EvalTokens
from runner.steering import metrics as steering_metrics
from runner.steering.sampler import NO_VOCAB_LIMIT, SamplingBatch, SteeringSampler, left_pad, prompt_bucket

_log = logging.getLogger(__name__)

#: Tag of a steering point: its feature's top logit-lens tokens, decoded (a JSON list).
LOGIT_LENS_TAG = "logit_lens_tokens"
#: Tags of every point: the peak memory its worker expected after fitting its batch, and the peak it has reached
#: so far (MiB; CPU: the process's resident set, GPU/TPU: the devices' bytes in use).
TAG_EXPECTED_MEMORY = "runner.memory_expected_mib"
TAG_PEAK_MEMORY = "runner.memory_peak_mib"
#: Share of the device memory an `SAEEvalWorker` may fill with SAEs it keeps loaded between jobs.
SAE_CACHE_FRACTION = 0.25


#: Set to 0 to keep workers from caching compiled programs and their traces on disk
#: (`<cache_dir>/jax-compilation-cache`, `<cache_dir>/traced-programs`).
COMPILATION_CACHE_ENV = "RUNNER_COMPILATION_CACHE"


def enable_compilation_cache(cache_dir: Path) -> None:
    """Makes this (worker) process keep compiled XLA programs in `<cache_dir>/jax-compilation-cache`, so a sweep of
    the same shapes, a resumed sweep or a restarted worker does not compile again. Leaves a cache directory set
    through `JAX_COMPILATION_CACHE_DIR` alone; `RUNNER_COMPILATION_CACHE=0` turns it off."""
    if os.environ.get(COMPILATION_CACHE_ENV, "1") == "0" or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    jax.config.update("jax_compilation_cache_dir", str(Path(cache_dir) / "jax-compilation-cache"))


def program_cache_for(cache_dir: Path) -> ProgramCache:
    """The worker's cache of traced programs, `<cache_dir>/traced-programs` (none with
    `RUNNER_COMPILATION_CACHE=0`)."""
    if os.environ.get(COMPILATION_CACHE_ENV, "1") == "0":
        return ProgramCache(None)
    return ProgramCache(Path(cache_dir) / "traced-programs")


@contextlib.contextmanager
def count_compilations() -> Iterator[list[int]]:
    """Counts XLA backend compilations inside the block (`counter[0]`)."""
    counter = [0]

    def listener(event: str, duration: float, **kwargs: Any) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            counter[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counter
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def load_host_model(config: ExperimentConfig, cache_dir: Path, mesh: Mesh | None | str = "auto") -> LoadedModel:
    """The configured model: with `mesh="auto"`, sharded over every device JAX sees when there are several (this
    host's, or under `jax.distributed` the whole slice's); else on `mesh`, or unsharded for None."""
    if mesh == "auto":
        mesh = make_host_mesh() if jax.device_count() > 1 else None
    return load_model(config.model, cache_dir=cache_dir, mesh=mesh, model_id=plan.model_id(config.model))


def write_pending_synthetic_saes(
    loaded: LoadedModel, config: ExperimentConfig, sae_files: Mapping[str, SAEFile], cache_dir: Path
) -> dict[str, SAEFile]:
    """The files with every synthetic SAE (no path yet) written for this model under `cache_dir`."""
    files = dict(sae_files)
    pending: dict[tuple[str, str, str], list[SAEFile]] = collections.defaultdict(list)
    for file in files.values():
        if file.path is None:
            pending[(file.site, file.width, file.l0)].append(file)
    slug = loaded.model_id.replace(":", "-").replace("/", "_")
    for (site, width, target_l0), group in pending.items():
        out_root = cache_dir / "synthetic-saes" / slug / f"{site}_width{width}_target{target_l0}_seed{config.sae.seed}"
        written = write_synthetic_saes(
            loaded, [file.layer for file in group], out_root, width=int(width), target_l0=float(target_l0),
            seed=config.sae.seed, site=site,
        )
        files.update({file.sae_id: dataclasses.replace(file, path=written[file.layer]) for file in group})
    return files


def load_saes(
    loaded: LoadedModel, config: ExperimentConfig, sae_files: Iterable[SAEFile], cache_dir: Path
) -> dict[str, LoadedSAE]:
    """Loads SAE files by id; synthetic ones (no path yet) are first written for this model under `cache_dir`."""
    files = write_pending_synthetic_saes(loaded, config, {file.sae_id: file for file in sae_files}, cache_dir)
    architecture = loaded.architecture
    return {
        sae_id: load_sae(
            file.path, sae_id=sae_id, layer=file.layer, expected_d_in=sites.site_width(architecture, file.site)
        )
        for sae_id, file in files.items()
    }


def point_stream(point: SteeringPoint) -> int:
    """The random stream of a point: a 32-bit hash of its prompt, so scale 0 rows of a (prompt, seed) agree."""
    return int.from_bytes(hashlib.sha256(point.prompt.encode("utf-8")).digest()[:4], "little")


def steer_from_position(positions: str, prompt_length: int) -> int:
    """First steered token position for a `steering.positions` setting."""
    return {"all": 0, "skip_bos": 1, "generated": prompt_length}[positions]


def batch_rows(
    points: Sequence[SteeringPoint],
    prompt_tokens: Sequence[Sequence[int]],
    prompt_len: int,
    probe_features: Sequence[int],
    known_pieces: int | None = None,
    num_interventions: int = 1,
) -> SamplingBatch:
    """Host arrays for a batch whose row i runs `points[i]` on `prompt_tokens[i]`; baselines run unsteered. Each
    row has `num_interventions` slots: a point's interventions (a combination's several), the rest unused. A
    point with `exclude_unknown_tokens` samples only ids below `known_pieces` (the tokenizer's piece count)."""
    slots = [intervention_slots(p, num_interventions) for p in points]
    return SamplingBatch(
        prompt_tokens=left_pad([list(tokens) for tokens in prompt_tokens], prompt_len),
        target_layer=np.array([[layer for layer, _, _, _ in row] for row in slots], np.int32),
        feature=np.array([[feature for _, feature, _, _ in row] for row in slots], np.int32),
        value=np.array([[value for _, _, value, _ in row] for row in slots], np.float32),
        mode=np.array([[mode for _, _, _, mode in row] for row in slots], np.int32),
        steer_from=np.array(
            [steer_from_position(p.positions, len(t)) for p, t in zip(points, prompt_tokens, strict=True)], np.int32
        ),
        temperature=np.array([p.temperature for p in points], np.float32),
        top_k=np.array([p.top_k or 0 for p in points], np.int32),
        top_p=np.array([1.0 if p.top_p is None else p.top_p for p in points], np.float32),
        seed=np.array([p.seed for p in points], np.uint32),
        stream=np.array([point_stream(p) for p in points], np.uint32),
        probe_features=np.asarray(probe_features, np.int32),
        sampled_vocab=np.array(
            [known_pieces if p.exclude_unknown_tokens and known_pieces is not None else NO_VOCAB_LIMIT
             for p in points], np.int32
        ),
    )


def intervention_slots(point: SteeringPoint, num_interventions: int) -> list[tuple[int, int, float, int]]:
    """A row's `(target layer, feature, value, mode code)` slots: the point's interventions (none for a baseline),
    then unused slots (`NO_LAYER`) up to `num_interventions`."""
    used = [] if point.is_baseline else [
        (i.layer, i.feature, 0.0 if i.mode == "ablate" else i.scale, MODE_CODES[i.mode]) for i in point.interventions
    ]
    if len(used) > num_interventions:
        raise ValueError(f"a point of {len(used)} interventions in a program for {num_interventions}")
    return used + [(NO_LAYER, 0, 0.0, MODE_CODES["add"])] * (num_interventions - len(used))


#: The metrics a combination point logs for each of its interventions (`steer/L{layer}F{feature}/<name>`).
PER_INTERVENTION_METRICS = ("steer/concept_rate", "steer/concept_activation", "steer/logit_lens_mass",
                            "steer/feature_activation", "steer/feature_firing_rate", "steer/l0")


def cut_at_eos(tokens: np.ndarray, eos_id: int = tokenizer_lib.EOS_ID) -> tuple[list[int], bool]:
    """The generated ids before the first EOS (padding dropped), and whether an EOS was produced."""
    ids = [int(t) for t in tokens]
    if eos_id in ids:
        return ids[: ids.index(eos_id)], True
    return [t for t in ids if t != tokenizer_lib.PAD_ID], False


class _MemoryWatch:
    """A worker's memory: what it holds resident, what its device has free, and the batch fitted to it.

    On CPU the free memory is the host's available memory plus what this process allocated beyond its resident
    state since loading (XLA's freed temporaries, which the allocator keeps for the next call); on GPU/TPU the
    least free memory of the worker's devices.

    Args:
      model_id: Named in every message.
      devices: The worker's local devices.
    """

    def __init__(self, model_id: str, devices: Sequence[jax.Device]):
        self.model_id = model_id
        self.devices = list(devices)
        self.on_cpu = self.devices[0].platform == "cpu"
        self.loaded_rss = _rss()
        self.needs: dict[tuple[str, int], int] = {}
        self.fit: memory.BatchFit | None = None
        self.program = ""

    def free_bytes(self) -> int:
        """What the devices can still give a program now."""
        free = memory.device_free_bytes(self.devices)
        if self.on_cpu:
            free += max(0, _rss() - self.loaded_rss)
        return free

    def budget(self) -> int:
        """The usable part of `free_bytes`."""
        return int(self.free_bytes() * memory.USABLE_FRACTION)

    def expected_peak_bytes(self) -> int:
        """The peak the fitted batch should reach: what the process holds after loading (CPU: its resident set;
        GPU/TPU: the device's bytes in use) plus the fitted program's need."""
        held = self.loaded_rss if self.on_cpu else max(
            int((device.memory_stats() or {}).get("bytes_in_use", 0)) for device in self.devices
        )
        return held + (self.fit.need if self.fit is not None else 0)

    def check(self, program: str, batch_size: int) -> None:
        """Raises `DeviceOutOfMemory` when `program` at `batch_size` (measured while fitting) needs more than the
        device has usable now: the job is then run again with a smaller batch, before anything is killed."""
        need = self.needs.get((program, batch_size))
        if need is not None and need > self.budget():
            raise DeviceOutOfMemory(self.line(program, batch_size, need, self.budget()))

    def line(self, program: str, batch_size: int, need: int | None, budget: int) -> str:
        """One line: model, program, batch, the bytes needed and available."""
        needed = f"needs {memory.gib(need)}" if need is not None else "did not fit"
        return (f"model {self.model_id}: the {program} at a batch of {batch_size} {needed} beyond the weights; "
                f"{memory.gib(budget)} available")

    def note(self) -> str:
        """What the worker chose, in one line (`HostWorker.info()['memory']`)."""
        if self.fit is None:
            return ""
        return (f"{self.program} at a batch of {self.fit.batch_size} needs {memory.gib(self.fit.need)} beyond the "
                f"weights ({memory.gib(self.fit.budget)} usable); expected peak "
                f"{memory.gib(self.expected_peak_bytes())}")

    def tags(self) -> dict[str, str]:
        """What a result records of the worker's memory: the expected and the measured peak (MiB)."""
        return {TAG_EXPECTED_MEMORY: str(round(self.expected_peak_bytes() / 2**20)),
                TAG_PEAK_MEMORY: str(round(memory.peak_memory_bytes(self.devices) / 2**20))}

    def out_of_memory(self, program: str, batch_size: int, error: BaseException) -> DeviceOutOfMemory:
        """The one-line error of a program that ran out of memory while it ran (XLA's `RESOURCE_EXHAUSTED`)."""
        need = self.needs.get((program, batch_size))
        return DeviceOutOfMemory(f"{self.line(program, batch_size, need, self.budget())} ({first_line(str(error))})")


def _local_devices(loaded: LoadedModel) -> list[jax.Device]:
    """The devices of this process that hold the model."""
    if loaded.mesh is None:
        return jax.local_devices()[:1]
    return [device for device in loaded.mesh.devices.flat if device.process_index == jax.process_index()]


def _held_bytes(loaded: LoadedModel) -> tuple[int, int]:
    """Bytes of one parameter and one activation of the loaded model as it runs."""
    return (jnp.dtype(loaded.held_dtype).itemsize, jnp.dtype(loaded.model.metadata.activation_dtype).itemsize)


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _same_on_every_process(batch_size: int) -> int:
    """The smallest of the processes' batch sizes: every process of a slice must compile the same program."""
    if jax.process_count() == 1:
        return batch_size
    return int(np.min(multihost_utils.process_allgather(np.int32(batch_size))))


@contextlib.contextmanager
def _recurring_errors() -> Iterator[None]:
    """Turns errors that running the job again cannot cure (shapes, types, indices: the job itself) into
    `RecurringJobError`, so their points fail once, without retries."""
    try:
        yield
    except (ValueError, TypeError, IndexError, KeyError) as error:
        raise RecurringJobError(f"{type(error).__name__}: {error}") from error


class SteeringWorker:
    """Runs steering jobs on this host's model.

    The batch (rows of one compiled program) is chosen from XLA's compiled memory analysis of the sweep's two
    programs, the sampler and the steering metrics, on this host's devices (`runner.plan.memory.fit_batch`): the
    largest batch up to `batch_size` whose programs fit what the device has free after loading. A job may then
    run as several calls of the programs. Before each call the worker checks that the device still has room (on a
    shared host other processes take memory too); if not, or if XLA runs out of memory, the job raises
    `DeviceOutOfMemory`, and is run again at half the batch, which the worker keeps for later jobs.

    Args:
      config: The experiment (with `steering`).
      sae_files: The SAE file of every steered layer, by SAE id, as resolved by the driver.
      batch_size: Distinct generations per job. With `sampling.batch_size: auto` the worker compiles for the
        largest batch up to this that fits its device memory; an explicit batch size that does not fit is
        refused.
      cache_dir: Where synthetic models and SAEs are written.
      worker_name: Recorded with each result.
      mesh: Where the model lives (`load_host_model`); a slice replica passes its global mesh.
      point_capacity: Point rows the metrics program is first compiled for (`SweepPlan.point_capacity`).
    """

    def __init__(
        self,
        config: ExperimentConfig,
        sae_files: Mapping[str, SAEFile],
        *,
        batch_size: int,
        cache_dir: Path,
        worker_name: str = "local",
        mesh: Mesh | None | str = "auto",
        point_capacity: int | None = None,
    ):
        self.config = config
        self.worker_name = worker_name
        self.program_cache = program_cache_for(cache_dir)
        self.loaded: LoadedModel = load_host_model(config, cache_dir, mesh)
        loaded_saes = load_saes(self.loaded, config, sae_files.values(), cache_dir)
        self.saes: dict[int, LoadedSAE] = {sae.layer: sae for sae in loaded_saes.values()}
        self._sae_layers = {layer: loaded.sae for layer, loaded in self.saes.items()}
        self._prompt_ids = {
            prompt: tokenizer_lib.encode_prompt(self.loaded.tokenizer, prompt) for prompt in config.prompts
        }
        longest = max(len(ids) for ids in self._prompt_ids.values())
        self.prompt_len = prompt_bucket(longest)  # one bucket for the sweep: one compiled program
        self.max_new_tokens = config.sampling.max_new_tokens
        self.probe_features = sorted(set(config.steering.features)) or [0]  # combinations alone: no baseline
        self.num_interventions = config.steering.max_interventions
        self._samplers: dict[tuple[int, int, int], SteeringSampler] = {}
        self._lens_tags: dict[tuple[int, ...], str] = {}
        self._metrics_programs: dict[tuple[int, int], steering_metrics.SteeringMetricsProgram] = {}
        self._point_capacity = point_capacity
        self._dropped_compilations = 0
        self.memory = _MemoryWatch(self.loaded.model_id, _local_devices(self.loaded))
        self.batch_size = self._fitting_batch_size(batch_size)

    @property
    def memory_note(self) -> str:
        """The batch the worker chose and what it expects of memory, in one line."""
        return self.memory.note()

    def estimate(self) -> memory.BatchMemory:
        """The planner's estimate of this worker's programs (`runner.plan.memory.estimate_steering_memory`)."""
        parameter_bytes, activation_bytes = _held_bytes(self.loaded)
        return memory.estimate_steering_memory(
            self.loaded.architecture, prompt_len=self.prompt_len, max_new_tokens=self.max_new_tokens,
            parameter_bytes=parameter_bytes, activation_bytes=activation_bytes,
            sae_widths=[sae.d_sae for sae in self._sae_layers.values()],
        )

    def _fitting_batch_size(self, job_size: int) -> int:
        """The largest batch up to `job_size` whose sampler and metrics programs fit (compiled analysis)."""
        budget = self.memory.budget()
        guess = self.estimate().largest_batch(self.memory.free_bytes(), job_size) or 1
        try:
            fit = memory.fit_batch(self._measure, budget, job_size, guess)
        except memory.DoesNotFit as error:
            hint = ("; model.dtype: bfloat16 halves the weights" if self.loaded.held_dtype == "float32"
                    and not self.memory.on_cpu else "")
            raise PlanError(
                f"{self.memory.line('steering programs', 1, error.need, error.budget)} on {self.worker_name} "
                f"(model weights {self.loaded.dtype}); use a larger host, shard over more devices, or shorten "
                f"prompts / sampling.max_new_tokens{hint}"
            ) from None
        fitting = _same_on_every_process(fit.batch_size)
        if fitting != fit.batch_size:
            self._measure(fitting)
            fit = dataclasses.replace(fit, batch_size=fitting, need=fit.measured.get(fitting, fit.need))
        if self.config.sampling.batch_size != "auto" and fitting < job_size:
            raise PlanError(
                f"sampling.batch_size: {job_size} needs about {memory.gib(fit.measured.get(job_size, fit.need))} "
                f"beyond the weights on {self.worker_name}, {memory.gib(budget)} usable; at most {fitting} fits "
                f"(allowed: <= {fitting}, or auto)"
            )
        self.memory.fit, self.memory.program = fit, "steering sampler and metrics"
        self._keep_programs_of(fitting)
        return fitting

    def _measure(self, batch_size: int) -> int:
        """Compiles the sampler and the metrics program at `batch_size` (the metrics program on a second thread,
        tracing while XLA compiles the sampler); returns the larger one's need beyond the weights."""
        sampler = self.sampler_for(self.prompt_len, self.max_new_tokens, batch_size)
        sampler.lower()
        metrics_program = self.metrics_program_for(self._point_capacity or batch_size, batch_size)
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="runner-metrics-compile") as pool:
            compiling = pool.submit(metrics_program.compile)
            sampler.compile()
            compiling.result()
        needs = {
            "steering sampler": memory.program_need(sampler.memory_analysis(), memory.argument_bytes(sampler.weights)),
            "steering metrics": memory.program_need(
                metrics_program.memory_analysis(), memory.argument_bytes(metrics_program.weights)
            ),
        }
        for program, need in needs.items():
            self.memory.needs[(program, batch_size)] = need
        return max(needs.values())

    def _keep_programs_of(self, batch_size: int) -> None:
        """Drops the programs compiled for other batch sizes (while fitting, or after shrinking the batch)."""
        dropped = [sampler for key, sampler in self._samplers.items() if key[0] != batch_size]
        self._dropped_compilations += sum(sampler.compilations for sampler in dropped)
        self._samplers = {key: value for key, value in self._samplers.items() if key[0] == batch_size}
        self._metrics_programs = {key: value for key, value in self._metrics_programs.items() if key[0] == batch_size}

    def shrink_batch(self, batch_size: int) -> None:
        """Runs this and later jobs at most `batch_size` rows at a time (after running out of memory)."""
        batch_size = _same_on_every_process(max(1, batch_size))
        if batch_size < self.batch_size:
            _log.warning("%s: running at a batch of %d from now on (was %d)", self.worker_name, batch_size,
                         self.batch_size)
            self.batch_size = batch_size
            self._measure(batch_size)
            self._keep_programs_of(batch_size)
            if self.memory.fit is not None:
                need = max(self.memory.needs.get((program, batch_size), 0)
                           for program in ("steering sampler", "steering metrics"))
                self.memory.fit = dataclasses.replace(self.memory.fit, batch_size=batch_size, need=need)

    @property
    def compilations(self) -> int:
        """Sampler programs compiled by this worker so far (one per batch shape; more when the batch was fitted
        at several sizes or shrunk)."""
        return sum(sampler.compilations for sampler in self._samplers.values()) + self._dropped_compilations

    def metrics_program_for(
        self, num_points: int, batch_size: int | None = None
    ) -> steering_metrics.SteeringMetricsProgram:
        """The compiled metrics program of a batch size (default: the worker's) for at least `num_points` points,
        built on first use; the largest one built so far serves every smaller chunk, so a sweep compiles it once
        or twice."""
        batch_size = batch_size or self.batch_size
        fitting = [capacity for rows, capacity in self._metrics_programs
                   if rows == batch_size and capacity >= num_points]
        if fitting:
            return self._metrics_programs[(batch_size, min(fitting))]
        capacity = steering_metrics.point_bucket(num_points, batch_size)
        self._metrics_programs[(batch_size, capacity)] = steering_metrics.SteeringMetricsProgram(
            self.loaded.model, self._sae_layers, num_generations=batch_size,
            seq_len=self.prompt_len + self.max_new_tokens, num_points=capacity,
            num_interventions=self.num_interventions, program_cache=self.program_cache,
        )
        return self._metrics_programs[(batch_size, capacity)]

    def sampler_for(self, prompt_len: int, max_new_tokens: int, batch_size: int | None = None) -> SteeringSampler:
        """The compiled sampler of a shape (batch size default: the worker's), built on first use."""
        key = (batch_size or self.batch_size, prompt_len, max_new_tokens)
        if key not in self._samplers:
            self._samplers[key] = SteeringSampler(
                self.loaded.model,
                self._sae_layers,
                batch_size=key[0],
                prompt_len=prompt_len,
                max_new_tokens=max_new_tokens,
                num_probes=len(self.probe_features),
                num_interventions=self.num_interventions,
                mesh=self.loaded.mesh,
                program_cache=self.program_cache,
            )
        return self._samplers[key]

    def run_job(self, job: Job, attempt: int = 1, batch_size: int | None = None) -> list[PointResult | FailedPoint]:
        """Generates every point of `job`: one call of the compiled programs per `batch_size` distinct generations
        (baseline points of a (prompt, seed) share one unsteered row). `batch_size` (after an out-of-memory
        fault) lowers the worker's batch for this and later jobs."""
        if batch_size is not None:
            self.shrink_batch(batch_size)
        return [
            result
            for chunk in plan.split_by_generations(job.points, self.batch_size)
            for result in self._run_chunk(chunk, attempt)
        ]

    def _run_chunk(self, points: list[SteeringPoint], attempt: int) -> list[PointResult | FailedPoint]:
        rows: list[SteeringPoint] = []
        row_of: dict[str, int] = {}
        for point in points:
            if point.generation_key not in row_of:
                row_of[point.generation_key] = len(rows)
                rows.append(point)
        padded = self._padded(rows)
        # One measurement per intervention: a combination's features are each read on its generation.
        measured = [(index, point.interventions[k]) for index, point in enumerate(points)
                    for k in range(len(point.interventions))]
        point_rows = [row_of[points[index].generation_key] for index, _ in measured]
        with _recurring_errors():
            batch = batch_rows(padded, self._prompt_tokens(padded), self.prompt_len, self.probe_features,
                               self.loaded.tokenizer.vocab_size, self.num_interventions)
            output = self._run("steering sampler", self.sampler_for(self.prompt_len, rows[0].max_new_tokens), batch)
            generation_metrics = self._run(
                "steering metrics", self.metrics_program_for(len(measured)),
                steering_lib.SteeringInputs.from_rows(
                    batch.target_layer, batch.feature, batch.value, batch.mode, batch.steer_from
                ),
                batch.prompt_tokens, output.tokens, [intervention.layer for _, intervention in measured],
                [intervention.feature for _, intervention in measured], point_rows,
            )
        by_point: dict[int, list[steering_metrics.GenerationMetrics]] = {}
        for (index, _), extra in zip(measured, generation_metrics, strict=True):
            by_point.setdefault(index, []).append(extra)
        memory_tags = self.memory.tags()
        results: list[PointResult | FailedPoint] = []
        for index, point in enumerate(points):
            try:
                results.append(self._point_result(point, row_of[point.generation_key], output, by_point[index],
                                                  attempt, memory_tags))
            except Exception as error:  # noqa: BLE001 - this point's result cannot be made: it fails alone, once
                results.append(FailedPoint(point.point_key, f"{type(error).__name__}: {error}",
                                           worker=self.worker_name, attempt=attempt))
        return results

    def _run(self, program: str, compiled: Any, *args: Any) -> Any:
        """Calls one of the worker's programs at its batch after checking the device still has room for it."""
        self.memory.check(program, self.batch_size)
        try:
            return compiled(*args)
        except Exception as error:
            if is_out_of_memory(error) and not isinstance(error, DeviceOutOfMemory):
                raise self.memory.out_of_memory(program, self.batch_size, error) from error
            raise

    def _point_result(
        self, point: SteeringPoint, row: int, output: Any, extras: Sequence[steering_metrics.GenerationMetrics],
        attempt: int, memory_tags: Mapping[str, str],
    ) -> PointResult:
        """A point's result from its generation row and its measurements (one per intervention, its own first:
        a combination also logs each intervention's under `steer/L{layer}F{feature}/...`)."""
        tokenizer = self.loaded.tokenizer
        ids, stopped = cut_at_eos(output.tokens[row])
        extra = extras[0]
        if point.is_baseline:
            measured = output.baseline[point.layer]
            probe = self.probe_features.index(point.feature)
            sums = (measured["baseline_tokens"][row], measured["baseline_l0"][row],
                    measured["probe_activation"][row, probe], measured["probe_fires"][row, probe])
        else:
            sums = tuple(output.totals[name][row, 0] for name in steering_lib.TOTAL_NAMES)
        point_metrics = steering_metrics.steering_point_metrics(*sums)
        point_metrics.update(extra.metrics)
        if point.combined_with:
            for k, (intervention, measurement) in enumerate(zip(point.interventions, extras, strict=True)):
                own = {**steering_metrics.steering_point_metrics(
                    *(output.totals[name][row, k] for name in steering_lib.TOTAL_NAMES)), **measurement.metrics}
                point_metrics.update({f"steer/{intervention.label}/{name.removeprefix('steer/')}": own[name]
                                      for name in PER_INTERVENTION_METRICS if name in own})
        point_metrics["gen/num_tokens"] = float(len(ids))
        point_metrics["gen/stopped_at_eos"] = float(stopped)
        point_metrics["gen/unknown_tokens"] = float(sum(tokenizer_lib.is_unknown(tokenizer, token) for token in ids))
        return PointResult(
            point_key=point.point_key,
            text=tokenizer_lib.decode_tokens(tokenizer, ids),
            token_ids=tuple(ids),
            metrics=point_metrics,
            tags={LOGIT_LENS_TAG: self._lens_tag(extra.logit_lens_tokens), **memory_tags},
            worker=self.worker_name,
            attempt=attempt,
        )

    def _lens_tag(self, token_ids: tuple[int, ...]) -> str:
        if token_ids not in self._lens_tags:
            pieces = [tokenizer_lib.decode_tokens(self.loaded.tokenizer, [token]) for token in token_ids]
            self._lens_tags[token_ids] = json.dumps(pieces, ensure_ascii=False)
        return self._lens_tags[token_ids]

    def _padded(self, items: list[SteeringPoint]) -> list[SteeringPoint]:
        return items + [items[-1]] * (self.batch_size - len(items))

    def _prompt_tokens(self, points: Sequence[SteeringPoint]) -> list[list[int]]:
        return [self._prompt_ids[point.prompt] for point in points]


class SAEEvalWorker:
    """Runs SAE evaluation jobs on this host's model over the sweep's evaluation tokens.

    The batch (sequences per forward pass) is the largest up to `sae_eval.batch_size` whose passes fit what the
    device has free, from XLA's compiled memory analysis of the clean pass, the clean losses, the longest
    patched suffix of the sweep's SAEs and the SAE statistics at the widest SAE (`runner.plan.memory.fit_batch`);
    the batch changes only how many sequences run at once, never the metrics. Memory is checked before every job
    and an out-of-memory job runs again at half the batch, as for steering.

    SAEs stay loaded between jobs while they fit in `SAE_CACHE_FRACTION` of the device memory (least recently
    used first out), so a worker that sees an SAE again does not read it again.

    Args:
      config: The experiment (with `sae_eval`).
      sae_files: Every SAE of the sweep, by SAE id, as resolved by the driver.
      batch_size: Most sequences per forward pass (`sae_eval.batch_size`).
      cache_dir: Where synthetic models and SAEs are written.
      worker_name: Recorded with each result.
      eval_tokens: The evaluation set.
      mesh: Where the model lives (`load_host_model`); a slice replica passes its global mesh.
    """

    def __init__(
        self,
        config: ExperimentConfig,
        sae_files: Mapping[str, SAEFile],
        *,
        eval_tokens: EvalTokens,
        batch_size: int,
        cache_dir: Path,
        worker_name: str = "local",
        mesh: Mesh | None | str = "auto",
    ):
        self.config = config
        self.worker_name = worker_name
        self.tokens = np.asarray(eval_tokens.tokens, np.int32)
        self._cache_dir = cache_dir
        self._files = dict(sae_files)
        self.loaded: LoadedModel = load_host_model(config, cache_dir, mesh)
        self.memory = _MemoryWatch(self.loaded.model_id, _local_devices(self.loaded))
        self._saes = sae_cache(int(memory.device_memory_bytes() * SAE_CACHE_FRACTION))
        self.compilations = 0
        self.batch_size = self._fitting_batch_size(batch_size)

    @property
    def memory_note(self) -> str:
        """The batch the worker chose and what it expects of memory, in one line."""
        return self.memory.note()

    def _site_keys(self) -> list[tuple[int, str]]:
        return sorted({(file.layer, file.site) for file in self._files.values()})

    def _widest(self) -> int:
        widths = [sae_eval_width(file) for file in self._files.values()]
        return max((width for width in widths if width is not None), default=0)

    def estimate(self) -> memory.BatchMemory:
        """The planner's estimate of this worker's passes (`runner.plan.memory.estimate_eval_memory`)."""
        parameter_bytes, activation_bytes = _held_bytes(self.loaded)
        per_job = self.config.sae_eval.saes_per_job
        per_job = len(self._files) if per_job == "auto" else per_job
        site = self._site_keys()[0][1] if self._files else "res"
        return memory.estimate_eval_memory(
            self.loaded.architecture, context_length=self.tokens.shape[1], parameter_bytes=parameter_bytes,
            activation_bytes=activation_bytes, sae_widths=[self._widest()] * min(per_job, max(len(self._files), 1)),
            site_width=sites.site_width(self.loaded.architecture, site), captures=2 * len(self._site_keys()),
        )

    def _fitting_batch_size(self, most: int) -> int:
        most = max(1, min(most, self.tokens.shape[0]))
        if not self._files or self._widest() == 0:
            return most
        budget = self.memory.budget()
        guess = self.estimate().largest_batch(self.memory.free_bytes(), most) or 1
        try:
            fit = memory.fit_batch(self._measure, budget, most, guess)
        except memory.DoesNotFit as error:
            raise PlanError(
                f"{self.memory.line('SAE evaluation passes', 1, error.need, error.budget)} on {self.worker_name} "
                f"(model weights {self.loaded.dtype}, context_length {self.tokens.shape[1]}); use a larger host, "
                "shard over more devices, or shorten sae_eval.context_length"
            ) from None
        fitting = _same_on_every_process(fit.batch_size)
        if fitting != fit.batch_size:
            self._measure(fitting)
        if fitting < most:
            _log.warning("%s: sae_eval.batch_size %d does not fit (%s); evaluating %d sequences at a time",
                         self.worker_name, most, memory.gib(fit.measured.get(most, fit.need)), fitting)
        self.memory.fit = dataclasses.replace(fit, batch_size=fitting, need=fit.measured.get(fitting, fit.need))
        self.memory.program = "SAE evaluation passes"
        return fitting

    def _measure(self, batch_size: int) -> int:
        """Compiles the evaluation's passes at `batch_size`; returns what the batch needs beyond the weights."""
        with count_compilations() as compiled:
            need = sae_eval.batch_need(
                self.loaded, batch_size=batch_size, seq_len=self.tokens.shape[1], site_keys=self._site_keys(),
                d_sae=self._widest(), program_need=memory.program_need, argument_bytes=memory.argument_bytes,
            )
        self.compilations += compiled[0]
        self.memory.needs[("SAE evaluation passes", batch_size)] = need
        return need

    def shrink_batch(self, batch_size: int) -> None:
        """Evaluates this and later jobs at most `batch_size` sequences at a time (after running out of memory)."""
        batch_size = _same_on_every_process(max(1, batch_size))
        if batch_size < self.batch_size:
            _log.warning("%s: evaluating %d sequences at a time from now on (was %d)", self.worker_name,
                         batch_size, self.batch_size)
            self.batch_size = batch_size
            if self.memory.fit is not None:
                need = self._measure(batch_size)
                self.memory.fit = dataclasses.replace(self.memory.fit, batch_size=batch_size, need=need)

    def _sae(self, sae_id: str) -> LoadedSAE:
        """The SAE of an id, loaded on first use and kept while the cache budget allows."""
        loaded = self._saes.get(sae_id)
        if loaded is None:
            loaded = load_saes(self.loaded, self.config, [self._files[sae_id]], self._cache_dir)[sae_id]
            self._saes[sae_id] = loaded
        return loaded

    def run_job(self, job: Job, attempt: int = 1, batch_size: int | None = None) -> list[SAEEvalPointResult]:
        """Evaluates every SAE of `job` in one pass over the evaluation tokens (`batch_size`, after an
        out-of-memory fault, lowers the worker's batch for this and later jobs)."""
        if batch_size is not None:
            self.shrink_batch(batch_size)
        points: list[SAEEvalPoint] = list(job.points)
        saes = {
            point.point_key: sae_eval.SiteSAE(point.layer, self._sae(point.sae_id).sae, point.site) for point in points
        }
        program = "SAE evaluation passes"
        self.memory.check(program, self.batch_size)
        with count_compilations() as compiled, _recurring_errors():
            try:
                evaluated = sae_eval.evaluate_saes(
                    self.loaded, saes, self.tokens, self.batch_size,
                    table_sequences=self.config.sae_eval.table_sequences,
                )
            except Exception as error:
                if is_out_of_memory(error) and not isinstance(error, DeviceOutOfMemory):
                    raise self.memory.out_of_memory(program, self.batch_size, error) from error
                raise
        self.compilations += compiled[0]
        tags = self.memory.tags()
        return [
            SAEEvalPointResult(point.point_key, evaluated[point.point_key], tags=tags, worker=self.worker_name,
                               attempt=attempt)
            for point in points
        ]


def sae_eval_width(sae_file: SAEFile) -> int | None:
    """Latents of an SAE file without reading it: its width label's count (`16k`: 16,384; synthetic: the count)."""
    if sae_file.width is None:
        return None
    try:
        return width_latents(sae_file.width)
    except ValueError:
        return None


def sae_cache(budget_bytes: int) -> cachetools.LRUCache[str, LoadedSAE]:
    """Loaded SAEs by id, least recently used first out once they fill `budget_bytes`; the last one always stays."""
    maxsize = max(budget_bytes, 1)
    # An SAE larger than the whole budget counts as the budget: it pushes every other one out and stays alone.
    return cachetools.LRUCache(maxsize, getsizeof=lambda loaded: min(_sae_bytes(loaded), maxsize))


def _sae_bytes(loaded: LoadedSAE) -> int:
    return sum(leaf.nbytes for leaf in jax.tree.leaves(loaded.sae))


Worker = SteeringWorker | SAEEvalWorker


def worker_class_for(kind: str) -> type[Worker]:
    """The worker class of a sweep kind (`ExperimentConfig.kind`)."""
    return {"steering": SteeringWorker, "sae_eval": SAEEvalWorker}[kind]
