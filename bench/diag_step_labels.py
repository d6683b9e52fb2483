"""Diagnostic: do the judge's step-level labels agree with the exact aesthetic metric?

Runs SPO's sampler with the base model of the miniature world and a judge, records every candidate's
decoded x0-prediction, and reports, per denoising step, how often the candidate the judge ranks best
has a cleaner background (exact metric) than the one it ranks worst, among decisive pairs.

    python bench/diag_step_labels.py PICKSCORE_DIR SPM_CHECKPOINT [num_prompts]
"""

from __future__ import annotations

import sys
from collections import defaultdict

import numpy as np
import torch

from spotune.diffusion.sampler import spo_sample
from spotune.models import load_pipeline
from spotune.models.text import encode_prompts
from spotune.preference.factory import build_judge
from spotune.toyworld.demo import resource_dir
from spotune.toyworld.metrics import cleanliness
from spotune.toyworld.render import to_uint8
from spotune.toyworld.world import prompt_split


class RecordingJudge:
    def __init__(self, judge):
        self.judge, self.calls = judge, []

    def score(self, images, prompts, timesteps):
        scores = self.judge.score(images, prompts, timesteps)
        self.calls.append((images.detach(), int(timesteps[0]), scores.detach()))
        return scores


def main(pickscore: str, spm: str, num_prompts: int = 40) -> None:
    torch.manual_seed(0)
    pipe = load_pipeline(str(resource_dir() / "base"))
    judge = RecordingJudge(build_judge("spm", clip_path=pickscore, checkpoint=spm))
    train, _ = prompt_split()
    prompts = [p.caption for p in train[:num_prompts]]
    agree, total, gap = defaultdict(int), defaultdict(int), defaultdict(list)
    for start in range(0, len(prompts), 10):
        batch = prompts[start : start + 10]
        b = len(batch)
        embeds = encode_prompts(pipe.tokenizer, pipe.text_encoder, batch)
        neg = encode_prompts(pipe.tokenizer, pipe.text_encoder, [""])
        g = torch.Generator().manual_seed(start)
        latents = torch.randn(b, 4, 8, 8, generator=g)
        judge.calls.clear()
        with torch.no_grad():
            spo_sample(pipe.unet, pipe.vae, pipe.scheduler, judge, batch, embeds, neg, latents, generator=g, decode_chunk_size=64)
        for images, t, scores in judge.calls:
            k = len(scores) // b
            s = scores.view(k, b)
            clean = np.array([cleanliness(im) for im in to_uint8(images)]).reshape(k, b)
            best, worst = s.argmax(0), s.argmin(0)
            p = torch.softmax(torch.stack([s.max(0).values, s.min(0).values]), 0)
            for j in range(b):
                if p[0, j] - p[1, j] <= 0.3:
                    continue
                cb, cw = clean[best[j], j], clean[worst[j], j]
                if cb == cw:
                    continue
                total[t] += 1
                agree[t] += int(cb > cw)
                gap[t].append(cb - cw)
    print("| judged at t | decisive pairs with a cleanliness difference | judge agrees with cleanliness |")
    print("| ---: | ---: | ---: |")
    for t in sorted(total, reverse=True):
        print(f"| {t} | {total[t]} | {agree[t] / total[t]:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 40)
