"""Config -> steering points -> jobs. Pure: no model, SAE or tracking here.

A point is one generation (prompt x layer x feature x scale x seed); its `point_key` identifies the result across
runs, so a resumed sweep can skip what is already logged.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from runner.config.schema import ExperimentConfig, ModelConfig
from runner.errors import PlanError

#: Fields of `SteeringPoint` that do not change the generation, so stay out of its key (`dtype` is what
#: `model.dtype` resolved to, which `model_id` already fixes for a given checkpoint).
_NOT_IN_KEY = frozenset({"neuronpedia_url", "dtype"})
#: Fields that do not change an unsteered (baseline) generation.
_NOT_IN_GENERATION_KEY = frozenset({"neuronpedia_url", "dtype", "layer", "feature", "sae_id", "positions"})
#: Fields that do not change an ablation (the feature is clamped to 0 whatever the scale).
_NOT_IN_ABLATION_KEY = frozenset({"neuronpedia_url", "dtype", "scale"})
#: Fields that vary along one steering curve (a curve is everything else: layer, feature, mode, positions, ...).
_NOT_IN_CURVE_KEY = frozenset({"neuronpedia_url", "dtype", "prompt_index", "prompt", "scale", "seed"})
#: Fields added after keys were first given out: left out of a key while they hold their default, so the points
#: of earlier sweeps keep their keys.
_KEYED_WHEN_SET: dict[str, Any] = {"exclude_unknown_tokens": False, "combined_with": ()}
#: MLflow params named otherwise than the point field they hold.
_PARAM_FIELD = {"model": "model_id", "l0_target": "l0"}
#: Most points a sweep may have (`RUNNER_MAX_POINTS` overrides it): a bigger grid is refused before it is expanded.
MAX_POINTS = 1_000_000
MAX_POINTS_ENV = "RUNNER_MAX_POINTS"


def _digest(data: Any) -> str:
    """First 16 hex digits of the sha256 of `data`'s canonical JSON."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Intervention:
    """One more intervention of a combination point, besides the point's own (layer, feature, scale, mode)."""

    layer: int
    feature: int
    scale: float
    mode: str
    sae_id: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", float(self.scale))

    @property
    def label(self) -> str:
        """`L{layer}F{feature}`: how the intervention's metrics are named (`steer/L20F3124/concept_rate`)."""
        return f"L{self.layer}F{self.feature}"

    def describe(self) -> str:
        """E.g. `L12F10004 add 40`."""
        return f"{self.label} {self.mode} {self.scale:g}"


@dataclasses.dataclass(frozen=True)
class SteeringPoint:
    """One steered generation: a prompt, an intervention (and, for a combination, `combined_with` more) and the
    sampling settings."""

    prompt_index: int
    prompt: str
    layer: int
    feature: int
    scale: float
    seed: int
    mode: str
    positions: str
    temperature: float
    top_k: int | None
    top_p: float | None
    max_new_tokens: int
    model_id: str
    sae_id: str
    neuronpedia_url: str | None = None
    exclude_unknown_tokens: bool = False
    dtype: str = ""
    combined_with: tuple[Intervention, ...] = ()

    #: The MLflow params of a point, in the order they are logged and `runner export` writes them (a combination
    #: point adds `combined_with`).
    PARAM_NAMES: ClassVar[tuple[str, ...]] = ("model", "sae_id", "layer", "feature", "scale", "seed", "temperature",
                                              "top_k", "top_p", "mode", "positions", "prompt_index", "max_new_tokens",
                                              "dtype", "exclude_unknown_tokens")

    def __post_init__(self) -> None:
        # 10 and 10.0 must give the same key.
        object.__setattr__(self, "scale", float(self.scale))
        object.__setattr__(self, "temperature", float(self.temperature))
        if self.top_p is not None:
            object.__setattr__(self, "top_p", float(self.top_p))

    @functools.cached_property
    def point_key(self) -> str:
        """16 hex digits identifying the result: a hash of every field but `neuronpedia_url` and `dtype` (and those
        of `_KEYED_WHEN_SET` at their defaults)."""
        return _digest(_keyed_fields(self, _NOT_IN_KEY))

    @property
    def interventions(self) -> tuple[Intervention, ...]:
        """Every intervention of the point, its own first."""
        own = Intervention(self.layer, self.feature, self.scale, self.mode, self.sae_id)
        return (own, *self.combined_with)

    @property
    def is_baseline(self) -> bool:
        """An `add` point at scale 0 (not a combination): the unsteered model, whatever its layer and feature."""
        return self.mode == "add" and self.scale == 0.0 and not self.combined_with

    @functools.cached_property
    def generation_key(self) -> str:
        """Points with equal keys generate identical tokens: a baseline's key leaves out layer and feature, so
        one unsteered generation per (prompt, seed, sampling settings) serves them all, and an ablation's leaves
        out the scale it ignores, so the scales of an `ablate` sweep share one generation."""
        if self.mode == "ablate":
            return _digest({"ablation": _keyed_fields(self, _NOT_IN_ABLATION_KEY)})
        if not self.is_baseline:
            return self.point_key
        return _digest({"baseline": _keyed_fields(self, _NOT_IN_GENERATION_KEY)})

    @functools.cached_property
    def curve_key(self) -> str:
        """16 hex digits naming the point's steering curve: the same intervention (layer, feature, mode,
        positions, SAE, model, sampling settings) at every scale, prompt and seed of the sweep."""
        return _digest({"curve": _keyed_fields(self, _NOT_IN_CURVE_KEY)})

    def params(self) -> dict[str, str]:
        """Returns the MLflow params of this point (all strings; None as "None"), in `PARAM_NAMES` order; a
        combination adds `combined_with` (e.g. `L12F10004 add 40`, `; `-separated)."""
        return {name: str(value) for name, value in self.param_values().items()}

    def param_values(self) -> dict[str, Any]:
        """The values behind `params`, with their types (int, float, str or None), in `PARAM_NAMES` order; a
        combination adds `combined_with`."""
        values = _param_values(self)
        if self.combined_with:
            values["combined_with"] = "; ".join(intervention.describe() for intervention in self.combined_with)
        return values


def _keyed_fields(point: SteeringPoint, left_out: frozenset[str]) -> dict[str, Any]:
    return {
        name: value
        for name, value in dataclasses.asdict(point).items()
        if name not in left_out and not (name in _KEYED_WHEN_SET and value == _KEYED_WHEN_SET[name])
    }


@dataclasses.dataclass(frozen=True)
class SAEEvalPoint:
    """One SAE measured on the sweep's evaluation text.

    Attributes:
      layer: Block whose site the SAE reads.
      site: `res`, `mlp` or `att` (`runner.nn.sites`).
      width: Width label (`16k`; synthetic: the latent count).
      l0: The requested L0: `canonical`, the N of `average_l0_N`, or a synthetic SAE's target L0.
      sae_id: The resolved SAE (e.g. `gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71`).
      model_id: The model (`model_id`).
      text: Where the evaluation text came from.
      text_digest: Hash of the evaluation tokens (`runner.sae_eval.text_sets.EvalTokens.digest`).
      context_length: Tokens per sequence, BOS included.
      num_sequences: Sequences evaluated.
      dtype: What `model.dtype` resolved to (a param; not in the key, `model_id` fixes it).
    """

    layer: int
    site: str
    width: str
    l0: str
    sae_id: str
    model_id: str
    text: str
    text_digest: str
    context_length: int
    num_sequences: int
    dtype: str = ""

    #: The MLflow params of a point, in the order they are logged and `runner export` writes them.
    PARAM_NAMES: ClassVar[tuple[str, ...]] = ("model", "sae_id", "layer", "site", "width", "l0_target", "text",
                                              "text_digest", "context_length", "num_sequences", "dtype")

    @functools.cached_property
    def point_key(self) -> str:
        """16 hex digits identifying the result: a hash of every field but `dtype`."""
        fields = dataclasses.asdict(self)
        del fields["dtype"]
        return _digest({"sae_eval": fields})

    def params(self) -> dict[str, str]:
        """Returns the MLflow params of this point (all strings), in `PARAM_NAMES` order."""
        return _params(self)


Point = SteeringPoint | SAEEvalPoint


def _param_values(point: Point) -> dict[str, Any]:
    """The point's `PARAM_NAMES` fields, in that order."""
    fields = dataclasses.asdict(point)
    return {name: fields[_PARAM_FIELD.get(name, name)] for name in point.PARAM_NAMES}


def _params(point: Point) -> dict[str, str]:
    """The point's `PARAM_NAMES` fields as MLflow params (`str` of each value), in that order."""
    return {name: str(value) for name, value in _param_values(point).items()}


@dataclasses.dataclass(frozen=True)
class Job:
    """Points run together (a batch of generations, or SAEs sharing forward passes); `job_id` depends only on its
    points, not on the sweep."""

    job_id: str
    points: tuple[Point, ...]


def sweep_id(config: ExperimentConfig) -> str:
    """16 hex digits identifying a sweep's results: a hash of the config without `tracking` and `cluster`."""
    data = config.canonical_dict()
    data.pop("tracking", None)
    data.pop("cluster", None)
    return _digest(data)


def model_id(model: ModelConfig) -> str:
    """Names a checkpoint, e.g. `kaggle:gemma2-2b`, `synthetic:tiny:seed0`, `local:/abs/path`,
    `huggingface:google/gemma-2-2b` (each source's `checkpoint_name`); a non-default dtype or upcasting is appended
    (`...:bfloat16:upcast`)."""
    name = model.checkpoint_name()
    if model.dtype != "auto":
        name += f":{model.dtype}"
    if model.upcast_activations:
        name += ":upcast"
    return name


def max_points() -> int:
    """The most points a sweep may have: `RUNNER_MAX_POINTS`, else `MAX_POINTS`.

    Raises:
      PlanError: `RUNNER_MAX_POINTS` is not a positive integer.
    """
    text = os.environ.get(MAX_POINTS_ENV)
    if text is None:
        return MAX_POINTS
    if not text.strip().isdigit() or int(text) < 1:
        raise PlanError(f"{MAX_POINTS_ENV}: {text!r} is not allowed (allowed: a positive integer)")
    return int(text)


def grid_size(config: ExperimentConfig, num_layers: int | None = None) -> int:
    """The points of the config's grid, counted without expanding it (an SAE evaluation of `layers: all` counts
    `num_layers` layers, 1 while unknown)."""
    if config.kind == "steering":
        steering = config.steering
        per_prompt_and_seed = len(steering.layers) * len(steering.features) * scales_per_curve(config)
        per_prompt_and_seed += len(steering.combinations)
        return len(config.prompts) * per_prompt_and_seed * len(steering.seeds)
    grid = config.sae_eval
    layers = (num_layers or 1) if grid.layers == "all" else len(grid.layers)
    return math.prod((layers, len(grid.widths), len(grid.l0s)))


def scales_per_curve(config: ExperimentConfig) -> int:
    """The scales of one steering curve: `steering.scales`, or at most what a search evaluates (its first round's
    bracket ends, candidates and baseline, then per round the candidates of the target's and the bound's
    brackets, and the doubled upper ends)."""
    steering, search = config.steering, config.search
    if search is None:
        return len(steering.scales or ())
    per_later_round = search.candidates_per_round * (2 if search.keep is not None else 1)
    return search.candidates_per_round + 3 + (search.max_rounds - 1) * per_later_round + search.max_growth


def check_grid_size(config: ExperimentConfig, num_layers: int | None = None, *, source: Path | None = None) -> None:
    """Refuses a grid of more than `max_points()` points, before anything is expanded or resolved.

    Raises:
      PlanError: One line with the grid, its point count and the limit (after the file, when `source` is given).
    """
    count, limit = grid_size(config, num_layers), max_points()
    if count <= limit:
        return
    if config.kind == "steering":
        steering = config.steering
        grid = (f"{len(config.prompts):,} prompts x {len(steering.layers):,} layers x {len(steering.features):,} "
                f"features x {scales_per_curve(config):,} scales x {len(steering.seeds):,} seeds")
        if steering.combinations:
            grid += f" (+ {len(steering.combinations):,} combinations per prompt and seed)"
        field = "steering"
    else:
        grid, field = "layers x sae_eval.widths x sae_eval.l0s", "sae_eval"
    where = f"{source}: " if source is not None else ""
    raise PlanError(
        f"{where}{field}: {grid} is {count:,} points (allowed: at most {limit:,}; set {MAX_POINTS_ENV} to raise the "
        "limit, or split the sweep)"
    )


def expand_points(
    config: ExperimentConfig,
    sae_ids: Mapping[int, str],
    neuronpedia: Callable[[int, int], str | None] | None = None,
    scales: Mapping[tuple[int, int], Sequence[float]] | None = None,
    dtype: str = "",
) -> list[SteeringPoint]:
    """Returns every point of the sweep, curve by curve: the grid in the order layers x features x prompts x scales x
    seeds, so that the jobs finish one steering curve (a layer and feature over every prompt, scale and seed) after
    another, and each curve can be logged while the sweep goes on; then the combinations in the order combinations
    x prompts x seeds.

    Args:
      config: The experiment.
      sae_ids: The SAE id steered at each layer of `config.steering.sae_layers`.
      neuronpedia: `(layer, feature) -> url or None`, the dashboard link of a feature.
      scales: The scales of each `(layer, feature)` curve (a search round's candidates; a curve left out gets
        none); default: `steering.scales` for every curve.
      dtype: What `model.dtype` resolves to (a param of every point).

    Raises:
      PlanError: A steered layer has no SAE id, a search sweep is expanded without its scales, or the grid has
        more than `max_points()` points.
    """
    check_grid_size(config)
    steering, sampling = config.steering, config.sampling
    missing = [layer for layer in steering.sae_layers if layer not in sae_ids]
    if missing:
        raise PlanError(f"steering.layers: no SAE id for layer(s) {missing} (have {sorted(sae_ids)})")
    if scales is None and config.search is not None:
        raise PlanError("steering.scales: a search sweep's points are expanded round by round, with their scales")

    def scales_of(layer: int, feature: int) -> Sequence[float]:
        return (steering.scales or ()) if scales is None else scales.get((layer, feature), ())

    name = model_id(config.model)

    def point(prompt_index: int, prompt: str, seed: int, own: Intervention,
              others: Sequence[Intervention] = ()) -> SteeringPoint:
        return SteeringPoint(
            prompt_index=prompt_index,
            prompt=prompt,
            layer=own.layer,
            feature=own.feature,
            scale=own.scale,
            seed=seed,
            mode=own.mode,
            positions=steering.positions,
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            max_new_tokens=sampling.max_new_tokens,
            model_id=name,
            sae_id=own.sae_id,
            neuronpedia_url=neuronpedia(own.layer, own.feature) if neuronpedia is not None else None,
            exclude_unknown_tokens=sampling.exclude_unknown_tokens,
            dtype=dtype,
            combined_with=tuple(others),
        )

    grid = [
        point(prompt_index, prompt, seed, Intervention(layer, feature, scale, steering.mode, sae_ids[layer]))
        for layer in steering.layers
        for feature in steering.features
        for prompt_index, prompt in enumerate(config.prompts)
        for scale in scales_of(layer, feature)
        for seed in steering.seeds
    ]
    if scales is not None:
        return grid  # a search round: combinations are not searched
    combinations = [
        [Intervention(i.layer, i.feature, i.scale, i.mode or steering.mode, sae_ids[i.layer]) for i in combination]
        for combination in steering.combinations
    ]
    return grid + [
        point(prompt_index, prompt, seed, own, others)
        for own, *others in combinations
        for prompt_index, prompt in enumerate(config.prompts)
        for seed in steering.seeds
    ]


def pack_jobs(points: Sequence[SteeringPoint], batch_size: int) -> list[Job]:
    """Splits points, in order, into consecutive jobs of at most `batch_size` distinct generations.

    Baseline points that share a `generation_key` share one batch row, so a job may hold more points than rows.

    Raises:
      PlanError: `batch_size` < 1.
    """
    if batch_size < 1:
        raise PlanError(f"batch size {batch_size} is not allowed (allowed: >= 1)")
    return [_job(chunk) for chunk in split_by_generations(points, batch_size)]


def _job(points: Sequence[Point]) -> Job:
    return Job(job_id=_digest([p.point_key for p in points]), points=tuple(points))


def split_by_generations(points: Sequence[SteeringPoint], limit: int) -> list[list[SteeringPoint]]:
    """Consecutive chunks of `points`, each with at most `limit` distinct `generation_key`s."""
    chunks: list[list[SteeringPoint]] = []
    generations: set[str] = set()
    for point in points:
        if not chunks or (point.generation_key not in generations and len(generations) == limit):
            chunks.append([])
            generations = set()
        chunks[-1].append(point)
        generations.add(point.generation_key)
    return chunks


def expand_sae_eval_points(
    config: ExperimentConfig,
    layers: Sequence[int],
    sae_ids: Mapping[tuple[int, str, str], str],
    *,
    text: str,
    text_digest: str,
    dtype: str = "",
) -> list[SAEEvalPoint]:
    """Returns every SAE of the evaluation grid in the order layers x widths x l0s.

    Args:
      config: The experiment (with `sae_eval`).
      layers: The evaluated blocks (`sae_eval.layers` with `all` resolved).
      sae_ids: The SAE id of each `(layer, width, l0)`, l0 as its string (`canonical`, `71`).
      text, text_digest: The evaluation text's description and token hash.
      dtype: What `model.dtype` resolves to (a param of every point).

    Raises:
      PlanError: An SAE of the grid has no id.
    """
    grid = config.sae_eval
    check_grid_size(config, len(layers))
    name = model_id(config.model)
    keys = [(layer, width, str(l0)) for layer in layers for width in grid.widths for l0 in grid.l0s]
    missing = [key for key in keys if key not in sae_ids]
    if missing:
        raise PlanError(f"sae_eval: no SAE id for (layer, width, l0) {missing[:3]}")
    return [
        SAEEvalPoint(
            layer=layer,
            site=config.sae.site,
            width=width,
            l0=l0,
            sae_id=sae_ids[(layer, width, l0)],
            model_id=name,
            text=text,
            text_digest=text_digest,
            context_length=grid.context_length,
            num_sequences=grid.num_sequences,
            dtype=dtype,
        )
        for layer, width, l0 in keys
    ]


def pack_sae_eval_jobs(points: Sequence[SAEEvalPoint], saes_per_job: int) -> list[Job]:
    """Splits SAE evaluation points, in order, into consecutive jobs of at most `saes_per_job` SAEs.

    Raises:
      PlanError: `saes_per_job` < 1.
    """
    if saes_per_job < 1:
        raise PlanError(f"saes per job {saes_per_job} is not allowed (allowed: >= 1)")
    return [_job(points[start : start + saes_per_job]) for start in range(0, len(points), saes_per_job)]
