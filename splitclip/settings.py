"""The one typed loader of `SPLITCLIP_*` settings, for both EdgeSettings and CloudSettings.

A settings class is a dataclass whose fields have one of the types int, float, bool, Path, str, or
`X | None` of one of them. `load()` reads field `foo` from `SPLITCLIP_FOO` (an empty value means unset:
the field keeps its default), then applies overrides (CLI flags, Serve application args) that are not
None. Strings are parsed by the same rules wherever they come from:

  int    int("42")                  float  float("0.5"), or an int
  bool   1/0, true/false, yes/no    Path   any non-empty string
  str    as is (or a path, as its string)

An override that names no field is an error. A variable that names no field is not: the `SPLITCLIP_`
namespace is shared by the edge, the cloud and the runtime (SPLITCLIP_ORT_THREADS), and one shell or pod
may set all of them. Every error is a one-line `SettingsError` naming the setting, its value and the
expected type.
"""

from __future__ import annotations

import os
import types
import typing
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from splitclip.errors import SplitclipError

ENV_PREFIX = "SPLITCLIP_"
TRUE = frozenset({"1", "true", "yes"})
FALSE = frozenset({"0", "false", "no"})
_EXPECTED = {
    int: "int",
    float: "float",
    bool: "bool (1/0/true/false/yes/no)",
    Path: "path (a non-empty string)",
    str: "str",
}


class SettingsError(SplitclipError, ValueError):
    """A setting that is unknown, of the wrong type or out of range; the message names it and its value."""


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def field_types(cls: type) -> dict[str, type]:
    """{field name: its base type} of a settings dataclass (`X | None` gives X)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in fields(cls):
        base = _base_type(hints[f.name])
        if base not in _EXPECTED:
            raise TypeError(f"{cls.__name__}.{f.name}: {hints[f.name]} is not a settings type")
        out[f.name] = base
    return out


def _base_type(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


def parse(label: str, typ: type, value: object) -> Any:
    """`value` (a string, or a Python value from code or config) as `typ`; `label` names it in errors."""
    try:
        return _parse(typ, value)
    except (TypeError, ValueError):
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        raise SettingsError(f"{label}={shown} is not a valid {_EXPECTED[typ]}") from None


def _parse(typ: type, value: object) -> Any:
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in TRUE | FALSE:
            return value.strip().lower() in TRUE
    elif isinstance(value, bool):  # True is an int to Python, never to a setting
        pass
    elif typ is int:
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            return int(value)
    elif typ is float:
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            return float(value)
    elif typ is Path:
        if isinstance(value, os.PathLike) or (isinstance(value, str) and value.strip()):
            return Path(value)
    elif typ is str:
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike):
            return os.fspath(value)
    raise ValueError(value)


def load(
    cls: type,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
    *,
    kind: str,
) -> dict[str, Any]:
    """The parsed values of the fields of `cls` that `env` (default os.environ) or `overrides` set;
    overrides win. `kind` ("edge", "cloud") names the settings in errors."""
    env = os.environ if env is None else env
    types_ = field_types(cls)
    values: dict[str, Any] = {}
    for name, typ in types_.items():
        raw = env.get(env_name(name))
        if raw is not None and raw != "":
            values[name] = parse(env_name(name), typ, raw)
    for name, value in (overrides or {}).items():
        if name not in types_:
            raise SettingsError(f"unknown {kind} setting {name!r}; known: {', '.join(sorted(types_))}")
        if value is not None:
            values[name] = parse(f"{kind} setting {name}", types_[name], value)
    return values
