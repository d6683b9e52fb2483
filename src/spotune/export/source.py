"""What an export starts from: a spotune run/checkpoint (LoRA or full fine-tune), or a LoRA file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from spotune.errors import SpotuneError
from spotune.export.lora_files import LoraWeights, load_lora_file
from spotune.export.lora_layout import lora_family
from spotune.export.metadata import SD15_DEFAULT_RESOLUTION, model_default_resolution, model_name


class ExportError(SpotuneError, ValueError):
    """An export that cannot be done as asked (output exists, no base model, wrong kind of source...)."""


@dataclass
class ExportSource:
    """The trained weights to export and what is known about them.

    Attributes:
        path: the checkpoint folder (resolved from a run folder) or the LoRA file given.
        kind: "lora" or "full".
        lora: the LoRA (kind "lora").
        unet_state: the whole trained UNet state dict (kind "full").
        base_model: the model source the run trained on (state.json), ``None`` for a bare LoRA file.
        title: a human-readable name for metadata (run name and checkpoint).
        description: one sentence for metadata; names the base model, never its local path.
        resolution: training image size in pixels (for modelspec metadata): the run's setting, or the
            base model's default when it was unset; for a bare LoRA file its family's native size
            (SDXL 1024, SD1.5 512).
    """

    path: Path
    kind: str
    lora: LoraWeights | None
    unet_state: dict[str, torch.Tensor] | None
    base_model: str | None
    title: str
    description: str
    resolution: int = SD15_DEFAULT_RESOLUTION


def _is_checkpoint_or_run(path: Path) -> bool:
    return path.is_dir() and ((path / "state.json").is_file() or (path / "checkpoints").is_dir())


def read_export_source(source: str | Path, weights: str = "trained") -> ExportSource:
    """Read a run folder (its latest checkpoint), a checkpoint folder, or a LoRA file/folder.

    Args:
        weights: "trained" (default; what GradSPO's official code releases too) or "ema", the EMA
            model that a GradSPO run keeps beside them.

    Raises:
        CheckpointError / LoraFormatError / ExportError: naming the path and what was expected.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise ExportError(f"{path} does not exist (expected a spotune run folder, a checkpoint folder, or a LoRA file)")
    if not _is_checkpoint_or_run(path):
        if weights != "trained":
            raise ExportError(f"{path}: --weights {weights} needs a spotune run or checkpoint folder, not a LoRA file")
        lora = load_lora_file(path)
        family = lora_family(lora)[0]
        return ExportSource(
            path=lora.source,
            kind="lora",
            lora=lora,
            unet_state=None,
            base_model=None,
            title=path.stem,
            description=f"LoRA converted by spotune from {path.name}",
            # A bare file says nothing of its training size: its family's native one (SDXL 1024, SD1.5 512).
            resolution=family.native_resolution if family is not None else SD15_DEFAULT_RESOLUTION,
        )

    from spotune.checkpoint import load_weights, read_state, resolve_checkpoint

    checkpoint = resolve_checkpoint(path)
    state = read_state(checkpoint)
    run_name = checkpoint.parent.parent.name if checkpoint.parent.name == "checkpoints" else checkpoint.parent.name
    title = f"{run_name}-{checkpoint.name}"
    config = state.get("config") or {}
    base_model = state.get("base_model")
    # What training used: train_spo samples at cfg.resolution or, unset, the VAE's sample_size.
    resolution = int(config.get("resolution") or model_default_resolution(base_model))
    description = (
        f"SPO (Step-by-step Preference Optimization) fine-tune made with spotune: run {run_name}, "
        f"{checkpoint.name} (iteration {state.get('iteration')}), base model {model_name(base_model) or 'unknown'}"
    )
    if config.get("algorithm") == "gradspo":
        title = f"{title}-ema" if weights == "ema" else title
        description = (
            f"GradSPO fine-tune made with spotune ({'EMA' if weights == 'ema' else 'trained'} weights): run {run_name}, "
            f"{checkpoint.name} (iteration {state.get('iteration')}), base model {base_model}"
        )
    if state.get("finetune") == "full":
        _, unet_state = load_weights(checkpoint, weights)
        return ExportSource(checkpoint, "full", None, unet_state, base_model, title, description, resolution)
    lora = load_lora_file(checkpoint, weights)
    return ExportSource(checkpoint, "lora", lora, None, base_model, title, description, resolution)
