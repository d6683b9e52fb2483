"""Pieces every training recipe shares: run-folder rules, seeds, precision names, loop errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from spotune.checkpoint import list_checkpoints, resolve_checkpoint
from spotune.errors import SpotuneError

MIXED_PRECISION_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class RunFolderError(SpotuneError, FileExistsError):
    """The output folder already holds a run and neither resume nor overwrite was asked for."""


class NonFiniteLossError(SpotuneError, FloatingPointError):
    """The loss became NaN or infinite; training stopped before the optimizer applied it."""


def seed_for(*parts: int) -> int:
    """A 63-bit seed from integers, stable across runs and processes (no Python hash randomisation).

    Recipes seed one generator per (seed, iteration, process, purpose) from this, so a resumed run
    draws exactly what the uninterrupted run would have drawn.
    """
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (part + 0x632BE59BD9B4E019 + (value << 6) + (value >> 2))) & 0xFFFFFFFFFFFFFFFF
    return value & 0x7FFFFFFFFFFFFFFF


def prepare_run_folder(output_dir: str | Path, resume: str | None, overwrite: bool) -> Path | None:
    """Decide between a fresh run, a resume, or a refusal; return the checkpoint to resume from.

    Args:
        output_dir: the run folder.
        resume: ``"latest"`` (newest complete checkpoint of ``output_dir``), a checkpoint folder, or ``None``.
        overwrite: start afresh in a folder that already holds a run, deleting its checkpoints, logs and samples.
    Raises:
        RunFolderError: the folder holds a run and neither ``resume`` nor ``overwrite`` was given.
    """
    output_dir = Path(output_dir)
    existing = list_checkpoints(output_dir)
    if resume:
        if resume == "latest":
            if not existing:
                raise SpotuneError(f"resume=latest: {output_dir} holds no complete checkpoint")
            return existing[-1]
        return resolve_checkpoint(resume)
    if existing or (output_dir / "checkpoints").exists():
        if not overwrite:
            raise RunFolderError(
                f"{output_dir} already holds a run ({len(existing)} checkpoint(s)); pass resume=latest to "
                "continue it, overwrite=true to start afresh (deleting them), or choose another output_dir"
            )
        # Only the main process deletes; the others wait for it (no accelerator exists yet, so ask
        # accelerate's view of the launch environment).
        from accelerate import PartialState

        state = PartialState()
        if state.is_main_process:
            for sub in ("checkpoints", "logs", "samples", "eval"):
                shutil.rmtree(output_dir / sub, ignore_errors=True)
        state.wait_for_everyone()
    return None


def end_accelerator(accelerator) -> None:
    """Close the trackers and forget accelerate's process-wide state.

    accelerate keeps its state in a singleton; forgetting it lets the same process run another recipe
    with other settings (e.g. the demo's SPM run, then SPO, then the baseline).
    """
    from accelerate.state import AcceleratorState

    accelerator.end_training()
    AcceleratorState._reset_state()


def run_recipe(trainer) -> dict[str, float]:
    """``setup()``, ``train()`` and, whatever happens, ``cleanup()``; returns what ``train()`` returns."""
    trainer.setup()
    try:
        return trainer.train()
    finally:
        trainer.cleanup()
