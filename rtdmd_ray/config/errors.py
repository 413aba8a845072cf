"""``ConfigError`` and the one-line messages: pydantic's ``ValidationError`` translated into the key path, the
closest valid key (anywhere in the schema) or the expected type, and the fix.

The schema helpers here walk the section classes through ``typing.get_type_hints`` (the annotated field
types of fieldtypes.py come back as plain ``int``, ``tuple[...]``, ``dict[...]``); they take the root class
as an argument, so this module does not import the schema.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from functools import cache
from typing import Any, Literal, Union

import pydantic


class ConfigError(ValueError):
    """A config problem, reported as one line naming the key path and the fix."""


# --------------------------------------------------------------------------------------------- schema walk
@cache
def hints(cls: type) -> dict[str, Any]:
    """The field types of section ``cls``, annotations stripped."""
    return typing.get_type_hints(cls)


def is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def type_name(tp: Any) -> str:
    """The expected type as the messages name it (``list of int``, ``map of {str: float}``)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"map of {{str: {type_name(typing.get_args(tp)[1])}}}"
    if is_section(tp):
        return "a mapping (section)"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@cache
def _all_paths(cls: type) -> tuple[str, ...]:
    """Every dotted key of the schema under ``cls`` (sections and leaves), for cross-section suggestions."""
    out: list[str] = []
    for name, tp in hints(cls).items():
        out.append(name)
        if is_section(tp):
            out.extend(f"{name}.{sub}" for sub in _all_paths(tp))
    return tuple(out)


def unknown_key(prefix: str, key: str, cls: type, where: str, root: type) -> ConfigError:
    """``key`` is not a field of section ``cls`` (at ``prefix``): suggest the closest key of the section, else
    the closest leaf anywhere under ``root``, else list the section's keys."""
    full = f"{prefix}{key}"
    valid = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        hint = f"did you mean '{prefix}{close[0]}'?"
    else:
        # the key may belong to another section: compare leaf names over the whole schema
        leaves = {p.rsplit(".", 1)[-1]: p for p in _all_paths(root)}
        other = difflib.get_close_matches(key, list(leaves), n=1, cutoff=0.75)
        hint = (f"did you mean '{leaves[other[0]]}'?" if other
                else f"valid keys of '{prefix.rstrip('.') or 'the top level'}': {', '.join(valid)}")
    return ConfigError(f"unknown key '{full}'{where}: {hint}")


# --------------------------------------------------------------------------------------------- pydantic
_UNKNOWN = {"unexpected_keyword_argument", "extra_forbidden", "invalid_key"}


def _raw_order(raw: Any, loc: tuple[Any, ...]) -> tuple[int, ...]:
    """Position of the error at ``loc`` in the raw input (key order of the mappings, depth first), so that
    the first problem of the file is reported."""
    out = []
    node = raw
    for part in loc:
        if isinstance(node, Mapping):
            keys = list(node)
            out.append(keys.index(part) if part in keys else len(keys))
            node = node.get(part)
        elif isinstance(node, list | tuple) and isinstance(part, int):
            out.append(part)
            node = node[part] if part < len(node) else None
        else:
            break
    return tuple(out)


def from_validation_error(exc: pydantic.ValidationError, raw: Any, root: type, where: str) -> ConfigError:
    """The first error of ``exc`` (validating ``raw`` as ``root``) as a one-line ``ConfigError``."""
    err = min(exc.errors(), key=lambda e: _raw_order(raw, e["loc"]))
    loc, value = err["loc"], err.get("input")
    tp: Any = root
    path = ""
    for i, part in enumerate(loc):
        if is_section(tp):
            fields = hints(tp)
            if (err["type"] in _UNKNOWN and i == len(loc) - 1) or part not in fields:
                return unknown_key(f"{path}." if path else "", str(part), tp, where, root)
            tp, path = fields[part], f"{path}.{part}" if path else str(part)
        elif typing.get_origin(tp) is tuple:
            tp, path = typing.get_args(tp)[0], f"{path}[{part}]"
        elif typing.get_origin(tp) is dict:
            if loc[i + 1:i + 2] == ("[key]",):
                return ConfigError(f"'{path}'{where}: keys must be strings, got {type(part).__name__} "
                                   f"{show(part)}")
            tp, path = typing.get_args(tp)[1], f"{path}.{part}"
        else:
            break  # the rest of a union's loc names the member pydantic tried; report the whole union
    if typing.get_origin(tp) is Literal:
        choices = [str(c) for c in typing.get_args(tp)]
        close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return ConfigError(f"'{path}'{where}: {show(value)} is not one of {', '.join(choices)}{hint}")
    expected = {bool: "bool (true or false)", str: "str (quote it in YAML)"}.get(tp) or type_name(tp)
    return ConfigError(f"'{path}'{where}: expected {expected}, got {type(value).__name__} {show(value)}")
