"""The planner: config -> points -> jobs, with the SAEs and the memory of a batch, from what is known.

`plan_sweep` is the one planner. `prepare_sweep` (`runner run`) gives it everything, resolved (`ResolvedFacts`),
and refuses, before anything runs or is written to MLflow, what cannot run: layers, features or prompts out of
the model's or SAEs' range. `outline` (`runner validate`) gives it what is known without a download
(`OfflineFacts`) and describes the sweep (`SweepOutline`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from runner.config.schema import ClusterConfig, ExperimentConfig
from runner.errors import PlanError
from runner.model.architecture import Gemma2Architecture
from runner.nn.sites import site_width
from runner.plan import memory
from runner.plan import points as plan
from runner.plan.facts import L0, OfflineFacts, ResolvedFacts, SweepFacts
from runner.plan.memory import BatchMemory
from runner.plan.points import Job, Point, SteeringPoint
from runner.plan.search import CurveSearch, SearchSettings, uniform_grid_generations
from runner.sae.sources import SAEFile, steering_width_and_l0
from runner.sae_eval.text_sets import EvalTokens

#: Largest batch chosen automatically when `sampling.batch_size` is `auto`.
MAX_AUTO_BATCH = 64
#: Most SAEs in one evaluation job when `sae_eval.saes_per_job` is `auto`.
MAX_AUTO_SAES_PER_JOB = 8
#: The evaluation text of an offline plan, which does not read it.
UNREAD_TEXT = "not read"


@dataclasses.dataclass(frozen=True)
class SweepPlan:
    """Everything a sweep needs: the points, their jobs, the SAEs and the memory estimate (checked and resolved
    when made by `prepare_sweep`; from what is known offline when made for `outline`).

    Attributes:
      config: The experiment.
      sweep_id: Identity of the sweep's results.
      points: Every point, in sweep order.
      jobs: The points packed into jobs.
      batch_size: Rows of each compiled batch (steering: generations; SAE evaluation: sequences).
      architecture: The model's architecture (from checkpoint metadata; offline: the published one, or None).
      sae_files: Every SAE of the sweep, by SAE id (offline: placeholders).
      d_sae: Latent count of each SAE, by SAE id (offline: those its width label names).
      memory: Estimated bytes of a worker's batch; None when the architecture is unknown.
      prompt_token_counts: Tokens of each prompt (BOS included; steering only; offline: estimated).
      eval_tokens: The evaluation set (SAE evaluation only; offline: None).
      saes_per_job: SAEs evaluated together (SAE evaluation only).
      dtype: What `model.dtype` resolves to (`auto`: the checkpoint's stored dtype).
      search: The scale search of a `search` sweep (whose `points` are then its first round's), else None.
      steering_sae_ids: The SAE id steered at each layer (steering only).
    """

    config: ExperimentConfig
    sweep_id: str
    points: tuple[Point, ...]
    jobs: tuple[Job, ...]
    batch_size: int
    architecture: Gemma2Architecture | None
    sae_files: dict[str, SAEFile]
    d_sae: dict[str, int]
    memory: BatchMemory | None = None
    prompt_token_counts: tuple[int, ...] = ()
    eval_tokens: EvalTokens | None = None
    saes_per_job: int = 1
    dtype: str = ""
    search: SearchSettings | None = None
    steering_sae_ids: dict[int, str] = dataclasses.field(default_factory=dict)

    def points_at(self, scales: Mapping[tuple[int, int], Sequence[float]]) -> list[SteeringPoint]:
        """The points of the given scales of each `(layer, feature)` curve, on every prompt and seed (a search
        round), in sweep order."""
        return plan.expand_points(
            self.config, self.steering_sae_ids,
            lambda layer, feature: self.sae_files[self.steering_sae_ids[layer]].neuronpedia_url(feature), scales,
            dtype=self.dtype,
        )

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
        scale-0 points share one generation, so a chunk may hold more points than generations; a combination is
        measured once per intervention)."""
        from runner.steering.metrics import point_bucket

        chunks = [chunk for job in self.jobs for chunk in plan.split_by_generations(job.points, self.batch_size)]
        # A combination point is measured once per intervention.
        rows = [sum(len(point.interventions) for point in chunk) for chunk in chunks]
        return max((point_bucket(count, self.batch_size) for count in rows), default=self.batch_size)


def prepare_sweep(config: ExperimentConfig, cache_dir: Path) -> SweepPlan:
    """Resolves and checks everything the sweep needs; raises a one-line `RunnerError` on bad input."""
    plan.check_grid_size(config)  # before anything is downloaded or expanded
    facts = ResolvedFacts.read(config, cache_dir)
    _check_model_fits(config, facts.architecture)  # before any SAE is resolved (which may download)
    sweep_plan = plan_sweep(config, facts)
    _check_steering_fits(sweep_plan)
    _check_memory_fits(sweep_plan, facts)
    return sweep_plan


def _check_memory_fits(sweep_plan: SweepPlan, facts: SweepFacts) -> None:
    """Refuses a sweep whose estimate does not fit one batch row on this host, when this host runs its worker: a
    local Ray on the CPU (a cluster's workers measure their own devices when they start)."""
    config = sweep_plan.config
    if sweep_plan.memory is None or config.cluster.address or os.environ.get("RAY_ADDRESS"):
        return
    platform = config.cluster.jax_platform()
    if platform != "cpu":
        return
    import psutil

    memory.check_fits(sweep_plan.memory, psutil.virtual_memory().available, model=plan.model_id(config.model),
                      dtype=resolved_dtype(config, facts), platform=platform)


def plan_sweep(config: ExperimentConfig, facts: SweepFacts) -> SweepPlan:
    """The sweep's points, jobs, SAEs and memory estimate, from what `facts` know (see `runner.plan.facts`)."""
    if config.kind == "sae_eval":
        return _plan_sae_eval(config, facts)
    return _plan_steering(config, facts)


def _plan_steering(config: ExperimentConfig, facts: SweepFacts) -> SweepPlan:
    arch = facts.architecture
    layers = config.steering.sae_layers
    width, l0 = _steering_sae_labels(config, arch)
    by_layer = {layer: facts.sae_file(layer, width=width, l0=l0, num_layers=len(layers)) for layer in layers}
    d_sae = _latent_counts(facts, by_layer.values())
    counts = facts.prompt_token_counts(config.prompts)
    search = SearchSettings.from_config(config.search) if config.search is not None else None
    first_round = None
    if search is not None:
        first = CurveSearch(search).candidates()
        first_round = {(layer, feature): first for layer in config.steering.layers
                       for feature in config.steering.features}
    points = plan.expand_points(
        config,
        {layer: sae_file.sae_id for layer, sae_file in by_layer.items()},
        lambda layer, feature: by_layer[layer].neuronpedia_url(feature),
        first_round,
        dtype=resolved_dtype(config, facts),
    )
    batch_size = job_size(config, points)
    estimate = None
    if arch is not None:
        from runner.steering.sampler import prompt_bucket

        parameter_bytes, activation_bytes = memory.value_bytes(config.model, facts.stored_dtype,
                                                               config.cluster.jax_platform())
        estimate = memory.estimate_steering_memory(
            arch, prompt_len=prompt_bucket(max(counts)), max_new_tokens=config.sampling.max_new_tokens,
            parameter_bytes=parameter_bytes, activation_bytes=activation_bytes,
            sae_widths=[d_sae[by_layer[layer].sae_id] for layer in layers],
        )
    return SweepPlan(
        config=config,
        sweep_id=plan.sweep_id(config),
        points=tuple(points),
        jobs=tuple(plan.pack_jobs(points, batch_size)),
        batch_size=batch_size,
        architecture=arch,
        sae_files={sae_file.sae_id: sae_file for sae_file in by_layer.values()},
        d_sae=d_sae,
        memory=estimate,
        prompt_token_counts=counts,
        dtype=resolved_dtype(config, facts),
        search=search,
        steering_sae_ids={layer: sae_file.sae_id for layer, sae_file in by_layer.items()},
    )


def _plan_sae_eval(config: ExperimentConfig, facts: SweepFacts) -> SweepPlan:
    grid = config.sae_eval
    arch = facts.architecture
    layers = evaluated_layers(config, arch)
    files = {
        (layer, width, str(l0)): facts.sae_file(layer, width=width, l0=l0, num_layers=len(layers))
        for layer in layers
        for width in grid.widths
        for l0 in grid.l0s
    }
    d_sae = _latent_counts(facts, files.values())
    eval_tokens = facts.eval_tokens(grid)
    points = plan.expand_sae_eval_points(
        config,
        layers,
        {key: sae_file.sae_id for key, sae_file in files.items()},
        text=eval_tokens.description if eval_tokens is not None else UNREAD_TEXT,
        text_digest=eval_tokens.digest if eval_tokens is not None else UNREAD_TEXT,
        dtype=resolved_dtype(config, facts),
    )
    per_job = saes_per_job(config, len(points))
    estimate = None
    if arch is not None:
        parameter_bytes, activation_bytes = memory.value_bytes(config.model, facts.stored_dtype,
                                                               config.cluster.jax_platform())
        estimate = memory.estimate_eval_memory(
            arch, context_length=grid.context_length, parameter_bytes=parameter_bytes,
            activation_bytes=activation_bytes, sae_widths=[max(d_sae.values())] * per_job,
            site_width=site_width(arch, config.sae.site), captures=2 * per_job,
        )
    return SweepPlan(
        config=config,
        sweep_id=plan.sweep_id(config),
        points=tuple(points),
        jobs=tuple(plan.pack_sae_eval_jobs(points, per_job)),
        batch_size=grid.batch_size,
        architecture=arch,
        sae_files={sae_file.sae_id: sae_file for sae_file in files.values()},
        d_sae=d_sae,
        memory=estimate,
        eval_tokens=eval_tokens,
        saes_per_job=per_job,
        dtype=resolved_dtype(config, facts),
    )


def resolved_dtype(config: ExperimentConfig, facts: SweepFacts) -> str:
    """`model.dtype`, with `auto` the checkpoint's stored dtype."""
    return facts.stored_dtype if config.model.dtype == "auto" else config.model.dtype


def _latent_counts(facts: SweepFacts, sae_files: Iterable[SAEFile]) -> dict[str, int]:
    """Latents of each SAE whose width is known, by SAE id."""
    counts = {sae_file.sae_id: facts.latents(sae_file) for sae_file in sae_files}
    return {sae_id: count for sae_id, count in counts.items() if count is not None}


def _steering_sae_labels(config: ExperimentConfig, arch: Gemma2Architecture | None) -> tuple[str | None, L0]:
    """The width label and L0 of a steering sweep's SAEs: the config's, or for synthetic SAEs the latent count
    they are written with (`synthetic_sae_width`; None while the model's width is unknown) and their target L0."""
    if arch is not None:
        return steering_width_and_l0(config.sae, arch.embedding_dim)
    if config.sae.source == "synthetic":
        return None, config.sae.target_l0  # written at 4 x the model's width unless set: unknown yet
    return steering_width_and_l0(config.sae, embedding_dim=0)


def evaluated_layers(config: ExperimentConfig, arch: Gemma2Architecture | None) -> list[int]:
    """`sae_eval.layers`, with `all` resolved to every block of the model (none while its architecture is
    unknown)."""
    layers = config.sae_eval.layers
    if layers != "all":
        return list(layers)
    return list(range(arch.num_layers)) if arch is not None else []


def job_size(config: ExperimentConfig, points: Sequence[SteeringPoint]) -> int:
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


def saes_per_job(config: ExperimentConfig, num_points: int) -> int:
    """`sae_eval.saes_per_job`, or with `auto` the points shared evenly over the workers, at most
    `MAX_AUTO_SAES_PER_JOB` (a job is also what a resumed sweep reruns after a crash)."""
    requested = config.sae_eval.saes_per_job
    if requested != "auto":
        return requested
    return max(1, min(MAX_AUTO_SAES_PER_JOB, math.ceil(num_points / config.cluster.workers)))


def _check_model_fits(config: ExperimentConfig, arch: Gemma2Architecture) -> None:
    """Refuses layers the model does not have and an evaluation context longer than the model's."""
    if config.kind == "steering":
        _check_layers(config.steering.layers, arch, "steering.layers")
        for index, combination in enumerate(config.steering.combinations):
            _check_layers([i.layer for i in combination], arch, f"steering.combinations.{index}")
        return
    grid = config.sae_eval
    _check_layers(evaluated_layers(config, arch), arch, "sae_eval.layers")
    if grid.context_length > arch.context_length:
        raise PlanError(f"sae_eval.context_length: {grid.context_length} exceeds the model's context of "
                        f"{arch.context_length} tokens")


def _check_layers(layers: Sequence[int], arch: Gemma2Architecture, field: str) -> None:
    bad_layers = [layer for layer in layers if layer >= arch.num_layers]
    if bad_layers:
        raise PlanError(
            f"{field}: {bad_layers} out of range (allowed: 0..{arch.num_layers - 1}, "
            f"the model has {arch.num_layers} blocks)"
        )


def _check_steering_fits(sweep_plan: SweepPlan) -> None:
    """Refuses features beyond an SAE's latents and prompts that leave no room in the context for the
    generation."""
    config = sweep_plan.config
    if config.kind != "steering":
        return
    steering = config.steering
    for sae_file in sweep_plan.sae_files.values():
        d_sae = sweep_plan.d_sae[sae_file.sae_id]
        bad_features = [feature for feature in steering.features if feature >= d_sae]
        if bad_features and sae_file.layer in steering.layers:
            raise PlanError(
                f"steering.features: {bad_features} out of range for the layer-{sae_file.layer} SAE "
                f"(allowed: 0..{d_sae - 1})"
            )
        for index, combination in enumerate(steering.combinations):
            bad = [i.feature for i in combination if i.layer == sae_file.layer and i.feature >= d_sae]
            if bad:
                raise PlanError(f"steering.combinations.{index}: features {bad} out of range for the "
                                f"layer-{sae_file.layer} SAE (allowed: 0..{d_sae - 1})")
    limit = sweep_plan.architecture.context_length - config.sampling.max_new_tokens
    for index, count in enumerate(sweep_plan.prompt_token_counts):
        if count > limit:
            raise PlanError(
                f"prompts.{index}: {count} tokens plus sampling.max_new_tokens={config.sampling.max_new_tokens} "
                f"exceed the model's context of {sweep_plan.architecture.context_length} tokens"
            )


@dataclasses.dataclass(frozen=True)
class SweepOutline:
    """A sweep's size and what each worker needs, as `runner validate` prints it.

    Attributes:
      sweep_id: Identity of the sweep's results.
      points: Points of the sweep.
      jobs: Jobs the points are packed into.
      job_size: Most distinct generations (steering) or SAEs (SAE evaluation) per job.
      grid: The grid in words, e.g. `2 prompts x 1 layers x ...`.
      tokens: Tokens of the points' generated texts at most, as `runner run` counts them (steering: every point's
        text, a generation shared by several points counted for each), or tokens evaluated (SAE evaluation).
      memory_bytes: Estimated peak bytes per worker, or None when the architecture is unknown before download.
      memory_parts: `(model, SAEs, per batch)` bytes of that estimate.
      replica: What one replica spans when it spans several hosts (`cluster.replica: slice`), in words: hosts,
        chips per host and the placement-group bundles reserved; None for one replica per host.
      dtype: What `model.dtype` resolves to (`auto`: the checkpoint's stored dtype).
      held_dtype: What the workers' platform holds the weights in (bfloat16 is held in float32 on CPU).
      batch_rows: Rows of one batch the memory estimate is for (steering: generations; SAE evaluation:
        sequences per pass).
    """

    sweep_id: str
    points: int
    jobs: int
    job_size: int
    grid: str
    tokens: int
    memory_bytes: int | None
    memory_parts: tuple[int, int, int] | None
    replica: str | None = None
    dtype: str = ""
    held_dtype: str = ""
    batch_rows: int = 0


def outline(config: ExperimentConfig) -> SweepOutline:
    """What `runner validate` reports: the plan from what is known without downloading or loading a model
    (`OfflineFacts`: SAE ids are placeholders, which gives the same points and jobs).

    Raises:
      PlanError: The grid has more points than a sweep may have (`runner.plan.points.max_points`).
    """
    plan.check_grid_size(config)
    return outline_of(plan_sweep(config, OfflineFacts(config)))


def outline_of(sweep_plan: SweepPlan) -> SweepOutline:
    """The outline of a plan (see `SweepOutline`)."""
    config, dtype = sweep_plan.config, sweep_plan.dtype
    if config.kind == "steering":
        steering = config.steering
        generations = len({point.generation_key for point in sweep_plan.points})
        size = sweep_plan.batch_size
        shared = "the scales of each ablation shared" if steering.mode == "ablate" else "scale-0 baselines shared"
        if sweep_plan.search is None:
            grid = (f"{len(config.prompts)} prompts x {len(steering.layers)} layers x {len(steering.features)} "
                    f"features x {len(steering.scales or ())} scales x {len(steering.seeds)} seeds")
            if steering.combinations:
                grid += (f" + {len(config.prompts)} prompts x {len(steering.combinations)} combinations (of up to "
                         f"{steering.max_interventions} interventions) x {len(steering.seeds)} seeds")
            grid += f"; {generations} generations ({shared})"
        else:
            grid = search_outline(sweep_plan.search, config, generations)
        # What `runner run` counts: every point's text, a shared generation once for each point it serves.
        tokens = len(sweep_plan.points) * config.sampling.max_new_tokens
    else:
        grid_config = config.sae_eval
        size = sweep_plan.saes_per_job
        known = grid_config.layers != "all" or sweep_plan.architecture is not None
        num_layers = len(evaluated_layers(config, sweep_plan.architecture))
        layer_words = f"{num_layers} layers" if known else "every layer (count known after download)"
        grid = (f"{layer_words} x {len(grid_config.widths)} widths x {len(grid_config.l0s)} L0s of the "
                f"{config.sae.site} site; {grid_config.num_sequences} sequences of {grid_config.context_length} "
                "tokens per SAE")
        tokens = len(sweep_plan.points) * grid_config.num_sequences * grid_config.context_length
    estimate, batch = sweep_plan.memory, sweep_plan.batch_size
    return SweepOutline(
        sweep_id=sweep_plan.sweep_id,
        points=len(sweep_plan.points),
        jobs=len(sweep_plan.jobs),
        job_size=size,
        grid=grid,
        tokens=tokens,
        memory_bytes=estimate.total(batch) if estimate is not None else None,
        memory_parts=(estimate.weights - estimate.sae_weights, estimate.sae_weights, estimate.need(batch))
        if estimate is not None else None,
        replica=replica_outline(config.cluster),
        dtype=dtype,
        held_dtype="float32" if dtype == "bfloat16" and config.cluster.jax_platform() == "cpu" else dtype,
        batch_rows=batch,
    )


def search_outline(search: SearchSettings, config: ExperimentConfig, first_round_generations: int) -> str:
    """A scale search in words: its curves, samples per scale, rounds and the grid it replaces."""
    steering = config.steering
    samples = len(config.prompts) * len(steering.seeds)
    curves = len(steering.layers) * len(steering.features)
    grid = uniform_grid_generations(search, samples) * curves
    return (f"scale search of {len(steering.layers)} layers x {len(steering.features)} features ({curves} curves) "
            f"over {len(config.prompts)} prompts x {len(steering.seeds)} seeds, scales {search.low:g}..{search.high:g}"
            f" to within {search.tolerance:g}, at most {search.max_rounds} rounds; round 1: {first_round_generations} "
            f"generations (a uniform grid of spacing {search.tolerance:g}: {grid})")


def replica_outline(cluster: ClusterConfig) -> str | None:
    """What one slice replica spans and reserves, in words (None for `replica: host`)."""
    if cluster.replica != "slice":
        return None
    bundle = {key: int(value) if float(value).is_integer() else value for key, value in cluster.host_bundle().items()}
    shape = cluster.tpu_slice()
    if shape is None:
        strategy = "STRICT_SPREAD" if cluster.placement == "spread" else "PACK"
        return (f"{cluster.hosts_per_replica} hosts, one gang member each; reserved as {cluster.hosts_per_replica} "
                f"bundles of {bundle} ({strategy} placement group)")
    return (f"a {shape.describe()}, one gang member each; reserved as {shape.hosts} bundles of {bundle} with "
            f"Ray's slice_placement_group({shape.topology!r}, {shape.ray_version!r}, chips_per_vm="
            f"{shape.chips_per_host}) on the hosts labelled ray.io/tpu-pod-type={shape.pod_type}")
