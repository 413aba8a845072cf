"""Dumping: ``to_dict`` (plain Python of a config), ``dump_yaml`` (the resolved config as YAML, optionally
with each field's description from the section docstrings as a comment above it) and ``reference_yaml``
(the text of configs/reference.yaml). ``load_config`` of a dump gives an equal config."""

from __future__ import annotations

import dataclasses
import re
import textwrap
from collections.abc import Mapping
from functools import cache
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from rtdmd_ray.config.schema import Config


def to_dict(obj: Any) -> Any:
    """Plain Python (dict/list/scalars) of a config or section, in field order."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    return obj


@cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field: description}`` parsed from the Google-style ``Attributes:`` section of ``cls``'s
    docstring."""
    doc = cls.__doc__ or ""
    lines = doc.splitlines()
    out: dict[str, str] = {}
    try:
        start = next(i for i, ln in enumerate(lines) if ln.strip() == "Attributes:")
    except StopIteration:
        return out
    indent = None
    current = None
    for ln in lines[start + 1:]:
        if not ln.strip():
            continue
        ind = len(ln) - len(ln.lstrip())
        if indent is None:
            indent = ind
        if ind < indent:
            break
        m = re.match(r"^(\w+): (.*)$", ln.strip())
        if ind == indent and m:
            current = m.group(1)
            out[current] = m.group(2).strip()
        elif current is not None:
            out[current] += " " + ln.strip()
    return out


def _flow(value: Any) -> str:
    """One YAML flow value (scalar, [list] or {map}) that safe_load reads back to the same value."""
    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf"), sort_keys=False)
    text = text.strip()
    if text.endswith("\n..."):
        text = text[: -len("\n...")]
    elif text.endswith("..."):
        text = text[:-3].rstrip()
    return text


def _dump_section(obj: Any, indent: int, comments: bool, lines: list[str]) -> None:
    docs = field_docs(type(obj)) if comments else {}
    pad = " " * indent
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if comments and f.name in docs:
            width = max(40, 110 - indent - 2)
            lines.extend(f"{pad}# {ln}" for ln in textwrap.wrap(docs[f.name], width, break_on_hyphens=False))
        if dataclasses.is_dataclass(value):
            lines.append(f"{pad}{f.name}:")
            _dump_section(value, indent + 2, comments, lines)
        else:
            _dump_value(f.name, to_dict(value), indent, lines)


def _dump_value(key: str, value: Any, indent: int, lines: list[str]) -> None:
    """``key: value``: non-empty maps in block style (an entry per line), everything else in flow style."""
    pad = " " * indent
    if isinstance(value, dict) and value:
        lines.append(f"{pad}{_flow(key)}:")
        for k, v in value.items():
            _dump_value(k, v, indent + 2, lines)
    else:
        lines.append(f"{pad}{_flow(key)}: {_flow(value)}")


def dump_yaml(cfg: Config, *, comments: bool = False) -> str:
    """The fully resolved config as YAML; ``load_config`` of the text gives an equal config.

    Args:
        cfg: the config.
        comments: put each field's description (from the section docstrings) on a comment line above it.
    """
    lines = ([f"# {ln}" for ln in textwrap.wrap(f"rtdmd-ray resolved config: {cfg.summary()}", 108)]
             if comments else [])
    _dump_section(cfg, 0, comments, lines)
    return "\n".join(lines) + "\n"
