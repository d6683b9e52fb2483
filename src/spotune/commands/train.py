"""``spotune train``: SPO fine-tuning of an SD1.5-family model."""

from __future__ import annotations

import argparse
import os


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="fine-tune a diffusion model with SPO (LoRA or full)",
        description=(
            "Fine-tune with Step-by-step Preference Optimization. Settings come from --config (YAML) and "
            "key=value overrides, e.g. `spotune train --config configs/sd15_spo.yaml output_dir=runs/a learning_rate=1e-5`. "
            "`spotune train --list-keys` prints every key with its default and meaning. Multi-GPU: "
            "`accelerate launch -m spotune.cli train ...`."
        ),
    )
    parser.add_argument("--config", help="YAML file of settings (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="settings that override the file")
    parser.add_argument("--list-keys", action="store_true", help="print every config key with its default and help, then exit")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML, then exit")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from spotune.config import config_to_yaml, describe_config, load_config
    from spotune.recipes.train_spo_config import TrainSPOConfig

    if args.list_keys:
        print(describe_config(TrainSPOConfig))
        return 0
    config = load_config(TrainSPOConfig, args.config, args.overrides)
    if args.print_config:
        print(config_to_yaml(config), end="")
        return 0
    from spotune.recipes.trainers import run_train_spo

    metrics = run_train_spo(config)
    if os.environ.get("RANK", "0") != "0":  # one summary per run, not per process
        return 0
    if metrics:
        summary = ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
        print(f"done: {config.output_dir} ({summary})")
    else:
        print(f"done: {config.output_dir}")
    print(f"next: {export_command(config.output_dir, config.finetune)}")
    return 0


def export_command(output_dir: str, finetune: str) -> str:
    """The ``spotune export`` line that turns this run into something webui / diffusers load."""
    import shlex
    from pathlib import Path

    run = Path(output_dir)
    if finetune == "lora":
        target = run.parent / f"{run.name}_lora.safetensors"
        return f"spotune export {shlex.quote(str(run))} --format webui --output {shlex.quote(str(target))}"
    target = run.parent / f"{run.name}_merged"
    return f"spotune export {shlex.quote(str(run))} --format merged --output {shlex.quote(str(target))}"
