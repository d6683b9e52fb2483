"""Diagnostic: do the judge's step-level labels agree with the exact aesthetic metric?

Runs SPO's sampler with the base model of the miniature world and a judge, records every candidate's
decoded x0-prediction, and reports, per denoising step, how often the candidate the judge ranks best
has the higher exact aesthetic score than the one it ranks worst, among decisive pairs, and how many
of the chains the judge's pair selection (softmax gap over the threshold) keeps as a training pair.

    python bench/diag_step_labels.py [--pickscore DIR] [--spm CHECKPOINT] [--prompts N]

The judge defaults to the shipped one (resources/toyworld/pickscore and spm/spm.safetensors).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from spotune.diffusion.sampler import spo_sample
from spotune.models import load_pipeline
from spotune.models.family import family_of
from spotune.preference import select_pair
from spotune.preference.factory import build_judge
from spotune.toyworld.demo import resource_dir
from spotune.toyworld.metrics import aesthetic
from spotune.toyworld.render import to_uint8
from spotune.toyworld.world import prompt_split


THRESHOLD = 0.3  # SPO's select_pair threshold


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
    agree, total = defaultdict(int), defaultdict(int)
    kept, chains = defaultdict(int), defaultdict(int)
    conditioner = family_of(pipe).conditioner(pipe)
    negative = conditioner.negative("")
    channels, size = pipe.unet.config.in_channels, pipe.unet.config.sample_size
    for start in range(0, len(prompts), 10):
        batch = prompts[start : start + 10]
        b = len(batch)
        embeds = conditioner.encode(batch)
        g = torch.Generator().manual_seed(start)
        latents = torch.randn(b, channels, size, size, generator=g)
        judge.calls.clear()
        with torch.no_grad():
            spo_sample(pipe.unet, pipe.vae, pipe.scheduler, judge, batch, embeds, negative, latents, generator=g,
                       decode_chunk_size=64, threshold=THRESHOLD)
        for images, t, scores in judge.calls:
            k = len(scores) // b
            clean = np.array([aesthetic(im) for im in to_uint8(images)]).reshape(k, b)  # candidate-major, as scored
            indices, valid = select_pair(scores.view(k, b), THRESHOLD)  # the sampler's own pair selection
            kept[t] += int(valid.sum())
            chains[t] += b
            for j in valid.nonzero().squeeze(1).tolist():
                best, worst = clean[indices[0, j], j], clean[indices[1, j], j]
                if best != worst:
                    total[t] += 1
                    agree[t] += int(best > worst)
    print("| judged at t | chains kept as pairs | kept pairs with an aesthetic difference | judge agrees with the aesthetic |")
    print("| ---: | ---: | ---: | ---: |")
    for t in sorted(chains, reverse=True):
        share = f"{agree[t] / total[t]:.2f}" if total[t] else "-"
        print(f"| {t} | {kept[t]} / {chains[t]} | {total[t]} | {share} |")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pickscore", default=str(resource_dir() / "pickscore"), help="CLIPModel folder the SPM extends")
    parser.add_argument("--spm", default=str(resource_dir() / "spm" / "spm.safetensors"), help="SPM weights or train-spm run")
    parser.add_argument("--prompts", type=int, default=40, help="training captions to sample (batches of 10)")
    args = parser.parse_args()
    main(args.pickscore, args.spm, args.prompts)
