"""The base pipeline with the trained weights folded in: LoRA fused, or the fine-tuned UNet loaded."""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline

from spotune.export.apply import apply_lora
from spotune.export.source import ExportError, ExportSource


def merged_pipeline(source: ExportSource, base_model: str | None = None) -> DiffusionPipeline:
    """Load the base model (fp32, CPU) and fold ``source`` into its UNet.

    Args:
        source: from :func:`~spotune.export.source.read_export_source`.
        base_model: overrides the base model recorded in the checkpoint (needed for a bare LoRA file).
    Returns:
        An SD1.5 or SDXL pipeline (the base model's family) whose UNet carries no adapter: ``W + (alpha / r) * B @ A`` for a LoRA, the trained
        weights for a full fine-tune.
    """
    from spotune.models.loading import load_pipeline

    base = base_model or source.base_model
    if not base:
        raise ExportError(
            f"{source.path}: no base model is known for this LoRA; pass --base-model MODEL (base_model: in an "
            "export --config file) with the model it was trained on"
        )
    pipe = load_pipeline(str(base), dtype=torch.float32)
    if source.kind == "lora":
        assert source.lora is not None
        apply_lora(pipe.unet, source.lora, fuse=True)
        return pipe
    assert source.unet_state is not None
    try:
        result = pipe.unet.load_state_dict(source.unet_state, strict=False)
    except RuntimeError as exc:  # torch reports shape mismatches this way
        raise ExportError(f"{source.path}: the fine-tuned UNet does not fit base model {base}: {exc}") from exc
    if result.missing_keys or result.unexpected_keys:
        raise ExportError(
            f"{source.path}: the fine-tuned UNet does not fit base model {base}: "
            f"{len(result.missing_keys)} missing key(s) (e.g. {result.missing_keys[:2]}), "
            f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:2]})"
        )
    return pipe
