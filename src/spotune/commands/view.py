"""``spotune view RUN``: write the run page, one static HTML file of what a training run has written."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "view",
        help="write a training run's page (RUN/report.html): curves, sampling trees, validation grids, checkpoints",
        description=(
            "Write one static HTML page of a spotune train run folder: its config (and the configs it was resumed "
            "with), the curves of logs/metrics.jsonl with the per-step pair rate and softmax gap as heat maps over "
            "iterations, the validation grids beside the base model's, the recorded sampling trees with each step's "
            "numbers, and the checkpoints with the spotune export command of each. It opens from a file:// URL, "
            "with no server and no network, and works on a run that is still going. Training writes the same page "
            "at every checkpoint. E.g. `spotune view runs/sd15_spo`."
        ),
    )
    parser.add_argument("run", help="the run folder (output_dir of spotune train)")
    parser.add_argument("--output", "-o", help="the HTML file to write (default: RUN/report.html)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:

    from spotune.utils.paths import resolve_user_path
    from spotune.view.run_page import RunPageError, write_run_page

    folder = resolve_user_path(args.run, "RUN") if args.run else None
    if folder is None or not folder.exists():
        raise RunPageError(f"{args.run}: no such run folder; pass the output_dir of a spotune train run")
    if not folder.is_dir():
        raise RunPageError(f"{args.run}: is a file, not a run folder; pass the output_dir of a spotune train run")
    path = write_run_page(folder, args.output)
    print(f"run page: {path}  (open {path.resolve().as_uri()})")
    return 0
