"""The experiment schema and its loader: one YAML file (plus `--set` overrides) -> a validated, frozen config.

Every failure of `load_experiment` is a `ConfigError` whose message is one line naming the file, the field path,
the offending value and what is allowed, e.g.
`experiments/x.yaml: steering.scales.1: 'abc' is not a number`.
"""

from __future__ import annotations

import os
import re
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from runner.errors import ConfigError
from runner.sae import gemma_scope

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

_MODEL_CONFIG = ConfigDict(extra="forbid", frozen=True, strict=True)
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]+$")


def _error(message: str, field: str | None = None) -> PydanticCustomError:
    """A validation error whose message is final; `field`, when given, is appended to the error's location."""
    if field is None:
        return PydanticCustomError("runner", message)
    return PydanticCustomError("runner_field", message, {"field": field})


def _not_blank(value: str) -> str:
    if not value.strip():
        raise _error(f"{value!r} is blank (allowed: a non-empty prompt)")
    return value


def _width_label(value: str) -> str:
    if not re.fullmatch(r"\d+[km]?", value):
        raise _error(f"{value!r} is not a width label (allowed: {', '.join(gemma_scope.WIDTHS)}, or a latent count)")
    return value


WidthLabel = Annotated[str, AfterValidator(_width_label)]
NonNegativeInt = Annotated[int, Field(ge=0)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Prompt = Annotated[str, AfterValidator(_not_blank)]


def _check_source_fields(
    config: BaseModel, source: str, allowed: Mapping[str, Sequence[str]], required: Mapping[str, Sequence[str]]
) -> None:
    """Rejects fields that `source` does not use (unless left at their default, so canonical dumps load back),
    and missing fields it needs."""
    own = ("source", *allowed[source])
    listing = f"fields for {source}: {', '.join(own)}"
    for field in sorted(config.model_fields_set - set(own)):
        if getattr(config, field) != type(config).model_fields[field].get_default(call_default_factory=True):
            raise _error(f"does not apply to source {source!r} ({listing})", field)
    for field in required.get(source, ()):
        if getattr(config, field) is None:
            raise _error(f"is required with source {source!r} ({listing})", field)


def _resolve_path(value: Any, info: ValidationInfo) -> Path | None:
    """Accepts a string or Path and makes it absolute against the context's base directory (else the cwd)."""
    if value is None:
        return None
    if not isinstance(value, (str, Path)) or str(value) == "":
        raise _error(f"{value!r} is not a path")
    base = Path((info.context or {}).get(BASE_DIR) or Path.cwd())
    return Path(os.path.abspath(base / Path(value).expanduser()))


class ModelConfig(BaseModel):
    """Which Gemma2 checkpoint to load, and how."""

    model_config = _MODEL_CONFIG

    source: Literal["synthetic", "kaggle", "local", "huggingface"]
    preset: Literal["tiny", "small"] | None = None
    seed: int = 0
    variant: str | None = None
    path: Path | None = None
    repo_id: str | None = None
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    upcast_activations: bool = False

    @field_validator("path", mode="before")
    @classmethod
    def _absolute_path(cls, value: Any, info: ValidationInfo) -> Path | None:
        return _resolve_path(value, info)

    @field_validator("variant")
    @classmethod
    def _known_variant(cls, value: str | None) -> str | None:
        if value is not None and value not in KAGGLE_VARIANTS:
            raise _error(f"{value!r} is not a Kaggle Gemma2 variant (allowed: {', '.join(KAGGLE_VARIANTS)})")
        return value

    @field_validator("repo_id")
    @classmethod
    def _repo_shape(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[\w.-]+/[\w.-]+", value):
            raise _error(f"{value!r} is not a Hugging Face repo id (like google/gemma-2-2b)")
        return value

    @model_validator(mode="after")
    def _fields_fit_source(self) -> ModelConfig:
        common = ("dtype", "upcast_activations")
        allowed = {
            "synthetic": ("preset", "seed", *common),
            "kaggle": ("variant", *common),
            "local": ("path", *common),
            "huggingface": ("path", "repo_id", *common),
        }
        required = {"kaggle": ("variant",), "local": ("path",)}
        _check_source_fields(self, self.source, allowed, required)
        if self.source == "huggingface" and (self.path is None) == (self.repo_id is None):
            raise _error("source 'huggingface' needs exactly one of 'repo_id' (like google/gemma-2-2b) or 'path'")
        if self.source == "synthetic" and self.preset is None:
            object.__setattr__(self, "preset", "tiny")
        return self


class SAEConfig(BaseModel):
    """Which sparse autoencoder to steer with (one per steered layer)."""

    model_config = _MODEL_CONFIG

    source: Literal["huggingface", "local", "synthetic"]
    release: str | None = None
    site: Literal["res", "mlp", "att"] = "res"
    width: WidthLabel = "16k"
    l0: int | Literal["canonical"] = "canonical"
    path: Path | None = None
    width_features: int | None = Field(default=None, ge=1)
    target_l0: float = Field(default=16.0, gt=0, allow_inf_nan=False)
    seed: int = 0

    @field_validator("path", mode="before")
    @classmethod
    def _absolute_path(cls, value: Any, info: ValidationInfo) -> Path | None:
        return _resolve_path(value, info)

    @field_validator("l0", mode="before")
    @classmethod
    def _l0_value(cls, value: Any) -> Any:
        if value == "canonical" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise _error(f"{value!r} is not allowed (allowed: 'canonical' or an integer >= 1, the N of average_l0_N)")

    @field_validator("release")
    @classmethod
    def _known_release(cls, value: str | None) -> str | None:
        if value is not None and value not in gemma_scope.RELEASES:
            raise _error(f"{value!r} is not a Gemma Scope release (allowed: {', '.join(gemma_scope.RELEASES)})")
        return value

    @model_validator(mode="after")
    def _fields_fit_source(self) -> SAEConfig:
        gemma_scope_fields = ("release", "site", "width", "l0")
        allowed = {
            "huggingface": gemma_scope_fields,
            "local": ("path", *gemma_scope_fields),
            "synthetic": ("site", "width_features", "target_l0", "seed"),
        }
        required = {"huggingface": ("release",), "local": ("path",)}
        _check_source_fields(self, self.source, allowed, required)
        if self.source == "huggingface" and self.width not in gemma_scope.WIDTHS:
            allowed = ", ".join(gemma_scope.WIDTHS)
            raise _error(f"{self.width!r} is not a Gemma Scope width (allowed: {allowed})", "width")
        if self.release is not None and gemma_scope.release_site(self.release) != self.site:
            kind = gemma_scope.release_site(self.release)
            raise _error(
                f"{self.release!r} holds {kind!r} SAEs but site is {self.site!r} (allowed: the -{self.site} releases)",
                "release",
            )
        return self


def _unique(values: list[Any], what: str) -> list[Any]:
    duplicates = sorted({v for v in values if values.count(v) > 1})
    if duplicates:
        raise _error(f"repeats {duplicates} (allowed: each {what} once)")
    return values


class SteeringConfig(BaseModel):
    """The sweep grid: every layer x feature x scale x seed is steered on every prompt."""

    model_config = _MODEL_CONFIG

    layers: list[NonNegativeInt] = Field(min_length=1)
    features: list[NonNegativeInt] = Field(min_length=1)
    scales: list[FiniteFloat] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    mode: Literal["add", "clamp", "ablate"] = "add"
    positions: Literal["all", "skip_bos", "generated"] = "all"

    @field_validator("layers", "features", "scales", "seeds")
    @classmethod
    def _each_once(cls, values: list[Any], info: ValidationInfo) -> list[Any]:
        return _unique(values, info.field_name.removesuffix("s"))


class TextSetConfig(BaseModel):
    """The text an SAE evaluation runs on: the bundled prose, a user's files, or a Hugging Face dataset."""

    model_config = _MODEL_CONFIG

    source: Literal["bundled", "file", "huggingface"] = "bundled"
    path: str | None = None
    dataset: str | None = None
    files: list[str] = Field(default_factory=list)
    column: str = Field(default="text", min_length=1)

    @field_validator("path", mode="before")
    @classmethod
    def _absolute_glob(cls, value: Any, info: ValidationInfo) -> str | None:
        path = _resolve_path(value, info)
        return None if path is None else str(path)

    @field_validator("dataset")
    @classmethod
    def _dataset_shape(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", value):
            raise _error(f"{value!r} is not a Hugging Face dataset id (like NeelNanda/pile-10k)")
        return value

    @model_validator(mode="after")
    def _fields_fit_source(self) -> TextSetConfig:
        allowed = {"bundled": (), "file": ("path", "column"), "huggingface": ("dataset", "files", "column")}
        required = {"file": ("path",), "huggingface": ("dataset",)}
        _check_source_fields(self, self.source, allowed, required)
        if self.source == "huggingface" and not self.files:
            raise _error(
                "is required with source 'huggingface': the files of the dataset repo to read, e.g. "
                "['data/train-00000-of-00001.parquet'] (globs allowed)",
                "files",
            )
        return self


class SAEEvalConfig(BaseModel):
    """An SAE evaluation sweep: every layer x width x L0 of one release, measured on one text set."""

    model_config = _MODEL_CONFIG

    layers: list[NonNegativeInt] | Literal["all"] = "all"
    widths: list[WidthLabel] = Field(min_length=1)
    l0s: list[Annotated[int, Field(ge=1)] | Literal["canonical"]] = Field(min_length=1)
    text: TextSetConfig = Field(default_factory=TextSetConfig)
    context_length: int = Field(default=128, ge=2, le=8192)
    num_sequences: int = Field(default=32, ge=1)
    batch_size: int = Field(default=8, ge=1)
    saes_per_job: int | Literal["auto"] = "auto"
    table_sequences: int = Field(default=4, ge=0)

    @field_validator("layers", mode="before")
    @classmethod
    def _layers_value(cls, value: Any) -> Any:
        if value == "all" or isinstance(value, list):
            return value
        raise _error(f"{value!r} is not allowed (allowed: 'all' or a list of block indices)")

    @field_validator("layers", "widths", "l0s")
    @classmethod
    def _each_once(cls, values: Any, info: ValidationInfo) -> Any:
        if values == "all":
            return values
        if info.field_name == "layers" and not values:
            raise _error("must not be empty")
        return _unique(values, info.field_name.removesuffix("s"))

    @field_validator("saes_per_job", mode="before")
    @classmethod
    def _saes_per_job_value(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise _error(f"{value!r} is not allowed (allowed: 'auto' or an integer >= 1)")


class SamplingConfig(BaseModel):
    """How tokens are generated."""

    model_config = _MODEL_CONFIG

    max_new_tokens: int = Field(default=32, ge=1, le=4096)
    temperature: float = Field(default=0.0, ge=0.0, allow_inf_nan=False)
    top_k: int | None = Field(default=None, ge=1)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    batch_size: int | Literal["auto"] = "auto"

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch_size_value(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise _error(f"{value!r} is not allowed (allowed: 'auto' or an integer >= 1)")


class TrackingConfig(BaseModel):
    """Where the sweep is logged (MLflow)."""

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
            raise _error(
                f"{redacted!r} embeds credentials; remove them and set MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment instead"
            )
        return value


class ClusterConfig(BaseModel):
    """How many workers run the sweep and what each one needs (Ray).

    `resources` is what one worker (one host) requests: `CPU`, `GPU` and custom resources such as `TPU` (chips).
    `platform` is the JAX platform the workers must get; `auto` means tpu when a TPU resource is requested, gpu
    when a GPU is, else cpu. `address` joins a running Ray cluster; without it a local Ray is started.
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
    accelerator_version: Literal["v4", "v5e", "v5p", "v6e"] | None = None
    placement: Literal["spread", "pack"] = "spread"
    max_job_retries: int = Field(default=2, ge=0)
    max_worker_crashes: int = Field(default=3, ge=1)
    platform: Literal["auto", "cpu", "gpu", "tpu"] = "auto"

    @field_validator("slice_topology")
    @classmethod
    def _topology_shape(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"\d+(x\d+){1,2}", value):
            raise _error(f"{value!r} is not a TPU topology (allowed: like 4x4 or 2x2x2)")
        return value

    @model_validator(mode="after")
    def _slice_fields_fit_replica(self) -> ClusterConfig:
        slice_only = {
            "hosts_per_replica": 1, "slice_topology": None, "accelerator_version": None, "placement": "spread"
        }
        if self.replica == "host":
            for field, default in slice_only.items():
                if getattr(self, field) != default:
                    raise _error("applies to cluster.replica 'slice' only (one replica spanning several hosts)", field)
        elif self.slice_topology is not None:
            if self.accelerator_version is None:
                raise _error("is required with slice_topology (allowed: v4, v5e, v5p, v6e)", "accelerator_version")
            if self.hosts_per_replica != 1:
                raise _error("is given by slice_topology (the slice's hosts); leave it out", "hosts_per_replica")
        elif "hosts_per_replica" not in self.model_fields_set:
            raise _error("is required with replica 'slice': the hosts one replica spans, e.g. 2 (or give "
                         "slice_topology and accelerator_version for a TPU slice)", "hosts_per_replica")
        return self

    @model_validator(mode="after")
    def _accelerator_platform_needs_its_resource(self) -> ClusterConfig:
        needed = {"tpu": "TPU", "gpu": "GPU"}.get(self.platform)
        if needed is not None and self.resources.get(needed, 0) <= 0:
            raise _error(
                f"{self.platform!r} needs resources.{needed} (allowed: request every {needed} of a host, "
                f"e.g. resources: {{{needed}: {4 if needed == 'TPU' else 8}}}, or platform cpu)",
                "platform",
            )
        return self

    def jax_platform(self) -> Literal["cpu", "gpu", "tpu"]:
        """The JAX platform workers must run on: `platform`, with `auto` resolved from `resources`."""
        if self.platform != "auto":
            return self.platform
        if self.resources.get("TPU", 0) > 0:
            return "tpu"
        if self.resources.get("GPU", 0) > 0:
            return "gpu"
        return "cpu"


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
    sae_eval: SAEEvalConfig | None = None
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @field_validator("name")
    @classmethod
    def _name_chars(cls, value: str) -> str:
        if not _NAME_PATTERN.fullmatch(value):
            raise _error(f"{value!r} is not allowed (allowed: letters, digits, '_', '.', '-')")
        return value

    @field_validator("prompts", mode="before")
    @classmethod
    def _prompts_list(cls, value: Any) -> Any:
        if isinstance(value, list):
            return tuple(value)
        if isinstance(value, Mapping):
            raise _error("{file: ...} is read by load_experiment (allowed here: a list of strings)")
        return value

    @model_validator(mode="after")
    def _one_kind_of_sweep(self) -> ExperimentConfig:
        if (self.steering is None) == (self.sae_eval is None):
            given = "both 'steering' and 'sae_eval' are" if self.steering is not None else \
                "neither 'steering' nor 'sae_eval' is"
            raise _error(f"{given} given (allowed: exactly one of them: a steering sweep or an SAE evaluation)")
        if self.steering is not None:
            if not self.prompts:
                if "prompts" in self.model_fields_set:
                    raise _error("must not be empty", "prompts")
                raise _error("is required with steering (a list of strings, or {file: PATH})", "prompts")
            if self.sae.site != "res":
                raise _error(f"{self.sae.site!r}: steering adds decoder rows to the residual stream (allowed: res)",
                             "sae.site")
            return self
        if self.prompts:
            raise _error("does not apply to sae_eval sweeps (they read sae_eval.text)", "prompts")
        if self.sampling != SamplingConfig():
            raise _error("does not apply to sae_eval sweeps (they only read text)", "sampling")
        for field in sorted(self.sae.model_fields_set & set(_SAE_GRID_FIELDS)):
            raise _error(f"is set by the evaluation grid (set {_SAE_GRID_FIELDS[field]} instead)", f"sae.{field}")
        if self.sae.source == "huggingface":
            bad = [width for width in self.sae_eval.widths if width not in gemma_scope.WIDTHS]
            if bad:
                raise _error(f"{bad} are not Gemma Scope widths (allowed: {', '.join(gemma_scope.WIDTHS)})",
                             "sae_eval.widths")
        if self.sae.source == "synthetic" and "canonical" in self.sae_eval.l0s:
            raise _error("'canonical' has no meaning for synthetic SAEs (allowed: target L0s, integers >= 1)",
                         "sae_eval.l0s")
        return self

    @property
    def kind(self) -> SweepKind:
        """Which sweep this is: `steering` or `sae_eval`."""
        return "steering" if self.steering is not None else "sae_eval"

    @model_validator(mode="after")
    def _experiment_defaults_to_name(self) -> ExperimentConfig:
        if self.tracking.experiment is None:
            object.__setattr__(self, "tracking", self.tracking.model_copy(update={"experiment": self.name}))
        return self

    def canonical_dict(self) -> dict[str, Any]:
        """Returns every field, defaults included, as JSON-safe data (paths as strings, tuples as lists); what the
        sweep kind does not use is left out (the other kind's section, and for `sae_eval` the SAE fields its grid
        sets)."""
        if self.kind == "steering":
            return self.model_dump(mode="json", exclude={"sae_eval"})
        return self.model_dump(mode="json", exclude={"steering": True, "sae": set(_SAE_GRID_FIELDS)})

    def to_yaml(self) -> str:
        """Returns the canonical YAML dump, which `load_experiment` reads back to an equal config."""
        return yaml.safe_dump(self.canonical_dict(), sort_keys=False, allow_unicode=True)


# ---------------------------------------------------------------------------------------------------------------
# Where a sweep writes


def check_write_locations(config: ExperimentConfig, output_dir: Path, source: Path) -> None:
    """Refuses an experiment that would make runner write outside `output_dir` (the directory `runner run` works
    in; MLflow resolves a relative sqlite path against it, and keeps a local store's artifacts under it).

    What an experiment file can point a write at is its tracking store: a `sqlite:` database or a `file:` (or
    plain path) store must resolve, symbolic links followed, inside `output_dir`. Tracking servers (`http(s)://`)
    and other stores are not local writes. Paths the file reads from (model, SAEs, prompts, text) may be anywhere.

    Raises:
      ConfigError: One line naming the file, the field, the value and what is allowed.
    """
    uri = config.tracking.uri
    parts = urlsplit(uri)
    if parts.scheme == "sqlite":
        target = uri.removeprefix("sqlite:").removeprefix("///").split("?", 1)[0]
        if uri.startswith("sqlite:////"):
            target = "/" + target.lstrip("/")
    elif parts.scheme in ("", "file"):
        target = parts.path if parts.scheme == "file" else uri
    else:
        return
    root = Path(os.path.realpath(output_dir))
    written = Path(os.path.realpath(root / target))
    if written != root and root not in written.parents:
        raise ConfigError(
            f"{source}: tracking.uri: {uri!r} would write {str(written)!r}, outside the output directory "
            f"{str(root)!r} (allowed: a store under it, e.g. sqlite:///mlflow.db, or an http(s):// tracking "
            "server; run runner from the directory the results belong in)"
        )


# ---------------------------------------------------------------------------------------------------------------
# Loading


def load_experiment(path: Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Reads, overrides and validates one experiment file.

    Args:
      path: The YAML file. Relative paths inside it (`model.path`, `sae.path`, `prompts.file`) are resolved
        against its directory.
      overrides: `--set` items `a.b.c=value`; the value is parsed as YAML (`steering.scales=[0, 10]`).

    Raises:
      ConfigError: One line: file, field path, offending value, what is allowed.
    """
    path = Path(path)
    raw = _read_yaml(path)
    for override in overrides:
        raw = _apply_override(raw, override, path)
    base_dir = path.parent.absolute()
    raw = _inline_prompts(raw, base_dir, path)
    try:
        return ExperimentConfig.model_validate(raw, context={BASE_DIR: base_dir})
    except ValidationError as error:
        raise ConfigError(f"{path}: {format_validation_error(error)}") from None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read: {_one_line(str(error))}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: {_describe_yaml_error(error)}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of fields (allowed: {_allowed(ExperimentConfig)}), "
            f"got {_kind(data)}"
        )
    return data


def _describe_yaml_error(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"invalid YAML{where}: {_one_line(problem)}"


def _apply_override(raw: dict[str, Any], override: str, source: Path) -> dict[str, Any]:
    """Returns a copy of `raw` with one `a.b.c=value` override applied."""
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"{source}: --set {override!r}: expected KEY=VALUE, e.g. steering.scales=[0, 10]")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: --set {key}: {_describe_yaml_error(error)}") from None
    parts = key.split(".")
    problem = _override_path_problem(parts, raw)
    if problem:
        raise ConfigError(f"{source}: --set {key}: {problem}")
    return _set_in(raw, parts, value)


def _override_path_problem(parts: list[str], raw: Any) -> str | None:
    """Checks an override path against the schema (model fields) and then the data (dict keys, list indices)."""
    schema: type[BaseModel] | None = ExperimentConfig
    node: Any = raw
    for depth, part in enumerate(parts):
        where = ".".join(parts[: depth + 1])
        if schema is not None:
            if part not in schema.model_fields:
                return f"unknown field {where!r} (allowed: {_allowed(schema)})"
            schema = _model_class(schema.model_fields[part].annotation)
            if part == "prompts" and parts[depth + 1 : depth + 2] == ["file"]:
                schema = _PromptsFile
            node = node.get(part) if isinstance(node, dict) else None
        elif isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                return f"no item {part!r} (the list has {len(node)} items)"
            node = node[int(part)]
        elif isinstance(node, dict) or node is None:
            node = node.get(part) if isinstance(node, dict) else None
        else:
            return f"{'.'.join(parts[:depth])!r} is {_kind(node)}, not a mapping or list"
    return None


def _set_in(node: Any, parts: list[str], value: Any) -> Any:
    """Returns a copy of `node` with `value` at `parts`, creating mappings as needed."""
    if not parts:
        return value
    head, rest = parts[0], parts[1:]
    if isinstance(node, list) and head.isdigit():
        copy = list(node)
        copy[int(head)] = _set_in(copy[int(head)], rest, value)
        return copy
    copy = dict(node) if isinstance(node, dict) else {}
    copy[head] = _set_in(copy.get(head), rest, value)
    return copy


class _PromptsFile(BaseModel):
    """The `prompts: {file: PATH}` form (UTF-8 text, one prompt per non-blank line)."""

    model_config = _MODEL_CONFIG

    file: str


def _inline_prompts(raw: dict[str, Any], base_dir: Path, source: Path) -> dict[str, Any]:
    """Replaces `prompts: {file: PATH}` with the file's non-blank lines."""
    spec = raw.get("prompts")
    if not isinstance(spec, dict):
        return raw
    unknown = sorted(set(spec) - {"file"})
    if unknown:
        raise ConfigError(f"{source}: unknown field 'prompts.{unknown[0]}' (allowed: file)")
    file = spec.get("file")
    if not isinstance(file, str) or not file:
        raise ConfigError(f"{source}: prompts.file: {file!r} is not a path (allowed: a UTF-8 text file)")
    prompt_path = Path(os.path.abspath(base_dir / Path(file).expanduser()))
    try:
        text = prompt_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{source}: prompts.file: {str(prompt_path)!r} not found") from None
    except (OSError, UnicodeDecodeError) as error:
        reason = _one_line(str(error))
        raise ConfigError(f"{source}: prompts.file: cannot read {str(prompt_path)!r}: {reason}") from None
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"{source}: prompts.file: {str(prompt_path)!r} has no non-blank line")
    return {**raw, "prompts": prompts}


# ---------------------------------------------------------------------------------------------------------------
# One-line error messages

_TYPE_WORDS = {
    "int_type": "is not an integer",
    "int_parsing": "is not an integer",
    "int_from_float": "is not an integer",
    "float_type": "is not a number",
    "float_parsing": "is not a number",
    "finite_number": "is not a finite number",
    "bool_type": "is not true or false",
    "bool_parsing": "is not true or false",
    "string_type": "is not a string",
    "list_type": "is not a list",
    "tuple_type": "is not a list",
    "dict_type": "is not a mapping",
}
_BOUNDS = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
#: Location items pydantic adds for members of a union, which are not field names.
_UNION_TAG = re.compile(r"^(int|float|str|bool|none|literal\[.*\]|function-\w+\[.*\]|constrained-.*)$")


def format_validation_error(error: ValidationError) -> str:
    """Converts a pydantic error into one line: `field.path: 'value' what-is-wrong (allowed: ...)`, errors joined
    with '; '."""
    lines: list[str] = []
    for item in error.errors():
        line = _format_error(item)
        if line not in lines:
            lines.append(line)
    return "; ".join(lines)


def _format_error(item: Mapping[str, Any]) -> str:
    loc = [part for part in item["loc"] if not (isinstance(part, str) and _UNION_TAG.match(part))]
    kind = item["type"]
    ctx = item.get("ctx") or {}
    if kind == "runner_field":
        loc.append(ctx["field"])
    where = ".".join(str(part) for part in loc) or "(top level)"
    value = _short_repr(item.get("input"))
    if kind == "extra_forbidden":
        return f"unknown field {where!r} (allowed: {_allowed(_schema_at(loc[:-1]))})"
    if kind == "missing":
        return f"{where}: required field is missing"
    if kind in ("model_type", "model_attributes_type", "dataclass_type"):
        return f"{where}: {value} is not a mapping (allowed fields: {_allowed(_schema_at(loc))})"
    if kind in _TYPE_WORDS:
        return f"{where}: {value} {_TYPE_WORDS[kind]}"
    if kind in _BOUNDS:
        bound = next(iter(ctx.values()))
        return f"{where}: {value} is not allowed (allowed: {_BOUNDS[kind]} {bound})"
    if kind == "literal_error":
        return f"{where}: {value} is not allowed (allowed: {ctx.get('expected')})"
    if kind == "too_short":
        return f"{where}: must not be empty"
    if kind in ("runner", "runner_field"):
        return _one_line(f"{where}: {item['msg']}")
    return _one_line(f"{where}: {value}: {item['msg']}")


def _schema_at(loc: Sequence[Any]) -> type[BaseModel] | None:
    schema: type[BaseModel] | None = ExperimentConfig
    for part in loc:
        field = schema.model_fields.get(part) if schema is not None and isinstance(part, str) else None
        schema = _model_class(field.annotation) if field is not None else None
    return schema


def _model_class(annotation: Any) -> type[BaseModel] | None:
    """The config class of a field annotated `Config` or `Config | None`, else None."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _allowed(schema: type[BaseModel] | None) -> str:
    return ", ".join(schema.model_fields) if schema is not None else "?"


def _kind(value: Any) -> str:
    return {type(None): "empty", list: "a list", str: "a string", dict: "a mapping"}.get(
        type(value), f"a {type(value).__name__}"
    )


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _one_line(text: str) -> str:
    return re.sub(r"\s*[\r\n]+\s*", " ", text).strip()
