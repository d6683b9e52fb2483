"""The step-aware preference model (SPM) as an image scorer: its judgement of final images (t = 0)."""

from __future__ import annotations

from pathlib import Path

import torch

from spotune.eval.scorers.base import BUILTIN_TINY_CLIP, WeightSpec, require_path, resolve_device, resolve_dtype
from spotune.eval.scorers.pickscore import ClipJudgeScorer

WEIGHTS = (
    WeightSpec(
        "clip_path",
        "the CLIPModel the SPM extends (PickScore_v1 for the paper's)",
        "the Hugging Face hub repo yuvalkirstain/PickScore_v1",
        kind="dir",
    ),
    WeightSpec(
        "checkpoint_path",
        "an SPM checkpoint: a `spotune train-spm` run or checkpoint folder, its spm.safetensors, or the "
        "official *_step-aware_preference_model.bin",
        "`spotune train-spm` output, or the SPO authors' release (GitHub repository RockeyCoss/SPO)",
        kind="any",
    ),
)


def load_spm(
    clip_path: str | Path | None = None,
    checkpoint_path: str | Path | None = None,
    processor_path: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    batch_size: int = 16,
) -> ClipJudgeScorer:
    """The SPM scoring final images at t = 0.

    Args:
        clip_path: the CLIP folder the SPM was built on (``builtin:tiny-clip`` for tiny test SPMs).
        checkpoint_path: the SPM's weights (file, or train-spm run/checkpoint folder).
        processor_path: tokenizer + ``preprocessor_config.json`` folder (default: ``clip_path``).
    """
    from spotune.preference.step_aware import StepAwarePreferenceModel

    if str(clip_path) != BUILTIN_TINY_CLIP:
        require_path("spm", clip_path, WEIGHTS[0])
    ckpt = require_path("spm", checkpoint_path, WEIGHTS[1])
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    judge = StepAwarePreferenceModel.from_pretrained(
        str(clip_path), str(ckpt), str(processor_path) if processor_path else None, device=dev, dtype=dt
    )
    return ClipJudgeScorer(judge, "spm", timestep=0, batch_size=batch_size, device=dev)
