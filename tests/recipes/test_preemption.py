"""SIGTERM / SIGUSR1 as a scheduler sends them: a training run checkpoints where it stands and exits 143;
one that cannot finish its checkpoint within preempt_grace_s keeps the previous one; the SLURM script
requeues and resumes; a signal to the whole process group; the watch itself.

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
import torch

from spotune.checkpoint import list_checkpoints, read_state
from spotune.cli import main
from spotune.utils.preemption import PREEMPTED_EXIT, PreemptionWatch, data_worker_options, ignore_stop_signals

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


def _signal_after_first_checkpoint(proc: subprocess.Popen, run: Path, group: bool = False) -> tuple[str, str]:
    """SIGTERM ``proc`` (``group``: its whole process group) once ``run`` holds a checkpoint, as a scheduler
    would mid-run; returns its (stdout, stderr)."""
    try:
        deadline = time.monotonic() + 240
        while not list_checkpoints(run) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        return proc.communicate(timeout=240)
    finally:
        proc.kill()


def test_watch_defers_the_signal_to_the_loop_and_restores_the_handler():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionWatch(grace_s=0) as watch:
        assert not watch.stop_here()
        os.kill(os.getpid(), signal.SIGUSR1)  # SLURM's early warning counts as a preemption too
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal changes nothing
        assert watch.stop_here() and watch.signal == "SIGUSR1"
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_ctrl_c_that_a_finalizer_swallowed_stops_the_loop_at_its_next_safe_point():
    """Python drops a KeyboardInterrupt raised while a __del__ runs ("Exception ignored in ..."): the watch
    remembers the Ctrl-C, and the loop's next safe point raises it again."""

    class Finalized:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)  # the handler runs here, inside the finalizer
            for _ in range(100):  # a few bytecodes for the pending handler to run in
                pass

    before = signal.getsignal(signal.SIGINT)
    with PreemptionWatch(grace_s=0) as watch:
        assert not watch.stop_here()
        Finalized()  # collected at once; its KeyboardInterrupt is printed and dropped by Python
        assert watch.interrupted
        with pytest.raises(KeyboardInterrupt):
            watch.stop_here()
    assert signal.getsignal(signal.SIGINT) is before


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


@pytest.mark.slow
def test_the_slurm_script_requeues_on_sigterm_and_the_next_start_resumes(tmp_path):
    """examples/slurm/train_spo.sbatch as SLURM runs it: SIGTERM to the batch shell (--signal=B:TERM) reaches
    the training, which checkpoints; the script requeues the job (scontrol, recorded here) and exits 0; the
    requeued start finds the checkpoint and continues from it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    scontrol.chmod(0o755)
    out = tmp_path / "run"
    env = {**ENV, "PATH": f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "SLURM_JOB_ID": "4242", "NPROC": "1", "CONFIG": str(CONFIG), "RUN": str(out), "GRACE": "60"}
    script = [str(ROOT / "examples" / "slurm" / "train_spo.sbatch"), *FAST, "checkpoint_every=1"]
    proc = subprocess.Popen(["bash", *script, "max_iterations=18"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, err = _signal_after_first_checkpoint(proc, out)
    assert proc.returncode == 0, stdout + err[-3000:]
    assert "preempted; requeueing job 4242" in stdout
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    newest = list_checkpoints(out)[-1]
    done = read_state(newest)["iteration"]
    assert 1 <= done < 18
    (line,) = [line for line in err.splitlines() if line.startswith("spotune train:")]  # the training's one line
    assert "Traceback" not in err and line.startswith("spotune train: preempted (SIGTERM) ") and str(newest) in line
    assert line.endswith(f"continue with resume=latest output_dir={out}")

    rerun = subprocess.run(["bash", *script, f"max_iterations={done + 1}"], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr[-3000:]
    assert (out / f"config.resumed-{done:08d}.yaml").is_file()
    assert read_state(list_checkpoints(out)[-1])["iteration"] == done + 1


class _SlowItems(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> torch.Tensor:
        time.sleep(0.01)
        return torch.tensor([i])


def _slow_start(worker_id: int) -> None:
    """The worker's own start-up takes a second before it ignores the stop signals: the window a group signal
    can fall into."""
    time.sleep(1.0)
    ignore_stop_signals(worker_id)


@pytest.mark.parametrize("held, survives", [(False, False), (True, True)])
def test_data_workers_leave_a_sigterm_to_the_main_process_even_while_they_start(held, survives):
    """A SIGTERM to the process group reaches DataLoader workers too, also one that is still starting. Workers made
    with data_worker_options start with the stop signals held, so it waits and is then ignored; a worker that only
    ignores them once its init function runs dies of it."""
    options = data_worker_options(1) if held else {}
    loader = torch.utils.data.DataLoader(_SlowItems(), batch_size=4, num_workers=1,
                                         **{**options, "worker_init_fn": _slow_start})
    batches = iter(loader)  # starts the worker
    (worker,) = batches._workers
    os.kill(worker.pid, signal.SIGTERM)
    if not survives:  # torch reports the dead worker in this process as soon as it is gone
        with pytest.raises(RuntimeError, match="killed by signal|exited unexpectedly"):
            worker.join(timeout=3)
            list(batches)
        return
    worker.join(timeout=3)
    assert worker.is_alive()
    assert sum(1 for _ in batches) == 16  # and it goes on serving batches


@pytest.mark.slow
def test_a_sigterm_to_the_whole_process_group_leaves_train_spm_a_checkpoint(tmp_path):
    """A scheduler that signals the process group: train-spm (its data workers ignore it) finishes its optimizer
    step and checkpoints."""
    from spotune.data.pickapic import synthetic_pairs, write_pairs_parquet

    pairs = write_pairs_parquet(tmp_path / "train.parquet", *synthetic_pairs(8, 32, seed=0))
    out = tmp_path / "spm"
    proc = subprocess.Popen(
        [sys.executable, "-m", "spotune.cli", "train-spm", "--config", str(ROOT / "configs" / "tiny_spm.yaml"),
         f"output_dir={out}", f"train_data={pairs}", "guidance_scale=1.0", "progress=false", "log_with=none",
         "num_workers=1", "max_steps=200", "checkpoint_every=1", "eval_every=0", "eval_at_start=false"],
        env=ENV, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _, err = _signal_after_first_checkpoint(proc, out, group=True)
    assert proc.returncode == PREEMPTED_EXIT, err[-3000:]
    assert "Traceback" not in err and "spotune train-spm: preempted (SIGTERM) at optimizer step " in err, err[-3000:]
    assert read_state(list_checkpoints(out)[-1])["optimizer_step"] >= 1


def test_the_slurm_script_names_a_bad_process_count():
    script = str(ROOT / "examples" / "slurm" / "train_spo.sbatch")
    for name, value in (("NPROC", "four"), ("NPROC", "0"), ("GRACE", "1m")):
        proc = subprocess.run(["bash", script], env={**ENV, name: value}, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and proc.stderr.startswith(f"train_spo.sbatch: {name}={value} is not a "), proc.stderr
