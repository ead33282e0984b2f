"""The experiment schema: the pydantic models of one experiment file, frozen once validated.

The sections whose fields depend on where something comes from (`model`, `sae`, `sae_eval.text`) are unions
discriminated by `source`: one class per source, holding only that source's fields. Validators raise `invalid(...)`
errors whose message is final; `runner.config.messages` turns every error into one line.
"""

from __future__ import annotations

import abc
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from runner import gemma_scope
from runner.config.tpu_slices import TPU_GENERATIONS, TpuSliceShape, tpu_slice_shape

KAGGLE_VARIANTS: tuple[str, ...] = (
    "gemma2-2b",
    "gemma2-2b-it",
    "gemma2-9b",
    "gemma2-9b-it",
    "gemma2-27b",
    "gemma2-27b-it",
)

#: Validation context key holding the directory relative paths are resolved against.
BASE_DIR = "base_dir"
#: Error types of `invalid`: a final message, and one whose location gets `ctx["field"]` appended.
MESSAGE_ERROR = "runner"
FIELD_MESSAGE_ERROR = "runner_field"

_MODEL_CONFIG = ConfigDict(extra="forbid", frozen=True, strict=True)
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]+$")


def invalid(message: str, field: str | None = None) -> PydanticCustomError:
    """A validation error whose message is final; `field`, when given, is appended to the error's location."""
    if field is None:
        return PydanticCustomError(MESSAGE_ERROR, message)
    return PydanticCustomError(FIELD_MESSAGE_ERROR, message, {"field": field})


def _not_blank(value: str) -> str:
    if not value.strip():
        raise invalid(f"{value!r} is blank (allowed: a non-empty prompt)")
    return value


def _accepted(accept: Callable[[str], object], what: str) -> AfterValidator:
    """A validator of the strings `accept` holds true; any other gets `'value' is not <what>`."""

    def check(value: str) -> str:
        if not accept(value):
            raise invalid(f"{value!r} is not {what}")
        return value

    return AfterValidator(check)


def _absolute_path(value: object, info: ValidationInfo) -> Path:
    """Accepts a string or Path and makes it absolute against the context's base directory (else the cwd)."""
    if not isinstance(value, (str, Path)) or str(value) == "":
        raise invalid(f"{value!r} is not a path")
    base = Path((info.context or {}).get(BASE_DIR) or Path.cwd())
    return Path(os.path.abspath(base / Path(value).expanduser()))


def _absolute_glob(value: object, info: ValidationInfo) -> str:
    return str(_absolute_path(value, info))


def _keyword_or_positive(keyword: str, meaning: str = "") -> BeforeValidator:
    """Accepts `keyword` or an integer >= 1 (not a boolean); anything else gets one message."""

    def check(value: object) -> object:
        if value == keyword or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise invalid(f"{value!r} is not allowed (allowed: {keyword!r} or an integer >= 1{meaning})")

    return BeforeValidator(check)


_RELEASES = ", ".join(gemma_scope.RELEASES)
_WIDTH_LABEL = re.compile(r"\d+[km]?")
_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")
_DATASET_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")

NonNegativeInt = Annotated[int, Field(ge=0)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Prompt = Annotated[str, AfterValidator(_not_blank)]
#: A path in the file, absolute once validated (relative ones are relative to the file's directory).
AbsolutePath = Annotated[Path, BeforeValidator(_absolute_path)]
AbsoluteGlob = Annotated[str, BeforeValidator(_absolute_glob)]
#: `auto` (runner chooses) or a count.
AutoOrPositive = Annotated[int | Literal["auto"], _keyword_or_positive("auto")]
#: The N of a Gemma Scope `average_l0_N` folder, or `canonical` (the release's L0 closest to 100).
L0 = Annotated[int | Literal["canonical"], _keyword_or_positive("canonical", ", the N of average_l0_N")]
Site = Literal["res", "mlp", "att"]
Column = Annotated[str, Field(min_length=1)]
#: A Gemma Scope width (`16k`) or, for synthetic SAEs, a latent count (`256`).
WidthLabel = Annotated[str, _accepted(_WIDTH_LABEL.fullmatch,
                                      f"a width label (allowed: {', '.join(gemma_scope.WIDTHS)}, or a latent count)")]
GemmaScopeRelease = Annotated[str, _accepted(gemma_scope.RELEASES.__contains__,
                                             f"a Gemma Scope release (allowed: {_RELEASES})")]
KaggleVariant = Annotated[str, _accepted(KAGGLE_VARIANTS.__contains__,
                                         f"a Kaggle Gemma2 variant (allowed: {', '.join(KAGGLE_VARIANTS)})")]
RepoId = Annotated[str, _accepted(_REPO_ID.fullmatch, "a Hugging Face repo id (like google/gemma-2-2b)")]
DatasetId = Annotated[str, _accepted(_DATASET_ID.fullmatch, "a Hugging Face dataset id (like NeelNanda/pile-10k)")]


# ---------------------------------------------------------------------------------------------------------------
# model: one class per checkpoint source


class _ModelSource(BaseModel):
    """What every model source has: the dtypes the model runs in."""

    model_config = _MODEL_CONFIG

    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    upcast_activations: bool = False

    @abc.abstractmethod
    def checkpoint_name(self) -> str:
        """Names the checkpoint, e.g. `kaggle:gemma2-2b` (the source and what it is within the source)."""


#: Synthetic model sizes: two small ones and the published Gemma2 shapes (`runner.model.synthetic.PRESETS`).
SyntheticPreset = Literal["tiny", "small", "gemma2-2b", "gemma2-9b", "gemma2-27b"]


class SyntheticModelConfig(_ModelSource):
    """A random Gemma2 of a preset size, written once under the cache directory (no download): `tiny` and `small`
    in float32, or the published Gemma2 shapes (`gemma2-2b`, `gemma2-9b`, `gemma2-27b`) in bfloat16 with the padded
    256,128-row vocabulary."""

    source: Literal["synthetic"] = "synthetic"
    preset: SyntheticPreset = "tiny"
    seed: int = 0

    def checkpoint_name(self) -> str:
        """`synthetic:<preset>:seed<seed>`."""
        return f"synthetic:{self.preset}:seed{self.seed}"


class KaggleModelConfig(_ModelSource):
    """A Gemma2 Flax checkpoint downloaded from Kaggle (`google/gemma-2/flax/<variant>`)."""

    source: Literal["kaggle"] = "kaggle"
    variant: KaggleVariant

    def checkpoint_name(self) -> str:
        """`kaggle:<variant>`."""
        return f"kaggle:{self.variant}"


class LocalModelConfig(_ModelSource):
    """A checkpoint directory in the Kaggle/Flax layout (orbax checkpoint and `tokenizer.model`)."""

    source: Literal["local"] = "local"
    path: AbsolutePath

    def checkpoint_name(self) -> str:
        """`local:<absolute path>`."""
        return f"local:{self.path}"


class HuggingFaceModelConfig(_ModelSource):
    """A checkpoint in the Hugging Face format: a repo to download, or a directory that holds one."""

    source: Literal["huggingface"] = "huggingface"
    path: AbsolutePath | None = None
    repo_id: RepoId | None = None

    @model_validator(mode="after")
    def _repo_or_path(self) -> HuggingFaceModelConfig:
        if (self.path is None) == (self.repo_id is None):
            raise invalid("source 'huggingface' needs exactly one of 'repo_id' (like google/gemma-2-2b) or 'path'")
        return self

    def checkpoint_name(self) -> str:
        """`huggingface:<repo id or absolute path>`."""
        return f"huggingface:{self.repo_id or self.path}"


#: Which Gemma2 checkpoint to load, and how.
ModelConfig = Annotated[
    SyntheticModelConfig | KaggleModelConfig | LocalModelConfig | HuggingFaceModelConfig,
    Field(discriminator="source"),
]


# ---------------------------------------------------------------------------------------------------------------
# sae: one class per SAE source


def _check_release_site(release: str | None, site: str) -> None:
    if release is not None and gemma_scope.release_site(release) != site:
        kind = gemma_scope.release_site(release)
        raise invalid(
            f"{release!r} holds {kind!r} SAEs but site is {site!r} (allowed: the -{site} releases)", "release"
        )


class _GemmaScopeFolders(BaseModel):
    """Where an SAE of the Gemma Scope layout is: `layer_L/width_W/average_l0_N`, L the steered layer."""

    model_config = _MODEL_CONFIG

    site: Site = "res"
    width: WidthLabel = "16k"
    l0: L0 = "canonical"


class HuggingFaceSAEConfig(_GemmaScopeFolders):
    """A Gemma Scope SAE downloaded from its release's Hugging Face repo."""

    source: Literal["huggingface"] = "huggingface"
    release: GemmaScopeRelease

    @model_validator(mode="after")
    def _fits_the_release(self) -> HuggingFaceSAEConfig:
        if self.width not in gemma_scope.WIDTHS:
            raise invalid(f"{self.width!r} is not a Gemma Scope width (allowed: {', '.join(gemma_scope.WIDTHS)})",
                          "width")
        widths = gemma_scope.release_widths(self.release)
        if self.width not in widths:
            raise invalid(f"{self.width!r} is not a width of {self.release!r} (allowed: {', '.join(widths)})", "width")
        _check_release_site(self.release, self.site)
        return self


class LocalSAEConfig(_GemmaScopeFolders):
    """SAEs in a local tree of the Gemma Scope layout, or one `params.npz` file (for one steered layer)."""

    source: Literal["local"] = "local"
    path: AbsolutePath
    release: GemmaScopeRelease | None = None

    @model_validator(mode="after")
    def _fits_the_release(self) -> LocalSAEConfig:
        _check_release_site(self.release, self.site)
        return self


class SyntheticSAEConfig(BaseModel):
    """Random JumpReLU SAEs fitted to the model, their thresholds calibrated to a target L0."""

    model_config = _MODEL_CONFIG

    source: Literal["synthetic"] = "synthetic"
    site: Site = "res"
    width_features: int | None = Field(default=None, ge=1)
    target_l0: float = Field(default=16.0, gt=0, allow_inf_nan=False)
    seed: int = 0


#: Which sparse autoencoder to steer with (one per steered layer), or the release an evaluation measures.
SAEConfig = Annotated[HuggingFaceSAEConfig | LocalSAEConfig | SyntheticSAEConfig, Field(discriminator="source")]


# ---------------------------------------------------------------------------------------------------------------
# sae_eval.text: one class per text source


class BundledTextConfig(BaseModel):
    """The public-domain prose shipped with runner."""

    model_config = _MODEL_CONFIG

    source: Literal["bundled"] = "bundled"


class FileTextConfig(BaseModel):
    """A user's text files: a path or a glob (`.txt`, `.md`, `.jsonl`, `.json`, `.parquet`)."""

    model_config = _MODEL_CONFIG

    source: Literal["file"] = "file"
    path: AbsoluteGlob
    column: Column = "text"


class HuggingFaceTextConfig(BaseModel):
    """Files of a Hugging Face dataset repo."""

    model_config = _MODEL_CONFIG

    source: Literal["huggingface"] = "huggingface"
    dataset: DatasetId
    files: list[str] = Field(
        min_length=1,
        description="the files of the dataset repo to read, e.g. ['data/train-00000-of-00001.parquet'] (globs allowed)",
    )
    column: Column = "text"


#: The text an SAE evaluation runs on (`source` defaults to `bundled`).
TextSetConfig = Annotated[BundledTextConfig | FileTextConfig | HuggingFaceTextConfig, Field(discriminator="source")]


# ---------------------------------------------------------------------------------------------------------------
# The sweep grids, sampling, tracking and cluster


def _unique(values: list[Any], what: str) -> list[Any]:
    duplicates = sorted({v for v in values if values.count(v) > 1})
    if duplicates:
        raise invalid(f"repeats {duplicates} (allowed: each {what} once)")
    return values


SteeringMode = Literal["add", "clamp", "ablate"]
#: Most interventions in one combination (the K of the compiled program is the sweep's largest combination).
MAX_COMBINATION = 8


class InterventionConfig(BaseModel):
    """One intervention of a combination: steer `feature` of the layer-`layer` SAE at `scale` (`mode` defaults
    to `steering.mode`)."""

    model_config = _MODEL_CONFIG

    layer: NonNegativeInt
    feature: NonNegativeInt
    scale: FiniteFloat
    mode: SteeringMode | None = None


class SteeringConfig(BaseModel):
    """The sweep grid: every layer x feature x scale x seed is steered on every prompt (with a `search` section,
    the scales are the search's, not a list); and `combinations`, each several interventions in one generation,
    run on every prompt x seed as points of their own."""

    model_config = _MODEL_CONFIG

    layers: list[NonNegativeInt] = Field(default_factory=list)
    features: list[NonNegativeInt] = Field(default_factory=list)
    scales: list[FiniteFloat] | None = Field(default=None, min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    mode: SteeringMode = "add"
    positions: Literal["all", "skip_bos", "generated"] = "all"
    combinations: list[Annotated[list[InterventionConfig], Field(min_length=2, max_length=MAX_COMBINATION)]] = \
        Field(default_factory=list)

    @field_validator("layers", "features", "scales", "seeds")
    @classmethod
    def _each_once(cls, values: list[Any], info: ValidationInfo) -> list[Any]:
        return _unique(values, info.field_name.removesuffix("s")) if values is not None else values

    @model_validator(mode="after")
    def _grid_or_combinations(self) -> SteeringConfig:
        if not self.combinations or self.layers or self.features:
            for field in ("layers", "features"):
                if field in self.model_fields_set and not getattr(self, field):
                    raise invalid("must not be empty", field)
                if not getattr(self, field):
                    raise invalid("is required (a list, unless only 'combinations' are given)", field)
        for index, combination in enumerate(self.combinations):
            steered = [(intervention.layer, intervention.feature) for intervention in combination]
            twice = sorted({pair for pair in steered if steered.count(pair) > 1})
            if twice:
                raise invalid(f"steers (layer, feature) {twice} twice (allowed: each once per combination)",
                              f"combinations.{index}")
        return self

    @property
    def has_grid(self) -> bool:
        """Whether the section has a layer x feature grid (else only combinations)."""
        return bool(self.layers)

    @property
    def sae_layers(self) -> list[int]:
        """Every layer steered, by the grid or a combination (each needs its SAE), ascending."""
        combined = {intervention.layer for combination in self.combinations for intervention in combination}
        return sorted(set(self.layers) | combined)

    @property
    def max_interventions(self) -> int:
        """Interventions per row of the compiled program: the largest combination's size, else 1."""
        return max((len(combination) for combination in self.combinations), default=1)


#: The per-point steering metrics (`runner.steering.metrics`) a search may target or bound.
STEERING_METRICS: tuple[str, ...] = (
    "steer/concept_rate", "steer/concept_activation", "steer/logit_lens_mass", "steer/feature_activation",
    "steer/feature_firing_rate", "steer/l0", "steer/nll", "steer/perplexity", "steer/kl_steered_base",
    "steer/kl_base_steered", "steer/entropy_base", "steer/entropy_steered", "gen/distinct_1", "gen/distinct_2",
    "gen/longest_repeat", "gen/num_tokens", "gen/measured_tokens",
)
_BOUND_FIELDS = ("at_least", "at_most", "at_least_above_baseline", "at_most_above_baseline")


class SearchCriterionConfig(BaseModel):
    """A condition on a steering metric at one scale, judged on its 95% interval over prompts and seeds: exactly
    one of `at_least`, `at_most`, or the same relative to the unsteered baseline (`..._above_baseline`: the
    difference from scale 0, paired by prompt and seed)."""

    model_config = _MODEL_CONFIG

    metric: Annotated[str, _accepted(STEERING_METRICS.__contains__,
                                     f"a steering metric (allowed: {', '.join(STEERING_METRICS)})")]
    at_least: FiniteFloat | None = None
    at_most: FiniteFloat | None = None
    at_least_above_baseline: FiniteFloat | None = None
    at_most_above_baseline: FiniteFloat | None = None

    @model_validator(mode="after")
    def _one_bound(self) -> SearchCriterionConfig:
        given = [name for name in _BOUND_FIELDS if getattr(self, name) is not None]
        if len(given) != 1:
            raise invalid(f"sets {given or 'no bound'} (allowed: exactly one of {', '.join(_BOUND_FIELDS)})")
        return self

    @property
    def bound(self) -> tuple[Literal["at_least", "at_most"], float, bool]:
        """`(direction, threshold, relative to the baseline)`."""
        name = next(name for name in _BOUND_FIELDS if getattr(self, name) is not None)
        direction: Literal["at_least", "at_most"] = "at_least" if name.startswith("at_least") else "at_most"
        return direction, float(getattr(self, name)), name.endswith("_above_baseline")


class SearchScalesConfig(BaseModel):
    """The bracket a scale search starts from."""

    model_config = _MODEL_CONFIG

    low: FiniteFloat = 0.0
    high: FiniteFloat

    @model_validator(mode="after")
    def _ordered(self) -> SearchScalesConfig:
        if not self.low < self.high:
            raise invalid(f"low {self.low} is not below high {self.high} (allowed: low < high)")
        return self


class SearchConfig(BaseModel):
    """An adaptive scale search per steering curve (layer x feature), instead of `steering.scales`: the smallest
    scale whose interval meets `target`, and with `keep` the largest whose interval keeps that bound, found in
    rounds that narrow each curve's bracket (`runner.plan.search`)."""

    model_config = _MODEL_CONFIG

    target: SearchCriterionConfig
    keep: SearchCriterionConfig | None = None
    scales: SearchScalesConfig
    tolerance: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    max_rounds: Annotated[int, Field(ge=1, le=64)] = 8
    candidates_per_round: Annotated[int, Field(ge=1, le=64)] = 3
    max_growth: Annotated[int, Field(ge=0, le=16)] = 4


class SAEEvalConfig(BaseModel):
    """An SAE evaluation sweep: every layer x width x L0 of one release, measured on one text set."""

    model_config = _MODEL_CONFIG

    layers: list[NonNegativeInt] | Literal["all"] = "all"
    widths: list[WidthLabel] = Field(min_length=1)
    l0s: list[Annotated[int, Field(ge=1)] | Literal["canonical"]] = Field(min_length=1)
    text: TextSetConfig = Field(default_factory=BundledTextConfig)
    context_length: int = Field(default=128, ge=2, le=8192)
    num_sequences: int = Field(default=32, ge=1)
    batch_size: int = Field(default=8, ge=1)
    saes_per_job: AutoOrPositive = "auto"
    table_sequences: int = Field(default=4, ge=0)

    @field_validator("layers", mode="before")
    @classmethod
    def _layers_value(cls, value: Any) -> Any:
        if value == "all" or isinstance(value, list):
            return value
        raise invalid(f"{value!r} is not allowed (allowed: 'all' or a list of block indices)")

    @field_validator("text", mode="before")
    @classmethod
    def _bundled_by_default(cls, value: Any) -> Any:
        if isinstance(value, Mapping) and "source" not in value:
            return {"source": "bundled", **value}
        return value

    @field_validator("layers", "widths", "l0s")
    @classmethod
    def _each_once(cls, values: Any, info: ValidationInfo) -> Any:
        if values == "all":
            return values
        if info.field_name == "layers" and not values:
            raise invalid("must not be empty")
        return _unique(values, info.field_name.removesuffix("s"))


class SamplingConfig(BaseModel):
    """How tokens are generated."""

    model_config = _MODEL_CONFIG

    max_new_tokens: int = Field(default=32, ge=1, le=4096)
    temperature: float = Field(default=0.0, ge=0.0, allow_inf_nan=False)
    top_k: int | None = Field(default=None, ge=1)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    batch_size: AutoOrPositive = "auto"
    #: Never sample an id the tokenizer has no piece for (Gemma2's Kaggle checkpoints have 256,128 embedding rows
    #: and 256,000 pieces). Off by default, so generations equal the reference implementation's.
    exclude_unknown_tokens: bool = False


class TrackingConfig(BaseModel):
    """Where the sweep is logged (MLflow). `experiment` defaults to the experiment's `name`."""

    model_config = _MODEL_CONFIG

    uri: str = Field(default="sqlite:///mlflow.db", min_length=1)
    experiment: str | None = Field(default=None, min_length=1)
    retry_timeout_s: float = Field(default=600.0, gt=0, allow_inf_nan=False)

    @field_validator("uri")
    @classmethod
    def _no_credentials(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.username is not None or parts.password is not None:
            redacted = f"{parts.scheme}://***@{parts.hostname or ''}..."
            raise invalid(
                f"{redacted!r} embeds credentials; remove them and set MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment instead"
            )
        return value


class ClusterConfig(BaseModel):
    """How many workers run the sweep and what each one needs (Ray).

    `resources` is what one worker (one host) requests: `CPU`, `GPU` and custom resources such as `TPU` (chips).
    `platform` is the JAX platform the workers must get; `auto` means tpu when a TPU resource is requested, gpu
    when a GPU is, else cpu. `address` joins a running Ray cluster; without it a local Ray is started.
    With `replica: slice`, `workers` counts slice replicas (one per slice); a TPU slice is named by its
    `slice_topology` and `accelerator_version` (as users name generations: v4, v5e, v5p, v6e), checked with Ray's
    own TPU functions (`runner.config.tpu_slices`), and `resources` is what each of its hosts has.
    """

    model_config = _MODEL_CONFIG

    workers: int = Field(default=1, ge=1)
    resources: dict[str, Annotated[float, Field(ge=0, allow_inf_nan=False)]] = Field(
        default_factory=lambda: {"CPU": 1.0}
    )
    address: str | None = None
    replica: Literal["host", "slice"] = "host"
    hosts_per_replica: int = Field(default=1, ge=1)
    slice_topology: str | None = None
    accelerator_version: Literal["v4", "v5e", "v5litepod", "v5p", "v6e"] | None = None
    placement: Literal["spread", "pack"] = "spread"
    max_job_retries: int = Field(default=2, ge=0)
    max_worker_crashes: int = Field(default=3, ge=1)
    platform: Literal["auto", "cpu", "gpu", "tpu"] = "auto"

    @model_validator(mode="after")
    def _slice_fields_fit_replica(self) -> ClusterConfig:
        if self.replica == "host":
            slice_only = {
                "hosts_per_replica": self.hosts_per_replica != 1,
                "slice_topology": self.slice_topology is not None,
                "accelerator_version": self.accelerator_version is not None,
                "placement": self.placement != "spread",
            }
            for field in (field for field, given in slice_only.items() if given):
                raise invalid("applies to cluster.replica 'slice' only (one replica spanning several hosts)", field)
        elif self.slice_topology is not None:
            if self.accelerator_version is None:
                raise invalid(f"is required with slice_topology (allowed: {', '.join(TPU_GENERATIONS)})",
                              "accelerator_version")
            if self.hosts_per_replica != 1:
                raise invalid("is given by slice_topology (the slice's hosts); leave it out", "hosts_per_replica")
            shape = self._checked_tpu_slice()
            if "TPU" not in self.resources:
                raise invalid(f"needs TPU: the chips of one host of the {shape.describe()} (allowed: resources: "
                              f"{{TPU: {shape.chips_per_host}}}, plus any custom resource of those hosts)", "resources")
        elif "hosts_per_replica" not in self.model_fields_set:
            raise invalid("is required with replica 'slice': the hosts one replica spans, e.g. 2 (or give "
                          "slice_topology and accelerator_version for a TPU slice)", "hosts_per_replica")
        return self

    @model_validator(mode="after")
    def _accelerator_platform_needs_its_resource(self) -> ClusterConfig:
        needed = {"tpu": "TPU", "gpu": "GPU"}.get(self.platform)
        if needed is not None and self.resources.get(needed, 0) <= 0:
            raise invalid(
                f"{self.platform!r} needs resources.{needed} (allowed: request every {needed} of a host, "
                f"e.g. resources: {{{needed}: {4 if needed == 'TPU' else 8}}}, or platform cpu)",
                "platform",
            )
        return self

    def _checked_tpu_slice(self) -> TpuSliceShape:
        try:
            return tpu_slice_shape(self.accelerator_version, self.slice_topology, self.resources.get("TPU"))
        except ValueError as error:
            field, _, message = str(error).partition(": ")
            raise invalid(message, field) from None

    def host_bundle(self) -> dict[str, float]:
        """What each host of a slice replica reserves (one placement-group bundle): `resources`, CPU 0 unless
        given."""
        return {"CPU": 0.0, **self.resources}

    def tpu_slice(self) -> TpuSliceShape | None:
        """The TPU slice one replica spans (`slice_topology` on `accelerator_version`), or None without one."""
        if self.replica != "slice" or self.slice_topology is None:
            return None
        return tpu_slice_shape(self.accelerator_version, self.slice_topology, self.resources.get("TPU"))

    def jax_platform(self) -> Literal["cpu", "gpu", "tpu"]:
        """The JAX platform workers must run on: `platform`, with `auto` resolved from `resources`."""
        if self.platform != "auto":
            return self.platform
        if self.resources.get("TPU", 0) > 0:
            return "tpu"
        if self.resources.get("GPU", 0) > 0:
            return "gpu"
        return "cpu"


# ---------------------------------------------------------------------------------------------------------------
# The experiment

SweepKind = Literal["steering", "sae_eval"]
#: SAE fields an evaluation grid sets, and the grid field that does.
_SAE_GRID_FIELDS = {"width": "sae_eval.widths", "l0": "sae_eval.l0s", "width_features": "sae_eval.widths",
                    "target_l0": "sae_eval.l0s"}


class ExperimentConfig(BaseModel):
    """One sweep: model, SAE, then either a steering grid (prompts, steering, sampling) or an SAE evaluation grid
    (`sae_eval`), and tracking and cluster."""

    model_config = _MODEL_CONFIG

    name: str
    model: ModelConfig
    sae: SAEConfig
    prompts: tuple[Prompt, ...] = ()
    steering: SteeringConfig | None = None
    search: SearchConfig | None = None
    sae_eval: SAEEvalConfig | None = None
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @model_validator(mode="before")
    @classmethod
    def _experiment_defaults_to_name(cls, data: Any) -> Any:
        if not isinstance(data, Mapping) or not isinstance(data.get("name"), str):
            return data
        if not _NAME_PATTERN.fullmatch(data["name"]):
            return data
        tracking = data.get("tracking", {})
        if isinstance(tracking, TrackingConfig) and tracking.experiment is None:
            return {**data, "tracking": tracking.model_copy(update={"experiment": data["name"]})}
        if isinstance(tracking, Mapping) and tracking.get("experiment") is None:
            return {**data, "tracking": {**tracking, "experiment": data["name"]}}
        return data

    @field_validator("name")
    @classmethod
    def _name_chars(cls, value: str) -> str:
        if not _NAME_PATTERN.fullmatch(value):
            raise invalid(f"{value!r} is not allowed (allowed: letters, digits, '_', '.', '-')")
        return value

    @field_validator("prompts", mode="before")
    @classmethod
    def _prompts_list(cls, value: Any) -> Any:
        if isinstance(value, list):
            return tuple(value)
        if isinstance(value, Mapping):
            raise invalid("{file: ...} is read by load_experiment (allowed here: a list of strings)")
        return value

    @model_validator(mode="after")
    def _one_kind_of_sweep(self) -> ExperimentConfig:
        if (self.steering is None) == (self.sae_eval is None):
            given = "both 'steering' and 'sae_eval' are" if self.steering is not None else \
                "neither 'steering' nor 'sae_eval' is"
            raise invalid(f"{given} given (allowed: exactly one of them: a steering sweep or an SAE evaluation)")
        if self.steering is not None:
            if not self.prompts:
                if "prompts" in self.model_fields_set:
                    raise invalid("must not be empty", "prompts")
                raise invalid("is required with steering (a list of strings, or {file: PATH})", "prompts")
            if self.sae.site != "res":
                raise invalid(f"{self.sae.site!r}: steering adds decoder rows to the residual stream (allowed: res)",
                              "sae.site")
            if isinstance(self.sae, HuggingFaceSAEConfig):
                _check_gemma_scope_folders(self.sae.release, self.steering.sae_layers, [self.sae.width],
                                           [self.sae.l0], "steering.layers", "sae.l0")
            self._check_scales_or_search()
            return self
        if self.search is not None:
            raise invalid("searches steering scales (allowed only with a steering section)", "search")
        if self.prompts:
            raise invalid("does not apply to sae_eval sweeps (they read sae_eval.text)", "prompts")
        if self.sampling != SamplingConfig():
            raise invalid("does not apply to sae_eval sweeps (they only read text)", "sampling")
        for field in sorted(self.sae.model_fields_set & set(_SAE_GRID_FIELDS)):
            raise invalid(f"is set by the evaluation grid (set {_SAE_GRID_FIELDS[field]} instead)", f"sae.{field}")
        if isinstance(self.sae, HuggingFaceSAEConfig):
            _check_evaluated_widths(self.sae.release, self.sae_eval.widths)
            if self.sae_eval.layers != "all":
                _check_gemma_scope_folders(self.sae.release, self.sae_eval.layers, self.sae_eval.widths,
                                           self.sae_eval.l0s, "sae_eval.layers", "sae_eval.l0s")
        if isinstance(self.sae, SyntheticSAEConfig) and "canonical" in self.sae_eval.l0s:
            raise invalid("'canonical' has no meaning for synthetic SAEs (allowed: target L0s, integers >= 1)",
                          "sae_eval.l0s")
        return self

    def _check_scales_or_search(self) -> None:
        steering = self.steering
        if self.search is not None and steering.combinations:
            raise invalid("are fixed points; a search steers single features (allowed: combinations without "
                          "search, in a sweep of their own)", "steering.combinations")
        if self.search is None:
            if steering.scales is None and steering.has_grid:
                raise invalid("is required (a list of scales), unless a 'search' section searches them",
                              "steering.scales")
            if steering.scales is not None and not steering.has_grid:
                raise invalid("has no grid to apply to (combinations carry their own scales)", "steering.scales")
            return
        if steering.scales is not None:
            raise invalid("is given with a 'search' section (allowed: one of them: the search chooses the scales)",
                          "steering.scales")
        if steering.mode == "ablate":
            raise invalid("'ablate' has no scale to search (allowed with search: add, clamp)", "steering.mode")

    @property
    def kind(self) -> SweepKind:
        """Which sweep this is: `steering` or `sae_eval`."""
        return "steering" if self.steering is not None else "sae_eval"

    def canonical_dict(self) -> dict[str, Any]:
        """Returns every field, defaults included, as JSON-safe data (paths as strings, tuples as lists); what the
        sweep kind does not use is left out (the other kind's section, and for `sae_eval` the SAE fields its grid
        sets)."""
        if self.kind == "steering":
            # Without a search, the dump is the one sweeps were identified by before searches existed.
            unused = {"scales"} if self.search is not None else set()
            unused |= {"combinations"} if not self.steering.combinations else set()
            exclude: dict[str, Any] = {"sae_eval": True, **({"search": True} if self.search is None else {})}
            if unused:
                exclude["steering"] = unused
            return self.model_dump(mode="json", exclude=exclude)
        return self.model_dump(mode="json", exclude={"steering": True, "search": True, "sae": set(_SAE_GRID_FIELDS)})

    def to_yaml(self) -> str:
        """Returns the canonical YAML dump, which `load_experiment` reads back to an equal config."""
        return yaml.safe_dump(self.canonical_dict(), sort_keys=False, allow_unicode=True)


def _check_evaluated_widths(release: str, widths: list[str]) -> None:
    unknown = [width for width in widths if width not in gemma_scope.WIDTHS]
    if unknown:
        raise invalid(f"{unknown} are not Gemma Scope widths (allowed: {', '.join(gemma_scope.WIDTHS)})",
                      "sae_eval.widths")
    missing = [width for width in widths if width not in gemma_scope.release_widths(release)]
    if missing:
        allowed = ", ".join(gemma_scope.release_widths(release))
        raise invalid(f"{missing} are not widths of {release!r} (allowed: {allowed})", "sae_eval.widths")


def _check_gemma_scope_folders(
    release: str, layers: list[int], widths: list[str], l0s: list[int | str], layers_field: str, l0_field: str
) -> None:
    """Refuses a grid naming a Gemma Scope SAE the release does not have: a layer without SAEs of a width, or an
    L0 without a folder (the registry lists every folder, so this needs no download)."""
    for width in widths:
        for layer in layers:
            problem = gemma_scope.layer_problem(release, layer, width)
            if problem is not None:
                raise invalid(problem, layers_field)
        for layer in layers:
            for l0 in l0s:
                problem = gemma_scope.l0_problem(release, layer, width, l0)
                if problem is not None:
                    raise invalid(problem, l0_field)
