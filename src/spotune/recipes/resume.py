"""What may change when a run is resumed, and making the allowed changes real.

A resumed run must go on computing what the stopped one would have: the same model, adapter shape,
sampler, seed and loss. So on resume the new config is compared with the one stored in the checkpoint's
``state.json``; a change to any key outside the recipe's resumable set is refused with the list of
keys. The resumable ones (how long to run, how often to checkpoint, logging, and the learning rate)
are applied for real: a new learning rate replaces the restored optimizer's and schedule's. The
resumed config is written beside the original ``config.yaml``, which is never replaced.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch

from spotune.checkpoint import checkpoint_name, read_state
from spotune.config import config_to_dict
from spotune.errors import SpotuneError
from spotune.utils.io import atomic_write_text

logger = logging.getLogger(__name__)

# Keys that name where the run is and how it was started, not what it computes.
_NOT_COMPARED = frozenset({"resume", "overwrite", "output_dir"})


class ResumeConfigError(SpotuneError, ValueError):
    """A resume whose config changes what the run computes, or leaves it nothing to do."""


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return field.default_factory()  # type: ignore[misc]
    return None


def config_changes(saved: dict[str, Any], config: Any) -> dict[str, tuple[Any, Any]]:
    """``key -> (checkpoint's value, new value)`` for every compared key whose value differs.

    A key the checkpoint does not record (it predates the key) counts as having had its default.
    """
    changes = {}
    for field in dataclasses.fields(config):
        if field.name in _NOT_COMPARED:
            continue
        new = _plain(config_to_dict(config)[field.name])
        old = _plain(saved[field.name] if field.name in saved else _default(field))
        if old != new:
            changes[field.name] = (old, new)
    return changes


def check_resume_config(checkpoint: Path, config: Any, resumable: frozenset[str]) -> dict[str, tuple[Any, Any]]:
    """Refuse a resume that changes a non-resumable key; return (and log) the allowed changes.

    Args:
        checkpoint: the checkpoint folder being resumed (its ``state.json`` holds the run's config).
        config: the new, validated config.
        resumable: the keys this recipe lets a resume change.
    Raises:
        ResumeConfigError: listing every refused key with its old and new value.
    """
    saved = read_state(checkpoint).get("config") or {}
    changes = config_changes(saved, config)
    refused = {k: v for k, v in changes.items() if k not in resumable}
    if refused:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
        raise ResumeConfigError(
            f"{checkpoint}: resume changes {', '.join(refused)} ({listed}); these change what the run computes, "
            "so it would no longer continue the same run. Set them back to the checkpoint's values, or start a "
            f"new run in another output_dir. A resume may change: {', '.join(sorted(resumable))}"
        )
    for key, (old, new) in changes.items():
        logger.info("resume: %s changed from %r to %r", key, old, new)
    return changes


def override_learning_rate(optimizer: torch.optim.Optimizer, scheduler: Any, learning_rate: float) -> None:
    """Make ``learning_rate`` the base rate of a restored optimizer and its schedule, from this step on.

    The schedule's factor at its current step is kept (a warm-up or decay goes on where it was); only
    the rate it multiplies changes. The restored state would otherwise win and the run would train at
    the old rate while its config said the new one.

    Args:
        optimizer: the (possibly accelerate-wrapped) optimizer, already restored.
        scheduler: its ``LambdaLR`` schedule (diffusers' ``get_scheduler``), already restored.
    """
    inner = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        raise ResumeConfigError(f"learning_rate cannot be changed on resume with a {type(scheduler).__name__} schedule")
    scheduler.base_lrs = [learning_rate for _ in inner.param_groups]
    for group, factor in zip(inner.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = learning_rate
        group["lr"] = learning_rate * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in inner.param_groups]  # what get_last_lr() reports


def write_run_config(output_dir: Path, yaml_text: str, resumed_at: int | None) -> Path:
    """Write the run's config: ``config.yaml`` for a new run, ``config.resumed-<iteration>.yaml`` beside it
    for a resume (``config.yaml`` stays the config the run started with)."""
    path = output_dir / "config.yaml"
    if resumed_at is not None and path.exists():
        path = output_dir / f"config.resumed-{checkpoint_name(resumed_at).split('-', 1)[1]}.yaml"
    atomic_write_text(path, yaml_text)
    return path


def check_nothing_lost(checkpoint: Path, done: int, total: int, key: str) -> None:
    """Refuse a resume whose new length ends before the checkpoint (it would do nothing and say done)."""
    if total < done:
        raise ResumeConfigError(
            f"{checkpoint} is at {done}, beyond the {total} this config asks for in total; raise {key} above {done} "
            "to continue training, or export the checkpoint as it is"
        )
