"""The step-aware model's training as SPO's trainer does it: the WarmupDecayLR schedule, the training
pre-processing order, has_label rows, fp16 views, and the recipe in configs/sd15_spm.yaml."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from spotune.config import load_config
from spotune.data.pickapic import PairDataError, PickAPicPairs, encode_png, synthetic_pairs, write_pairs_parquet
from spotune.preference.clip_judge import CLIP_MEAN, CLIP_STD, preprocess_images, spm_training_pixels
from spotune.recipes.train_spm import SPMTrainer, TrainSPMConfig
from spotune.utils.lr_schedules import build_lr_scheduler, warmup_decay_factor

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _deepspeed_warmup_decay(step: int, warmup: int, total: int, peak: float) -> float:
    """DeepSpeed's WarmupDecayLR (deepspeed/runtime/lr_schedules.py), written out: min lr 0, log warm-up."""
    if step < warmup:
        return peak * (1.0 / math.log(warmup)) * math.log(step + 1)
    return peak * max(0.0, float(total - step) / float(max(1.0, total - warmup)))


def test_warmup_decay_schedule_equals_deepspeed_formula_at_the_recipe_steps():
    cfg = load_config(TrainSPMConfig, CONFIGS / "sd15_spm.yaml", ["train_data=x", "clip_path=x"])
    assert (cfg.lr_scheduler, cfg.lr_warmup_type, cfg.lr_warmup_steps, cfg.max_steps) == ("warmup_decay", "log", 500, 8000)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.learning_rate)
    scheduler = build_lr_scheduler(cfg.lr_scheduler, optimizer, cfg.lr_warmup_steps, cfg.max_steps, cfg.lr_warmup_type)
    seen = {}
    for step in range(cfg.max_steps + 1):
        if step in (0, 250, 500, 4000, 8000):
            seen[step] = optimizer.param_groups[0]["lr"]  # the rate the next optimizer step applies
        optimizer.step()
        scheduler.step()
    for step, lr in seen.items():
        assert lr == pytest.approx(_deepspeed_warmup_decay(step, 500, 8000, 3e-6), rel=1e-12, abs=1e-20), step
    assert seen[0] == 0.0 and seen[500] == pytest.approx(3e-6) and seen[8000] == 0.0
    assert seen[250] / 3e-6 == pytest.approx(math.log(251) / math.log(500))  # log warm-up: 89% at half-way
    assert warmup_decay_factor(250, 500, 8000, "linear") == 0.5  # the linear option, for contrast


def test_training_preprocessing_is_spo_order_on_values_outside_the_range():
    g = torch.Generator().manual_seed(0)
    # A hand-made 2-image "view" at 64 px with values well outside [-1, 1] (as noisy x0-predictions have).
    images = torch.randn(2, 3, 64, 64, generator=g) * 1.5
    images[0, :, :8, :8] = 3.0
    images[1, :, 20:30, 20:30] = -2.5
    ours = spm_training_pixels(images, 32, CLIP_MEAN, CLIP_STD)
    # spm_task.py's order: (x / 2 + 0.5).clamp(0, 1) -> bicubic to 32 x 32 -> clamp(0, 1) -> normalise.
    x = (images / 2 + 0.5).clamp(0, 1).float()
    x = F.interpolate(x, size=(32, 32), mode="bicubic", align_corners=False).clamp(0, 1)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(ours, (x - mean) / std)
    # the sampling path (resize the unclamped image, then clamp) is a different function here
    assert not torch.allclose(preprocess_images(images, 32, CLIP_MEAN, CLIP_STD), ours, atol=1e-3)


def _rows_with_has_label(path: Path, n: int) -> Path:
    captions, images_0, images_1, labels = synthetic_pairs(n, 16, seed=3)
    has_label = [i % 3 != 1 for i in range(n)]
    label_0 = [l0 if h else 0.0 for (l0, _), h in zip(labels, has_label)]  # unlabelled rows carry 0/0
    label_1 = [l1 if h else 0.0 for (_, l1), h in zip(labels, has_label)]
    table = pa.table({
        "caption": captions, "jpg_0": [encode_png(i) for i in images_0], "jpg_1": [encode_png(i) for i in images_1],
        "label_0": label_0, "label_1": label_1, "has_label": has_label,
    })
    pq.write_table(table, path)
    return path


def test_unlabelled_rows_are_kept_for_training_and_dropped_for_evaluation(tmp_path):
    path = _rows_with_has_label(tmp_path / "pairs.parquet", 6)
    train = PickAPicPairs(path, resolution=16, keep_unlabelled=True)
    evaluation = PickAPicPairs(path, resolution=16)
    assert len(train) == 6 and len(evaluation) == 4
    assert train.num_without_preference == 2 and evaluation.num_without_preference == 0
    assert TrainSPMConfig.__dataclass_fields__["train_keep_unlabelled"].default is True
    # A 0/0 row contributes a constant to SPO's loss: no gradient, only weight in the normalisation.
    from spotune.preference.spm_loss import spm_pair_loss

    # Seeded, and at logit scale 1 so the labelled row's softmax never saturates (at PickScore's 100 a
    # random draw could make its gradient underflow to exactly 0 and the last check fail by chance).
    g = torch.Generator().manual_seed(0)
    text = torch.randn(2, 8, generator=g)
    image_0 = torch.randn(2, 8, generator=g).requires_grad_(True)
    image_1 = torch.randn(2, 8, generator=g).requires_grad_(True)
    loss, _ = spm_pair_loss(text, image_0, image_1, torch.tensor(0.0), torch.tensor([1.0, 0.0]),
                            torch.tensor([0.0, 0.0]), torch.ones(2))
    loss.backward()
    assert image_0.grad[1].abs().max() == 0 and image_1.grad[1].abs().max() == 0
    assert image_0.grad[0].abs().max() > 0


def test_an_unlabelled_row_with_an_impossible_label_is_named(tmp_path):
    path = _rows_with_has_label(tmp_path / "pairs.parquet", 3)
    table = pq.read_table(path).to_pydict()
    table["label_0"][1] = 0.7
    pq.write_table(pa.table(table), path)
    with pytest.raises(PairDataError, match=r"row 1: labels .*\(0, 0\)"):
        PickAPicPairs(path, resolution=16, keep_unlabelled=True)


def test_fp16_views_and_the_sd15_recipe(tmp_path):
    torch.set_num_threads(1)
    pairs = write_pairs_parquet(tmp_path / "train.parquet", *synthetic_pairs(8, 32, seed=0))
    cfg = load_config(TrainSPMConfig, CONFIGS / "tiny_spm.yaml", [
        f"output_dir={tmp_path / 'run'}", f"train_data={pairs}", "guidance_scale=1.0", "progress=false",
        "log_with=none", "views_dtype=fp16", "lr_scheduler=warmup_decay", "lr_warmup_steps=4", "max_steps=2", "train_batch_size=4",
    ])
    trainer = SPMTrainer(cfg)
    trainer.setup()
    try:
        assert trainer.views.unet.dtype == torch.float16 and trainer.views.vae.dtype == torch.float16
        assert trainer.unwrapped.dtype == torch.float32  # the SPM itself trains in fp32
        metrics = trainer.train()
    finally:
        trainer.cleanup()
    assert math.isfinite(metrics["train/loss"])
    assert metrics["train/lr"] == pytest.approx(1e-4 * math.log(3) / math.log(4))  # 2 steps into a 4-step log warm-up

    sd15 = load_config(TrainSPMConfig, CONFIGS / "sd15_spm.yaml", ["train_data=x", "clip_path=x"])
    assert (sd15.adam_weight_decay, sd15.max_grad_norm, sd15.mixed_precision, sd15.views_dtype) == (0.3, 1.0, "bf16", "fp16")
    assert (sd15.learning_rate, sd15.train_batch_size, sd15.gradient_accumulation_steps) == (3e-6, 16, 1)
