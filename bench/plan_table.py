"""The table of predicted memory and time in docs/plan.md, for the shipped full-size recipes (``spotune plan``'s machinery).

    python bench/plan_table.py                       # every recipe below (about 15 minutes on 2 CPU cores)
    python bench/plan_table.py configs/sd15_spo.yaml # one
    python bench/plan_table.py --json plans.json
    python bench/plan_table.py --from-json plans.json   # the table again from saved rows, predicting nothing

One prediction per config (one iteration on fake tensors, every pair kept), then the fit verdict for each
card size (peak x 1.1 + 1 GiB <= the card's memory, the plan's default margin) and the time on an RTX 4090
and an H100 (the plan's roofline at its stated efficiencies). Every number is predicted, not measured.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["configs/sd15_spo.yaml", "configs/sd15_spo_24gb.yaml", "configs/sd15_gradspo.yaml",
           "configs/sdxl_spo.yaml", "configs/sdxl_spo_24gb.yaml", "configs/sdxl_gradspo.yaml"]
CARD_SIZES_GIB = (8, 12, 16, 24, 48, 80)
TIMED_GPUS = ("RTX-4090", "H100")


def plan_row(config_path: str) -> dict:
    """Predict ``config_path`` once; its peak, peak phase, fits per card size and time per GPU."""
    from spotune.config import load_config
    from spotune.plan.gpus import find_gpu
    from spotune.plan.predict import predict_iteration
    from spotune.plan.report import PlanSettings, assess
    from spotune.recipes.train_spo_config import TrainSPOConfig

    config = load_config(TrainSPOConfig, str(ROOT / config_path), [])
    prediction = predict_iteration(config)
    settings = PlanSettings()
    row = {"config": config_path, "peak_gib": prediction.peak / 2**30, "peak_phase": prediction.peak_phase,
           "needed_gib": settings.needed_gib(prediction.peak), "tuples": prediction.tuples,
           "fits": {str(size): settings.needed_gib(prediction.peak) <= size for size in CARD_SIZES_GIB}}
    for name in TIMED_GPUS:
        report = assess(prediction, PlanSettings(gpu=find_gpu(name)))
        row[name] = {"seconds_per_iteration": report["seconds_per_iteration"], "run_hours": report["run_hours"],
                     "total_iterations": report["total_iterations"]}
    return row


def markdown(rows: list[dict]) -> str:
    from spotune.plan.predict import PHASE_TITLES

    head = ("| recipe | peak GiB (phase) | " + " | ".join(f"{s} GB" for s in CARD_SIZES_GIB)
            + " | s/it RTX 4090 | s/it H100 | 10 epochs on one H100 |")
    lines = [head, "|" + " --- |" * (3 + len(CARD_SIZES_GIB) + 2)]
    for r in rows:
        fits = " | ".join("yes" if r["fits"][str(s)] else "no" for s in CARD_SIZES_GIB)
        h100 = r["H100"]
        lines.append(f"| `{r['config']}` | {r['peak_gib']:.1f} ({PHASE_TITLES[r['peak_phase']]}) | {fits} | "
                     f"{r['RTX-4090']['seconds_per_iteration']:.0f} | {h100['seconds_per_iteration']:.1f} | "
                     f"{h100['run_hours']:.0f} h ({h100['total_iterations']} iterations) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="*", default=CONFIGS)
    parser.add_argument("--json", help="also write the rows as JSON")
    parser.add_argument("--from-json", help="print the table of rows a --json run saved, predicting nothing")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    if args.from_json:
        print(markdown(json.loads(Path(args.from_json).read_text())["rows"]))
        return 0
    rows = []
    for config in args.configs:
        rows.append(plan_row(config))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(markdown(rows))
    if args.json:
        from spotune.utils.io import atomic_write_json

        atomic_write_json(Path(args.json), {"predicted": True, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
