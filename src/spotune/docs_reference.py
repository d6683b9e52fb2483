"""The configuration reference, docs/config-reference.md, generated from the config dataclasses.

Every key of every command is a field of that command's config dataclass, made with
:func:`spotune.config.help_field`, so its type, default and help text live in the code. This module
renders them as one Markdown table per command; the page is never edited by hand::

    python -m spotune.docs_reference --write    # regenerate docs/config-reference.md
    python -m spotune.docs_reference --check    # exit 1, with one line, when the file on disk is stale
    python -m spotune.docs_reference            # print the page

``tests/test_docs.py`` runs the check.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml

REFERENCE_PATH = Path("docs") / "config-reference.md"
REGENERATE = "python -m spotune.docs_reference --write"


@dataclasses.dataclass(frozen=True)
class CommandConfig:
    """One command and the dataclass its keys come from.

    Attributes:
        command: how the command is typed, ``spotune train``.
        config: ``module:Class`` of the config dataclass (imported when the page is rendered).
        usage: one sentence on how the keys reach the command.
    """

    command: str
    config: str
    usage: str


COMMANDS: tuple[CommandConfig, ...] = (
    CommandConfig(
        "spotune train", "spotune.recipes.train_spo_config:TrainSPOConfig",
        "`--config FILE` (YAML) and `key=value`; `spotune plan` reads the same keys (it plans a train config).",
    ),
    CommandConfig(
        "spotune train-spm", "spotune.recipes.train_spm:TrainSPMConfig",
        "`--config FILE` (YAML) and `key=value`.",
    ),
    CommandConfig(
        "spotune eval-spm", "spotune.recipes.eval_spm:EvalSPMConfig",
        "`--config FILE` (YAML) and `key=value`.",
    ),
    CommandConfig(
        "spotune eval-lrm", "spotune.recipes.eval_spm:EvalLRMConfig",
        "`--config FILE` (YAML) and `key=value`: eval-spm's keys with an LRM's defaults.",
    ),
    CommandConfig(
        "spotune generate", "spotune.generation.config:GenerateConfig",
        "`--config FILE` (YAML), `key=value`, and the flags `--model`, `--lora`, `--compare-base`, `--prompt`, "
        "`--prompt-file`, `--out` (for `model`, `loras`, `compare_base`, `prompts`, `prompt_file`, `output_dir`).",
    ),
    CommandConfig(
        "spotune eval", "spotune.eval.config:EvalConfig",
        "`--config FILE` (YAML), `key=value`, and the flags `--images`, `--generate`, `--scorers`, `--out` "
        "(for `images`, `generate_config`, `scorers`, `output_dir`).",
    ),
    CommandConfig(
        "spotune demo", "spotune.toyworld.demo:DemoConfig",
        "`--config FILE` (YAML), `key=value`, and the flags `--output`, `--overwrite`.",
    ),
    CommandConfig(
        "spotune export", "spotune.export.api:ExportConfig",
        "the source as an argument and the flags `--format`, `--output`, `--base-model`, `--dtype`, `--weights`, "
        "`--overwrite`; or a YAML file of these keys with `--config FILE` (the flags take precedence).",
    ),
    CommandConfig(
        "python -m spotune.toyworld.pretrain", "spotune.toyworld.pretrain:PretrainConfig",
        "a YAML file and `key=value`: `python -m spotune.toyworld.pretrain configs/toyworld_pretrain.yaml key=value` "
        "(pre-trains the miniature world's base model; not a `spotune` subcommand).",
    ),
)


def _load(target: str) -> type:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def render_type(annotation: Any) -> str:
    """A field's type as a reader types values: ``int``, ``float | None``, ``one of: "lora", "full"``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        parts = [render_type(a) for a in args if a is not type(None)]
        parts = [f"({p})" if p.startswith("one of") else p for p in parts]  # '(one of: "a", "b") | None'
        return " | ".join(parts + (["None"] if type(None) in args else []))
    if origin is typing.Literal:
        return "one of: " + ", ".join(f'"{a}"' if isinstance(a, str) else repr(a) for a in typing.get_args(annotation))
    if origin in (list, tuple, dict, set):
        args = typing.get_args(annotation)
        inner = ", ".join("..." if a is Ellipsis else render_type(a) for a in args)
        return f"{origin.__name__}[{inner}]" if args else origin.__name__
    if annotation is Any:
        return "any"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def render_default(f: dataclasses.Field) -> str:
    """The default as it appears in a run's config.yaml (YAML flow style); ``(required)`` when there is none."""
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return "(required)"
    if isinstance(value, tuple):
        value = list(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    if text.endswith("\n..."):  # the document-end marker YAML adds after a bare scalar
        text = text[: -len("\n...")].rstrip()
    return text


def _cell(text: str) -> str:
    """Text for one Markdown table cell: one line, pipes escaped (also inside code spans, as GFM reads them)."""
    return " ".join(text.split()).replace("|", "\\|")


def _code(text: str) -> str:
    """``text`` as a code span (a double-backtick one when it holds a backtick)."""
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading's text: lower case, punctuation but '-' and '_' dropped, spaces as '-'."""
    kept = "".join(c for c in heading.strip().lower() if c.isalnum() or c in " -_")
    return kept.replace(" ", "-")


def command_table(cls: type) -> str:
    """A Markdown table of every field of ``cls``: key, type, default, help."""
    hints = typing.get_type_hints(cls)
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for f in dataclasses.fields(cls):
        help_text = f.metadata.get("help", "")
        rows.append(
            f"| `{f.name}` | {_cell(_code(render_type(hints[f.name])))} | {_cell(_code(render_default(f)))} "
            f"| {_cell(help_text)} |"
        )
    return "\n".join(rows)


def render_reference() -> str:
    """The whole page: a title, how keys are given, a contents list, then one table per command."""
    lines = [
        "# Configuration reference",
        "",
        "Every key of every command, with its type, default and meaning, generated from the config classes' "
        "help text; [back to the README](../README.md).",
        "",
        f"Generated by `{REGENERATE}` from the code; do not edit it by hand (`tests/test_docs.py` fails when "
        "it is stale). A key is set in a YAML file given with `--config FILE` or as `key=value` on the command "
        "line; `--list-keys` after a command (`spotune train --list-keys`) prints the same keys. Values are read by the key's type: booleans "
        "take true/false, yes/no, 1/0; `null` unsets a key whose type allows `None`; lists are `[a, b]` or `a,b`. "
        "Defaults are shown as a run's `config.yaml` writes them; the shipped YAML files in "
        "[configs/](../configs/) set many keys to a recipe's values.",
        "",
    ]
    for entry in COMMANDS:
        lines.append(f"- [`{entry.command}`](#{_anchor(entry.command)})")
    for entry in COMMANDS:
        cls = _load(entry.config)
        module = entry.config.partition(":")[0]
        source = "src/" + module.replace(".", "/") + ".py"
        lines += [
            "",
            f"## `{entry.command}`",
            "",
            f"`{cls.__name__}` ([{source}](../{source})); keys come from {entry.usage}",
            "",
            command_table(cls),
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m spotune.docs_reference",
        description=f"Print, write or check {REFERENCE_PATH}, the configuration reference generated from the config classes.",
    )
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help=f"write {REFERENCE_PATH}")
    action.add_argument("--check", action="store_true", help=f"exit 1 when {REFERENCE_PATH} differs from the generated text")
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[2],
                        help="the repository root (default: the checkout this module is in)")
    args = parser.parse_args(argv)
    # As the CLI does: transformers' import-time notices would bury the one line --check prints.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    text = render_reference()
    path = args.root / REFERENCE_PATH
    if args.write:
        from spotune.utils.io import atomic_write_text

        atomic_write_text(path, text)
        print(f"wrote {path}")
        return 0
    if args.check:
        try:
            current = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            current = None
        if current != text:
            state = "is missing" if current is None else "is stale"
            print(f"{path} {state}: run `{REGENERATE}`", file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
