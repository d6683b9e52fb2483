"""``spotune eval-spm`` and ``spotune eval-lrm``: a judge's pairwise accuracy per denoising timestep."""

from __future__ import annotations

import argparse
import os


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval-spm",
        help="measure a preference model's pairwise accuracy at each denoising timestep",
        description=(
            "Pairwise accuracy of a judge (step-aware model, PickScore, or a tiny judge) against the labels of "
            "Pick-a-Pic-format pairs, at t = 0 on the clean images and at t > 0 on the diffusion model's "
            "x0-predictions, ties left out. Settings come from --config (YAML) and key=value overrides, e.g. "
            "`spotune eval-spm judge=spm judge_clip_path=PATH judge_checkpoint=runs/spm data=PATH "
            "pretrained_model=PATH output=acc.csv`."
        ),
    )
    _common(parser, "EvalSPMConfig")
    parser = subparsers.add_parser(
        "eval-lrm",
        help="measure a latent reward model's (LPO's judge) pairwise accuracy at each denoising timestep",
        description=(
            "Pairwise accuracy of LPO's latent reward model against the labels of Pick-a-Pic-format pairs: each image "
            "VAE-encoded, noised to t with its own noise and judged as a latent (as it is trained), ties left out. "
            "eval-spm's settings with judge=lrm and the authors' timesteps (1, 251, 501, 751, 951), e.g. "
            "`spotune eval-lrm judge_checkpoint=runs/lrm pretrained_model=PATH data=PATH output=acc.csv`."
        ),
    )
    _common(parser, "EvalLRMConfig")


def _common(parser, config_class: str) -> None:
    parser.add_argument("--config", help="YAML file of settings")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="settings that override the file")
    parser.add_argument("--list-keys", action="store_true", help="print every config key with its default and help, then exit")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML, then exit")
    parser.set_defaults(func=run, config_class=config_class)


def run(args: argparse.Namespace) -> int:
    from spotune.config import config_to_yaml, describe_config, load_config
    from spotune.recipes import eval_spm

    config_class = getattr(eval_spm, args.config_class)
    if args.list_keys:
        print(describe_config(config_class))
        return 0
    config = load_config(config_class, args.config, args.overrides)
    if args.print_config:
        print(config_to_yaml(config), end="")
        return 0
    from spotune.preference.spm_eval import format_accuracy_table
    from spotune.recipes.eval_spm import run_eval_spm

    rows = run_eval_spm(config)
    if int(os.environ.get("RANK", "0")) == 0:  # one table, however many processes measured
        print(format_accuracy_table(rows))
        # What the numbers rest on, so they can be set beside train-spm's accuracy.csv (same seed, same pairs).
        pairs = max((r.total for r in rows), default=0)
        print(f"measured on {pairs} decisive pair(s) (ties left out) of {config.data} with noise seed {config.seed}")
    return 0
