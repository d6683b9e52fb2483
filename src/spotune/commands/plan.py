"""``spotune plan``: a training recipe's GPU memory and time, predicted on any machine before renting a GPU."""

from __future__ import annotations

import argparse
import math
import sys

DOES_NOT_FIT_EXIT = 3  # the plan was made, and the recipe does not fit the card


def _number(unit: str = "", *, zero_allowed: bool = False, most: float | None = None):
    """An argparse type: a finite number > 0 (>= 0 with ``zero_allowed``), at most ``most`` (argparse names the flag)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number{unit}, got {text!r}") from None
        low_ok = value >= 0 if zero_allowed else value > 0
        if not (math.isfinite(value) and low_ok and (most is None or value <= most)):
            wanted = f"{'>= 0' if zero_allowed else '> 0'}" + (f" and <= {most:g}" if most is not None else "")
            raise argparse.ArgumentTypeError(f"expected a number {wanted}, got {text!r}")
        return value

    return parse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="predict a training recipe's GPU memory and time, without weights or a GPU",
        description=(
            "Run one iteration of the recipe's own code on fake tensors (shapes only: no weights, no GPU, little "
            "memory) and predict, per phase, the peak GPU memory, what is resident then, the FLOPs and the time "
            "on a named card; then whether it fits, the seconds per iteration and the run's wall time, and, when "
            "it does not fit, the memory settings that would make it fit (each predicted again). "
            "E.g. `spotune plan --config configs/sd15_spo.yaml --gpu RTX-4090`. Every figure is a prediction. "
            f"Exit code: 0 when it fits (or no card was given), {DOES_NOT_FIT_EXIT} when it does not, 1 on bad input."
        ),
    )
    parser.add_argument("--config", help="the train config (YAML) to plan, as given to spotune train")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="train settings that override the file")
    card = parser.add_mutually_exclusive_group()
    card.add_argument("--gpu", help="the card: " + ", ".join(_gpu_names()) + " (memory, and the time estimate)")
    card.add_argument("--memory-gb", type=_number(" (GiB)"), help="the card's memory in GiB (no time estimate)")
    parser.add_argument("--margin-gb", type=_number(" (GiB)", zero_allowed=True), default=None,
                        help="memory kept for the CUDA context and workspaces, GiB (default 1.0)")
    parser.add_argument("--margin-fraction", type=_number(zero_allowed=True, most=1), default=None,
                        help="memory kept for allocator fragmentation, as a fraction of the peak (default 0.10)")
    parser.add_argument("--efficiency", type=_number(most=1), default=None,
                        help="assumed fraction of the card's peak FLOP/s reached (default 0.45)")
    parser.add_argument("--processes", type=int, default=1, help="GPUs sharing each round (accelerate launch --num_processes)")
    parser.add_argument("--no-search", action="store_true", help="do not search for memory settings that would fit")
    parser.add_argument("--json", metavar="FILE", help="also write the report as JSON (top-level 'fits' and 'peak_gib')")
    parser.add_argument("--print-config", action="store_true", help="print the resolved train config as YAML, then exit")
    parser.set_defaults(func=run)


def _check_report_path(path) -> None:
    """Refuse a ``--json`` path that cannot be written, or whose file spotune plan did not write."""
    import json

    from spotune.errors import SpotuneError

    if path.is_dir():
        raise SpotuneError(f"--json {path}: is a folder; give a file path such as {path / 'plan.json'}")
    if not path.parent.is_dir():
        raise SpotuneError(f"--json {path}: its folder {path.parent} does not exist; create it or give another path")
    if path.exists():
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            report = None
        if not (isinstance(report, dict) and report.get("predicted") is True and "fits" in report and "phases" in report):
            raise SpotuneError(f"--json {path}: the file exists and is not a spotune plan report, so it is not "
                               "replaced; give another path or remove it")


def _gpu_names() -> list[str]:
    from spotune.plan.gpus import GPUS

    return list(GPUS)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from spotune.config import load_config
    from spotune.errors import SpotuneError
    from spotune.plan.gpus import find_gpu
    from spotune.plan.predict import predict_iteration
    from spotune.plan.report import MARGIN_FRACTION, MARGIN_GIB, PlanSettings, assess, format_report, search_knobs
    from spotune.recipes.train_spo_config import TrainSPOConfig
    from spotune.utils.io import atomic_write_json

    if args.processes < 1:
        raise SpotuneError(f"--processes takes a whole number >= 1, got {args.processes}")
    settings = PlanSettings(
        gpu=find_gpu(args.gpu) if args.gpu else None, memory_gib=args.memory_gb,
        margin_gib=MARGIN_GIB if args.margin_gb is None else args.margin_gb,
        margin_fraction=MARGIN_FRACTION if args.margin_fraction is None else args.margin_fraction,
        processes=args.processes,
    )
    if args.efficiency is not None:
        settings.compute_efficiency = args.efficiency
    config = load_config(TrainSPOConfig, args.config, args.overrides)
    if args.json:
        _check_report_path(Path(args.json))  # before minutes of predicting, not after
    if args.print_config:
        from spotune.config import config_to_yaml

        print(config_to_yaml(config), end="")
        return 0
    card_bytes = int(settings.card_gib * 2**30) if settings.card_gib else None

    def predict(cfg):
        return predict_iteration(cfg, card_memory_bytes=card_bytes, progress=sys.stderr)

    prediction = predict(config)
    report = assess(prediction, settings)
    if not args.no_search and report["fits"] is False:
        print("plan: it does not fit; predicting again with memory settings changed one at a time ...", file=sys.stderr)
        report["knobs"] = search_knobs(config, prediction, settings, predict)
    print(format_report(report, args.config or "defaults"))
    if args.json:
        atomic_write_json(Path(args.json), report)
        print(f"plan: wrote {args.json}", file=sys.stderr)
    return DOES_NOT_FIT_EXIT if report["fits"] is False else 0
