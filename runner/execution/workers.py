"""Host workers: load the model and SAEs once, then turn jobs of points into results.

A worker owns one host (all of its local accelerators, or the CPU in tests). `SteeringWorker` keeps one compiled
`SteeringSampler` per (batch size, prompt bucket, max_new_tokens), so a sweep compiles once per shape;
`SAEEvalWorker` evaluates a job's SAEs over the sweep's evaluation tokens, sharing the clean forward passes. The
Ray actors (`runner.execution.host_actor`, `runner.execution.slices`) wrap these classes; a local run uses them
directly.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import os
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import cachetools
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from penzai import pz

from runner.config.schema import ExperimentConfig
from runner.errors import PlanError
from runner.model import tokenizer as tokenizer_lib
from runner.model.loading import LoadedModel, load_model, make_host_mesh
from runner.nn import sites
from runner.nn import steering as steering_lib
from runner.nn.steering import MODE_CODES, NO_LAYER
from runner.plan import memory
from runner.plan import points as plan
from runner.plan.points import Job, SAEEvalPoint, SteeringPoint
from runner.program_cache import ProgramCache
from runner.results import PointResult, SAEEvalPointResult
from runner.sae.params import LoadedSAE, load_sae
from runner.sae.sources import SAEFile, write_synthetic_saes
from runner.sae_eval import evaluate as sae_eval
from runner.sae_eval.text_sets import EvalTokens
from runner.steering import metrics as steering_metrics
from runner.steering.sampler import SamplingBatch, SteeringSampler, left_pad, prompt_bucket

#: Tag of a steering point: its feature's top logit-lens tokens, decoded (a JSON list).
LOGIT_LENS_TAG = "logit_lens_tokens"
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
) -> SamplingBatch:
    """Host arrays for a batch whose row i runs `points[i]` on `prompt_tokens[i]`; baselines run unsteered."""
    return SamplingBatch(
        prompt_tokens=left_pad([list(tokens) for tokens in prompt_tokens], prompt_len),
        target_layer=np.array([[NO_LAYER if p.is_baseline else p.layer] for p in points], np.int32),
        feature=np.array([[p.feature] for p in points], np.int32),
        value=np.array([[0.0 if p.mode == "ablate" else p.scale] for p in points], np.float32),
        mode=np.array([[MODE_CODES[p.mode]] for p in points], np.int32),
        steer_from=np.array(
            [steer_from_position(p.positions, len(t)) for p, t in zip(points, prompt_tokens, strict=True)], np.int32
        ),
        temperature=np.array([p.temperature for p in points], np.float32),
        top_k=np.array([p.top_k or 0 for p in points], np.int32),
        top_p=np.array([1.0 if p.top_p is None else p.top_p for p in points], np.float32),
        seed=np.array([p.seed for p in points], np.uint32),
        stream=np.array([point_stream(p) for p in points], np.uint32),
        probe_features=np.asarray(probe_features, np.int32),
    )


def cut_at_eos(tokens: np.ndarray, eos_id: int = tokenizer_lib.EOS_ID) -> tuple[list[int], bool]:
    """The generated ids before the first EOS (padding dropped), and whether an EOS was produced."""
    ids = [int(t) for t in tokens]
    if eos_id in ids:
        return ids[: ids.index(eos_id)], True
    return [t for t in ids if t != tokenizer_lib.PAD_ID], False


class SteeringWorker:
    """Runs steering jobs on this host's model.

    Args:
      config: The experiment (with `steering`).
      sae_files: The SAE file of every steered layer, by SAE id, as resolved by the driver.
      batch_size: Points per job. With `sampling.batch_size: auto` the worker compiles for the largest batch
        up to this that fits its device memory (a bigger job then runs as several calls of one program); an
        explicit batch size that does not fit is refused.
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
        self.batch_size = self._fitting_batch_size(batch_size)
        self.probe_features = sorted(set(config.steering.features))
        self._samplers: dict[tuple[int, int, int], SteeringSampler] = {}
        self._steered_model = steering_lib.add_steering_sites(self.loaded.model, self._sae_layers)
        self._lens_tags: dict[tuple[int, ...], str] = {}
        self._metrics_programs: dict[int, steering_metrics.SteeringMetricsProgram] = {}
        # The sweep's two programs (its shape is known now) are compiled before they are needed: the sampler's
        # before the first job, the metrics program's on a second thread, which traces it while XLA compiles the
        # sampler (and, if it takes longer, while the first batch samples; that batch's metrics wait for it).
        sampler = self.sampler_for(self.prompt_len, config.sampling.max_new_tokens)
        sampler.lower()
        metrics_program = self.metrics_program_for(point_capacity or self.batch_size)
        threading.Thread(target=metrics_program.compile, name="runner-metrics-compile").start()
        sampler.compile()

    def _fitting_batch_size(self, job_size: int) -> int:
        params = pz.unbind_params(self.loaded.model)[1]
        estimate = memory.estimate_batch_memory(
            self.loaded.architecture,
            prompt_len=self.prompt_len,
            max_new_tokens=self.config.sampling.max_new_tokens,
            parameter_bytes=params[0].value.dtype.itemsize,
            activation_bytes=np.dtype(self.loaded.model.metadata.activation_dtype).itemsize,
            sae_widths=[sae.d_sae for sae in self._sae_layers.values()],
        )
        fitting = memory.largest_fitting_batch(estimate, memory.device_memory_bytes(), at_most=job_size)
        if jax.process_count() > 1:  # every process of a slice must compile the same program
            fitting = int(np.min(multihost_utils.process_allgather(np.int32(fitting))))
        if self.config.sampling.batch_size != "auto" and fitting < job_size:
            raise PlanError(
                f"sampling.batch_size: {job_size} needs about {estimate.total(job_size) / 2**30:.1f} GiB on "
                f"{self.worker_name}; at most {fitting} fits (allowed: <= {fitting}, or auto)"
            )
        return fitting

    @property
    def compilations(self) -> int:
        """Programs compiled by this worker so far (one per batch shape)."""
        return sum(sampler.compilations for sampler in self._samplers.values())

    def metrics_program_for(self, num_points: int) -> steering_metrics.SteeringMetricsProgram:
        """The compiled metrics program for at least `num_points` points, built on first use; the largest one
        built so far serves every smaller chunk, so a sweep compiles it once or twice."""
        fitting = [capacity for capacity in self._metrics_programs if capacity >= num_points]
        if fitting:
            return self._metrics_programs[min(fitting)]
        capacity = steering_metrics.point_bucket(num_points, self.batch_size)
        self._metrics_programs[capacity] = steering_metrics.SteeringMetricsProgram(
            self.loaded.model, self._steered_model, self._sae_layers, num_generations=self.batch_size,
            seq_len=self.prompt_len + self.config.sampling.max_new_tokens, num_points=capacity,
            program_cache=self.program_cache,
        )
        return self._metrics_programs[capacity]

    def sampler_for(self, prompt_len: int, max_new_tokens: int) -> SteeringSampler:
        """The compiled sampler of a shape, built on first use."""
        key = (self.batch_size, prompt_len, max_new_tokens)
        if key not in self._samplers:
            self._samplers[key] = SteeringSampler(
                self.loaded.model,
                self._sae_layers,
                batch_size=self.batch_size,
                prompt_len=prompt_len,
                max_new_tokens=max_new_tokens,
                num_probes=len(self.probe_features),
                mesh=self.loaded.mesh,
                program_cache=self.program_cache,
            )
        return self._samplers[key]

    def run_job(self, job: Job, attempt: int = 1) -> list[PointResult]:
        """Generates every point of `job`: one call of the compiled program per `batch_size` distinct generations
        (baseline points of a (prompt, seed) share one unsteered row)."""
        return [
            result
            for chunk in plan.split_by_generations(job.points, self.batch_size)
            for result in self._run_chunk(chunk, attempt)
        ]

    def _run_chunk(self, points: list[SteeringPoint], attempt: int) -> list[PointResult]:
        tokenizer = self.loaded.tokenizer
        rows: list[SteeringPoint] = []
        row_of: dict[str, int] = {}
        for point in points:
            if point.generation_key not in row_of:
                row_of[point.generation_key] = len(rows)
                rows.append(point)
        padded = self._padded(rows)
        batch = batch_rows(padded, self._prompt_tokens(padded), self.prompt_len, self.probe_features)
        output = self.sampler_for(self.prompt_len, rows[0].max_new_tokens)(batch)
        point_rows = [row_of[point.generation_key] for point in points]
        generation_metrics = self.metrics_program_for(len(points))(
            steering_lib.SteeringInputs.from_rows(
                batch.target_layer, batch.feature, batch.value, batch.mode, batch.steer_from
            ),
            batch.prompt_tokens,
            output.tokens,
            [point.layer for point in points],
            [point.feature for point in points],
            point_rows,
        )

        results = []
        for point, row, extra in zip(points, point_rows, generation_metrics, strict=True):
            ids, stopped = cut_at_eos(output.tokens[row])
            if point.is_baseline:
                measured = output.baseline[point.layer]
                probe = self.probe_features.index(point.feature)
                sums = (measured["baseline_tokens"][row], measured["baseline_l0"][row],
                        measured["probe_activation"][row, probe], measured["probe_fires"][row, probe])
            else:
                sums = tuple(output.totals[name][row, 0] for name in steering_lib.TOTAL_NAMES)
            point_metrics = steering_metrics.steering_point_metrics(*sums)
            point_metrics.update(extra.metrics)
            point_metrics["gen/num_tokens"] = float(len(ids))
            point_metrics["gen/stopped_at_eos"] = float(stopped)
            results.append(
                PointResult(
                    point_key=point.point_key,
                    text=tokenizer_lib.decode_tokens(tokenizer, ids),
                    token_ids=tuple(ids),
                    metrics=point_metrics,
                    tags={LOGIT_LENS_TAG: self._lens_tag(extra.logit_lens_tokens)},
                    worker=self.worker_name,
                    attempt=attempt,
                )
            )
        return results

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

    SAEs stay loaded between jobs while they fit in `SAE_CACHE_FRACTION` of the device memory (least recently
    used first out), so a worker that sees an SAE again does not read it again.

    Args:
      config: The experiment (with `sae_eval`).
      sae_files: Every SAE of the sweep, by SAE id, as resolved by the driver.
      batch_size: Sequences per forward pass (`sae_eval.batch_size`).
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
        self.batch_size = batch_size
        self.tokens = np.asarray(eval_tokens.tokens, np.int32)
        self._cache_dir = cache_dir
        self._files = dict(sae_files)
        self.loaded: LoadedModel = load_host_model(config, cache_dir, mesh)
        self._saes = sae_cache(int(memory.device_memory_bytes() * SAE_CACHE_FRACTION))
        self.compilations = 0

    def _sae(self, sae_id: str) -> LoadedSAE:
        """The SAE of an id, loaded on first use and kept while the cache budget allows."""
        loaded = self._saes.get(sae_id)
        if loaded is None:
            loaded = load_saes(self.loaded, self.config, [self._files[sae_id]], self._cache_dir)[sae_id]
            self._saes[sae_id] = loaded
        return loaded

    def run_job(self, job: Job, attempt: int = 1) -> list[SAEEvalPointResult]:
        """Evaluates every SAE of `job` in one pass over the evaluation tokens."""
        points: list[SAEEvalPoint] = list(job.points)
        saes = {
            point.point_key: sae_eval.SiteSAE(point.layer, self._sae(point.sae_id).sae, point.site) for point in points
        }
        with count_compilations() as compiled:
            evaluated = sae_eval.evaluate_saes(
                self.loaded, saes, self.tokens, self.batch_size, table_sequences=self.config.sae_eval.table_sequences
            )
        self.compilations += compiled[0]
        return [
            SAEEvalPointResult(point.point_key, evaluated[point.point_key], worker=self.worker_name, attempt=attempt)
            for point in points
        ]


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
