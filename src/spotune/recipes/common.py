"""Pieces every training recipe shares: run-folder rules, seeds, precision names, loop errors."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import NoReturn

import torch

from spotune.checkpoint import checkpoint_name, list_checkpoints, resolve_checkpoint
from spotune.config import ConfigError
from spotune.errors import RunInterrupted, SpotuneError, Terminated
from spotune.utils.io import remove_stale_temporaries
from spotune.utils.paths import resolve_user_path
from spotune.utils.preemption import DEFAULT_GRACE_S, PreemptionWatch
from spotune.utils.run_lock import RunLock, RunLockedError

logger = logging.getLogger(__name__)

MIXED_PRECISION_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class RunFolderError(SpotuneError, FileExistsError):
    """The output folder already holds a run and neither resume nor overwrite was asked for."""


class NoTrainingError(SpotuneError, RuntimeError):
    """A run ended without a single optimizer step (e.g. no pair passed the preference threshold)."""


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


def planned_iterations(num_epochs: int, iterations_per_epoch: int, max_iterations: int | None) -> int:
    """Iterations the run will do: ``num_epochs`` passes, or fewer when ``max_iterations`` says so.

    Raises:
        ConfigError: ``max_iterations`` asks for more than the epochs hold (it would be cut silently).
    """
    planned = num_epochs * iterations_per_epoch
    if max_iterations is None:
        return planned
    if max_iterations > planned:
        needed = -(-max_iterations // iterations_per_epoch)
        raise ConfigError(
            f"config: max_iterations={max_iterations} is more than num_epochs={num_epochs} x "
            f"{iterations_per_epoch} iterations per epoch = {planned}; set num_epochs={needed} to run "
            f"{max_iterations} iterations, or lower max_iterations"
        )
    return max_iterations


def prepare_run_folder(output_dir: str | Path, resume: str | None, overwrite: bool) -> Path | None:
    """Decide between a fresh run, a resume, or a refusal; return the checkpoint to resume from.

    Args:
        output_dir: the run folder.
        resume: ``"latest"`` (newest complete checkpoint of ``output_dir``), a checkpoint folder, or ``None``.
        overwrite: start afresh in a folder that already holds a run, deleting its checkpoints, logs and samples.
    Raises:
        RunFolderError: the folder holds a run and neither ``resume`` nor ``overwrite`` was given.
        SpotuneError: ``resume=latest`` and no checkpoint in the folder. A run that stopped before its first
            checkpoint has nothing to resume, so both messages then name ``overwrite=true``, not ``resume=latest``.
    """
    output_dir = Path(output_dir)
    existing = list_checkpoints(output_dir)
    if resume:
        if resume == "latest":
            if not existing:
                raise SpotuneError(
                    f"resume=latest: no checkpoint was written in {output_dir}, so there is nothing to resume; "
                    "drop resume=latest and pass overwrite=true to start afresh there, or choose another output_dir"
                )
            return existing[-1]
        return resolve_checkpoint(resume)
    if existing or (output_dir / "checkpoints").exists():
        if not overwrite and not existing:
            raise RunFolderError(
                f"{output_dir} already holds a run that stopped before its first complete checkpoint, so there is "
                "nothing to resume; pass overwrite=true to start afresh there (deleting what it left), or choose "
                "another output_dir"
            )
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
            for sub in ("checkpoints", "logs", "samples", "eval", "best"):
                shutil.rmtree(output_dir / sub, ignore_errors=True)
        state.wait_for_everyone()
    return None


def _remove_stale_run_temporaries(output_dir: Path) -> None:
    """Delete what killed processes left in the run folder: half-written checkpoints and files.

    Called with the run lock held. In ``checkpoints/`` only the lock holder writes, so every hidden
    temporary there is stale, also those named before temporaries carried their PID; elsewhere in the
    folder (where e.g. an export may be writing) only those of processes that no longer run are.
    """
    for sub in (output_dir, output_dir / "eval", output_dir / "samples"):
        remove_stale_temporaries(sub)
    checkpoints = output_dir / "checkpoints"
    remove_stale_temporaries(checkpoints)
    if checkpoints.is_dir():
        for child in sorted(checkpoints.iterdir()):
            if re.match(r"^\.iter-\d{8}\..*\.tmp$", child.name):
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
                logger.info("removed %s, a checkpoint an interrupted run did not finish", child)


def open_run_folder(
    output_dir: str | Path, resume: str | None, overwrite: bool, command: str
) -> tuple[RunLock | None, Path | None]:
    """Lock the run folder for this run, clean what crashed runs left, then :func:`prepare_run_folder`.

    Only the main process takes the lock (one run = one holder, however many processes it has); the
    others learn from it whether it succeeded, so all of them stop together when it did not.

    Returns:
        The held lock (``None`` on the other processes) and the checkpoint to resume from (or ``None``).
    Raises:
        RunLockedError: another live process holds the folder (its PID is in the message).
    """
    from accelerate import PartialState

    output_dir = Path(output_dir)
    resolve_user_path(output_dir, "output_dir=FOLDER")  # a symbolic-link loop is one line, not the lock's OSError
    state = PartialState(cpu=not torch.cuda.is_available())
    lock, error = None, None
    if state.is_main_process:
        try:
            lock = RunLock(output_dir, command)
        except (RunLockedError, OSError) as exc:  # told to every process, so none waits for the others
            error = str(exc)
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        error = broadcast_object_list([error])[0]
    if error:
        raise RunLockedError(error)
    try:
        if lock is not None:
            _remove_stale_run_temporaries(output_dir)
        return lock, prepare_run_folder(output_dir, resume, overwrite)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def release_run_folder(trainer) -> None:
    """Free the run lock a trainer holds, if any (safe to call twice, or before setup took it)."""
    lock = getattr(trainer, "run_lock", None)
    if lock is not None:
        lock.release()


def end_accelerator(accelerator) -> None:
    """Close the trackers and forget accelerate's process-wide state.

    accelerate keeps its state in a singleton; forgetting it lets the same process run another recipe
    with other settings (e.g. the demo's SPM run, then SPO, then the baseline).
    """
    from accelerate.state import AcceleratorState

    accelerator.end_training()
    AcceleratorState._reset_state()


def _progress_counter(trainer) -> tuple[str, int]:
    """("iteration", n) for SPO trainers (SPO iterations done), ("optimizer step", n) for SPM trainers."""
    if hasattr(trainer, "iteration"):
        return "iteration", int(trainer.iteration)
    return "optimizer step", int(trainer.global_step)


def kept_checkpoint_text(output_dir: str | Path) -> str:
    """Which checkpoint of a run is kept and how to continue, e.g. for the end of an interruption's line."""
    output_dir = Path(output_dir)
    checkpoints = list_checkpoints(output_dir)
    if checkpoints:
        return f"the last checkpoint is {checkpoints[-1]} (continue with resume=latest output_dir={output_dir})"
    return f"no checkpoint of {output_dir} was written yet"


def interruption_message(trainer, started: bool, cause: str = "interrupted") -> str:
    """Where a Ctrl-C (or a signal at set-up) stopped ``trainer`` and what is kept, for the CLI's one line.

    SPO trainers count SPO iterations (``iteration``), SPM trainers optimizer steps (``global_step``);
    the number named is the one that was in progress.
    """
    output_dir = Path(trainer.output_dir)
    if not started:
        return f"{cause} while setting up the run in {output_dir}; no training step was taken"
    unit, done = _progress_counter(trainer)
    return f"{cause} at {unit} {done + 1}; {kept_checkpoint_text(output_dir)}"


def stop_for_preemption(trainer, abandoned: bool = False) -> NoReturn:
    """Checkpoint where the run stands (unless the newest checkpoint already is that) and raise Terminated.

    Called on every process at a safe point where :meth:`PreemptionWatch.stop_here` said stop, so the
    collective ``save_checkpoint`` runs on all of them. The trainer records the step of its newest checkpoint
    in ``saved_at`` (set by ``save_checkpoint`` and by a resume).

    Args:
        abandoned: the iteration in progress was given up before it changed anything (its sampling is
            redone on resume); the checkpoint is the state before it.
    """
    unit, done = _progress_counter(trainer)
    watch = trainer.preemption
    checkpoint = trainer.save_checkpoint() if getattr(trainer, "saved_at", None) != done else (
        Path(trainer.output_dir) / "checkpoints" / checkpoint_name(done))
    watch.finished()
    where = (f"during {unit} {done + 1}, which was abandoned before it trained (it is redone on resume)"
             if abandoned else f"at {unit} {done}")
    stopped = Terminated(
        f"preempted ({watch.signal}) {where}; checkpoint {checkpoint}; continue with resume=latest "
        f"output_dir={trainer.output_dir}",
        signal_name=watch.signal or "SIGTERM",
    )
    stopped.where, stopped.checkpoint = where, checkpoint  # for callers that word their own line (the demo)
    raise stopped


def run_recipe(trainer) -> dict[str, float]:
    """``setup()``, ``train()`` and, whatever happens, ``cleanup()``; returns what ``train()`` returns.

    ``train()`` runs under a :class:`PreemptionWatch` (``trainer.preemption``): a SIGTERM or SIGUSR1 makes the
    loop checkpoint at its next safe point and raise :class:`Terminated` (see :func:`stop_for_preemption`).
    A setup that fails (or is interrupted) still frees the run folder's lock, so the same process can try again.

    Raises:
        RunInterrupted: on Ctrl-C, naming the iteration (or step) and the last checkpoint.
        Terminated: on SIGTERM / SIGUSR1, the same (exit 143).
    """
    started = False
    try:
        try:
            trainer.setup()
        except BaseException:
            release_run_folder(trainer)
            raise
        started = True
        grace = float(getattr(trainer.config, "preempt_grace_s", DEFAULT_GRACE_S))
        trainer.preemption = PreemptionWatch(grace, describe_kept=lambda: kept_checkpoint_text(trainer.output_dir))
        try:
            with trainer.preemption:
                return trainer.train()
        finally:
            trainer.cleanup()
    except KeyboardInterrupt as exc:
        if isinstance(exc, RunInterrupted) and str(exc):  # the recipe said where it stopped
            raise
        if isinstance(exc, Terminated):
            cause = f"terminated by {exc.signal_name}"
            raise Terminated(interruption_message(trainer, started, cause), signal_name=exc.signal_name) from None
        raise RunInterrupted(interruption_message(trainer, started)) from None
