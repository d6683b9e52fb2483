"""``spotune generate``: images of a model (plus LoRAs) on fixed per-image seeds, for comparison."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate images of a model (and LoRAs) on fixed seeds, resumable",
        description=(
            "Generate images with the SPO paper's evaluation settings (DDIM, 20 steps, CFG 5.0). Each image's "
            "seed depends only on (seed, prompt index, image index), so models generated into the same output "
            "folder start from identical noise. Settings come from --config (YAML), the flags below and "
            "key=value overrides; `spotune generate --list-keys` prints them all. Example: `spotune generate "
            "--model sd15/ --lora runs/spo --compare-base --prompt-file PartiPrompts.tsv --out gens/ "
            "images_per_prompt=2`."
        ),
    )
    parser.add_argument("--config", help="YAML file of settings")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="settings that override the file")
    parser.add_argument("--model", help="base model (diffusers folder, .safetensors, hub id, builtin:tiny-sd15)")
    parser.add_argument(
        "--lora", action="append", metavar="PATH[:SCALE]", help="a LoRA file or spotune run folder (repeatable)"
    )
    parser.add_argument("--compare-base", action="store_true", help="also generate the base model alone, as 'base'")
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable; instead of --prompt-file)")
    parser.add_argument("--prompt-file", help="prompt file, or a folder in the HPS v2 benchmark layout")
    parser.add_argument("--out", help="output folder (output_dir)")
    parser.add_argument("--list-keys", action="store_true", help="print every config key with its default and help")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML, then exit")
    parser.set_defaults(func=run)


def flag_overrides(args: argparse.Namespace) -> dict:
    """Values given with the convenience flags (they win over the YAML file and key=value)."""
    values: dict = {}
    if args.model:
        values["model"] = args.model
    if args.lora:
        values["loras"] = list(args.lora)
    if args.compare_base:
        values["compare_base"] = True
    if args.prompt:
        values["prompts"] = list(args.prompt)
    if args.prompt_file:
        values["prompt_file"] = args.prompt_file
    if args.out:
        values["output_dir"] = args.out
    return values


def load_with_flags(cls: type, path: str | None, overrides: list[str], flags: dict):
    """``load_config`` with the flags' values applied last, validating once everything is in.

    The YAML alone may lack keys that the flags give (the model, the output folder), so it is read
    into an unvalidated copy of ``cls`` first.
    """
    from spotune.config import config_from_dict, config_to_dict, load_config

    if not flags:
        return load_config(cls, path, overrides)
    unchecked = type(f"Unchecked{cls.__name__}", (cls,), {"validate": lambda self: None})
    base = load_config(unchecked, path, overrides)
    return config_from_dict(cls, {**config_to_dict(base), **flags}, "command line")


def run(args: argparse.Namespace) -> int:
    from spotune.config import config_to_yaml, describe_config
    from spotune.generation.config import GenerateConfig

    if args.list_keys:
        print(describe_config(GenerateConfig))
        return 0
    config = load_with_flags(GenerateConfig, args.config, args.overrides, flag_overrides(args))
    if args.print_config:
        print(config_to_yaml(config), end="")
        return 0
    from spotune.generation.runner import run_generate

    result = run_generate(config)
    for name, folder in result.folders.items():
        print(f"{name}: {result.generated[name]} new, {result.kept[name]} kept -> {folder}")
    if result.grid:
        print(f"grid: {result.grid}")
    return 0
