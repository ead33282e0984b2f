"""The planner: config -> checked plan (points, jobs, SAE files) for `runner.driver.run_sweep`.

`prepare_sweep` does every check that can fail on user input (checkpoint layout, SAE files, layer and feature
ranges, prompt lengths) before anything is written to MLflow; `outline` is what `runner validate` prints.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from runner.config.schema import ExperimentConfig
from runner.errors import PlanError, SAEError
from runner.model import tokenizer as tokenizer_lib
from runner.model.architecture import Gemma2Architecture
from runner.model.loading import read_architecture, resolve_model_location
from runner.nn.sites import site_width
from runner.plan import points as plan
from runner.plan.points import Job, Point
from runner.sae.jumprelu import read_params_npz
from runner.sae.sources import SAEFile, resolve_sae_file, resolve_sae_files, width_latents
from runner.sae_eval import text_sets
from runner.sae_eval.text_sets import EvalTokens

#: Largest batch chosen automatically when `sampling.batch_size` is `auto`.
MAX_AUTO_BATCH = 64
#: Most SAEs in one evaluation job when `sae_eval.saes_per_job` is `auto`.
MAX_AUTO_SAES_PER_JOB = 8


@dataclasses.dataclass(frozen=True)
class SweepPlan:
    """Everything a sweep needs, checked: the points, their jobs, and the resolved files.

    Attributes:
      config: The experiment.
      sweep_id: Identity of the sweep's results.
      points: Every point, in sweep order.
      jobs: The points packed into jobs.
      batch_size: Rows of each compiled batch (steering: generations; SAE evaluation: sequences).
      architecture: The model's architecture (from checkpoint metadata).
      sae_files: Every SAE of the sweep, by SAE id.
      d_sae: Latent count of each SAE, by SAE id.
      prompt_token_counts: Tokens of each prompt (BOS included; steering only).
      eval_tokens: The evaluation set (SAE evaluation only).
      saes_per_job: SAEs evaluated together (SAE evaluation only).
    """

    config: ExperimentConfig
    sweep_id: str
    points: tuple[Point, ...]
    jobs: tuple[Job, ...]
    batch_size: int
    architecture: Gemma2Architecture
    sae_files: dict[str, SAEFile]
    d_sae: dict[str, int]
    prompt_token_counts: tuple[int, ...] = ()
    eval_tokens: EvalTokens | None = None
    saes_per_job: int = 1

    def pack(self, points: Sequence[Point]) -> list[Job]:
        """Packs (a subset of) the sweep's points into jobs the way the plan did."""
        if self.config.kind == "sae_eval":
            return plan.pack_sae_eval_jobs(points, self.saes_per_job)
        return plan.pack_jobs(points, self.batch_size)

    def worker_args(self) -> dict[str, Any]:
        """What a worker class (`runner.execution.workers`) takes besides its cache directory and name."""
        args = {"config": self.config, "sae_files": self.sae_files, "batch_size": self.batch_size}
        if self.config.kind == "sae_eval":
            return {**args, "eval_tokens": self.eval_tokens}
        return {**args, "point_capacity": self.point_capacity}

    @property
    def point_capacity(self) -> int:
        """Point rows of a steering worker's metrics program that serve every chunk of the plan's jobs (a job's
        scale-0 points share one generation, so a chunk may hold more points than generations)."""
        from runner.steering.metrics import point_bucket

        chunks = [chunk for job in self.jobs for chunk in plan.split_by_generations(job.points, self.batch_size)]
        return max((point_bucket(len(chunk), self.batch_size) for chunk in chunks), default=self.batch_size)


def prepare_sweep(config: ExperimentConfig, cache_dir: Path) -> SweepPlan:
    """Resolves and checks everything the sweep needs; raises a one-line `RunnerError` on bad input."""
    location = resolve_model_location(config.model, cache_dir)
    arch = read_architecture(location)
    tokenizer = tokenizer_lib.load_tokenizer(location.tokenizer_path)
    if config.kind == "sae_eval":
        return _prepare_sae_eval(config, arch, tokenizer)
    return _prepare_steering(config, arch, tokenizer)


def _check_layers(layers: Sequence[int], arch: Gemma2Architecture, field: str) -> None:
    bad_layers = [layer for layer in layers if layer >= arch.num_layers]
    if bad_layers:
        raise PlanError(
            f"{field}: {bad_layers} out of range (allowed: 0..{arch.num_layers - 1}, "
            f"the model has {arch.num_layers} blocks)"
        )


def _latent_count(config: ExperimentConfig, sae_file: SAEFile, arch: Gemma2Architecture) -> int:
    """The SAE's width, read from its file (synthetic: the width it will be written with)."""
    if sae_file.path is None:
        return int(sae_file.width)
    d_sae = read_params_npz(sae_file.path, expected_d_in=site_width(arch, sae_file.site))["W_enc"].shape[1]
    if config.sae.source == "huggingface" and d_sae != width_latents(sae_file.width):
        raise SAEError(f"{sae_file.path}: holds {d_sae} latents but width {sae_file.width} has "
                       f"{width_latents(sae_file.width)}")
    return d_sae


def _prepare_steering(config: ExperimentConfig, arch: Gemma2Architecture, tokenizer: Any) -> SweepPlan:
    steering = config.steering
    _check_layers(steering.layers, arch, "steering.layers")
    model_name = plan.model_id(config.model)
    by_layer = resolve_sae_files(
        config.sae, steering.layers, model_id=model_name, embedding_dim=arch.embedding_dim
    )
    d_sae = {}
    for layer, sae_file in by_layer.items():
        d_sae[sae_file.sae_id] = _latent_count(config, sae_file, arch)
        bad_features = [feature for feature in steering.features if feature >= d_sae[sae_file.sae_id]]
        if bad_features:
            raise PlanError(
                f"steering.features: {bad_features} out of range for the layer-{layer} SAE "
                f"(allowed: 0..{d_sae[sae_file.sae_id] - 1})"
            )

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
        {layer: sae_file.sae_id for layer, sae_file in by_layer.items()},
        lambda layer, feature: by_layer[layer].neuronpedia_url(feature),
    )
    batch_size = job_size(config, points)
    return SweepPlan(
        config=config,
        sweep_id=plan.sweep_id(config),
        points=tuple(points),
        jobs=tuple(plan.pack_jobs(points, batch_size)),
        batch_size=batch_size,
        architecture=arch,
        sae_files={sae_file.sae_id: sae_file for sae_file in by_layer.values()},
        d_sae=d_sae,
        prompt_token_counts=counts,
    )


def evaluated_layers(config: ExperimentConfig, num_layers: int) -> list[int]:
    """`sae_eval.layers` with `all` resolved to every block of the model."""
    layers = config.sae_eval.layers
    return list(range(num_layers)) if layers == "all" else list(layers)


def saes_per_job(config: ExperimentConfig, num_points: int) -> int:
    """`sae_eval.saes_per_job`, or with `auto` the points shared evenly over the workers, at most
    `MAX_AUTO_SAES_PER_JOB` (a job is also what a resumed sweep reruns after a crash)."""
    requested = config.sae_eval.saes_per_job
    if requested != "auto":
        return requested
    return max(1, min(MAX_AUTO_SAES_PER_JOB, math.ceil(num_points / config.cluster.workers)))


def _prepare_sae_eval(config: ExperimentConfig, arch: Gemma2Architecture, tokenizer: Any) -> SweepPlan:
    grid = config.sae_eval
    layers = evaluated_layers(config, arch.num_layers)
    _check_layers(layers, arch, "sae_eval.layers")
    if grid.context_length > arch.context_length:
        raise PlanError(f"sae_eval.context_length: {grid.context_length} exceeds the model's context of "
                        f"{arch.context_length} tokens")
    model_name = plan.model_id(config.model)
    files: dict[tuple[int, str, str], SAEFile] = {}
    for layer in layers:
        for width in grid.widths:
            for l0 in grid.l0s:
                files[(layer, width, str(l0))] = resolve_sae_file(
                    config.sae, layer, width=width, l0=l0, model_id=model_name, num_layers=len(layers)
                )
    d_sae = {sae_file.sae_id: _latent_count(config, sae_file, arch) for sae_file in files.values()}
    eval_tokens = text_sets.load_eval_tokens(
        grid.text, tokenizer, context_length=grid.context_length, num_sequences=grid.num_sequences
    )
    points = plan.expand_sae_eval_points(
        config,
        layers,
        {key: sae_file.sae_id for key, sae_file in files.items()},
        text=eval_tokens.description,
        text_digest=eval_tokens.digest,
    )
    per_job = saes_per_job(config, len(points))
    return SweepPlan(
        config=config,
        sweep_id=plan.sweep_id(config),
        points=tuple(points),
        jobs=tuple(plan.pack_sae_eval_jobs(points, per_job)),
        batch_size=grid.batch_size,
        architecture=arch,
        sae_files={sae_file.sae_id: sae_file for sae_file in files.values()},
        d_sae=d_sae,
        eval_tokens=eval_tokens,
        saes_per_job=per_job,
    )


def job_size(config: ExperimentConfig, points: Sequence[plan.SteeringPoint]) -> int:
    """Distinct generations per job: `sampling.batch_size`, or with `auto` the generations shared evenly over
    as few jobs as hold at most `MAX_AUTO_BATCH` each, their count a multiple of the workers (so no job runs a
    mostly empty batch). A worker may then run a job in smaller batches that fit its device."""
    requested = config.sampling.batch_size
    if requested != "auto":
        return requested
    generations = len({point.generation_key for point in points})
    jobs = math.ceil(generations / MAX_AUTO_BATCH)
    workers = config.cluster.workers
    if generations >= workers:
        jobs = math.ceil(jobs / workers) * workers
    return max(1, math.ceil(generations / jobs))


@dataclasses.dataclass(frozen=True)
class SweepOutline:
    """A sweep's size and what each worker needs, worked out without downloading or loading a model.

    Attributes:
      sweep_id: Identity of the sweep's results.
      points: Points of the sweep.
      jobs: Jobs the points are packed into.
      job_size: Most distinct generations (steering) or SAEs (SAE evaluation) per job.
      grid: The grid in words, e.g. `2 prompts x 1 layers x ...`.
      tokens: Tokens the sweep generates (at most) or evaluates.
      memory_bytes: Estimated peak bytes per worker, or None when the architecture is unknown before download.
      memory_parts: `(model, SAEs, per batch)` bytes of that estimate.
    """

    sweep_id: str
    points: int
    jobs: int
    job_size: int
    grid: str
    tokens: int
    memory_bytes: int | None
    memory_parts: tuple[int, int, int] | None


def outline(config: ExperimentConfig) -> SweepOutline:
    """What `runner validate` reports (see `SweepOutline`). SAE ids are placeholders (resolving them may download),
    which gives the same points and jobs."""
    from runner.model.loading import planning_architecture
    from runner.plan import memory
    from runner.steering.sampler import prompt_bucket

    arch = planning_architecture(config.model)
    parameter_bytes = 4 if config.model.dtype == "float32" or (
        config.model.dtype == "auto" and config.model.source == "synthetic") else 2
    activation_bytes = 4 if config.model.upcast_activations else parameter_bytes
    if config.kind == "steering":
        steering = config.steering
        points = plan.expand_points(config, {layer: f"layer-{layer}-sae" for layer in steering.layers})
        size = job_size(config, points)
        jobs = len(plan.pack_jobs(points, size))
        generations = len({point.generation_key for point in points})
        grid = (f"{len(config.prompts)} prompts x {len(steering.layers)} layers x {len(steering.features)} features "
                f"x {len(steering.scales)} scales x {len(steering.seeds)} seeds; {generations} generations (scale-0 "
                "baselines shared)")
        tokens = generations * config.sampling.max_new_tokens
        estimate = None
        if arch is not None:
            # About 3 bytes of English per token: a conservative prompt length before the tokenizer is at hand.
            longest = max(math.ceil(len(prompt.encode("utf-8")) / 3) + 1 for prompt in config.prompts)
            width = _sae_latents(config, config.sae.width, arch)
            estimate = memory.estimate_batch_memory(
                arch, prompt_len=prompt_bucket(longest), max_new_tokens=config.sampling.max_new_tokens,
                parameter_bytes=parameter_bytes, activation_bytes=activation_bytes,
                sae_widths=[width] * len(steering.layers),
            )
            sae_bytes = len(steering.layers) * 2 * arch.embedding_dim * width * 4
    else:
        grid_config = config.sae_eval
        layers = evaluated_layers(config, arch.num_layers) if arch is not None else grid_config.layers
        num_layers = len(layers) if layers != "all" else None
        count = (num_layers or 0) * len(grid_config.widths) * len(grid_config.l0s)
        size = saes_per_job(config, count) if count else 1
        jobs = math.ceil(count / size)
        points = [None] * count
        layer_words = f"{num_layers} layers" if num_layers is not None else "every layer (count known after download)"
        grid = (f"{layer_words} x {len(grid_config.widths)} widths x {len(grid_config.l0s)} L0s of the "
                f"{config.sae.site} site; {grid_config.num_sequences} sequences of {grid_config.context_length} "
                "tokens per SAE")
        tokens = count * grid_config.num_sequences * grid_config.context_length
        estimate = None
        if arch is not None:
            widths = [_sae_latents(config, width, arch) for width in grid_config.widths]
            width_site = site_width(arch, config.sae.site)
            estimate = memory.estimate_eval_memory(
                arch, context_length=grid_config.context_length, parameter_bytes=parameter_bytes,
                activation_bytes=activation_bytes, sae_widths=[max(widths)] * size, site_width=width_site,
                captures=2 * size,
            )
            sae_bytes = size * 2 * width_site * max(widths) * 4
    batch = size if config.kind == "steering" else config.sae_eval.batch_size
    return SweepOutline(
        sweep_id=plan.sweep_id(config),
        points=len(points),
        jobs=jobs,
        job_size=size,
        grid=grid,
        tokens=tokens,
        memory_bytes=estimate.total(batch) if estimate is not None else None,
        memory_parts=(estimate.weights - sae_bytes, sae_bytes, batch * estimate.per_row) if estimate else None,
    )


def _sae_latents(config: ExperimentConfig, width: str, arch: Gemma2Architecture) -> int:
    """Latents of an SAE of the config: a width label's count, or a synthetic steering SAE's width."""
    if config.sae.source == "synthetic" and config.kind == "steering":
        return int(config.sae.width_features or 4 * arch.embedding_dim)
    return width_latents(width)
