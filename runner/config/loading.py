"""Loading an experiment: one YAML file, plus `--set` overrides -> a validated, frozen `ExperimentConfig`.

Every failure of `load_experiment` is a `ConfigError` whose message is one line naming the file, the field path,
the offending value and what is allowed, e.g.
`experiments/x.yaml: steering.scales.1: 'abc' is not a number`.

YAML is read with PyYAML's safe loader, bounded against hostile files: a file larger than `MAX_FILE_BYTES`, aliases
that expand beyond `MAX_YAML_VALUES` values (a "billion laughs" bomb is refused while it is parsed, before anything
is built from it) and a key given twice in one mapping (which YAML loaders otherwise resolve silently, the last one
winning) are refused with their line.
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


#: Largest experiment file read (long prompt lists belong in `prompts: {file: ...}`).
MAX_FILE_BYTES = 4 * 2**20
#: Most values (scalars, lists and mappings, each alias counted as everything it stands for) one YAML document
#: may expand to.
MAX_YAML_VALUES = 1_000_000


class _YAMLRefused(yaml.MarkedYAMLError):
    """A YAML document the bounded loader refuses (its `problem` says why, its mark where)."""


class BoundedSafeLoader(yaml.SafeLoader):
    """PyYAML's safe loader (no Python tags), refusing a key given twice in a mapping and a document whose aliases
    expand to more than `MAX_YAML_VALUES` values.

    Each node's expanded size (itself plus everything under it, aliases counted in full) is kept while the
    document is composed, so a bomb is refused as soon as its first oversized anchor is used, in time and memory
    linear in the file.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._expanded: dict[int, int] = {}

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        """Composes one node and records its expanded size (refusing a recursive alias or an oversized one)."""
        is_alias = self.check_event(yaml.AliasEvent)
        mark = self.peek_event().start_mark
        node = super().compose_node(parent, index)
        if is_alias:
            if id(node) not in self._expanded:
                raise _YAMLRefused(problem="a recursive alias (an anchor used inside itself) is not allowed",
                                   problem_mark=mark)
            return node
        if isinstance(node, yaml.SequenceNode):
            size = 1 + sum(self._expanded[id(child)] for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            size = 1 + sum(self._expanded[id(key)] + self._expanded[id(value)] for key, value in node.value)
        else:
            size = 1
        if size > MAX_YAML_VALUES:
            raise _YAMLRefused(
                problem=f"aliases expand this value to more than {MAX_YAML_VALUES:,} values (allowed: at most "
                        f"{MAX_YAML_VALUES:,}; is this an alias bomb?)",
                problem_mark=node.start_mark,
            )
        self._expanded[id(node)] = size
        return node

    def compose_mapping_node(self, anchor: str | None) -> yaml.MappingNode:
        """Composes a mapping, refusing a key that appears twice (merge keys `<<` excepted)."""
        node = super().compose_mapping_node(anchor)
        seen: dict[tuple[str, str], yaml.Node] = {}
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                continue
            first = seen.setdefault((key.tag, key.value), key)
            if first is not key:
                raise _YAMLRefused(
                    problem=f"duplicate key {key.value!r} (first at line {first.start_mark.line + 1}; allowed: each "
                            "key once per mapping)",
                    problem_mark=key.start_mark,
                )
        return node


def safe_load_bounded(text: str) -> Any:
    """Parses one YAML document with `BoundedSafeLoader`.

    Raises:
      yaml.YAMLError: Invalid YAML, a Python tag, a duplicate key or an alias bomb.
    """
    loader = BoundedSafeLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ConfigError(
                f"{path}: the file is {size / 2**20:.1f} MiB (allowed: at most {MAX_FILE_BYTES // 2**20} MiB; put "
                "long prompt lists in prompts: {file: PATH})"
            )
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read: {one_line(str(error))}") from None
    try:
        data = safe_load_bounded(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: {_describe_yaml_error(error)}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of fields (allowed: "
            f"{', '.join(field_names([ExperimentConfig]))}), got {describe_kind(data)}"
        )
    return data


def _describe_yaml_error(error: yaml.YAMLError) -> str:
    if isinstance(error, _YAMLRefused):
        mark = error.problem_mark
        return f"line {mark.line + 1}, column {mark.column + 1}: {error.problem}"
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
        value = safe_load_bounded(text)
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
