"""Loading an experiment: one YAML file, plus `--set` overrides -> a validated, frozen `ExperimentConfig`.

Every failure of `load_experiment` is a `ConfigError` whose message is one line naming the file, the field path,
the offending value and what is allowed, e.g.
`experiments/x.yaml: steering.scales.1: 'abc' is not a number`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from runner.config.messages import describe_kind, field_names, format_validation_error, one_line, sections_of
from runner.config.schema import BASE_DIR, ExperimentConfig
from runner.errors import ConfigError


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
        raise ConfigError(f"{path}: cannot read: {one_line(str(error))}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: {_describe_yaml_error(error)}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of fields (allowed: "
            f"{', '.join(field_names([ExperimentConfig]))}), got {describe_kind(data)}"
        )
    return data


def _describe_yaml_error(error: yaml.YAMLError) -> str:
    if isinstance(error, yaml.MarkedYAMLError):
        mark, problem = error.problem_mark, error.problem or str(error)
    else:
        mark, problem = None, str(error)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"invalid YAML{where}: {one_line(problem)}"


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
    """Checks an override path against the schema (the fields of the config classes, of every source's class for
    a section with a `source`) and then the data (dict keys, list indices)."""
    sections: tuple[type[BaseModel], ...] = (ExperimentConfig,)
    node: Any = raw
    for depth, part in enumerate(parts):
        where = ".".join(parts[: depth + 1])
        if sections:
            field = next((s.model_fields[part] for s in sections if part in s.model_fields), None)
            if field is None:
                return f"unknown field {where!r} (allowed: {', '.join(field_names(sections))})"
            sections = sections_of(field)
            if part == "prompts" and parts[depth + 1 : depth + 2] == ["file"]:
                sections = (_PromptsFile,)
            node = node.get(part) if isinstance(node, dict) else None
        elif isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                return f"no item {part!r} (the list has {len(node)} items)"
            node = node[int(part)]
        elif isinstance(node, dict) or node is None:
            node = node.get(part) if isinstance(node, dict) else None
        else:
            return f"{'.'.join(parts[:depth])!r} is {describe_kind(node)}, not a mapping or list"
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

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

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
        reason = one_line(str(error))
        raise ConfigError(f"{source}: prompts.file: cannot read {str(prompt_path)!r}: {reason}") from None
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"{source}: prompts.file: {str(prompt_path)!r} has no non-blank line")
    return {**raw, "prompts": prompts}
