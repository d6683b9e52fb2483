"""SIGTERM / SIGUSR1 as a scheduler sends them: a training run checkpoints where it stands and exits 143;
one that cannot finish its checkpoint within preempt_grace_s keeps the previous one; the watch itself.

The bit-exact resumes after a SIGTERM are tested beside each recipe's own resume tests (test_train_spo,
test_train_sdxl, test_train_gradspo, test_train_spm) and for two processes in test_accelerate_launch.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spotune.checkpoint import list_checkpoints, read_state
from spotune.cli import main
from spotune.utils.preemption import PREEMPTED_EXIT, PreemptionWatch

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "tiny_cpu.yaml"
FAST = [
    "num_inference_steps=6", "divert_start_step=3", "sample_batch_size=2", "train_batch_size=4",
    "preference_threshold=0.0", "log_with=none", "progress=false", "validate_every_epochs=0",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _spotune(*args: str, code: str | None = None) -> subprocess.Popen:
    """``spotune ARGS`` in a new process (``code`` runs first, e.g. to slow a writer down)."""
    prelude = (code or "") + "\nimport sys\nfrom spotune.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.Popen([sys.executable, "-c", prelude, *args], env=ENV, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_watch_defers_the_signal_to_the_loop_and_restores_the_handler():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionWatch(grace_s=0) as watch:
        assert not watch.stop_here()
        os.kill(os.getpid(), signal.SIGUSR1)  # SLURM's early warning counts as a preemption too
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal changes nothing
        assert watch.stop_here() and watch.signal == "SIGUSR1"
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.slow
def test_an_external_sigterm_stops_the_cli_with_a_checkpoint_and_resume_continues(tmp_path, capsys):
    """The real path: another process (the scheduler) sends SIGTERM to a running `spotune train`."""
    out = tmp_path / "run"
    proc = _spotune("train", "--config", str(CONFIG), f"output_dir={out}", *FAST, "max_iterations=18", "checkpoint_every=1")
    try:
        deadline = time.monotonic() + 240
        while not list_checkpoints(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == PREEMPTED_EXIT, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("spotune train:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    newest = list_checkpoints(out)[-1]
    assert lines[0].startswith("spotune train: preempted (SIGTERM) ") and str(newest) in lines[0]
    assert lines[0].endswith(f"continue with resume=latest output_dir={out}")
    done = read_state(newest)["iteration"]
    assert 1 <= done < 18
    assert main(["train", "--config", str(CONFIG), f"output_dir={out}", *FAST, f"max_iterations={done + 1}",
                 "checkpoint_every=1", "resume=latest"]) == 0
    assert read_state(list_checkpoints(out)[-1])["iteration"] == done + 1


# Writing iteration 2's LoRA takes 60 s in this process, and a SIGTERM arrives as it starts.
SLOW_SECOND_CHECKPOINT = """
import os, signal, time
import spotune.recipes.train_spo as recipe
save = recipe.atomic_save_safetensors
def slow_save(tensors, path, metadata=None):
    if ".iter-00000002." in str(path) and str(path).endswith("lora.safetensors"):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)
    save(tensors, path, metadata)
recipe.atomic_save_safetensors = slow_save
"""


@pytest.mark.slow
def test_a_checkpoint_not_finished_within_the_grace_keeps_the_previous_one(tmp_path, capsys):
    out = tmp_path / "run"
    proc = _spotune("train", "--config", str(CONFIG), f"output_dir={out}", *FAST, "max_iterations=3",
                    "checkpoint_every=1", "preempt_grace_s=1", code=SLOW_SECOND_CHECKPOINT)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == PREEMPTED_EXIT, err[-3000:]
    previous = out / "checkpoints" / "iter-00000001"
    assert err.strip().splitlines()[-1] == (
        "spotune train: preempted (SIGTERM); the checkpoint was not finished within preempt_grace_s=1 s, so it "
        f"was abandoned: the last checkpoint is {previous} (continue with resume=latest output_dir={out})"
    )
    assert list_checkpoints(out) == [previous] and read_state(previous)["iteration"] == 1
    assert any(p.name.startswith(".iter-00000002.") for p in (out / "checkpoints").iterdir())  # the abandoned one
    assert main(["train", "--config", str(CONFIG), f"output_dir={out}", *FAST, "max_iterations=3",
                 "checkpoint_every=1", "resume=latest"]) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["iter-00000001", "iter-00000002", "iter-00000003"]
