"""The miniature world's PickScore: its CLIP fine-tuned on generic preference pairs of clean images.

In the real pipeline the step-aware preference model does not start from CLIP but from PickScore, a
CLIP already fine-tuned on Pick-a-Pic's human preference pairs (timestep-blind, final images only);
SPO then teaches it to judge noisy x0-predictions with ``train-spm`` on the same pairs. The miniature
world mirrors that: this module fine-tunes the world's contrastive CLIP on the generic preference pairs
(clean images, all weights, PickScore's pairwise loss :func:`spotune.preference.spm_loss.spm_pair_loss`)
and saves a CLIPModel folder, which is then ``clip_path`` of ``train-spm`` and ``judge_clip_path`` of
the SPO judge::

    python -m spotune.toyworld.pickscore CLIP_FOLDER DATA_FOLDER OUT_FOLDER [--steps N] [--lr X]

``DATA_FOLDER`` is written by ``python -m spotune.toyworld.preferences`` (``train.parquet`` for training,
``eval.parquet`` for the accuracy it reports).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from spotune.data.pickapic import PickAPicPairs, collate_pairs
from spotune.errors import SpotuneError
from spotune.preference.clip_judge import PickScoreJudge, preprocess_images
from spotune.preference.spm_loss import spm_pair_loss
from spotune.utils.io import atomic_directory, atomic_write_json

logger = logging.getLogger(__name__)


@dataclass
class PickScoreTraining:
    """Settings of the fine-tuning (defaults: what the shipped model used)."""

    steps: int = 600
    batch_size: int = 32
    learning_rate: float = 3e-4
    weight_decay: float = 0.01
    seed: int = 0


def _features(judge: PickScoreJudge, pixels: torch.Tensor, input_ids: torch.Tensor):
    text = judge.text_features(input_ids)
    image = judge.image_features(pixels, torch.zeros(len(pixels)))
    return text, image


@torch.no_grad()
def pair_accuracy(judge: PickScoreJudge, pairs: PickAPicPairs, batch_size: int = 128) -> float:
    """Share of decisive pairs whose preferred image the judge scores higher (clean images, t = 0)."""
    judge.eval()
    correct = total = 0
    for start in range(0, len(pairs), batch_size):
        batch = collate_pairs([pairs[i] for i in range(start, min(len(pairs), start + batch_size))])
        s0 = judge.score(batch.pixel_values_0, batch.captions)
        s1 = judge.score(batch.pixel_values_1, batch.captions)
        decisive = batch.label_0 != batch.label_1
        correct += int(((s0 > s1) == (batch.label_0 > batch.label_1))[decisive].sum())
        total += int(decisive.sum())
    return correct / total if total else float("nan")


def train_pickscore(clip_dir: str | Path, data_dir: str | Path, out_dir: str | Path,
                    settings: PickScoreTraining = PickScoreTraining()) -> dict:
    """Fine-tune the CLIP in ``clip_dir`` on ``data_dir/train.parquet``; save a CLIPModel folder to ``out_dir``.

    Returns:
        a record (settings, accuracy on ``eval.parquet`` before and after, seconds), also written to
        ``out_dir/pickscore.json``.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise SpotuneError(f"{out_dir} already exists; refusing to overwrite it")
    t0 = time.perf_counter()
    judge = PickScoreJudge.from_pretrained(str(clip_dir))
    model = judge.model
    size = judge.image_size
    train = PickAPicPairs(Path(data_dir) / "train.parquet", resolution=size)
    evals = PickAPicPairs(Path(data_dir) / "eval.parquet", resolution=size)
    before = pair_accuracy(judge, evals)
    model.requires_grad_(True).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    generator = torch.Generator().manual_seed(settings.seed)
    losses = []
    for step in range(settings.steps):
        index = torch.randint(0, len(train), (settings.batch_size,), generator=generator).tolist()
        batch = collate_pairs([train[i] for i in index])
        pixels = preprocess_images(torch.cat([batch.pixel_values_0, batch.pixel_values_1]), size, judge.image_mean, judge.image_std)
        text, image = _features(judge, pixels, judge.tokenize(batch.captions))  # [B, D], [2B, D]
        image_0, image_1 = image.chunk(2)
        loss, _ = spm_pair_loss(text, image_0, image_1, model.logit_scale, batch.label_0, batch.label_1, batch.num_pairs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 100 == 0:
            logger.info("pickscore: step %d/%d loss %.4f", step + 1, settings.steps, sum(losses[-100:]) / len(losses[-100:]))
    judge.clear_text_cache()
    after = pair_accuracy(judge, evals)
    record = {
        "settings": vars(settings),
        "eval_accuracy_before": before,
        "eval_accuracy_after": after,
        "train_pairs": len(train),
        "eval_pairs": len(evals),
        "seconds": time.perf_counter() - t0,
        "loss": [[i + 1, v] for i, v in enumerate(losses)][:: max(1, len(losses) // 200)],
    }
    with atomic_directory(out_dir) as tmp:
        model.eval().to(torch.float16).save_pretrained(tmp, safe_serialization=True)
        judge.tokenizer.save_pretrained(tmp)
        src = Path(clip_dir) / "preprocessor_config.json"
        if src.is_file():
            (tmp / "preprocessor_config.json").write_text(src.read_text())
        atomic_write_json(tmp / "pickscore.json", record)
    logger.info("pickscore: eval accuracy %.3f -> %.3f (%d pairs), %.0f s", before, after, len(evals), record["seconds"])
    return record


def main(argv: list[str] | None = None) -> int:
    """Bad input is one line and exit code 1 (``--debug``: the traceback)."""
    from spotune.cli import run_tool

    return run_tool("python -m spotune.toyworld.pickscore", _main, argv)


def _main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Fine-tune the world's CLIP on generic preference pairs (a toy PickScore).")
    parser.add_argument("clip")
    parser.add_argument("data")
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=PickScoreTraining.steps)
    parser.add_argument("--batch-size", type=int, default=PickScoreTraining.batch_size)
    parser.add_argument("--lr", type=float, default=PickScoreTraining.learning_rate)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    record = train_pickscore(args.clip, args.data, args.out, PickScoreTraining(args.steps, args.batch_size, args.lr))
    print(json.dumps({k: v for k, v in record.items() if k != "loss"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
