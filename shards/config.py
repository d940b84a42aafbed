"""Typed YAML configs with dotted overrides: the one loader of `multimae-train` and `multimae-label` settings.

A config is a tree of dataclasses. `load_config(cls, path, overrides)` reads a YAML file (optionally one
section of it, such as the `metadata:` of a Ray cluster config), applies `key.sub=value` overrides (values
parsed as YAML) and returns a validated instance:

- unknown keys, values of the wrong type and null where null is not allowed raise `ConfigError` naming the
  key; a problem in the file names the file, a problem an override brings in names the override;
- types are `int`, `float` (YAML 1.1's `1e-4` and `"1e-1"` are numbers), `bool`, `str`, `Literal[...]`,
  `X | None`, unions such as `int | list[int]`, `list[X]`, `dict[str, X]` and nested dataclasses;
- an override sets one key (`data.inputs.depth=depth_gt`) or replaces a whole section
  (`data.inputs={rgb: rgb}`); setting a key *below* a value that is not a section is an error;
- after building, each dataclass's `check()` method (when it has one) runs cross-field rules.

Loading reads only the YAML file: checks that need data or weights run when the job starts. This module
imports no torch, so a config error is reported in well under a second.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")
_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


class ConfigError(ValueError):
    """A bad config file, key, value or override; the message names it and what is allowed."""


def _describe(value: Any) -> str:
    return f"{value!r}" if not isinstance(value, dict | list) or len(repr(value)) < 60 else type(value).__name__


def _convert(value: Any, tp: Any, key: str, check: bool = True) -> Any:
    """`value` checked against (and converted to) type `tp`; ConfigError naming `key` otherwise."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: must not be null")
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, key, check)
            except ConfigError as e:
                errors.append(str(e).removeprefix(f"{key}: "))
        raise ConfigError(f"{key}: {' or '.join(dict.fromkeys(errors))}")
    if value is None:
        raise ConfigError(f"{key}: must not be null")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {_describe(value)} is not one of {list(typing.get_args(tp))}")
        return value
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {_describe(value)}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{key}[{i}]", check) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {_describe(value)}")
        _, vt = typing.get_args(tp)
        return {str(k): _convert(v, vt, f"{key}.{k}", check) for k, v in value.items()}
    if tp is float:
        if isinstance(value, str) and _FLOAT.match(value.strip()):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {_describe(value)}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {_describe(value)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {_describe(value)}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {_describe(value)}")
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key, check=check)
    raise ConfigError(f"{key}: unsupported type {tp}")


def build(cls: type[T], data: Any, prefix: str = "", *, check: bool = True) -> T:
    """Dataclass `cls` from plain data (e.g. a checkpoint's saved config), type-checked, then `check()`ed."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    fields = {field_key(f): f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        raise ConfigError(f"{key}: unknown key (known{' in ' + prefix if prefix else ''}: {', '.join(fields)})")
    values = {
        fields[k]: _convert(v, hints[fields[k]], f"{prefix}.{k}" if prefix else k, check) for k, v in data.items()
    }
    obj = cls(**values)
    if check and hasattr(obj, "check"):
        try:
            obj.check()
        except ConfigError as e:
            raise ConfigError(f"{prefix}.{e}" if prefix else str(e)) from None
    return obj


def field_key(f: dataclasses.Field) -> str:
    """A field's key in YAML and overrides: its name, or `metadata["key"]` where the key cannot be a Python name
    (`field(default=None, metadata={"key": "from"})` reads `from:` into the field)."""
    return f.metadata.get("key", f.name)


def to_data(obj: Any) -> Any:
    """A config as plain data under its YAML keys (`dataclasses.asdict`, with `field_key` names)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {field_key(f): to_data(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_data(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_data(v) for k, v in obj.items()}
    return copy.deepcopy(obj)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b=value' -> (["a", "b"], value parsed as YAML; "" is null)."""
    key, sep, raw = text.partition("=")
    path = key.strip().split(".")
    if not sep or not all(re.fullmatch(r"[A-Za-z0-9_-]+", p) for p in path):
        raise ConfigError(f"override {text!r}: expected key=value (e.g. optim.blr=3e-4)")
    try:
        return path, yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({e.problem})") from None


def set_key(data: dict, path: list[str], value: Any) -> None:
    """Set data[path[0]]...[path[-1]] = value, creating sections; a non-section on the way is an error."""
    node = data
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path[: i + 1])} is {_describe(child)}, not a section")
        node = child
    node[path[-1]] = value


def read_yaml(path: str, section: str | None = None) -> dict:
    """The mapping in a YAML file (its `section` when the file has one); ConfigError naming the file."""
    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a config file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    doc = {} if doc is None else doc
    if section is not None and isinstance(doc, dict) and section in doc:
        doc = doc[section] or {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    return doc


def load_config(cls: type[T], path: str | None, overrides: list[str] | tuple[str, ...] = (), *, section=None) -> T:
    """Read `path` (defaults when None), apply overrides in order, validate; errors name their source.

    Overrides apply to the resolved config (file over defaults), so `data.inputs.depth=x` adds to the
    default inputs. A cross-field rule that fails is blamed on the first override after which it fails,
    or on the file when the file alone already fails it.
    """
    source = path or "defaults"
    try:
        data = to_data(build(cls, read_yaml(path, section) if path else {}, check=False))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None
    stages = [(source, copy.deepcopy(data))]
    for text in overrides:
        keys, value = parse_override(text)
        try:
            set_key(data, keys, value)
            data = to_data(build(cls, data, check=False))
        except ConfigError as e:
            raise ConfigError(f"override {text!r}: {e}") from None
        stages.append((f"override {text!r}", copy.deepcopy(data)))
    errors = []
    for _, staged in stages:
        try:
            build(cls, staged)
            errors.append(None)
        except ConfigError as e:
            errors.append(str(e))
    if errors[-1] is None:
        return build(cls, data)
    culprit = len(stages) - 1  # the first stage from which on the final error holds
    while culprit > 0 and errors[culprit - 1] == errors[-1]:
        culprit -= 1
    raise ConfigError(f"{stages[culprit][0]}: {errors[-1]}")


def to_yaml(obj: Any) -> str:
    """A dataclass config as YAML (what `--print-config` shows)."""
    return yaml.safe_dump(to_data(obj), sort_keys=False, default_flow_style=None, width=100)
