"""``spotune export``: write a trained run as a LoRA for diffusers or webui, a merged pipeline, or one file.

    spotune export RUN_OR_CHECKPOINT --format diffusers|webui|merged|single-file --output PATH
                   [--base-model SRC] [--dtype fp16|bf16|fp32] [--weights trained|ema] [--overwrite]
                   [--config export.yaml]

--weights ema writes the EMA weights a GradSPO run (algorithm=gradspo) samples with; the default,
trained, writes the optimised weights, which is what GradSPO's official code releases.

Flags override the optional YAML config (fields of :class:`spotune.export.ExportConfig`).
"""

from __future__ import annotations

import argparse
import dataclasses


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a run or checkpoint (diffusers / webui LoRA, merged pipeline, single file)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", nargs="?", help="run folder (latest checkpoint), checkpoint folder, or LoRA file")
    parser.add_argument("--format", choices=["diffusers", "webui", "merged", "single-file"], help="what to write (required)")
    parser.add_argument("--output", "-o", help="file or folder to write")
    parser.add_argument("--base-model", dest="base_model", help="base model to merge into (default: the run's)")
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="dtype of the written weights (default fp16)")
    parser.add_argument("--weights", choices=["trained", "ema"],
                        help="trained (default) or ema: the EMA weights of an algorithm=gradspo run")
    parser.add_argument("--overwrite", action="store_true", default=None, help="replace an existing output")
    parser.add_argument("--config", help="YAML file with ExportConfig fields (flags take precedence)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from spotune.config import ConfigError, config_from_dict, config_to_dict, load_config
    from spotune.export import ExportConfig, export_checkpoint

    values = config_to_dict(load_config(ExportConfig, args.config)) if args.config else {}
    for f in dataclasses.fields(ExportConfig):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    config = config_from_dict(ExportConfig, values, args.config or "command line")
    missing = [name for name in ("source", "format", "output") if not getattr(config, name)]
    if missing:
        raise ConfigError(
            f"export: {', '.join(missing)} not given (usage: spotune export SOURCE --format FORMAT --output PATH)"
        )
    written = export_checkpoint(
        config.source,
        config.format,
        config.output,
        base_model=config.base_model,
        dtype=config.dtype,
        overwrite=config.overwrite,
        weights=config.weights,
    )
    print(f"wrote {config.format} export of {config.source} to {written}")
    return 0
