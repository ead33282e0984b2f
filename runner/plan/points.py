"""Config -> steering points -> jobs. Pure: no model, SAE or tracking here.

A point is one generation (prompt x layer x feature x scale x seed); its `point_key` identifies the result across
runs, so a resumed sweep can skip what is already logged.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from runner.config.schema import ExperimentConfig, ModelConfig
from runner.errors import PlanError

#: Fields of `SteeringPoint` that do not change the generation, so stay out of its key (`dtype` is what
#: `model.dtype` resolved to, which `model_id` already fixes for a given checkpoint).
_NOT_IN_KEY = frozenset({"neuronpedia_url", "dtype"})
#: Fields that do not change an unsteered (baseline) generation.
_NOT_IN_GENERATION_KEY = frozenset({"neuronpedia_url", "dtype", "layer", "feature", "sae_id", "positions"})
#: Fields added after keys were first given out: left out of a key while they hold their default, so the points
#: of earlier sweeps keep their keys.
_KEYED_WHEN_SET = {"exclude_unknown_tokens": False}
#: MLflow params named otherwise than the point field they hold.
_PARAM_FIELD = {"model": "model_id", "l0_target": "l0"}


def _digest(data: Any) -> str:
    """First 16 hex digits of the sha256 of `data`'s canonical JSON."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class SteeringPoint:
    """One steered generation: a prompt, an intervention and the sampling settings."""

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

    #: The MLflow params of a point, in the order they are logged and `runner export` writes them.
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
        """16 hex digits identifying the result: a hash of every field but `neuronpedia_url` and `dtype`."""
        return _digest(_keyed_fields(self, _NOT_IN_KEY))

    @property
    def is_baseline(self) -> bool:
        """An `add` point at scale 0: the unsteered model, whatever its layer and feature."""
        return self.mode == "add" and self.scale == 0.0

    @functools.cached_property
    def generation_key(self) -> str:
        """Points with equal keys generate identical tokens: a baseline's key leaves out layer and feature, so
        one unsteered generation per (prompt, seed, sampling settings) serves them all."""
        if not self.is_baseline:
            return self.point_key
        return _digest({"baseline": _keyed_fields(self, _NOT_IN_GENERATION_KEY)})

    def params(self) -> dict[str, str]:
        """Returns the MLflow params of this point (all strings; None as "None"), in `PARAM_NAMES` order."""
        return _params(self)


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


def _params(point: Point) -> dict[str, str]:
    """The point's `PARAM_NAMES` fields as MLflow params (`str` of each value), in that order."""
    fields = dataclasses.asdict(point)
    return {name: str(fields[_PARAM_FIELD.get(name, name)]) for name in point.PARAM_NAMES}


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


def expand_points(
    config: ExperimentConfig,
    sae_ids: Mapping[int, str],
    neuronpedia: Callable[[int, int], str | None] | None = None,
    dtype: str = "",
) -> list[SteeringPoint]:
    """Returns every point of the sweep in the order prompts x layers x features x scales x seeds.

    Args:
      config: The experiment.
      sae_ids: The SAE id steered at each layer of `config.steering.layers`.
      neuronpedia: `(layer, feature) -> url or None`, the dashboard link of a feature.
      dtype: What `model.dtype` resolves to (a param of every point).

    Raises:
      PlanError: A steered layer has no SAE id.
    """
    steering, sampling = config.steering, config.sampling
    missing = [layer for layer in steering.layers if layer not in sae_ids]
    if missing:
        raise PlanError(f"steering.layers: no SAE id for layer(s) {missing} (have {sorted(sae_ids)})")
    name = model_id(config.model)
    return [
        SteeringPoint(
            prompt_index=prompt_index,
            prompt=prompt,
            layer=layer,
            feature=feature,
            scale=scale,
            seed=seed,
            mode=steering.mode,
            positions=steering.positions,
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            max_new_tokens=sampling.max_new_tokens,
            model_id=name,
            sae_id=sae_ids[layer],
            neuronpedia_url=neuronpedia(layer, feature) if neuronpedia is not None else None,
            exclude_unknown_tokens=sampling.exclude_unknown_tokens,
            dtype=dtype,
        )
        for prompt_index, prompt in enumerate(config.prompts)
        for layer in steering.layers
        for feature in steering.features
        for scale in steering.scales
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
