"""Seconds per SPO iteration (sampling and training separately) and peak memory.

    python bench/bench_spo.py                      # tiny CPU config, 5 iterations after 1 warm-up
    python bench/bench_spo.py --iterations 10 key=value ...   # any train config override

Reports the median over the measured iterations. Peak memory is the process's maximum resident set
size (CPU) or torch's peak allocated memory (CUDA). A full-size GPU mode will come with a real-config
benchmark.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny_cpu.yaml"))
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    from spotune.config import load_config
    from spotune.recipes.train_spo import SPOTrainer
    from spotune.recipes.train_spo_config import TrainSPOConfig

    with tempfile.TemporaryDirectory() as tmp:
        total = args.iterations + args.warmup
        config = load_config(
            TrainSPOConfig, args.config,
            [f"output_dir={tmp}/run", "log_with=none", "progress=false", "validate_every_epochs=0",
             f"max_iterations={total}", "num_epochs=1000", "checkpoint_every=0", *args.overrides],
        )
        trainer = SPOTrainer(config)
        trainer.setup()
        sampling, training, pairs = [], [], []
        for i in range(total):
            epoch, index = divmod(trainer.iteration, trainer.iterations_per_epoch)
            prompts = trainer._prompts_for(epoch, index)
            t0 = time.perf_counter()
            result = trainer.sample(prompts)
            t1 = time.perf_counter()
            trainer.train_on_pairs(result.pairs)
            t2 = time.perf_counter()
            trainer.iteration += 1
            if i >= args.warmup:
                sampling.append(t1 - t0)
                training.append(t2 - t1)
                pairs.append(len(result.pairs))
        device = trainer.accelerator.device
        trainer.cleanup()

    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
        peak_kind = "cuda max allocated"
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        peak_kind = "max RSS"
    report = {
        "config": args.config,
        "overrides": args.overrides,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "iterations_measured": args.iterations,
        "seconds_sampling_median": statistics.median(sampling),
        "seconds_training_median": statistics.median(training),
        "seconds_iteration_median": statistics.median(s + t for s, t in zip(sampling, training)),
        "pairs_per_iteration_mean": statistics.mean(pairs),
        "peak_memory_mb": round(peak_mb, 1),
        "peak_memory_kind": peak_kind,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
