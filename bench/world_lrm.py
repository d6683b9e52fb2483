"""A latent reward model for the miniature world, trained and measured beside the shipped SPM.

    python bench/world_lrm.py                         # pairs (cached), LRM training, the accuracy table
    python bench/world_lrm.py --json out.json         # and the record as JSON

The preference pairs are the demo's ``spm=train`` pairs (4,096 training and 256 held-out pairs of base
samples labelled by the world's rater, seed 0: the data the shipped SPM was trained on, built by the
demo's own pairs stage and cached as it caches them). The LRM is made from the world's base UNet and text
encoder and trained by ``spotune train-spm`` with ``model=lrm`` and ``timestep_grid=20``, with the world
SPM's optimisation settings (``toyworld_spm.yaml``: batch 32, lr 1e-4, 1,280 steps). Its pair accuracy on
the 256 held-out pairs, labelled by the rater's preference, is set beside the shipped SPM's on the same
pairs (``spm.json``'s ``final``). The LRM scores noisy latents at t = 1 where the SPM's first column
scores the clean images at t = 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default=str(Path("~/.cache/spotune").expanduser()), help="the demo's stage cache root")
    parser.add_argument("--run", default="runs/world-lrm", help="the LRM's train-spm run folder (must be new)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (the world SPM's 1,280 when unset)")
    parser.add_argument("--json", help="also write the record here")
    args = parser.parse_args(argv)

    from spotune.cli import main as spotune
    from spotune.config import load_config
    from spotune.toyworld.demo import Demo, DemoConfig, digest_files
    from spotune.toyworld.resources import resource_dir

    t0 = time.perf_counter()
    import tempfile

    report_folder = tempfile.mkdtemp(prefix="world-lrm-")  # the demo's report is not made; its check wants a new folder
    demo = Demo(load_config(DemoConfig, None, [f"cache_dir={args.cache}", f"output={report_folder}", "spm=train",
                                               "progress=false"]))
    demo.check()
    pairs = demo.pairs_stage(digest_files(demo.base_dir))
    seconds_pairs = time.perf_counter() - t0
    timesteps = [1, 251, 501, 701, 951]
    overrides = [f"output_dir={args.run}", f"pretrained_model={demo.base_dir}", "model=lrm", "timestep_grid=20",
                 f"train_data={pairs.folder / 'train.parquet'}", f"eval_data={pairs.folder / 'eval.parquet'}",
                 f"eval_timesteps=[{','.join(map(str, timesteps))}]", "eval_every=320", "checkpoint_every=640",
                 "progress=false", "log_with=none"]
    if args.steps:
        overrides.append(f"max_steps={args.steps}")
    t1 = time.perf_counter()
    code = spotune(["train-spm", "--config", str(resource_dir() / "configs" / "toyworld_spm.yaml"), *overrides])
    if code != 0:
        raise SystemExit(f"train-spm exited {code}")
    seconds_lrm = time.perf_counter() - t1
    rows = [line.split(",") for line in (Path(args.run) / "eval" / "accuracy.csv").read_text().splitlines()[1:]]
    last = max(int(r[0]) for r in rows)
    lrm = {r[1]: float(r[2]) for r in rows if int(r[0]) == last}
    start = {r[1]: float(r[2]) for r in rows if int(r[0]) == 0}
    spm = json.loads((resource_dir() / "spm" / "spm.json").read_text())["final"]
    record = {
        "pairs": str(pairs.folder), "lrm_run": args.run, "optimizer_steps": last,
        "lrm_accuracy": lrm, "lrm_accuracy_before_training": start, "spm_accuracy_shipped": spm,
        "seconds_pairs": seconds_pairs, "seconds_lrm_training": seconds_lrm,
        "note": "held-out pairs labelled by the rater's preference; the LRM at t = 1 beside the SPM at t = 0 (clean images)",
    }
    print("| t | LRM (latents) | SPM (decoded views; t = 0: clean images) |\n| --- | --- | --- |")
    for t_lrm, t_spm in zip(timesteps, ["0", "251", "501", "701", "951"]):
        print(f"| {t_lrm} / {t_spm} | {100 * lrm[str(t_lrm)]:.1f}% | {100 * spm[t_spm]:.1f}% |")
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return record


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
