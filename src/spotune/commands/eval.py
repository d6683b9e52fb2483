"""``spotune eval``: score image folders (or generate them first) and write tables, plots and a report."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="score generated images (PickScore, HPS v2, ImageReward, aesthetic, ...) and write a report",
        description=(
            "Score image folders with local scorer weights (nothing is downloaded) and write scores.csv, "
            "summary tables with 95% confidence intervals, win rates on identical prompts and seeds, plots and "
            "report.html. Settings come from --config (YAML), the flags below and key=value overrides; "
            "`spotune eval --list-keys` prints them all. Example: `spotune eval --images gens/ --out report/ "
            "scorers=[pickscore,hpsv2] pickscore_model=PickScore_v1 pickscore_processor=CLIP-ViT-H-14 "
            "hps_checkpoint=HPS_v2_compressed.pt`."
        ),
    )
    parser.add_argument("--config", help="YAML file of settings")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="settings that override the file")
    parser.add_argument("--images", action="append", metavar="FOLDER", help="an image folder to score (repeatable)")
    parser.add_argument("--generate", metavar="YAML", help="run `spotune generate` with this config first")
    parser.add_argument("--scorers", help="comma-separated scorer names")
    parser.add_argument("--out", help="report folder (output_dir)")
    parser.add_argument("--list-keys", action="store_true", help="print every config key with its default and help")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML, then exit")
    parser.set_defaults(func=run)


def flag_overrides(args: argparse.Namespace) -> dict:
    values: dict = {}
    if args.images:
        values["images"] = list(args.images)
    if args.generate:
        values["generate_config"] = args.generate
    if args.scorers:
        values["scorers"] = [s.strip() for s in args.scorers.split(",") if s.strip()]
    if args.out:
        values["output_dir"] = args.out
    return values


def run(args: argparse.Namespace) -> int:
    from spotune.commands.generate import load_with_flags
    from spotune.config import config_to_yaml, describe_config
    from spotune.eval.config import EvalConfig

    if args.list_keys:
        print(describe_config(EvalConfig))
        return 0
    config = load_with_flags(EvalConfig, args.config, args.overrides, flag_overrides(args))
    if args.print_config:
        print(config_to_yaml(config), end="")
        return 0
    from spotune.eval.report import markdown_report
    from spotune.eval.runner import run_eval

    result = run_eval(config)
    print(markdown_report(result.tables, config.title), end="")
    print(f"report: {result.report}")
    return 0
