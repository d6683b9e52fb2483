"""One entry point that turns a config's judge settings into a ready :class:`ClipStyleJudge`."""

from __future__ import annotations

import torch

from spotune.hints import config_keys, key
from spotune.preference.clip_judge import ClipStyleJudge, PickScoreJudge
from spotune.preference.loading import BUILTIN_TINY_CLIP, JudgeLoadError
from spotune.preference.lrm import LatentRewardModel, LRMLoadError, load_lrm
from spotune.preference.step_aware import StepAwarePreferenceModel

JUDGE_KINDS = ("spm", "pickscore", "tiny-clip", "tiny-spm", "lrm")
# The judges of decoded images (every kind but LPO's latent judge).
PIXEL_JUDGE_KINDS = tuple(kind for kind in JUDGE_KINDS if kind != "lrm")
# The precisions a judge can run in (the config's judge_dtype). fp32 is SPO's: its judge is built in
# fp32 and never runs under autocast; bf16/fp16 trade some pair decisions for speed.
JUDGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The config keys of the commands that build a judge (spotune train, eval-spm) for build_judge's arguments.
JUDGE_CONFIG_KEYS = {
    "kind": "judge",
    "clip_path": "judge_clip_path",
    "checkpoint": "judge_checkpoint",
    "processor_path": "judge_processor_path",
}


def build_judge(
    kind: str,
    clip_path: str | None = None,
    checkpoint: str | None = None,
    processor_path: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> ClipStyleJudge | LatentRewardModel:
    """Build the judge SPO (or an evaluation) scores candidates with, in eval mode without gradients.

    Args:
        kind: ``spm`` (step-aware, the paper's: ``clip_path`` = PickScore_v1 folder + ``checkpoint``),
            ``pickscore`` (plain, timestep-blind: ``clip_path``), ``tiny-clip`` (the tiny random CLIP built
            in code, for CPU runs) or ``tiny-spm`` (an SPM over the tiny CLIP; untrained unless
            ``checkpoint`` names a tiny train-spm run), or ``lrm`` (LPO's latent reward model, which scores
            latents: ``checkpoint`` is its folder, or ``builtin:tiny-lrm`` / ``builtin:tiny-lrm-sdxl``).
        clip_path: a local CLIPModel folder (spm, pickscore).
        checkpoint: an official ``.bin``, a ``.safetensors`` written by spotune, or a train-spm run or
            checkpoint folder (its latest checkpoint is used).
        processor_path: folder with the tokenizer and ``preprocessor_config.json`` (default: ``clip_path``).
        device, dtype: where and in what precision the judge runs (CPU, float32 by default).
    Raises:
        JudgeLoadError: an unknown kind, a missing path, or files that do not fit (each named).
    """
    kind_key, clip_key, ckpt_key = key("kind"), key("clip_path"), key("checkpoint")
    if kind == "tiny-clip":
        if checkpoint is not None:
            raise JudgeLoadError(f"{kind_key}=tiny-clip takes no {ckpt_key} (did you mean {kind_key}=tiny-spm?)")
        return PickScoreJudge.from_pretrained(BUILTIN_TINY_CLIP, processor_path, device=device, dtype=dtype)
    if kind == "tiny-spm":
        return StepAwarePreferenceModel.from_pretrained(
            BUILTIN_TINY_CLIP, checkpoint, processor_path, device=device, dtype=dtype
        )
    if kind == "pickscore":
        if not clip_path:
            raise JudgeLoadError(f"{kind_key}=pickscore needs {clip_key}=PATH: a local CLIPModel folder (PickScore_v1)")
        if checkpoint is not None:
            raise JudgeLoadError(
                f"{kind_key}=pickscore takes no {ckpt_key} (use {kind_key}=spm for a step-aware checkpoint)"
            )
        return PickScoreJudge.from_pretrained(clip_path, processor_path, device=device, dtype=dtype)
    if kind == "spm":
        if not clip_path or not checkpoint:
            raise JudgeLoadError(
                f"{kind_key}=spm needs {clip_key}=PATH (a local PickScore_v1 CLIPModel folder) and {ckpt_key}=PATH "
                "(an official *_step-aware_preference_model.bin, a .safetensors, or a train-spm run folder)"
            )
        return StepAwarePreferenceModel.from_pretrained(clip_path, checkpoint, processor_path, device=device, dtype=dtype)
    if kind == "lrm":
        if not checkpoint:
            raise JudgeLoadError(f"{kind_key}=lrm needs {ckpt_key}=PATH: the LRM folder (unet/, text_encoder/, state_dict.pt), "
                                 "or builtin:tiny-lrm for CPU runs")
        if clip_path is not None:
            raise JudgeLoadError(f"{kind_key}=lrm takes no {clip_key}: the LRM folder holds its own text encoder")
        try:
            return load_lrm(checkpoint, device=device, dtype=dtype)
        except LRMLoadError as exc:
            raise JudgeLoadError(f"{ckpt_key}: {exc}") from None
    raise JudgeLoadError(f"unknown judge kind {kind!r}; set {kind_key} to one of {', '.join(JUDGE_KINDS)}")


def build_judge_from_config(kind: str, clip_path: str | None, checkpoint: str | None, processor_path: str | None,
                            device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> ClipStyleJudge | LatentRewardModel:
    """:func:`build_judge` for the commands whose keys are ``judge``, ``judge_clip_path``, ``judge_checkpoint``
    and ``judge_processor_path``: its error messages name those keys."""
    with config_keys(JUDGE_CONFIG_KEYS):
        return build_judge(kind, clip_path, checkpoint, processor_path, device=device, dtype=dtype)
