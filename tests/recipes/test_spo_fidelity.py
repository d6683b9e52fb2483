"""What the authors' effective recipe needs of `spotune train`: the gradient norm before clipping logged
every optimizer step, clipping only when asked, and the judge in its own precision (fp32 by default)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml"
# 8 DDIM steps from divert step 4: 4 tuples from one prompt, every pair kept (threshold 0).
FAST = [
    "num_inference_steps=8", "divert_start_step=4", "sample_batch_size=1", "train_batch_size=2",
    "preference_threshold=0.0", "log_with=none", "progress=false", "validate_every_epochs=0",
]


def _trainer(tmp_path: Path, name: str, overrides: list[str]):
    from spotune.config import load_config
    from spotune.recipes.train_spo import SPOTrainer
    from spotune.recipes.train_spo_config import TrainSPOConfig

    cfg = load_config(TrainSPOConfig, CONFIG, [f"output_dir={tmp_path / name}", *FAST, *overrides])
    trainer = SPOTrainer(cfg)
    trainer.setup()
    return trainer


def _norm(tensors: list[torch.Tensor]) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors)))


def _logged_norms(run: Path) -> list[tuple[int, float]]:
    """(optimizer step, value) of grad_norm_per_optimizer_step in the run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "logs" / "spotune"))  # the tracker project's folder (hparams sit below it)
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars("grad_norm_per_optimizer_step")]


def _train_and_watch(tmp_path: Path, name: str, overrides: list[str], pairs=None):
    """Train on ``pairs`` (sampled when None); return them, the norms logged to TensorBoard, the applied
    gradients' norms and the iteration statistics."""
    trainer = _trainer(tmp_path, name, ["log_with=tensorboard", *overrides])
    try:
        if pairs is None:
            pairs = trainer.sample(["a red circle on a white background"]).pairs
        applied = []
        # The gradient the optimizer applies is the one it holds when step() is called.
        trainer.optimizer.step = lambda *a, **k: applied.append(_norm([p.grad for p in trainer.trainable]))
        stats = trainer.train_on_pairs(pairs)
    finally:
        trainer.cleanup()
    return pairs, _logged_norms(tmp_path / name), applied, stats


def test_grad_norm_is_logged_every_step_and_clipping_only_when_asked(tmp_path):
    pairs, logged, applied, stats = _train_and_watch(tmp_path, "noclip", ["max_grad_norm=0"])
    assert len(pairs) == 4 and len(applied) == 2  # 4 tuples, micro-batches of 2: two optimizer steps
    assert [s for s, _ in logged] == [1, 2]  # on the optimizer-step axis
    # max_grad_norm 0: nothing is clipped, and the logged norm is the applied gradient's, computed by hand
    for (_, value), by_hand in zip(logged, applied):
        assert by_hand > 0
        assert value == pytest.approx(by_hand, rel=1e-5)
    assert stats["grad_norm"] == pytest.approx(sum(applied) / 2, rel=1e-5)
    assert stats["grad_norm_max"] == pytest.approx(max(applied), rel=1e-5)

    # The same tuples and initial weights with clipping: the first step's norm before clipping is the same
    # as above, and the applied gradient is at most max_grad_norm.
    first = applied[0]
    _, logged_1, applied_1, _ = _train_and_watch(tmp_path, "clip1", ["max_grad_norm=1.0"], pairs)
    assert logged_1[0][1] == pytest.approx(first, rel=1e-5)
    assert all(n <= 1.0 + 1e-5 for n in applied_1)
    # A bound below the norm clips to it exactly (so the clip really ran, whatever the tiny model's scale).
    bound = first / 2
    _, logged_h, applied_h, _ = _train_and_watch(tmp_path, "cliphalf", [f"max_grad_norm={bound}"], pairs)
    assert logged_h[0][1] == pytest.approx(first, rel=1e-5)
    assert applied_h[0] == pytest.approx(bound, rel=1e-4)


def _judge_dtypes_while_sampling(tmp_path: Path, name: str, overrides: list[str]):
    """(parameter dtype, dtypes of the judge's image features seen while sampling) of a tiny run."""
    trainer = _trainer(tmp_path, name, ["judge=tiny-clip", *overrides])
    try:
        seen = []
        real = trainer.judge.image_features

        def watched(pixel_values, timesteps):
            out = real(pixel_values, timesteps)
            seen.append((pixel_values.dtype, out.dtype, torch.is_autocast_enabled("cpu")))
            return out

        trainer.judge.image_features = watched
        result = trainer.sample(["a red circle on a white background"])
        assert result.scores.dtype == torch.float32
        return trainer.judge.dtype, set(seen)
    finally:
        trainer.cleanup()


def test_judge_runs_in_fp32_outside_autocast_under_a_bf16_run(tmp_path):
    dtype, seen = _judge_dtypes_while_sampling(tmp_path, "bf16", ["mixed_precision=bf16"])
    assert dtype == torch.float32
    assert seen == {(torch.float32, torch.float32, False)}  # fp32 in, fp32 out, autocast off inside the judge


def test_judge_dtype_chooses_the_judge_precision(tmp_path):
    dtype, seen = _judge_dtypes_while_sampling(tmp_path, "bf16judge", ["mixed_precision=bf16", "judge_dtype=bf16"])
    assert dtype == torch.bfloat16
    assert seen == {(torch.bfloat16, torch.bfloat16, False)}


def test_sd15_recipe_does_not_clip_and_judges_in_fp32():
    from spotune.config import load_config
    from spotune.recipes.train_spo_config import TrainSPOConfig

    cfg = load_config(TrainSPOConfig, CONFIG.parent / "sd15_spo.yaml", [])
    assert cfg.max_grad_norm == 0 and cfg.judge_dtype == "fp32" and cfg.mixed_precision == "fp16"


def test_spotune_diffusion_exports_the_public_names():
    import spotune.diffusion as diffusion
    from spotune.diffusion.ddim import ddim_step_with_logprob
    from spotune.diffusion.sampler import spo_sample

    assert diffusion.ddim_step_with_logprob is ddim_step_with_logprob
    assert diffusion.spo_sample is spo_sample
    assert {"ddim_step_with_logprob", "spo_sample"} <= set(diffusion.__all__)
