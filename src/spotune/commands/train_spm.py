"""``spotune train-spm``: train a step-aware preference model on Pick-a-Pic-format pairs."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train-spm",
        help="train a step-aware preference model (SPO's judge) on preference pairs",
        description=(
            "Train a step-aware preference model: a CLIP (PickScore_v1) with timestep conditioning, taught to "
            "rank the x0-predictions of noisy steps. Settings come from --config (YAML) and key=value overrides, "
            "e.g. `spotune train-spm --config configs/sd15_spm.yaml train_data=PATH clip_path=PATH`. "
            "`spotune train-spm --list-keys` prints every key with its default and meaning. Multi-GPU: "
            "`accelerate launch -m spotune.cli train-spm ...`."
        ),
    )
    parser.add_argument("--config", help="YAML file of settings (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="settings that override the file")
    parser.add_argument("--list-keys", action="store_true", help="print every config key with its default and help, then exit")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML, then exit")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from spotune.config import config_to_yaml, describe_config, load_config
    from spotune.recipes.train_spm import TrainSPMConfig

    if args.list_keys:
        print(describe_config(TrainSPMConfig))
        return 0
    config = load_config(TrainSPMConfig, args.config, args.overrides)
    if args.print_config:
        print(config_to_yaml(config), end="")
        return 0
    from spotune.recipes.train_spm import run_train_spm

    metrics = run_train_spm(config)
    summary = ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
    print(f"done: {config.output_dir}" + (f" ({summary})" if summary else ""))
    return 0
