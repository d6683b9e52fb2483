"""Preemption: SIGTERM (and SIGUSR1) turned into a checkpoint at the next safe point, and exit 143.

Clusters stop jobs with SIGTERM: SLURM at the time limit or on preemption (``--signal`` sends it, or
SIGUSR1, a chosen number of seconds early), Kubernetes on eviction, cloud spot instances before they are
reclaimed. Each gives a grace period and then SIGKILL. Two behaviours live here:

* :func:`terminate_on_signals`, which every ``spotune`` command runs under: the signal raises
  :class:`~spotune.errors.Terminated` in the main thread, like Ctrl-C raises ``KeyboardInterrupt``, so the
  writers' ``except BaseException`` blocks remove their temporaries and nothing half-written keeps a final
  name; the CLI prints one line and exits 143 (128 + SIGTERM).
* :class:`PreemptionWatch`, which the training recipes run their loop under: the signal only sets a flag.
  The loop asks :meth:`PreemptionWatch.stop_here` at its safe points (where the state on disk can be made
  a complete checkpoint), and all processes of a launch agree there, so every rank stops at the same
  iteration. If the checkpoint is not done within ``grace_s`` seconds of the signal, a timer says so in one
  line and ends the process (the previous checkpoint is intact: checkpoints are written under temporary
  names), before the scheduler's SIGKILL would end it without a word.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from typing import Callable, Iterator

from spotune.errors import Terminated

logger = logging.getLogger(__name__)

# The signals that mean "you are about to be stopped": SIGTERM (every scheduler), SIGUSR1 (SLURM's usual
# early warning with --signal=USR1@SECONDS). SIGINT stays Ctrl-C (exit 130).
PREEMPT_SIGNALS: tuple[signal.Signals, ...] = tuple(
    s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None
)
# Exit status of a command stopped by one of them: the shell's 128 + SIGTERM, which schedulers read as
# "terminated" (SLURM requeues on it with --requeue).
PREEMPTED_EXIT = 128 + int(signal.SIGTERM)
# Seconds from the signal to a finished checkpoint, by default: the rest of one SPO iteration of the paper's
# 512 px SD1.5 recipe on a mid-range card (tens of seconds) and writing its checkpoint (a LoRA's take well under
# a second; a full fine-tune's 10 GB of weights and optimizer state some seconds), inside SLURM's usual
# 120 s warning with room to spare.
DEFAULT_GRACE_S = 90.0
# The command name the grace timer's line starts with; the CLI sets it (e.g. "spotune train").
program = "spotune"


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _handlers(handler: Callable) -> Iterator[None]:
    """Install ``handler`` for :data:`PREEMPT_SIGNALS` (main thread only) and restore the previous ones."""
    if not _in_main_thread():  # signal handlers can only be set there; elsewhere the default stays
        yield
        return
    previous = {s: signal.getsignal(s) for s in PREEMPT_SIGNALS}
    for s in PREEMPT_SIGNALS:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old if old is not None else signal.SIG_DFL)


def terminate_on_signals() -> contextlib.AbstractContextManager:
    """Run the body with SIGTERM / SIGUSR1 raising :class:`~spotune.errors.Terminated` (see the module doc)."""

    def raise_terminated(signum: int, frame) -> None:
        raise Terminated(signal_name=signal_name(signum))

    return _handlers(raise_terminated)


class PreemptionWatch:
    """Defers SIGTERM / SIGUSR1 to the training loop's next safe point (see the module doc).

    Args:
        grace_s: seconds from the signal within which the checkpoint must be finished; then the process
            ends with one line and :data:`PREEMPTED_EXIT` (0 or less: no limit).
        describe_kept: called by the grace timer for the end of its line: which checkpoint is kept.
    """

    def __init__(self, grace_s: float = DEFAULT_GRACE_S, describe_kept: Callable[[], str] | None = None) -> None:
        self.grace_s = grace_s
        self.describe_kept = describe_kept or (lambda: "the previous checkpoint is intact")
        self.signal: str | None = None  # the name of the first signal received
        self.received_at: float | None = None
        self._timer: threading.Timer | None = None
        self._installed: contextlib.AbstractContextManager | None = None
        self.interrupted = False  # a Ctrl-C reached this process (see _on_interrupt)
        self._previous_sigint = None

    # -- the signal side ----------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame) -> None:
        if self.signal is not None:  # a second one changes nothing: the checkpoint is on its way
            return
        self.signal, self.received_at = signal_name(signum), time.monotonic()
        logger.warning("%s received: checkpointing at the next safe point (preempt_grace_s=%g)", self.signal, self.grace_s)
        if self.grace_s > 0:
            self._timer = threading.Timer(self.grace_s, self._grace_expired)
            self._timer.daemon = True
            self._timer.start()

    def _grace_expired(self) -> None:
        """Timer thread: the checkpoint did not finish in time. Say what is kept and end the process now."""
        try:
            kept = self.describe_kept()
        except Exception:  # never let the message stop the exit
            kept = "the previous checkpoint is intact"
        sys.stderr.write(
            f"{program}: preempted ({self.signal}); the checkpoint was not finished within "
            f"preempt_grace_s={self.grace_s:g} s, so it was abandoned: {kept}\n"
        )
        sys.stderr.flush()
        os._exit(PREEMPTED_EXIT)

    def _on_interrupt(self, signum: int, frame) -> None:
        """Ctrl-C stops at once, as Python's own handler does, and is remembered: a ``KeyboardInterrupt`` raised
        while a finalizer (a ``__del__``, a weakref callback) runs is printed as "Exception ignored" and dropped
        by Python, and the loop would go on; :meth:`stop_here` raises it again at the next safe point."""
        self.interrupted = True
        raise KeyboardInterrupt

    def __enter__(self) -> PreemptionWatch:
        self._installed = _handlers(self._on_signal)
        self._installed.__enter__()
        # Only over Python's default: an ignored SIGINT (a job started in the background) stays ignored.
        if _in_main_thread() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_interrupt)
        return self

    def __exit__(self, *exc_info) -> None:
        self.finished()
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None
        if self._installed is not None:
            self._installed.__exit__(*exc_info)
            self._installed = None

    # -- the loop side ------------------------------------------------------------------------------
    def stop_here(self, accelerator=None) -> bool:
        """True when the run should stop at this safe point: a signal reached this process or any other.

        With more than one process this is a collective (every process must call it at the same point of
        the loop): the processes' flags are combined, so all of them stop at the same iteration.
        """
        if self.interrupted:  # a Ctrl-C whose KeyboardInterrupt a finalizer swallowed: stop as it asked
            raise KeyboardInterrupt
        stop = self.signal is not None
        if accelerator is not None and accelerator.num_processes > 1:
            import torch
            import torch.distributed as dist

            flag = torch.tensor([1 if stop else 0], device=accelerator.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
            if stop and self.signal is None:
                self.signal = "SIGTERM on another process"
        return stop

    def finished(self) -> None:
        """The checkpoint is written (or the loop is over): the grace timer has nothing left to guard."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class NoPreemption:
    """The watch of a trainer driven outside :func:`~spotune.recipes.common.run_recipe`: never stops it."""

    signal = None

    def stop_here(self, accelerator=None) -> bool:
        return False

    def finished(self) -> None:
        pass


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold Ctrl-C, SIGTERM and SIGUSR1 back while the body runs; they are delivered as it ends.

    For the few lines that swap a new output in for an old one (old renamed aside, new renamed in): a
    signal between the two renames would leave neither under the output's name.
    """
    held = {signal.SIGINT, *PREEMPT_SIGNALS}
    if not _in_main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A DataLoader ``worker_init_fn``: the worker ignores Ctrl-C, SIGTERM and SIGUSR1.

    A scheduler (or a terminal) may signal the whole process group. A worker killed by it would make the
    training's next batch fail before the loop reaches its safe point; the main process decides instead, and
    ends its workers itself when it stops. Use it through :func:`data_worker_options`, whose workers start with
    these signals blocked, so that none arrives between the worker's start and this function.
    """
    for s in (signal.SIGINT, *PREEMPT_SIGNALS):
        signal.signal(s, signal.SIG_IGN)


def _held_start_classes(method: str) -> tuple[type, type]:
    """(Process, Context) of start method ``method`` whose ``start`` runs with the stop signals held.

    A new process inherits the blocked set, so a signal to the process group that reaches a DataLoader worker
    before its ``worker_init_fn`` stays pending, and :func:`ignore_stop_signals` then drops it. torch starts new
    workers for every pass over the data, so without this the window opens at every epoch. The classes live in
    this module's namespace, so that a spawned child can unpickle its process object.
    """
    name = f"_HeldStart{method.capitalize()}"
    if name + "Context" not in globals():
        base = type(multiprocessing.get_context(method))

        def start(self) -> None:
            with signals_held():
                super(process, self).start()

        process = type(name + "Process", (base.Process,), {"start": start, "__module__": __name__})
        context = type(name + "Context", (base,), {"Process": process, "__module__": __name__})
        globals()[process.__name__], globals()[context.__name__] = process, context
    return globals()[name + "Process"], globals()[name + "Context"]


def data_worker_options(num_workers: int) -> dict:
    """DataLoader keyword arguments whose workers leave Ctrl-C, SIGTERM and SIGUSR1 to the main process (none
    without workers: torch refuses a context for in-process loading)."""
    if num_workers <= 0:
        return {}
    _, context = _held_start_classes(multiprocessing.get_start_method())
    return {"worker_init_fn": ignore_stop_signals, "multiprocessing_context": context()}
