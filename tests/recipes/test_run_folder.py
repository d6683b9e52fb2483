"""The run folder of `spotune train`: locked while a run uses it, cleaned of what killed runs left,
and resumed only with settings that continue the same run."""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from spotune.checkpoint import list_checkpoints
from spotune.cli import main
from spotune.utils.run_lock import LOCK_FILE, RunLock, RunLockedError

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "tiny_cpu.yaml"
FAST = [
    "num_inference_steps=8", "divert_start_step=4", "sample_batch_size=2", "train_batch_size=4",
    "preference_threshold=0.0", "log_with=none", "progress=false", "validate_every_epochs=0", "lr_scheduler=constant",
]


def train(out: Path, *extra: str) -> int:
    return main(["train", "--config", str(CONFIG), f"output_dir={out}", *FAST, *extra])


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- the lock -------------------------------------------------------------------------------------


def test_lock_is_exclusive_names_its_holder_and_is_released(tmp_path):
    lock = RunLock(tmp_path / "run", "spotune train")
    with pytest.raises(RunLockedError, match=f"in use by process {os.getpid()} \\(spotune train, since"):
        RunLock(tmp_path / "run", "spotune train")
    (tmp_path / "run" / "config.yaml").write_text("a run's file")
    lock.release()
    RunLock(tmp_path / "run", "spotune train").release()  # free again
    assert (tmp_path / "run" / LOCK_FILE).is_file()  # the file stays: deleting it would break the lock


def test_a_command_refused_in_its_setup_leaves_no_folder_it_made(tmp_path, capsys):
    """A new output folder that nothing but the lock went into is removed with it; an existing one stays."""
    assert train(tmp_path / "new", "judge_checkpoint=/no/such/file") == 1
    assert "takes no judge_checkpoint" in capsys.readouterr().err and not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()
    RunLock(tmp_path / "mine", "spotune train").release()
    assert (tmp_path / "mine").is_dir()  # the user's folder: only its (emptied) lock file was added


def test_a_second_train_is_refused_while_the_first_runs_and_accepted_after_kill_9(tmp_path, capsys):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    first = subprocess.Popen(
        [sys.executable, "-m", "spotune.cli", "train", "--config", str(CONFIG), f"output_dir={out}", *FAST,
         "num_epochs=100", "max_iterations=1000"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # until the first run holds the lock and has written its PID
            lock_file = out / LOCK_FILE
            if lock_file.is_file() and f'"pid": {first.pid}' in lock_file.read_text():
                break
            assert first.poll() is None, first.stderr.read().decode()[-2000:]
            time.sleep(0.2)
        else:
            pytest.fail("the first run never took the lock")
        assert train(out, "max_iterations=1", "overwrite=true") == 1
        err = capsys.readouterr().err
        assert f"in use by process {first.pid}" in err and len(err.strip().splitlines()) == 1
        assert train(out, "max_iterations=1", "resume=latest") == 1  # resuming a live run is refused too
        assert f"in use by process {first.pid}" in capsys.readouterr().err
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
        first.stderr.close()
    # The kernel freed the killed process's lock; a new run may take the folder.
    assert train(out, "max_iterations=1", "overwrite=true") == 0
    assert [c.name for c in list_checkpoints(out)] == ["iter-00000001"]


def test_stale_temporaries_are_removed_at_start_and_live_ones_kept(tmp_path, caplog):
    out = tmp_path / "run"
    assert train(out, "max_iterations=1") == 0
    dead = _dead_pid()
    stale_ckpt = out / "checkpoints" / f".iter-00000002.p{dead}-abc123.tmp"  # a checkpoint a kill -9 interrupted
    old_style = out / "checkpoints" / ".iter-00000003.x7k2m9.tmp"  # named before temporaries carried a PID
    stale_file = out / f".config.yaml.p{dead}-zz9.tmp"
    for folder in (stale_ckpt, old_style):
        folder.mkdir()
        (folder / "lora.safetensors").write_bytes(os.urandom(1024))
    stale_file.write_text("half")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = out / f".export.safetensors.p{sleeper.pid}-q1w2e3.tmp"  # e.g. an export writing into the run folder
        live.write_bytes(b"in progress")
        with caplog.at_level(logging.INFO):
            assert train(out, "max_iterations=2", "resume=latest") == 0
        assert not stale_ckpt.exists() and not old_style.exists() and not stale_file.exists()
        assert live.read_bytes() == b"in progress"
    finally:
        sleeper.kill()
        sleeper.wait()
    logged = caplog.text
    assert str(stale_ckpt) in logged and str(old_style) in logged and f"process {dead}" in logged
    assert [c.name for c in list_checkpoints(out)] == ["iter-00000001", "iter-00000002"]


# -- resume ---------------------------------------------------------------------------------------


def test_resume_refuses_changes_that_break_the_run(tmp_path, capsys):
    out = tmp_path / "run"
    old = os.umask(0o022)
    try:
        assert train(out, "max_iterations=1") == 0
    finally:
        os.umask(old)
    # checkpoints as the umask gives them (another user, e.g. an export job, may read them)
    ckpt_files = [p for p in (out / "checkpoints").rglob("*") if p.is_file()]
    assert ckpt_files and {stat.S_IMODE(p.stat().st_mode) for p in ckpt_files} == {0o644}
    assert stat.S_IMODE(list_checkpoints(out)[0].stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "config.yaml").stat().st_mode) == 0o644
    config_before = (out / "config.yaml").read_bytes()
    (ckpt,) = list_checkpoints(out)
    weights_before = (ckpt / "lora.safetensors").read_bytes()
    assert train(out, "max_iterations=2", "resume=latest", "seed=7", "num_inference_steps=6", "lora_rank=8") == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "seed: 42 -> 7" in err and "num_inference_steps: 8 -> 6" in err and "lora_rank: 4 -> 8" in err
    assert "max_iterations" not in err.split("A resume may change")[0]  # an allowed change is not listed as refused
    assert (out / "config.yaml").read_bytes() == config_before
    assert [c.name for c in list_checkpoints(out)] == ["iter-00000001"]
    assert (ckpt / "lora.safetensors").read_bytes() == weights_before
    assert not list(out.glob("config.resumed-*"))


def _largest_change(a: Path, b: Path) -> float:
    wa, wb = load_file(str(a / "lora.safetensors")), load_file(str(b / "lora.safetensors"))
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def test_resume_applies_a_new_learning_rate_and_keeps_config_yaml(tmp_path):
    for name in ("same", "faster"):
        assert train(tmp_path / name, "max_iterations=1", "learning_rate=1e-4") == 0
    assert train(tmp_path / "same", "max_iterations=2", "resume=latest") == 0
    assert train(tmp_path / "faster", "max_iterations=2", "resume=latest", "learning_rate=0.05") == 0
    out = tmp_path / "faster"
    first, second = list_checkpoints(out)
    meta = json.loads((second / "optimizer.json").read_text())
    assert [g["lr"] for g in meta["param_groups"]] == [0.05]
    assert json.loads((second / "scheduler.json").read_text())["base_lrs"] == [0.05]
    # The optimizer really stepped at the new rate: with the old one restored instead, both runs
    # would be identical (measured: 0.002 at 1e-4, 0.099 at 0.05).
    same = list_checkpoints(tmp_path / "same")
    slow, fast = _largest_change(same[0], same[1]), _largest_change(first, second)
    assert fast > 10 * slow, (slow, fast)
    # config.yaml is the config the run started with; the resumed one lies beside it.
    assert yaml.safe_load((out / "config.yaml").read_text())["learning_rate"] == 1e-4
    resumed = yaml.safe_load((out / "config.resumed-00000001.yaml").read_text())
    assert resumed["learning_rate"] == 0.05 and resumed["max_iterations"] == 2


def test_max_iterations_beyond_the_epochs_is_refused_not_cut(tmp_path, capsys):
    # 36 builtin prompts / 2 per round = 18 iterations per epoch.
    assert train(tmp_path / "run", "num_epochs=1", "max_iterations=20") == 1
    err = capsys.readouterr().err
    assert "max_iterations=20 is more than num_epochs=1 x 18" in err and "num_epochs=2" in err
    assert not (tmp_path / "run" / "checkpoints").exists()
