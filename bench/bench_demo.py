"""The full `spotune demo` from a cold cache: wall time per stage and the headline numbers.

    python bench/bench_demo.py                       # fresh temporary cache and output, default settings
    python bench/bench_demo.py --json bench.json key=value ...   # any demo setting as an override
    python bench/bench_demo.py shipped_stages=false  # train the trajectory baseline too, as before it shipped

Targets (issue 4): SPO beats the base on the aesthetic attribute in >= 65% of same-seed pairs on
held-out prompts, alignment falls by at most 2 points, and the whole demo takes < 10 minutes on 2 CPU
cores with no cache. This script measures; it does not tune anything.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--keep", help="keep the demo's output folder here instead of a temporary one")
    parser.add_argument("overrides", nargs="*", help="demo settings, key=value")
    args = parser.parse_args(argv)

    from spotune.config import load_config
    from spotune.toyworld.demo import DemoConfig, run_demo

    with tempfile.TemporaryDirectory() as tmp:
        out = args.keep or os.path.join(tmp, "out")
        config = load_config(DemoConfig, None, [f"output={out}", f"cache_dir={tmp}/cache", "progress=false", *args.overrides])
        t0 = time.perf_counter()
        report = run_demo(config)
        wall = time.perf_counter() - t0
    result = {
        "wall_seconds": wall,
        "seconds_total": report["seconds_total"],
        "stage_seconds": {k: v["seconds"] for k, v in report["stages"].items()},
        "aesthetic_win_rate": report["aesthetic_win_rate"],
        "aesthetic_win_rate_ci": report["aesthetic_win_rate_ci"],
        "alignment_base": report["alignment_base"],
        "alignment_spo": report["alignment_spo"],
        "aesthetic_base": report["aesthetic_base"],
        "aesthetic_spo": report["aesthetic_spo"],
        "comparisons": report["comparisons"],
        "spm_accuracy": report["spm_accuracy"]["final"],
        "targets": report["targets"],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
