"""One config system for every command: typed dataclasses, filled from YAML and `key=value` overrides.

Each recipe owns a flat ``@dataclass`` whose fields carry their help text in
``field(metadata={"help": ...})``. :func:`load_config` reads a YAML file (optional), applies
``key=value`` overrides from the command line, checks every key against the dataclass and coerces
each value to the field's type. Unknown keys fail with the list of valid ones, so a typo never
silently trains with a default.
"""

from __future__ import annotations

from spotune.errors import SpotuneError

import copy
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(SpotuneError, ValueError):
    """A config file or override that cannot be turned into the recipe's config."""


def help_field(text: str, default: Any) -> Any:
    """A dataclass field with a default and its help text (shown by ``--list-keys`` and in config.yaml)."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata={"help": text})
    return dataclasses.field(default=default, metadata={"help": text})


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, annotation: Any, key: str, source: str) -> Any:
    """Coerce a YAML-parsed value to ``annotation`` or raise a :class:`ConfigError` naming ``key``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{source}: key '{key}' cannot be {value!r}")
    if origin is typing.Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise ConfigError(f"{source}: key '{key}' must be one of {list(allowed)}, got {value!r}")
        return value
    if origin in (list, tuple):
        (item_type, *_) = typing.get_args(annotation) or (Any,)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: key '{key}' expects a list, got {value!r}")
        items = [_coerce(v, item_type, key, source) for v in value]
        return items if origin is list else tuple(items)
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: key '{key}' expects a mapping, got {value!r}")
        return dict(value)
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{source}: key '{key}' expects true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{source}: key '{key}' expects an integer, got {value!r}")
        try:
            as_float = float(value)
        except ValueError:
            raise ConfigError(f"{source}: key '{key}' expects an integer, got {value!r}") from None
        if as_float != int(as_float):
            raise ConfigError(f"{source}: key '{key}' expects an integer, got {value!r}")
        return int(as_float)
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{source}: key '{key}' expects a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{source}: key '{key}' expects a number, got {value!r}") from None
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{source}: key '{key}' expects a string, got {value!r}")
        return str(value)
    return value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["lr=1e-4", "lora_targets=[to_q,to_k]"]`` into a dict, values parsed as YAML scalars."""
    parsed: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override '{item}' has an empty key")
        try:
            parsed[key] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            parsed[key] = raw
    return parsed


def config_from_dict(cls: type[T], values: dict[str, Any], source: str) -> T:
    """Build ``cls`` from a flat dict, failing on unknown keys with the list of valid ones."""
    types_by_name = _field_types(cls)
    unknown = sorted(set(values) - set(types_by_name))
    if unknown:
        valid = ", ".join(sorted(types_by_name))
        raise ConfigError(f"{source}: unknown key(s) {unknown}. Valid keys: {valid}")
    kwargs = {k: _coerce(v, types_by_name[k], k, source) for k, v in values.items()}
    try:
        config = cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    validate = getattr(config, "validate", None)
    if callable(validate):
        validate()
    return config


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Read ``path`` (YAML mapping, optional), apply ``key=value`` overrides, return a ``cls``.

    Args:
        cls: the recipe's config dataclass.
        path: a YAML file whose top level is a mapping of field names to values.
        overrides: ``key=value`` strings; values are parsed as YAML (``true``, ``1e-4``, ``[a, b]``).
    """
    values: dict[str, Any] = {}
    source = "command line"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: the top level must be a mapping of key: value")
        values.update(loaded)
        source = str(path)
    if overrides:
        override_values = parse_overrides(overrides)
        values.update(override_values)
        if path is not None:
            source = f"{path} + command line"
    return config_from_dict(cls, values, source)


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain-data view of a config dataclass (tuples become lists), ready for YAML or JSON."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def config_to_yaml(config: Any) -> str:
    """YAML text of ``config`` with each field's help as a comment above it."""
    lines = []
    data = config_to_dict(config)
    for f in dataclasses.fields(config):
        help_text = f.metadata.get("help")
        if help_text:
            lines.append(f"# {help_text}")
        value = yaml.safe_dump(data[f.name], default_flow_style=True, width=10**6).strip()
        if value.endswith("\n..."):  # the document-end marker YAML adds after a bare scalar
            value = value[: -len("\n...")].rstrip()
        lines.append(f"{f.name}: {value}")
    return "\n".join(lines) + "\n"


def describe_config(cls: type) -> str:
    """A Markdown table of every field: name, default, help. Used by ``spotune config --list``."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "(required)"
        rows.append(f"| `{f.name}` | `{default}` | {f.metadata.get('help', '')} |")
    return "\n".join(rows)
