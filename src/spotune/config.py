"""One config system for every command: typed dataclasses, filled from YAML and `key=value` overrides.

Each recipe owns a flat ``@dataclass`` whose fields carry their help text in
``field(metadata={"help": ...})``. :func:`load_config` reads a YAML file (optional), applies
``key=value`` overrides from the command line, checks every key against the dataclass and converts
each value by the field's declared type. Unknown keys fail with the list of valid ones, so a typo
never silently trains with a default.

Values mean what the user typed. YAML 1.1 (PyYAML's default) reads ``no``, ``yes``, ``on`` and ``off``
as booleans and ``1e-5`` as a string, whatever the field is; here a value given as text (a
command-line value, an unquoted scalar in a file) stays text until the field's type decides:

* ``str`` fields keep the text as typed (``negative_prompt=no`` is the prompt "no");
* ``bool`` fields accept true/false, yes/no, 1/0 (any case);
* ``int`` / ``float`` fields accept ``20``, ``1e-5``, ``6.0e-5``, ``.inf``;
* ``X | None`` fields read ``null``, ``~`` or nothing as None;
* lists are ``[a, b]`` or ``a,b``; untyped (``Any``/``dict``) values follow YAML 1.2's core schema,
  whose only booleans are true/false (:class:`CoreSchemaLoader`).
"""

from __future__ import annotations

from spotune.errors import SpotuneError

import copy
import dataclasses
import math
import re
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


# ================================================================================================
# YAML: the 1.2 core schema, and text kept as typed
# ================================================================================================
# YAML 1.2 core schema (https://yaml.org/spec/1.2.2/#1032-tag-resolution), the forms it resolves.
_NULL = re.compile(r"^(?:null|Null|NULL|~|)$")
_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_INT = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
_FLOAT = re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?)$")
_INF_NAN = re.compile(r"^(?:[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")


def _core_int(text: str) -> int:
    if text.startswith("0o"):
        return int(text[2:], 8)
    if text.startswith("0x"):
        return int(text[2:], 16)
    return int(text)


def _core_float(text: str) -> float:
    if _INF_NAN.match(text):
        if "nan" in text.lower():
            return math.nan
        return -math.inf if text.startswith("-") else math.inf
    return float(text)


class CoreSchemaLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 core-schema implicit types instead of YAML 1.1's.

    Booleans are only true/false (``no``, ``yes``, ``on``, ``off`` stay strings); ``1e-5`` is a float as
    well as ``1.0e-5``; no sexagesimal numbers, no implicit timestamps.
    """

    yaml_implicit_resolvers: dict = {}


for _tag, _regex, _first in (
    ("tag:yaml.org,2002:null", _NULL, ["~", "n", "N", ""]),
    ("tag:yaml.org,2002:bool", _BOOL, list("tTfF")),
    ("tag:yaml.org,2002:int", _INT, list("-+0123456789")),
    ("tag:yaml.org,2002:float", _FLOAT, list("-+.0123456789")),
    ("tag:yaml.org,2002:float", _INF_NAN, list("-+.")),
    ("tag:yaml.org,2002:merge", re.compile(r"^(?:<<)$"), ["<"]),
):
    CoreSchemaLoader.add_implicit_resolver(_tag, _regex, _first)
CoreSchemaLoader.add_constructor("tag:yaml.org,2002:int", lambda loader, node: _core_int(loader.construct_scalar(node)))
CoreSchemaLoader.add_constructor("tag:yaml.org,2002:float", lambda loader, node: _core_float(loader.construct_scalar(node)))


def load_yaml(text: str) -> Any:
    """Parse YAML text with the 1.2 core schema (:class:`CoreSchemaLoader`)."""
    return yaml.load(text, Loader=CoreSchemaLoader)  # noqa: S506 - a SafeLoader subclass


class PlainText(str):
    """A value given as bare text (a command-line value, an unquoted YAML scalar): its field's type reads it."""


class _TextLoader(yaml.SafeLoader):
    """Reads config files keeping every unquoted scalar as :class:`PlainText`, so the field decides its type.

    Quoted scalars stay plain ``str`` (``"null"`` is the text null, never None); explicit tags
    (``!!int``) and anchors/merges work as in any safe loader.
    """

    yaml_implicit_resolvers: dict = {}


_TextLoader.add_implicit_resolver("tag:yaml.org,2002:merge", re.compile(r"^(?:<<)$"), ["<"])


def _construct_text(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> str:
    value = loader.construct_scalar(node)
    return PlainText(value) if node.style is None else value


_TextLoader.add_constructor("tag:yaml.org,2002:str", _construct_text)


def _load_text_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_TextLoader)  # noqa: S506 - a SafeLoader subclass


def _resolve_core(value: Any) -> Any:
    """Give bare text (also inside lists and mappings) its YAML 1.2 core-schema type, for untyped fields.

    The scalar's tag comes from :class:`CoreSchemaLoader`'s own resolvers, so the schema is defined once.
    """
    if isinstance(value, PlainText):
        text = str(value)
        if text.lstrip().startswith(("[", "{")):  # a flow list or mapping typed on the command line
            try:
                return _resolve_core(_load_text_yaml(text))
            except yaml.YAMLError:
                return text
        tag = CoreSchemaLoader.resolve(CoreSchemaLoader, yaml.ScalarNode, text.strip(), (True, False))  # type: ignore[arg-type]
        readers = {
            "tag:yaml.org,2002:null": lambda t: None,
            "tag:yaml.org,2002:bool": lambda t: t.lower() == "true",
            "tag:yaml.org,2002:int": _core_int,
            "tag:yaml.org,2002:float": _core_float,
        }
        return readers[tag](text.strip()) if tag in readers else text
    if isinstance(value, list):
        return [_resolve_core(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _resolve_core(v) for k, v in value.items()}
    return value


# ================================================================================================
# conversion by the field's declared type
# ================================================================================================
_TRUE = ("true", "yes", "1")
_FALSE = ("false", "no", "0")


def _is_optional(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in typing.get_args(annotation)


def _describe_type(annotation: Any) -> str:
    """How the type reads in an error: 'an integer', 'one of no, fp16, bf16', 'a number or null'."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        parts = [_describe_type(a) for a in typing.get_args(annotation) if a is not type(None)]
        return " or ".join(parts + (["null"] if _is_optional(annotation) else []))
    if origin is typing.Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(annotation))
    if origin in (list, tuple):
        args = typing.get_args(annotation)
        return f"a list of {_describe_type(args[0])} values" if args and args[0] is not Any else "a list"
    if origin is dict or annotation is dict:
        return "a mapping"
    return {bool: "true or false (yes/no, 1/0)", int: "an integer", float: "a number", str: "text"}.get(annotation, str(annotation))


def _example(annotation: Any, default: Any = None) -> str:
    """A value of ``annotation`` as one types it after ``key=``; the field's default when it is one."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = next(a for a in typing.get_args(annotation) if a is not type(None))
        return _example(inner, default)
    if origin is typing.Literal:
        allowed = typing.get_args(annotation)
        return str(default if default in allowed else allowed[0])
    if origin in (list, tuple):
        args = typing.get_args(annotation)
        if isinstance(default, (list, tuple)) and default:
            items = [str(v) for v in default]
        else:
            items = ["1", "2"] if args and args[0] in (int, float) else ["a", "b"]
        return "[" + ",".join(items) + "]"
    if annotation is bool:
        return "true" if not isinstance(default, bool) else str(default).lower()
    if annotation is int:
        return str(default) if isinstance(default, int) and not isinstance(default, bool) else "1"
    if annotation is float:
        return repr(float(default)) if isinstance(default, (int, float)) and not isinstance(default, bool) else "1e-4"
    if annotation is str:
        return str(default) if isinstance(default, str) and default and " " not in default else "text"
    return "..."


def _coerce(value: Any, annotation: Any, key: str, source: str, example: str | None = None) -> Any:
    """Convert ``value`` to ``annotation`` or raise a :class:`ConfigError` naming key, value, type and an example.

    ``value`` is :class:`PlainText` when the user typed it (command line, unquoted YAML scalar), in which
    case the type alone decides what it means; plain Python values (quoted YAML strings, lists, numbers
    from code) are checked against the type.
    """
    if example is None:
        example = _example(annotation)

    def fail() -> typing.NoReturn:
        shown = str(value) if isinstance(value, PlainText) else value
        raise ConfigError(
            f"{source}: key '{key}' expects {_describe_type(annotation)}, got {shown!r} (e.g. {key}={example})"
        )

    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if type(None) in args and (value is None or (isinstance(value, PlainText) and _NULL.match(value.strip()))):
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source, example)
            except ConfigError:
                continue
        fail()
    if origin is typing.Literal:
        allowed = typing.get_args(annotation)
        for choice in allowed:
            # text typed by the user matches a choice by its spelling ("no" is the choice "no", never False)
            if (isinstance(value, str) and value == str(choice)) or (not isinstance(value, str) and value == choice
                                                                   and type(value) is type(choice)):
                return choice
        fail()
    if origin in (list, tuple):
        (item_type, *_) = typing.get_args(annotation) or (Any,)
        if isinstance(value, str):
            text = value.strip()
            if isinstance(value, PlainText) and text.startswith("["):
                try:
                    value = _load_text_yaml(text)
                except yaml.YAMLError:
                    fail()
            else:  # "a,b" (and a quoted "a,b" in a file) is the list [a, b]
                value = [PlainText(v.strip()) if isinstance(value, PlainText) else v.strip()
                         for v in text.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            fail()
        items = [_coerce(v, item_type, key, source, None) for v in value]
        return items if origin is list else tuple(items)
    if origin is dict or annotation is dict:
        if isinstance(value, PlainText):
            value = _resolve_core(value)
        if not isinstance(value, dict):
            fail()
        return _resolve_core(dict(value))
    if annotation is Any:
        return _resolve_core(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        fail()
    if annotation is int:
        if isinstance(value, bool):
            fail()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            text = value.strip()
            if _INT.match(text):
                return _core_int(text)
            if _FLOAT.match(text) and float(text).is_integer():  # 1e3, 2.0
                return int(float(text))
        fail()
    if annotation is float:
        if isinstance(value, bool):
            fail()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            text = value.strip()
            if _FLOAT.match(text) or _INF_NAN.match(text) or _INT.match(text):
                return _core_int(text) * 1.0 if _INT.match(text) else _core_float(text)
        fail()
    if annotation is str:
        if isinstance(value, str):
            return str(value)  # as typed: no, 1e-5, null and 010 are text here
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # a number handed over from code
        fail()
    return value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["lr=1e-4", "lora_targets=[to_q,to_k]"]`` into ``{key: PlainText(value)}``.

    Values stay the text typed; :func:`config_from_dict` converts each by its field's type.
    """
    parsed: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. seed=1)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override '{item}' has an empty key (expected key=value, e.g. seed=1)")
        parsed[key] = PlainText(raw)
    return parsed


def _field_example(f: dataclasses.Field, annotation: Any) -> str:
    if f.default is not dataclasses.MISSING:
        default = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        default = f.default_factory()  # type: ignore[misc]
    else:
        default = None
    return _example(annotation, default)


def _check_seed(config: Any, source: str) -> None:
    """Every command's ``seed`` is a non-negative integer: a negative one has no stated meaning (torch folds it
    into an unsigned seed, numpy refuses it), so it is refused here, once, for every config that has one."""
    seed = getattr(config, "seed", None)
    if isinstance(seed, int) and not isinstance(seed, bool) and seed < 0:
        raise ConfigError(f"{source}: seed must be >= 0, got seed={seed}")


def config_from_dict(cls: type[T], values: dict[str, Any], source: str, key_sources: dict[str, str] | None = None) -> T:
    """Build ``cls`` from a flat dict, failing on unknown keys with the list of valid ones.

    Args:
        cls: the config dataclass.
        values: key -> value; :class:`PlainText` values are read by the field's type, others checked against it.
        source: where the values come from, for error messages (a file, "command line").
        key_sources: where single keys come from when they differ from ``source`` (an override of a file).
    """
    types_by_name = _field_types(cls)
    fields_by_name = {f.name: f for f in dataclasses.fields(cls)}
    key_sources = key_sources or {}
    unknown = sorted(set(values) - set(types_by_name))
    if unknown:
        valid = ", ".join(sorted(types_by_name))
        where = key_sources.get(unknown[0], source)
        raise ConfigError(f"{where}: unknown key(s) {unknown}. Valid keys: {valid}")
    kwargs = {
        k: _coerce(v, types_by_name[k], k, key_sources.get(k, source), _field_example(fields_by_name[k], types_by_name[k]))
        for k, v in values.items()
    }
    try:
        config = cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    _check_seed(config, key_sources.get("seed", source))
    validate = getattr(config, "validate", None)
    if callable(validate):
        validate()
    return config


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML config file, unquoted scalars kept as :class:`PlainText`.

    Every way the file can be unusable (missing, a folder, unreadable, not UTF-8, not YAML, not a
    mapping) raises one :class:`ConfigError` line naming the file.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder, not a YAML file (give --config the .yaml file itself)")
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); save it as UTF-8"
        ) from None
    try:
        loaded = _load_text_yaml(text)
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: an explicit tag on a bad value (!!int abc)
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or (str(exc).splitlines() or ["unreadable"])[0]
        raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping of key: value")
    return {str(k): v for k, v in loaded.items()}


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Read ``path`` (YAML mapping, optional), apply ``key=value`` overrides, return a ``cls``.

    Args:
        cls: the recipe's config dataclass.
        path: a UTF-8 YAML file whose top level is a mapping of field names to values.
        overrides: ``key=value`` strings; each value is read by its field's type (``no`` is text for a
            ``str`` field and false for a ``bool`` one; ``1e-4``, ``[a, b]``, ``null``).
    """
    values: dict[str, Any] = {}
    key_sources: dict[str, str] = {}
    source = "command line"
    if path is not None:
        values.update(read_config_file(path))
        source = str(path)
    if overrides:
        override_values = parse_overrides(overrides)
        values.update(override_values)
        key_sources.update(dict.fromkeys(override_values, "command line"))
    return config_from_dict(cls, values, source, key_sources)


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
