"""Pydantic validation errors as one line: `field.path: 'value' what-is-wrong (allowed: ...)`.

An error's location is read against the schema. After a field holding a union discriminated by `source`, pydantic
puts the source's tag (`model.kaggle.variant`); it is dropped from the field path and names the source, so a field
missing from that source's class reads `model.variant: is required with source 'kaggle' (fields for kaggle: ...)`
and one of another source's classes `does not apply to source 'local' (fields for local: ...)`.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from runner.config.schema import FIELD_MESSAGE_ERROR, MESSAGE_ERROR, ExperimentConfig

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
#: Location items pydantic adds for the members of a plain (not discriminated) union, which are not field names.
_UNION_TAG = re.compile(r"^(int|float|str|bool|none|literal\[.*\]|function-\w+\[.*\]|constrained-.*)$")

Section = type[BaseModel]


def format_validation_error(error: ValidationError) -> str:
    """Converts a pydantic error into one line: `field.path: 'value' what-is-wrong (allowed: ...)`, errors joined
    with '; '."""
    lines: list[str] = []
    for item in error.errors():
        line = _format_error(item)
        if line not in lines:
            lines.append(line)
    return "; ".join(lines)


def sections_of(field: FieldInfo) -> tuple[Section, ...]:
    """The config classes a field holds: one for `Config` or `Config | None`, each source's class for a
    discriminated union, none for other types."""
    candidates = typing.get_args(field.annotation) or (field.annotation,)
    return tuple(c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel))


def field_names(sections: Sequence[Section]) -> list[str]:
    """The fields of one config class, or of every class of a union, each once: a class's own fields first (a
    source's `source` and its fields), then those it shares with the other sources."""
    names: dict[str, None] = {}
    for section in sections:
        own = [name for name in inspect.get_annotations(section) if name in section.model_fields]
        names.update(dict.fromkeys([*own, *section.model_fields]))
    return list(names)


def describe_kind(value: Any) -> str:
    """What a YAML value is, in words: `empty`, `a list`, `a string`, `a mapping`, `a int`..."""
    return {type(None): "empty", list: "a list", str: "a string", dict: "a mapping"}.get(
        type(value), f"a {type(value).__name__}"
    )


def one_line(text: str) -> str:
    """`text` with its line breaks (and the blanks around them) made single spaces."""
    return re.sub(r"\s*[\r\n]+\s*", " ", text).strip()


@dataclasses.dataclass(frozen=True)
class _Place:
    """Where an error location leads in the schema.

    Attributes:
      path: The field path (union tags dropped).
      sections: The config classes there: one, a discriminated union's classes before its tag, or none.
      discriminator: The field naming the source, when `sections` is a discriminated union.
      source: The source's class when the location ends with its tag (the error is about that class's fields).
      siblings: Then the other sources' classes of the union, too.
    """

    path: tuple[str | int, ...]
    sections: tuple[Section, ...]
    discriminator: str | None = None
    source: Section | None = None
    siblings: tuple[Section, ...] = ()

    def tag(self, section: Section) -> str:
        """The source name of one class of the union."""
        return str(section.model_fields[self.discriminator or "source"].default)


def _place(loc: Sequence[str | int]) -> _Place:
    place = _Place((), (ExperimentConfig,))
    for part in loc:
        if isinstance(part, str) and _UNION_TAG.match(part):
            continue
        if place.discriminator is not None and place.source is None:
            chosen = [section for section in place.sections if place.tag(section) == part]
            if chosen:
                place = dataclasses.replace(place, sections=(chosen[0],), source=chosen[0], siblings=place.sections)
                continue
        field = next(
            (s.model_fields[part] for s in place.sections if isinstance(part, str) and part in s.model_fields), None
        )
        sections = sections_of(field) if field is not None else ()
        discriminator = field.discriminator if field is not None and len(sections) > 1 else None
        place = _Place((*place.path, part), sections, discriminator if isinstance(discriminator, str) else None)
    return place


def _format_error(item: Mapping[str, Any]) -> str:
    kind = item["type"]
    ctx = item.get("ctx") or {}
    loc = [*item["loc"], ctx["field"]] if kind == FIELD_MESSAGE_ERROR else list(item["loc"])
    if kind in ("extra_forbidden", "missing") and loc:
        return _field_of_source(kind, _place(loc[:-1]), loc[-1])
    place = _place(loc)
    where = ".".join(str(part) for part in place.path) or "(top level)"
    value = _short_repr(item.get("input"))
    if kind == "union_tag_not_found":
        return f"{where}.{place.discriminator or 'source'}: required field is missing"
    if kind == "union_tag_invalid":
        tags = _choices([repr(place.tag(section)) for section in place.sections])
        return f"{where}.{place.discriminator or 'source'}: {ctx['tag']!r} is not allowed (allowed: {tags})"
    if kind in ("model_type", "model_attributes_type", "dataclass_type"):
        return f"{where}: {value} is not a mapping (allowed fields: {', '.join(field_names(place.sections)) or '?'})"
    if kind in _TYPE_WORDS:
        return f"{where}: {value} {_TYPE_WORDS[kind]}"
    if kind in _BOUNDS:
        bound = next(iter(ctx.values()))
        return f"{where}: {value} is not allowed (allowed: {_BOUNDS[kind]} {bound})"
    if kind == "literal_error":
        return f"{where}: {value} is not allowed (allowed: {ctx.get('expected')})"
    if kind == "too_short":
        return f"{where}: must not be empty"
    if kind in (MESSAGE_ERROR, FIELD_MESSAGE_ERROR):
        return one_line(f"{where}: {item['msg']}")
    return one_line(f"{where}: {value}: {item['msg']}")


def _field_of_source(kind: str, parent: _Place, name: str | int) -> str:
    """The message of a field that is missing (`kind` "missing") or not allowed ("extra_forbidden") in `parent`."""
    where = ".".join(str(part) for part in (*parent.path, name))
    source = parent.source
    if source is None:
        if kind == "missing":
            return f"{where}: required field is missing"
        return f"unknown field {where!r} (allowed: {', '.join(field_names(parent.sections)) or '?'})"
    tag = parent.tag(source)
    listing = f"fields for {tag}: {', '.join(field_names([source]))}"
    if kind == "missing":
        description = source.model_fields[str(name)].description
        return f"{where}: is required with source {tag!r}" + (f": {description}" if description else f" ({listing})")
    if any(name in sibling.model_fields for sibling in parent.siblings):
        return f"{where}: does not apply to source {tag!r} ({listing})"
    return f"unknown field {where!r} (allowed: {', '.join(field_names([source]))})"


def _choices(items: Sequence[str]) -> str:
    """`'a', 'b' or 'c'`, as pydantic lists a literal's values."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
