"""The demo's thread count: the cores free now, said in one line when fewer than the machine has."""

from __future__ import annotations

import pytest

from spotune.utils import cpu


@pytest.mark.parametrize("idle, threads", [(2.0, 2), (1.85, 2), (1.5, 1), (0.9, 1), (0.0, 1)])
def test_auto_takes_the_cores_that_are_idle(monkeypatch, idle, threads):
    monkeypatch.setattr(cpu, "usable_cores", lambda: 2)
    monkeypatch.setattr(cpu, "idle_cores", lambda window_s=0.3: idle)
    choice = cpu.choose_threads(0)
    assert choice.threads == threads
    if threads < 2:
        assert "other processes keep about" in choice.reason and "threads=N" in choice.reason


def test_a_moment_of_load_is_not_a_busy_machine(monkeypatch):
    """A busy window is looked at again: a load that is gone in the next window leaves every core to the run;
    one that stays in every window takes a thread away."""
    monkeypatch.setattr(cpu, "usable_cores", lambda: 2)
    readings = iter([0.9, 1.1, 2.0, 0.4])
    monkeypatch.setattr(cpu, "idle_cores", lambda window_s=0.3: next(readings))
    assert cpu.choose_threads(0).threads == 2 and next(readings) == 0.4  # stopped looking once the cores were free
    readings = iter([0.9, 1.0, 0.8, 1.1, 2.0])
    monkeypatch.setattr(cpu, "idle_cores", lambda window_s=0.3: next(readings))
    assert cpu.choose_threads(0).threads == 1 and next(readings) == 2.0  # four looks, all busy


def test_a_set_count_is_kept_and_the_load_average_stands_in_without_proc_stat(monkeypatch):
    monkeypatch.setattr(cpu, "usable_cores", lambda: 2)
    assert cpu.choose_threads(3).threads == 3
    monkeypatch.setattr(cpu, "idle_cores", lambda window_s=0.3: None)
    monkeypatch.setattr(cpu.os, "getloadavg", lambda: (1.2, 1.0, 1.0))
    choice = cpu.choose_threads(0)
    assert choice.threads == 1 and "(load average)" in choice.reason


def test_idle_cores_reads_this_machine():
    idle = cpu.idle_cores(0.05)
    assert idle is None or 0.0 <= idle <= (cpu.os.cpu_count() or 1) + 1e-6
