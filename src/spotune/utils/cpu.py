"""How many CPU threads a CPU run should use: the cores that are free now, not the cores that exist.

torch's OpenMP threads wait for each other at the end of every parallel region. On a 2-core machine where
another process keeps one core busy, a second thread is descheduled for whole time slices and every region
waits for it: the demo's SPO stage measured 139 s with 2 threads against 14 s with 1 (one busy process
beside it). So a CPU run asks how much of the machine is idle before it chooses.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. a container's share), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _cpu_times() -> tuple[float, float] | None:
    """(idle, total) jiffies of all CPUs from ``/proc/stat``, or ``None`` where it cannot be read."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = fh.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    values = [float(v) for v in fields[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0.0)  # idle + iowait
    return idle, sum(values[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)


def idle_cores(window_s: float = 0.3) -> float | None:
    """How many cores' worth of CPU time was idle over the next ``window_s`` seconds (``/proc/stat``),
    or ``None`` where that cannot be measured. Counts the whole machine: on a machine with more cores than
    this process may use, the caller caps it."""
    before = _cpu_times()
    if before is None:
        return None
    time.sleep(window_s)
    after = _cpu_times()
    if after is None or after[1] <= before[1]:
        return None
    share = (after[0] - before[0]) / (after[1] - before[1])
    return share * (os.cpu_count() or 1)


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    reason: str  # one line for the progress output


def choose_threads(requested: int, window_s: float = 0.3, looks: int = 4) -> ThreadChoice:
    """``requested`` threads, or with 0 the cores free now (at least 1, at most :func:`usable_cores`).

    A core counts as free when at least 80% of it was idle over a ``window_s`` window. A busy machine is looked
    at again, up to ``looks`` windows, and the idlest window counts: a command that ran for a moment (a shell,
    an editor saving) is not a load, and taking fewer threads for it would change the run's speed and, through
    the order of float sums, the last bits of its results. Where idleness cannot be measured, the 1-minute load
    average stands in.
    """
    cores = usable_cores()
    if requested > 0:
        return ThreadChoice(requested, f"{requested} thread(s) as set ({cores} usable core(s))")
    idle = idle_cores(window_s)
    for _ in range(looks - 1):
        if idle is None or idle + 0.2 >= cores:
            break
        idle = max(idle, idle_cores(window_s) or 0.0)
    source = "idle"
    if idle is None:
        try:
            idle, source = max(0.0, cores - os.getloadavg()[0]), "load average"
        except OSError:
            return ThreadChoice(cores, f"{cores} thread(s), one per usable core (their load cannot be read here)")
    threads = max(1, min(cores, math.floor(idle + 0.2)))
    if threads < cores:
        return ThreadChoice(threads, (
            f"{threads} thread(s) of {cores} usable cores: other processes keep about {cores - idle:.1f} of them busy "
            f"({source}), and threads that wait for busy cores make torch many times slower; the run takes longer "
            "than on an idle machine (threads=N sets the number)"))
    return ThreadChoice(threads, f"{threads} thread(s), one per usable core (the machine is idle)")
