"""Generic preference data for the miniature world, in Pick-a-Pic format.

Each pair is two base-model samples of one caption (different seeds). The label comes from a simulated
rater whose taste, like that of real raters, blends several things (the premise of SPO: generic
preference labels mix layout opinions with aesthetics):

* **aesthetics**: the world's exact aesthetic score (:attr:`spotune.toyworld.metrics.SceneReading.aesthetic`:
  even lighting, a vivid subject and a clean background);
* **layout**: a big, centred subject (the object's share of the image, and minus the distance of its
  centroid from the image centre), opinions about composition that have nothing to do with aesthetics;
* **alignment**: whether the image shows what the caption names.

The rater's utility of an image is ``u = w_aes * z(aesthetic) + w_layout * (z(subject size) +
z(centring)) / 2 + w_align * aligned``, where ``z`` standardises by the mean and standard deviation
over the training images, and a pair is labelled by a Bradley-Terry draw: image 0 wins with probability
``sigmoid(decisiveness * (u_0 - u_1))``, so close calls are often labelled against the rater's own
utility, as with human raters (with the default decisiveness about one label in six is). Evaluation
pairs are labelled with the rater's underlying preference, ``u_0 > u_1``, without the draw, so accuracy
on them measures how much of that preference a model recovered.

Written columns: ``caption``, ``jpg_0``, ``jpg_1`` (PNG bytes: lossless, so the exact metrics still
hold for the stored images), ``label_0``, ``label_1``, plus, for inspection, the measured
``aesthetic_*`` (and its components ``lighting_*``, ``vividness_*``, ``cleanliness_*``), ``subject_*``,
``centring_*``, ``aligned_*`` and ``utility_*`` of both images.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from spotune.toyworld.metrics import ImageScores, score_images
from spotune.toyworld.render import to_uint8
from spotune.toyworld.sampling import generate_with_pipeline
from spotune.toyworld.world import IMAGE_SIZE, Prompt
from spotune.utils.io import atomic_path


@dataclass(frozen=True)
class RaterWeights:
    """How much the simulated rater cares about each property (see the module docstring)."""

    aesthetic: float = 1.5
    layout: float = 1.0
    alignment: float = 1.0
    decisiveness: float = 3.0  # scales utility gaps in the Bradley-Terry draw; higher = less label noise


def centring(scores: ImageScores) -> np.ndarray:
    """[N] minus the distance in pixels of the subject's centroid from the image centre (the farthest
    possible distance, the corner's, for an image without a subject): higher is more centred."""
    half = IMAGE_SIZE / 2
    distance = np.hypot(scores.centroid_x - half, scores.centroid_y - half)
    return -np.where(np.isnan(distance), half * math.sqrt(2), distance)


def _mean_std(values: np.ndarray) -> tuple[float, float]:
    return float(values.mean()), max(float(values.std()), 1e-6)


@dataclass(frozen=True)
class Standardisation:
    """Means and standard deviations that put aesthetics, subject size and centring on a common scale."""

    aesthetic_mean: float
    aesthetic_std: float
    subject_mean: float
    subject_std: float
    centring_mean: float
    centring_std: float

    @classmethod
    def of(cls, scores: ImageScores) -> "Standardisation":
        return cls(*_mean_std(scores.aesthetic), *_mean_std(scores.object_fraction), *_mean_std(centring(scores)))


def utilities(scores: ImageScores, weights: RaterWeights, scale: Standardisation) -> np.ndarray:
    """[N] rater utilities of N measured images."""
    z_aesthetic = (scores.aesthetic - scale.aesthetic_mean) / scale.aesthetic_std
    z_subject = (scores.object_fraction - scale.subject_mean) / scale.subject_std
    z_centring = (centring(scores) - scale.centring_mean) / scale.centring_std
    return (weights.aesthetic * z_aesthetic + weights.layout * (z_subject + z_centring) / 2
            + weights.alignment * scores.aligned)


def png_bytes(image: np.ndarray) -> bytes:
    """[H, W, 3] uint8 -> PNG file bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class PreferenceData:
    """Pairs ready to write: N captions, [N, 2] images and measurements, [N, 2] labels."""

    captions: list[str]
    images: np.ndarray  # [N, 2, H, W, 3] uint8
    labels: np.ndarray  # [N, 2] float32, rows (1, 0) or (0, 1)
    aesthetic: np.ndarray  # [N, 2]
    lighting: np.ndarray  # [N, 2]
    vividness: np.ndarray  # [N, 2]
    cleanliness: np.ndarray  # [N, 2]
    subject: np.ndarray  # [N, 2]
    centring: np.ndarray  # [N, 2]
    aligned: np.ndarray  # [N, 2]
    utility: np.ndarray  # [N, 2]
    scale: Standardisation

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def label_agrees_with_aesthetics(self) -> float:
        """Share of pairs (with an aesthetic difference) whose label prefers the more aesthetic image."""
        differ = self.aesthetic[:, 0] != self.aesthetic[:, 1]
        cleaner_0 = self.aesthetic[:, 0] > self.aesthetic[:, 1]
        return float(((self.labels[:, 0] == 1) == cleaner_0)[differ].mean()) if differ.any() else float("nan")

    @property
    def label_follows_utility(self) -> float:
        """Share of pairs whose label prefers the image of higher rater utility (1 - the label noise)."""
        return float(((self.labels[:, 0] == 1) == (self.utility[:, 0] > self.utility[:, 1])).mean())

    def to_table(self) -> pa.Table:
        columns = {
            "caption": self.captions,
            "jpg_0": [png_bytes(im) for im in self.images[:, 0]],
            "jpg_1": [png_bytes(im) for im in self.images[:, 1]],
            "label_0": self.labels[:, 0].astype(np.float64),
            "label_1": self.labels[:, 1].astype(np.float64),
        }
        for name in ("aesthetic", "lighting", "vividness", "cleanliness", "subject", "centring", "aligned", "utility"):
            values = getattr(self, name)
            columns[f"{name}_0"], columns[f"{name}_1"] = values[:, 0].astype(np.float64), values[:, 1].astype(np.float64)
        return pa.table(columns)

    def write(self, path: str | Path) -> Path:
        """Write a parquet file atomically (small row groups, so readers decode little at a time)."""
        path = Path(path)
        with atomic_path(path) as tmp:
            pq.write_table(self.to_table(), tmp, row_group_size=256)
        return path


def label_pairs(
    captions: list[str],
    images: np.ndarray,
    weights: RaterWeights,
    rng: random.Random | None,
    scale: Standardisation | None = None,
) -> PreferenceData:
    """Measure and label pairs.

    Args:
        captions: N captions.
        images: [N, 2, H, W, 3] uint8, the two images of each pair.
        weights: the rater's taste.
        rng: draws the Bradley-Terry labels; ``None`` labels each pair by the higher utility (evaluation).
        scale: the standardisation of the utility; that of these images when ``None`` (pass the training
            data's to label evaluation pairs on the same scale).
    """
    n = len(captions)
    if images.ndim != 5 or images.shape[:2] != (n, 2):
        raise ValueError(f"expected images of shape [{n}, 2, H, W, 3] for {n} captions, got {images.shape}")
    flat = images.reshape(n * 2, *images.shape[2:])
    scores = score_images(flat, [c for c in captions for _ in range(2)])
    scale = scale or Standardisation.of(scores)
    util = utilities(scores, weights, scale).reshape(n, 2)
    labels = np.zeros((n, 2), dtype=np.float32)
    for i in range(n):
        diff = float(util[i, 0] - util[i, 1])
        if rng is None:
            first = diff > 0 or (diff == 0 and i % 2 == 0)
        else:
            first = rng.random() < 1.0 / (1.0 + math.exp(-weights.decisiveness * diff))
        labels[i] = (1.0, 0.0) if first else (0.0, 1.0)
    return PreferenceData(
        captions=list(captions),
        images=images,
        labels=labels,
        aesthetic=scores.aesthetic.reshape(n, 2),
        lighting=scores.lighting.reshape(n, 2),
        vividness=scores.vividness.reshape(n, 2),
        cleanliness=scores.cleanliness.reshape(n, 2),
        subject=scores.object_fraction.reshape(n, 2),
        centring=centring(scores).reshape(n, 2),
        aligned=scores.aligned.reshape(n, 2),
        utility=util,
        scale=scale,
    )


def sample_pairs(
    pipe,
    prompts: list[Prompt],
    num_pairs: int,
    seed: int,
    num_inference_steps: int = 20,
    guidance_scale: float = 5.0,
    batch_size: int = 128,
    progress=None,
) -> tuple[list[str], np.ndarray]:
    """Two base-model samples for each of ``num_pairs`` captions (cycling through ``prompts``).

    Image j of pair i starts from seed ``seed + 2 i + j``, so the data is reproducible and two calls
    with seeds at least ``2 num_pairs`` apart share no image.

    Returns:
        (captions [N], images [N, 2, H, W, 3] uint8).
    """
    captions = [prompts[i % len(prompts)].caption for i in range(num_pairs)]
    flat_captions = [c for c in captions for _ in range(2)]
    seeds = [seed + k for k in range(2 * num_pairs)]
    chunks = []
    for start in range(0, len(flat_captions), batch_size):
        images = generate_with_pipeline(
            pipe, flat_captions[start : start + batch_size], seeds[start : start + batch_size],
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, batch_size=batch_size,
        )
        chunks.append(to_uint8(images))
        if progress:
            progress(len(images))
    images = np.concatenate(chunks)
    return captions, images.reshape(num_pairs, 2, *images.shape[1:])


def generic_preference_data(
    pipe,
    prompts: list[Prompt],
    num_pairs: int,
    seed: int,
    weights: RaterWeights = RaterWeights(),
    noisy_labels: bool = True,
    scale: Standardisation | None = None,
    **sampling,
) -> PreferenceData:
    """Sample and label ``num_pairs`` pairs (see :func:`sample_pairs` and :func:`label_pairs`)."""
    captions, images = sample_pairs(pipe, prompts, num_pairs, seed, **sampling)
    rng = random.Random(seed) if noisy_labels else None
    return label_pairs(captions, images, weights, rng, scale)



def write_dataset(
    folder: str | Path,
    base_model: str | Path,
    train_pairs: int,
    eval_pairs: int,
    seed: int = 0,
    weights: RaterWeights = RaterWeights(),
    num_inference_steps: int = 20,
    progress=None,
) -> dict:
    """Write ``train.parquet`` (training prompts, rater-drawn labels), ``eval.parquet`` (held-out prompts,
    noise-free labels), ``train_prompts.txt`` and ``summary.json`` into ``folder``; return the summary.

    The seeds of the two files' images never overlap (10,000,000 + 100,000 seed and 20,000,000 + ...).
    """
    from spotune.models import load_pipeline
    from spotune.toyworld.world import prompt_split

    folder = Path(folder)
    pipe = load_pipeline(str(base_model))  # before the folder exists: a bad model path leaves nothing behind
    folder.mkdir(parents=True, exist_ok=True)
    train_prompts, held_out = prompt_split()
    common = dict(num_inference_steps=num_inference_steps, progress=progress)
    train = generic_preference_data(pipe, train_prompts, train_pairs, seed=10_000_000 + seed * 100_000,
                                    weights=weights, noisy_labels=True, **common)
    evals = generic_preference_data(pipe, held_out, eval_pairs, seed=20_000_000 + seed * 100_000,
                                    weights=weights, noisy_labels=False, scale=train.scale, **common)
    train.write(folder / "train.parquet")
    evals.write(folder / "eval.parquet")
    from spotune.utils.io import atomic_write_text

    atomic_write_text(folder / "train_prompts.txt", "".join(p.caption + "\n" for p in train_prompts))
    from dataclasses import asdict

    from spotune.utils.io import atomic_write_json

    summary = {
        "train_pairs": len(train),
        "eval_pairs": len(evals),
        "train_label_agrees_with_aesthetics": train.label_agrees_with_aesthetics,
        "train_label_follows_utility": train.label_follows_utility,
        "eval_label_agrees_with_aesthetics": evals.label_agrees_with_aesthetics,
        "base_sample_alignment": float(train.aligned.mean()),
        "base_sample_aesthetic": float(train.aesthetic.mean()),
        **{f"base_sample_{name}": float(getattr(train, name).mean()) for name in ("lighting", "vividness", "cleanliness")},
        "scale": asdict(train.scale),
        "rater": asdict(weights),
        "seed": seed,
        "num_inference_steps": num_inference_steps,
    }
    atomic_write_json(folder / "summary.json", summary)
    return summary


def _refuse_foreign_output(folder: Path, overwrite: bool) -> None:
    """Write only into an empty folder, or with ``overwrite`` into one this tool wrote (its summary.json)."""
    from spotune.errors import SpotuneError

    if folder.exists() and not folder.is_dir():
        raise SpotuneError(f"{folder} is a file; pass a folder to write the preference data into")
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    if not (folder / "summary.json").is_file():
        raise SpotuneError(f"{folder} is not empty and was not written by this tool (no summary.json); pass an empty "
                           f"or new folder")
    if not overwrite:
        raise SpotuneError(f"{folder} holds earlier preference data; pass --overwrite to replace it, or another folder")


def main(argv: list[str] | None = None) -> int:
    """Bad input is one line and exit code 1 (``--debug``: the traceback)."""
    from spotune.cli import run_tool

    return run_tool("python -m spotune.toyworld.preferences", _main, argv)


def _main(argv: list[str]) -> int:
    """``python -m spotune.toyworld.preferences OUT_FOLDER [--base-model DIR] [--train-pairs N] ...``"""
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Write the miniature world's generic preference data (Pick-a-Pic format).")
    parser.add_argument("folder")
    parser.add_argument("--base-model", default=None, help="diffusers folder (default: the shipped toyworld base model)")
    parser.add_argument("--train-pairs", type=int, default=1536)
    parser.add_argument("--eval-pairs", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--overwrite", action="store_true", help="replace the files of an earlier run in FOLDER")
    args = parser.parse_args(argv)
    _refuse_foreign_output(Path(args.folder), args.overwrite)
    torch.set_num_threads(args.threads)
    if args.base_model is None:
        from spotune.toyworld.resources import resource_dir

        args.base_model = resource_dir() / "base"
    summary = write_dataset(args.folder, args.base_model, args.train_pairs, args.eval_pairs, args.seed)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
