"""The host worker: loads the model and SAEs once, then turns jobs of steering points into results.

A worker owns one host (all of its local accelerators, or the CPU in tests). It keeps one compiled
`SteeringSampler` per (batch size, prompt bucket, max_new_tokens), so a sweep compiles once per shape.
The Ray actor in `runner.cluster` wraps this class; a local run uses it directly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from penzai import pz

from runner import memory, metrics, plan, steering as steering_lib, steering_metrics, tokenizer as tokenizer_lib
from runner.errors import PlanError
from runner.model import LoadedModel, load_model, make_host_mesh
from runner.plan import Job, SteeringPoint
from runner.results import PointResult
from runner.sae import LoadedSAE, load_sae
from runner.sae_sources import SAEFile, synthetic_sae_width, write_synthetic_saes
from runner.sampling import SamplingBatch, SamplingOutput, SteeringSampler, left_pad, prompt_bucket
from runner.steering import MODE_CODES, NO_LAYER


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
        target_layer=np.array([NO_LAYER if p.is_baseline else p.layer for p in points], np.int32),
        feature=np.array([p.feature for p in points], np.int32),
        value=np.array([0.0 if p.mode == "ablate" else p.scale for p in points], np.float32),
        mode=np.array([MODE_CODES[p.mode] for p in points], np.int32),
        steer_from=np.array(
            [steer_from_position(p.positions, len(t)) for p, t in zip(points, prompt_tokens)], np.int32
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
      config: The experiment (`runner.config.ExperimentConfig`).
      sae_files: The SAE file of every steered layer, as resolved by the driver.
      batch_size: Points per job. With `sampling.batch_size: auto` the worker compiles for the largest batch
        up to this that fits its device memory (a bigger job then runs as several calls of one program); an
        explicit batch size that does not fit is refused.
      cache_dir: Where synthetic models and SAEs are written.
      worker_name: Recorded with each result.
    """

    def __init__(
        self,
        config: Any,
        sae_files: Mapping[int, SAEFile],
        *,
        batch_size: int,
        cache_dir: Path,
        worker_name: str = "local",
    ):
        self.config = config
        self.worker_name = worker_name
        mesh = make_host_mesh() if len(jax.local_devices()) > 1 else None
        self.loaded: LoadedModel = load_model(
            config.model, cache_dir=cache_dir, mesh=mesh, model_id=plan.model_id(config.model)
        )
        self.saes: dict[int, LoadedSAE] = self._load_saes(sae_files, cache_dir)
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
        if self.config.sampling.batch_size != "auto" and fitting < job_size:
            raise PlanError(
                f"sampling.batch_size: {job_size} needs about {estimate.total(job_size) / 2**30:.1f} GiB on "
                f"{self.worker_name}; at most {fitting} fits (allowed: <= {fitting}, or auto)"
            )
        return fitting

    def _load_saes(self, sae_files: Mapping[int, SAEFile], cache_dir: Path) -> dict[int, LoadedSAE]:
        paths = {layer: file.path for layer, file in sae_files.items()}
        pending = [layer for layer, path in paths.items() if path is None]
        if pending:
            sae_config = self.config.sae
            width = synthetic_sae_width(sae_config, self.loaded.architecture.embedding_dim)
            slug = self.loaded.model_id.replace(":", "-").replace("/", "_")
            paths.update(
                write_synthetic_saes(
                    self.loaded,
                    pending,
                    cache_dir / "synthetic-saes" / f"{slug}-seed{sae_config.seed}",
                    width=width,
                    target_l0=sae_config.target_l0,
                    seed=sae_config.seed,
                )
            )
        d_in = self.loaded.architecture.embedding_dim
        return {
            layer: load_sae(paths[layer], sae_id=file.sae_id, layer=layer, expected_d_in=d_in)
            for layer, file in sae_files.items()
        }

    @property
    def compilations(self) -> int:
        """Programs compiled by this worker so far (one per batch shape)."""
        return sum(sampler.compilations for sampler in self._samplers.values())

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
        output = self._sample(rows)
        point_rows = [row_of[point.generation_key] for point in points]
        generation_metrics = self._generation_metrics(points, output.tokens[point_rows])

        results = []
        for point, row, extra in zip(points, point_rows, generation_metrics):
            ids, stopped = cut_at_eos(output.tokens[row])
            if point.is_baseline:
                measured = output.baseline[point.layer]
                probe = self.probe_features.index(point.feature)
                sums = (measured["baseline_tokens"][row], measured["baseline_l0"][row],
                        measured["probe_activation"][row, probe], measured["probe_fires"][row, probe])
            else:
                sums = tuple(output.totals[name][row] for name in steering_lib.TOTAL_NAMES)
            point_metrics = metrics.steering_point_metrics(*sums)
            point_metrics.update(extra)
            point_metrics["gen/num_tokens"] = float(len(ids))
            point_metrics["gen/stopped_at_eos"] = float(stopped)
            results.append(
                PointResult(
                    point_key=point.point_key,
                    text=tokenizer_lib.decode_tokens(tokenizer, ids),
                    token_ids=tuple(ids),
                    metrics=point_metrics,
                    worker=self.worker_name,
                    attempt=attempt,
                )
            )
        return results

    def _padded(self, items: list) -> list:
        return items + [items[-1]] * (self.batch_size - len(items))

    def _prompt_tokens(self, points: Sequence[SteeringPoint]) -> list[list[int]]:
        return [self._prompt_ids[point.prompt] for point in points]

    def _sample(self, rows: list[SteeringPoint]) -> SamplingOutput:
        sampler = self.sampler_for(self.prompt_len, rows[0].max_new_tokens)
        padded = self._padded(rows)
        return sampler(batch_rows(padded, self._prompt_tokens(padded), self.prompt_len, self.probe_features))

    def _generation_metrics(self, points: list[SteeringPoint], tokens: np.ndarray) -> list[dict[str, float]]:
        """Judge-free steering metrics per point (`steering_metrics`), in batches of the compiled shape."""
        rows = []
        for start in range(0, len(points), self.batch_size):
            indices = self._padded(list(range(start, min(start + self.batch_size, len(points)))))
            piece = [points[i] for i in indices]
            batch = batch_rows(piece, self._prompt_tokens(piece), self.prompt_len, self.probe_features)
            inputs = steering_lib.SteeringInputs.from_rows(
                [point.layer for point in piece], batch.feature, batch.value, batch.mode, batch.steer_from
            )
            computed = steering_metrics.steering_generation_metrics(
                self.loaded, (self._steered_model, inputs), batch.prompt_tokens, tokens[indices], self._sae_layers,
                [point.layer for point in piece], batch.feature,
            )
            rows.extend(computed[: min(self.batch_size, len(points) - start)])
        return rows
