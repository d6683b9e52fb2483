"""The on-disk layout of training runs and checkpoints, and the code that reads and writes it.

A run folder::

    RUN/
      .spotune.lock                held (flock) by the process running in the folder; PID inside
      config.yaml                  the resolved config the run started with
      config.resumed-XXXXXXXX.yaml the config of a resume from that iteration (config.yaml is kept)
      checkpoints/
        iter-00000010/             one checkpoint, named by completed SPO iterations
          state.json               counters, the config, what the weights are (format below)
          lora.safetensors         finetune=lora: peft LoRA weights, diffusers module names
                                   (``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight``)
          unet.safetensors         finetune=full: the whole UNet state dict
          ema.safetensors          algorithm=gradspo: the EMA model's weights, same keys as the file above
          accumulation.safetensors an open accumulation group (state.json: open_group_micro_batches > 0):
                                   its summed gradients (``grad.<parameter name>``) and ``losses``
          scaler.json              mixed_precision=fp16: the loss scaler's state (scale, growth tracker)
          optimizer.safetensors    optimizer tensors (``state.<param index>.<name>``)
          optimizer.json           optimizer param groups and scalar state
          scheduler.json           learning-rate scheduler state
          rng_rank<r>.safetensors  torch RNG states of process r; rng_rank<r>.json python/numpy states
      logs/                        TensorBoard
      samples/                     validation images

Checkpoints are written into a temporary folder and renamed at the end, so a folder named
``iter-*`` with a ``state.json`` is always complete. Nothing here is a pickle.
"""

from __future__ import annotations

from spotune.errors import SpotuneError, one_line

import json
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

CHECKPOINT_FORMAT = "spotune-checkpoint-v1"
EMA_FILE = "ema.safetensors"
ACCUMULATION_FILE = "accumulation.safetensors"
SCALER_FILE = "scaler.json"
WEIGHT_CHOICES = ("trained", "ema")
_CKPT_RE = re.compile(r"^iter-(\d{8})$")


class CheckpointError(SpotuneError, RuntimeError):
    """A run or checkpoint folder that is missing, incomplete, or not spotune's."""


def checkpoint_name(iteration: int) -> str:
    return f"iter-{iteration:08d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary or half-written folders are skipped)."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = _CKPT_RE.match(child.name)
        if match and (child / "state.json").is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder itself, or the latest complete checkpoint of a run folder."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist (expected a run folder or a checkpoint folder)")
    if (path / "state.json").is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file; expected a run folder or a checkpoint folder (RUN/checkpoints/iter-XXXXXXXX)")
    if _CKPT_RE.match(path.name) or any(path.glob("*.safetensors")):
        # A checkpoint folder without its completion marker: its write was interrupted, or files were removed.
        complete = [c for c in list_checkpoints(path.parent.parent) if c != path] if path.parent.name == "checkpoints" else []
        alternative = f"; complete checkpoints of this run: {complete[-1]} (newest)" if complete else ""
        raise CheckpointError(
            f"checkpoint folder {path} has no state.json, so it is not a complete checkpoint{alternative}; "
            "name a complete checkpoint folder, or the run folder (resume=latest picks its newest complete one)"
        )
    checkpoints = list_checkpoints(path)
    if not checkpoints:
        raise CheckpointError(
            f"{path} holds no complete checkpoint (expected {path}/state.json in a checkpoint folder, or "
            f"{path}/checkpoints/iter-XXXXXXXX/state.json in a run folder)"
        )
    return checkpoints[-1]


def read_state(checkpoint: str | Path) -> dict[str, Any]:
    """The parsed ``state.json`` of a checkpoint, checked for the format tag."""
    file = Path(checkpoint) / "state.json"
    try:
        state = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file}: cannot read checkpoint state ({exc})") from exc
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{file}: not a spotune checkpoint (format={state.get('format')!r})")
    return state


def _damaged(file: Path, exc: BaseException) -> CheckpointError:
    """The error for an unreadable file of a checkpoint, pointing at the checkpoint before it."""
    checkpoint = file.parent
    earlier = [c for c in list_checkpoints(checkpoint.parent.parent) if c.name < checkpoint.name]
    if earlier:
        advice = f"use the previous checkpoint {earlier[-1]} instead (to continue training: resume={earlier[-1]})"
    else:
        advice = "no earlier checkpoint of this run exists (to train afresh: overwrite=true)"
    return CheckpointError(f"{file} is damaged or truncated ({one_line(exc)}); {advice}")


def load_checkpoint_tensors(checkpoint: str | Path, name: str, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of ``checkpoint/name`` (a safetensors file); a damaged file names the previous checkpoint."""
    file = Path(checkpoint) / name
    # A multi-process CPU run's accelerator device is "cpu:<rank>", which safetensors refuses; CPU is one device.
    device = "cpu" if str(device).split(":")[0] == "cpu" else str(device)
    try:
        return load_file(str(file), device=device)
    except Exception as exc:  # safetensors raises its own error type for truncated headers and data
        raise _damaged(file, exc) from exc


def load_checkpoint_json(checkpoint: str | Path, name: str) -> Any:
    """The parsed ``checkpoint/name`` JSON file; a damaged file names the previous checkpoint."""
    file = Path(checkpoint) / name
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or bad UTF-8
        raise _damaged(file, exc) from exc


def load_weights(checkpoint: str | Path, weights: str = "trained") -> tuple[str, dict[str, torch.Tensor]]:
    """Return ``("lora", peft state dict)`` or ``("full", unet state dict)`` of a checkpoint.

    Args:
        weights: "trained" (the optimised weights) or "ema" (a GradSPO run's EMA model, ``ema.safetensors``).
    """
    checkpoint = Path(checkpoint)
    state = read_state(checkpoint)
    kind = state["finetune"]
    if weights not in WEIGHT_CHOICES:
        raise CheckpointError(f"weights must be one of {', '.join(WEIGHT_CHOICES)}, got {weights!r}")
    file = checkpoint / ("lora.safetensors" if kind == "lora" else "unet.safetensors")
    if weights == "ema":
        file = checkpoint / EMA_FILE
        if not file.is_file():
            trained_with = (state.get("config") or {}).get("algorithm", "spo")
            raise CheckpointError(
                f"{file} does not exist: only algorithm=gradspo runs keep EMA weights (this one is "
                f"algorithm={trained_with}); use --weights trained"
            )
    return kind, load_checkpoint_tensors(checkpoint, file.name)


# -- optimizer, scheduler and RNG state as safetensors + JSON (no pickles) --------------------------


def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (for safetensors) and plain data (for JSON)."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in sd["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalar_state": scalars}


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`optimizer_to_files`: a state dict for ``optimizer.load_state_dict``."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for index, values in meta.get("scalar_state", {}).items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state_to_files() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every RNG this process uses: torch CPU (and CUDA), python ``random`` and numpy."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    np_state = np.random.get_state()
    meta = {
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    return tensors, meta


def restore_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted(k for k in tensors if k.startswith("torch_cuda_"))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def restore_training_state(checkpoint: str | Path, optimizer, lr_scheduler, process_index: int, device: str) -> None:
    """Load a checkpoint's optimizer, lr schedule and this process's RNG states (every recipe's resume).

    Args:
        optimizer: the torch optimizer (or accelerate's wrapper around one).
        process_index: whose ``rng_rank<r>`` files to restore; absent files leave the RNG as it is.
    """
    checkpoint = Path(checkpoint)
    inner = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
    opt_tensors = load_checkpoint_tensors(checkpoint, "optimizer.safetensors", device=device)
    inner.load_state_dict(optimizer_from_files(opt_tensors, load_checkpoint_json(checkpoint, "optimizer.json")))
    lr_scheduler.load_state_dict(load_checkpoint_json(checkpoint, "scheduler.json"))
    rng_name = f"rng_rank{process_index}"
    if (checkpoint / f"{rng_name}.safetensors").is_file():
        restore_rng_state(load_checkpoint_tensors(checkpoint, f"{rng_name}.safetensors"),
                          load_checkpoint_json(checkpoint, f"{rng_name}.json"))
