"""How many of SPO's pair decisions change when the judge runs in fp16 or bf16 instead of fp32.

Runs SPO's step-wise sampler in the miniature world (the shipped base model and step-aware judge,
configs/toyworld_spo.yaml's sampling settings: 20 DDIM steps, eta 1, CFG 5, divert_start_step 4, k = 4,
threshold 0.3) with the judge in fp32, which decides the chain. At every judged step the same decoded
x0-predictions are also scored by fp16 and bf16 copies of the judge (autocast off, as spotune runs
its judge), and each copy's pair decision (keep or drop, best and worst candidate) is compared with
the fp32 one. One decision per prompt per judged step.

    python bench/judge_precision.py [--prompts 40] [--seed 0] [--device cpu|cuda]

Prints a Markdown table. Deterministic for a given seed and device.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from spotune.diffusion.sampler import spo_sample
from spotune.models import load_pipeline
from spotune.models.family import family_of
from spotune.preference import select_pair
from spotune.preference.factory import build_judge
from spotune.toyworld.demo import resource_dir
from spotune.toyworld.world import prompt_split

THRESHOLD = 0.3  # SPO's select_pair threshold for SD1.5
PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16}


class ComparingJudge:
    """Scores with the fp32 judge (returned: it decides the chain) and records the half-precision copies' scores."""

    def __init__(self, judge) -> None:
        self.judge = judge
        self.copies = {name: copy.deepcopy(judge).to(dtype) for name, dtype in PRECISIONS.items()}
        self.calls: list[dict[str, torch.Tensor]] = []

    def score(self, images: torch.Tensor, prompts, timesteps: torch.Tensor) -> torch.Tensor:
        scores = {"fp32": self.judge.score(images, prompts, timesteps)}
        for name, judge in self.copies.items():
            scores[name] = judge.score(images, prompts, timesteps)  # the same images, the judge in half precision
        self.calls.append({k: v.detach().float().cpu() for k, v in scores.items()})
        return scores["fp32"]


def measure(num_prompts: int, seed: int, device: str) -> dict[str, dict[str, float]]:
    pipe = load_pipeline(str(resource_dir() / "base"), device=device)
    judge = build_judge("spm", clip_path=str(resource_dir() / "pickscore"),
                        checkpoint=str(resource_dir() / "spm" / "spm.safetensors"), device=device)
    comparing = ComparingJudge(judge)
    train, held_out = prompt_split()
    captions = [p.caption for p in (train + held_out)][:num_prompts]
    conditioner = family_of(pipe).conditioner(pipe)
    negative = conditioner.negative("", device)
    channels, size = pipe.unet.config.in_channels, pipe.unet.config.sample_size
    per_call_b = []
    for start in range(0, len(captions), 10):
        batch = captions[start : start + 10]
        embeds = conditioner.encode(batch, device)
        g = torch.Generator(device).manual_seed(seed * 1000 + start)
        latents = torch.randn(len(batch), channels, size, size, generator=g, device=device)
        before = len(comparing.calls)
        with torch.no_grad():
            spo_sample(pipe.unet, pipe.vae, pipe.scheduler, comparing, batch, embeds, negative, latents,
                       generator=g, decode_chunk_size=64, threshold=THRESHOLD)
        per_call_b += [len(batch)] * (len(comparing.calls) - before)

    out: dict[str, dict[str, float]] = {}
    for name in PRECISIONS:
        n = kept32 = flip_keep = flip_order = 0
        gap = []
        for scores, b in zip(comparing.calls, per_call_b):
            k = len(scores["fp32"]) // b
            ref_idx, ref_valid = select_pair(scores["fp32"].view(k, b), THRESHOLD)
            idx, valid = select_pair(scores[name].view(k, b), THRESHOLD)
            n += b
            kept32 += int(ref_valid.sum())
            flip_keep += int((valid != ref_valid).sum())
            both = valid & ref_valid
            flip_order += int((both & ((idx[0] != ref_idx[0]) | (idx[1] != ref_idx[1]))).sum())
            gap.append((scores[name] - scores["fp32"]).abs())
        gap_t = torch.cat(gap)
        out[name] = {
            "decisions": n, "kept_fp32": kept32, "keep_drop_changed": flip_keep, "best_or_worst_changed": flip_order,
            "changed": flip_keep + flip_order, "mean_abs_score_error": float(gap_t.mean()),
            "max_abs_score_error": float(gap_t.max()),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=40, help="captions sampled (batches of 10), 16 judged steps each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    results = measure(args.prompts, args.seed, args.device)
    print(f"judge precision vs fp32, {args.prompts} prompts, seed {args.seed}, {args.device}, "
          f"{time.perf_counter() - t0:.0f} s")
    print("| judge | pair decisions | kept by fp32 | keep/drop changed | best or worst changed (kept by both) "
          "| changed in all | mean / max abs score error |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        print(f"| {name} | {r['decisions']} | {r['kept_fp32']} | {r['keep_drop_changed']} | {r['best_or_worst_changed']} "
              f"| {r['changed']} ({100 * r['changed'] / r['decisions']:.1f}%) "
              f"| {r['mean_abs_score_error']:.4f} / {r['max_abs_score_error']:.4f} |")


if __name__ == "__main__":
    main()
