"""The driver of a steering sweep: config -> checked plan -> jobs -> worker -> results -> MLflow.

`prepare_sweep` does every check that can fail on user input (checkpoint layout, SAE files, layer and feature
ranges, prompt lengths) before anything is written to MLflow; `run_sweep` then opens the sweep's parent run,
skips points that already finished (resume), runs the rest in jobs, and logs each point as it completes.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from runner import plan, tokenizer as tokenizer_lib
from runner.architecture import Gemma2Architecture
from runner.config import ExperimentConfig
from runner.errors import PlanError
from runner.model import read_architecture, resolve_model_location
from runner.plan import Job, SteeringPoint
from runner.results import PointResult
from runner.sae import read_params_npz
from runner.sae_sources import SAEFile, resolve_sae_files, synthetic_sae_width
from runner.tracking import SweepTracker

#: Largest batch chosen automatically when `sampling.batch_size` is `auto`.
MAX_AUTO_BATCH = 64


@dataclasses.dataclass(frozen=True)
class SweepPlan:
    """Everything a sweep needs, checked: the points, their jobs, and the resolved files.

    Attributes:
      config: The experiment.
      sweep_id: Identity of the sweep's results.
      points: Every point, in sweep order.
      jobs: The points packed into batches of `batch_size`.
      batch_size: Rows of each compiled batch.
      architecture: The model's architecture (from checkpoint metadata).
      sae_files: The SAE file of every steered layer.
      d_sae: Latent count of the SAEs, by layer.
      prompt_token_counts: Tokens of each prompt (BOS included).
    """

    config: ExperimentConfig
    sweep_id: str
    points: tuple[SteeringPoint, ...]
    jobs: tuple[Job, ...]
    batch_size: int
    architecture: Gemma2Architecture
    sae_files: dict[int, SAEFile]
    d_sae: dict[int, int]
    prompt_token_counts: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class SweepSummary:
    """How a sweep ended."""

    sweep_id: str
    parent_run_id: str
    experiment_id: str | None
    points_total: int
    points_skipped: int
    points_finished: int
    points_failed: int
    generated_tokens: int
    seconds: float
    tracking_seconds: float
    compilations: int


def prepare_sweep(config: ExperimentConfig, cache_dir: Path) -> SweepPlan:
    """Resolves and checks everything the sweep needs; raises a one-line `RunnerError` on bad input."""
    location = resolve_model_location(config.model, cache_dir)
    arch = read_architecture(location)
    steering = config.steering
    bad_layers = [layer for layer in steering.layers if layer >= arch.num_layers]
    if bad_layers:
        raise PlanError(
            f"steering.layers: {bad_layers} out of range (allowed: 0..{arch.num_layers - 1}, "
            f"the model has {arch.num_layers} blocks)"
        )

    model_name = plan.model_id(config.model)
    sae_files = resolve_sae_files(
        config.sae, steering.layers, model_id=model_name, embedding_dim=arch.embedding_dim, cache_dir=cache_dir
    )
    d_sae = {}
    for layer, sae_file in sae_files.items():
        if sae_file.path is None:
            d_sae[layer] = synthetic_sae_width(config.sae, arch.embedding_dim)
        else:
            d_sae[layer] = read_params_npz(sae_file.path, expected_d_in=arch.embedding_dim)["W_enc"].shape[1]
    for layer in steering.layers:
        bad_features = [feature for feature in steering.features if feature >= d_sae[layer]]
        if bad_features:
            raise PlanError(
                f"steering.features: {bad_features} out of range for the layer-{layer} SAE "
                f"(allowed: 0..{d_sae[layer] - 1})"
            )

    tokenizer = tokenizer_lib.load_tokenizer(location.tokenizer_path)
    counts = tuple(len(tokenizer_lib.encode_prompt(tokenizer, prompt)) for prompt in config.prompts)
    limit = arch.context_length - config.sampling.max_new_tokens
    for index, count in enumerate(counts):
        if count > limit:
            raise PlanError(
                f"prompts.{index}: {count} tokens plus sampling.max_new_tokens={config.sampling.max_new_tokens} "
                f"exceed the model's context of {arch.context_length} tokens"
            )

    points = plan.expand_points(
        config,
        {layer: sae_file.sae_id for layer, sae_file in sae_files.items()},
        lambda layer, feature: sae_files[layer].neuronpedia_url(feature),
    )
    batch_size = job_size(config, len(points))
    return SweepPlan(
        config=config,
        sweep_id=plan.sweep_id(config),
        points=tuple(points),
        jobs=tuple(plan.pack_jobs(points, batch_size)),
        batch_size=batch_size,
        architecture=arch,
        sae_files=sae_files,
        d_sae=d_sae,
        prompt_token_counts=counts,
    )


def job_size(config: ExperimentConfig, num_points: int) -> int:
    """Distinct generations per job: `sampling.batch_size`, or with `auto` up to `MAX_AUTO_BATCH` (a worker may
    then run a job in smaller batches that fit its device)."""
    requested = config.sampling.batch_size
    return min(MAX_AUTO_BATCH, num_points) if requested == "auto" else requested


ProgressCallback = Callable[[int, int, int, int], None]
ResultCallback = Callable[[Job, list[PointResult]], None]
FailureCallback = Callable[[Job, str, int], None]


class JobExecutor(Protocol):
    """Runs jobs somewhere and reports each one back on the calling thread."""

    def run(self, jobs: Sequence[Job], on_result: ResultCallback, on_failure: FailureCallback) -> None:
        """Runs every job; calls `on_result(job, results)` or `on_failure(job, error_text, attempt)` per job."""

    @property
    def compilations(self) -> int:
        """Programs compiled by the executor's workers so far."""


class LocalExecutor:
    """Runs jobs in this process on one `SteeringWorker` (built on first use); a job's error fails its points."""

    def __init__(self, sweep_plan: SweepPlan, cache_dir: Path):
        self._plan = sweep_plan
        self._cache_dir = cache_dir
        self._worker: Any = None

    @property
    def compilations(self) -> int:
        """Programs compiled by the local worker so far."""
        return self._worker.compilations if self._worker is not None else 0

    def run(self, jobs: Sequence[Job], on_result: ResultCallback, on_failure: FailureCallback) -> None:
        """Runs the jobs one after another."""
        from runner.worker import SteeringWorker  # JAX model code is imported only when a sweep really runs.

        if self._worker is None and jobs:
            self._worker = SteeringWorker(
                self._plan.config, self._plan.sae_files, batch_size=self._plan.batch_size, cache_dir=self._cache_dir
            )
        for job in jobs:
            try:
                results = self._worker.run_job(job)
            except Exception as error:  # the job's own error: its points fail, the sweep goes on
                on_failure(job, f"{type(error).__name__}: {error}", 1)
            else:
                on_result(job, results)


def run_sweep(
    sweep_plan: SweepPlan,
    *,
    cache_dir: Path,
    executor: JobExecutor | None = None,
    progress: ProgressCallback | None = None,
) -> SweepSummary:
    """Runs the planned sweep and logs every point to MLflow (this process is the only MLflow writer).

    Points whose child run already FINISHED are skipped, so re-running a sweep resumes it. `executor` defaults to
    a `LocalExecutor`. `progress` is called after every job with (points done, points to run, failures, tokens).
    """
    config = sweep_plan.config
    executor = executor if executor is not None else LocalExecutor(sweep_plan, cache_dir)
    tracker = SweepTracker(config.tracking.uri, config.tracking.experiment)
    started = time.perf_counter()
    counts = {"finished": 0, "failed": 0, "tokens": 0, "to_run": 0}

    def report() -> None:
        if progress is not None:
            progress(counts["finished"] + counts["failed"], counts["to_run"], counts["failed"], counts["tokens"])

    tracking_seconds = 0.0

    def on_result(job: Job, results: list[PointResult]) -> None:
        nonlocal tracking_seconds
        logging_started = time.perf_counter()
        for point, result in zip(job.points, results):
            tracker.log_point(point, result)
            counts["tokens"] += len(result.token_ids)
        tracking_seconds += time.perf_counter() - logging_started
        counts["finished"] += len(results)
        report()

    def on_failure(job: Job, error: str, attempt: int) -> None:
        nonlocal tracking_seconds
        logging_started = time.perf_counter()
        for point in job.points:
            tracker.fail_point(point, error, attempt=attempt)
        tracking_seconds += time.perf_counter() - logging_started
        counts["failed"] += len(job.points)
        report()

    opened = time.perf_counter()
    with tracker.sweep(config, sweep_plan.sweep_id, len(sweep_plan.points)) as parent_run_id:
        done_keys = tracker.finished_point_keys()
        remaining = [point for point in sweep_plan.points if point.point_key not in done_keys]
        counts["to_run"] = len(remaining)
        tracking_seconds += time.perf_counter() - opened
        executor.run(plan.pack_jobs(remaining, sweep_plan.batch_size), on_result, on_failure)
        closing = time.perf_counter()
    tracking_seconds += time.perf_counter() - closing
    return SweepSummary(
        sweep_id=sweep_plan.sweep_id,
        parent_run_id=parent_run_id,
        experiment_id=tracker.experiment_id,
        points_total=len(sweep_plan.points),
        points_skipped=len(sweep_plan.points) - len(remaining),
        points_finished=counts["finished"],
        points_failed=counts["failed"],
        generated_tokens=counts["tokens"],
        seconds=time.perf_counter() - started,
        tracking_seconds=tracking_seconds,
        compilations=executor.compilations,
    )
