"""The field types of the config schema and the ``section`` decorator (pydantic v2 dataclasses).

pydantic's lax mode converts too much for a config file (``"true"`` or ``1`` into a bool, ``True`` into an
int), its strict mode too little (no list for a tuple, no mapping for a section), so every leaf field uses
one of these annotated types; ``typing.get_type_hints`` strips the annotations, so the rest of the package
(override parsing, error messages) sees plain ``int``, ``tuple[str, ...]``, ``dict[str, float]``:

* ``Bool``, ``Str``: strict (``true``/``false``; a YAML string).
* ``Int``: an int, an integral float (``1.0e5``) or a numeric string (PyYAML reads ``1e5`` as one); not
  a bool.
* ``Float``: a float, an int or a numeric string (PyYAML reads ``3e-6`` as a string); never a bool.
* ``Tuple[T]``: a YAML list (or tuple) of ``T``, stored as a tuple.
* ``Map[T]``: a ``{str: T}`` mapping, stored as a read-only ``FrozenDict``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Annotated, Any, TypeVar, Union

import pydantic
from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
)
from pydantic_core import PydanticCustomError


class FrozenDict(dict):
    """A read-only ``dict`` used for the ``{name: value}`` fields of the frozen config.

    It stays a ``dict`` (JSON/YAML friendly, equal to plain dicts) and pickles for Ray; mutation raises.
    """

    def _readonly(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("config maps are read-only: build a new config with apply_overrides(cfg, [...])")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _readonly  # type: ignore

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted((k, _hashable(v)) for k, v in self.items())))

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenDict, (dict(self),))

    def __repr__(self) -> str:
        return f"FrozenDict({dict.__repr__(self)})"


def _hashable(v: Any) -> Any:
    """A hashable stand-in for nested maps and lists (runtime_env values nest both)."""
    if isinstance(v, dict):
        return tuple(sorted((k, _hashable(x)) for k, x in v.items()))
    if isinstance(v, list | tuple):
        return tuple(_hashable(x) for x in v)
    return v


def _number(value: Any) -> float | None:
    """A float from an int/float or a numeric string; None otherwise (bools included)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def _to_int(value: Any) -> Any:
    if isinstance(value, int) or isinstance(value, bool):
        return value  # an int passes, a bool fails the strict check after this
    num = _number(value)
    return int(num) if num is not None and math.isfinite(num) and num.is_integer() else value


def _to_float(value: Any) -> Any:
    if isinstance(value, float | bool):
        return value
    num = _number(value)
    return value if num is None else num


def _list_or_tuple(value: Any) -> Any:
    # pydantic's lax tuple also takes sets and generators; a config list is a YAML list
    if isinstance(value, list | tuple):
        return tuple(value)
    raise PydanticCustomError("tuple_type", "Input should be a list")


T = TypeVar("T")
Bool = StrictBool
Str = StrictStr
Int = Annotated[StrictInt, BeforeValidator(_to_int)]
Float = Annotated[StrictFloat, BeforeValidator(_to_float)]
Tuple = Annotated[tuple[T, ...], BeforeValidator(_list_or_tuple)]
Map = Annotated[dict[StrictStr, T], AfterValidator(FrozenDict)]
# one YAML scalar that keeps its type (an option value of a scorer)
Scalar = Union[StrictStr, StrictInt, StrictFloat, StrictBool]  # noqa: UP007 (a runtime type the loader inspects)

# unknown keys are errors; a section instance given for a section field is kept as it is
SECTION_CONFIG = ConfigDict(extra="forbid", revalidate_instances="never")


def section(cls: type) -> type:
    """A frozen pydantic dataclass: still a ``dataclasses`` dataclass (``fields``, ``replace``, hashing,
    ``FrozenInstanceError``), validated on construction."""
    return pydantic.dataclasses.dataclass(frozen=True, config=SECTION_CONFIG)(cls)


field = dataclasses.field
