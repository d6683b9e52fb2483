"""``spotune demo``: the whole SPO story in the miniature world, on a CPU, in minutes."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run SPO end to end in a miniature world and report before/after (no downloads, CPU)",
        description=(
            "Run the whole chain in the miniature world that ships with spotune: generic preference data from the "
            "shipped base model, a step-aware preference model (train-spm), SPO fine-tuning (train), the "
            "trajectory-level baseline, and a same-seed evaluation on held-out prompts. Stages are cached under "
            "$SPOTUNE_CACHE (default ~/.cache/spotune). Settings: --config (YAML) and key=value overrides; "
            "`spotune demo --list-keys` prints them all."
        ),
    )
    parser.add_argument("--output", "-o", help="report folder (default ./spotune-demo); must be new or empty")
    parser.add_argument("--overwrite", action="store_true", help="write into a folder that already holds files")
    parser.add_argument("--config", help="YAML file of demo settings")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="settings that override the file")
    parser.add_argument("--list-keys", action="store_true", help="print every setting with its default and help, then exit")
    parser.add_argument("--print-config", action="store_true", help="print the resolved settings as YAML, then exit")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from spotune.config import config_to_yaml, describe_config, load_config
    from spotune.toyworld.demo import DemoConfig, run_demo

    if args.list_keys:
        print(describe_config(DemoConfig))
        return 0
    overrides = list(args.overrides)
    if args.output:
        overrides.append(f"output={args.output}")
    if args.overwrite:
        overrides.append("overwrite=true")
    config = load_config(DemoConfig, args.config, overrides)
    if args.print_config:
        print(config_to_yaml(config), end="")
        return 0
    from spotune.utils.paths import resolve_user_path

    # The report is written last: a symbolic-link loop there would fail only after every stage has run.
    resolve_user_path(config.output, "--output FOLDER")
    try:
        report = run_demo(config)
    except KeyboardInterrupt as exc:
        raise demo_interruption(exc, config) from None
    return 0 if report else 1


def demo_interruption(exc: KeyboardInterrupt, config) -> KeyboardInterrupt:
    """The one line for a Ctrl-C (exit 130) or a SIGTERM (exit 143) of the demo: the stage it stopped in,
    what is kept, and that the same command continues (finished stages are cached; a training stage resumes
    from the checkpoint it wrote)."""
    from spotune.errors import RunInterrupted, Terminated
    from spotune.toyworld.demo import cache_root

    stage = getattr(exc, "demo_stage", None)
    if isinstance(exc, Terminated):
        what = f"preempted ({exc.signal_name})" if getattr(exc, "checkpoint", None) else f"terminated by {exc.signal_name}"
    else:
        what = "interrupted"
    where = f" in the {stage} stage" if stage else ""
    if getattr(exc, "where", None):
        where += f" {exc.where} (its checkpoint {exc.checkpoint} is kept)"
    message = (f"{what}{where}; the stages already finished stay cached in {cache_root(config)}, and the same "
               "command continues from there (a training stage from its last checkpoint)")
    if isinstance(exc, Terminated):
        return Terminated(message, signal_name=exc.signal_name)
    return RunInterrupted(message)
