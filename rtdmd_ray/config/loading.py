"""Loading: YAML files with their ``inherit`` chains, ``key.sub=value`` overrides, and building the frozen
``Config`` (pydantic validates; errors.py turns its errors into one-line ``ConfigError`` messages).

Precedence: schema default < YAML file (and the files it ``inherit``s) < ``key.sub=value`` overrides.

* ``inherit: other.yaml`` (or a list of files), top level only, paths relative to the including file.
  Files merge in order, then the including file on top. Sections merge key by key; every other value,
  lists and ``{name: value}`` maps included, is replaced whole. A key or type error names the file that
  holds the bad key, not the file that inherits it.
* Overrides ``a.b.c=value``: the value is parsed as a YAML flow scalar/list/map (``x=[1,2]``,
  ``d={a: 1}``, ``3``, ``3.0``, ``true``), except for string fields, which take the text verbatim. A map
  given for a section merges into it; a path through a ``{name: value}`` map adds or replaces one entry
  (``rewards.weights.hpsv2=1.0``). An error caused by an override names it.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, Union

import pydantic
import yaml

from rtdmd_ray.config.dump import dump_yaml, to_dict
from rtdmd_ray.config.errors import (
    ConfigError,
    from_validation_error,
    hints,
    is_section,
    type_name,
    unknown_key,
)
from rtdmd_ray.config.schema import REPO_ROOT, Config

# libyaml's loader when present (same YAML 1.1 resolution as the pure-Python SafeLoader, several times faster)
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_CONFIG = pydantic.TypeAdapter(Config)
INHERIT_KEY = "inherit"


def _build(raw: Mapping[str, Any], where: str = "") -> Config:
    """``Config`` from a raw mapping; unknown keys and wrong types raise a one-line ConfigError."""
    try:
        return _CONFIG.validate_python(raw)
    except pydantic.ValidationError as exc:
        raise from_validation_error(exc, raw, Config, where) from None


def _merge(base: Mapping[str, Any], over: Mapping[str, Any], cls: type | None) -> dict[str, Any]:
    """``over`` on top of ``base``: sections merge key by key, any other value is replaced whole."""
    out = dict(base)
    fields = hints(cls) if cls is not None else {}
    for key, value in over.items():
        sub = fields.get(key)
        if is_section(sub) and isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value, sub)
        else:
            out[key] = value
    return out


# ------------------------------------------------------------------------------------- YAML + overrides
def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The raw mapping of ``path`` with its ``inherit`` chain merged in (schema-guided)."""
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise ConfigError(f"inherit cycle: {cycle}")
    if not path.is_file():
        hint = f" (inherited from {chain[-1]})" if chain else ""
        raise ConfigError(f"config file not found: {path}{hint}")
    try:
        raw = yaml.load(path.read_text(), Loader=_YAML_LOADER) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    raw = dict(raw)
    parents = raw.pop(INHERIT_KEY, None)
    # key and type errors name the file that holds the bad key, not the file that inherits it
    _build(raw, f" in {_display(path)}")
    if parents is None:
        return raw
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(x, str) for x in parents):
        raise ConfigError(f"{path}: '{INHERIT_KEY}' must be a file path or a list of file paths")
    merged: dict[str, Any] = {}
    for parent in parents:
        merged = _merge(merged, _read_yaml(path.parent / parent, (*chain, path)), Config)
    return _merge(merged, raw, Config)


def _display(path: Path) -> str:
    """``path`` relative to the working directory when it is below it (shorter error messages)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _field_type_at(parts: list[str], item: str) -> Any:
    """The schema type at a dotted override path, or ConfigError naming the unknown part."""
    tp: Any = Config
    for i, part in enumerate(parts):
        prefix = "".join(f"{p}." for p in parts[:i])
        if is_section(tp):
            fields = hints(tp)
            if part not in fields:
                raise unknown_key(prefix, part, tp, f" (override '{item}')", Config)
            tp = fields[part]
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        else:
            raise ConfigError(f"override '{item}': '{prefix.rstrip('.')}' is a {type_name(tp)} value; it "
                              f"has no sub-key '{part}'")
    return tp


def _parse_override_value(text: str, tp: Any) -> Any:
    """YAML flow parsing of an override value; string fields take the text verbatim."""
    plain = tp
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        plain = args[0] if len(args) == 1 else tp
    literal_str = typing.get_origin(plain) is Literal and all(
        isinstance(c, str) for c in typing.get_args(plain))
    if plain is str or literal_str:
        if text in ("null", "~") and plain is not tp:
            return None
        return text
    try:
        return yaml.load(text, Loader=_YAML_LOADER) if text.strip() else None
    except yaml.YAMLError as exc:
        reason = " ".join(str(exc).split())
        raise ConfigError(f"override value '{text}' is not valid YAML: {reason}") from None


def _apply_override(raw: dict[str, Any], item: str) -> dict[str, Any]:
    """``raw`` with one ``a.b.c=value`` override set (a new mapping; ``raw`` is not modified)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.sub=value (e.g. train.seed=3)")
    key, text = item.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ConfigError(f"override '{item}': the key '{key}' has an empty part")
    leaf_tp = _field_type_at(parts, item)
    value = _parse_override_value(text, leaf_tp)
    root = dict(raw)
    node, tp = root, Config
    for part in parts[:-1]:
        if is_section(tp):
            next_tp = hints(tp)[part]
            # entering a {name: value} map the file left at its default: start from that default, so the
            # override adds or replaces one entry instead of dropping the others
            default = to_dict(getattr(tp(), part)) if typing.get_origin(next_tp) is dict else {}
        else:
            next_tp, default = typing.get_args(tp)[1], {}
        child = node.get(part)
        node[part] = dict(child) if isinstance(child, Mapping) else default
        node, tp = node[part], next_tp
    last = parts[-1]
    if is_section(leaf_tp) and isinstance(value, Mapping) and isinstance(node.get(last), Mapping):
        node[last] = _merge(node[last], value, leaf_tp)
    else:
        node[last] = value
    return root


def _build_config(raw: Mapping[str, Any], overrides: Iterable[str], where: str, validate: bool) -> Config:
    raw = dict(raw)
    if INHERIT_KEY in raw:
        raise ConfigError(f"'{INHERIT_KEY}' is only allowed in a YAML file, not in a mapping or override")
    overrides = list(overrides)
    for item in overrides:
        raw = _apply_override(raw, item)
    try:
        cfg = _build(raw, where)
    except ConfigError as exc:
        # name the override responsible when the bad key or value came from the command line
        msg = str(exc)
        for item in reversed(overrides):
            key = item.split("=", 1)[0].strip()
            if f"'{key}'" in msg or f"'{key}." in msg or f"'{key}[" in msg:
                msg = (msg.replace(where, "", 1) if where else msg) + f" (set by override '{item}')"
                break
        raise ConfigError(msg) from None
    return cfg.validate() if validate else cfg


def load_config(path: str | Path, overrides: Iterable[str] = (), *, validate: bool = True) -> Config:
    """Load a YAML config (with its ``inherit`` chain), apply ``a.b=value`` overrides, and validate.

    Args:
        path: YAML file.
        overrides: dot-notation overrides applied in order, after the file.
        validate: run ``Config.validate()`` (False: key/type checks only, e.g. for partial files).

    Raises:
        ConfigError: one line naming the key path and the fix (unknown key with the closest valid key, wrong
            type with the expected type, or the failed cross-field checks with their numbers).
    """
    raw = _read_yaml(Path(path))
    return _build_config(raw, overrides, f" in {path}", validate)


def config_from_dict(
    raw: Mapping[str, Any], overrides: Iterable[str] = (), *, validate: bool = True
) -> Config:
    """``load_config`` for an in-memory mapping (tests, programmatic runs)."""
    return _build_config(raw, overrides, "", validate)


def apply_overrides(cfg: Config, overrides: Iterable[str], *, validate: bool = True) -> Config:
    """A new config: ``cfg`` with dot-notation overrides applied (the frozen original is unchanged)."""
    return _build_config(to_dict(cfg), overrides, "", validate)


REFERENCE_SOURCE = "configs/rtdmd/sd35m.yaml"


def reference_yaml() -> str:
    """The text of configs/reference.yaml: every key with its description, values of the SD3.5-M RL config."""
    cfg = load_config(REPO_ROOT / REFERENCE_SOURCE)
    head = (f"# GENERATED by `python -m rtdmd_ray.config reference` from {REFERENCE_SOURCE}: every\n"
            "# config key with its description. Do not edit: a test fails when it drifts from the schema.\n")
    return head + dump_yaml(cfg, comments=True)
