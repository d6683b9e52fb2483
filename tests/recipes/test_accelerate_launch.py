"""Two CPU processes through `accelerate launch` (DDP over gloo) run a tiny SPO training to the end.

accelerate's `--cpu` flag starts one process unless an MPI hostfile is given, so a multi-process CPU
run goes through the torchrun-based launcher (`--multi_gpu`); without CUDA the trainer forms a gloo
process group on the CPU.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spotune.checkpoint import list_checkpoints, read_state

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    """A TCP port nobody listens on now, so two test runs on one machine never share a rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(script: list[str], *spotune_args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        *script, *spotune_args,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=cwd)


@pytest.mark.slow
def test_two_processes_stop_together_on_a_sigterm_to_one_and_resume_to_the_end(tmp_path):
    """A SIGTERM reaches only process 1 while it samples iteration 2: both processes abandon that iteration,
    the checkpoint of iteration 1 is written once (with both processes' RNG states), both exit 143 with the
    same line; a second launch resumes from it and runs to the end."""
    out = tmp_path / "ddp"
    args = [
        "train", "--config", str(ROOT / "configs" / "tiny_cpu.yaml"),
        f"output_dir={out}", "num_inference_steps=6", "divert_start_step=3", "sample_batch_size=2",
        "train_batch_size=2", "preference_threshold=0.0", "max_iterations=2", "checkpoint_every=0", "log_with=none",
        "progress=false", "validate_every_epochs=0",
    ]
    hook = [str(ROOT / "tests" / "recipes" / "sigterm_launch.py"), "1", "1"]
    proc = _launch(hook, *args, cwd=tmp_path)
    log = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode != 0, log
    stops = [line for line in proc.stderr.splitlines() if "spotune train: preempted" in line]
    assert len(stops) == 2, log  # one line per process, each naming the same checkpoint
    assert all("during iteration 2, which was abandoned" in line and "iter-00000001" in line for line in stops), log
    assert any("(SIGTERM on another process)" in line for line in stops), log
    (ckpt,) = list_checkpoints(out)
    assert ckpt.name == "iter-00000001" and read_state(ckpt)["num_processes"] == 2

    proc = _launch(["-m", "spotune.cli"], *args, "resume=latest", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = list_checkpoints(out)[-1]
    state = read_state(ckpt)
    assert state["iteration"] == 2 and state["num_processes"] == 2 and state["optimizer_step"] >= 2
    assert (ckpt / "rng_rank0.safetensors").is_file() and (ckpt / "rng_rank1.safetensors").is_file()
    assert all(v.abs().sum() > 0 for k, v in load_file(str(ckpt / "lora.safetensors")).items() if "lora_B" in k)


def _launch_sdxl(out: Path, tmp_path: Path, *extra: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        "-m", "spotune.cli", "train", "--config", str(ROOT / "configs" / "tiny_sdxl.yaml"),
        f"output_dir={out}", "num_inference_steps=8", "divert_start_step=4", "num_inner_steps=1", "sample_batch_size=1",
        "train_batch_size=4", "preference_threshold=0.0", "checkpoint_every=1", "log_with=none",
        "progress=false", "validate_every_epochs=0", *extra,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_two_process_sdxl_resume_with_an_open_accumulation_group(tmp_path):
    """Two-state tuples (with their ``shared`` mask) go through the gather, and a checkpoint taken with an
    accumulation group open (each process's partial gradients averaged into one file) resumes bit for bit."""
    _launch_sdxl(tmp_path / "straight", tmp_path, "max_iterations=4")
    _launch_sdxl(tmp_path / "split", tmp_path, "max_iterations=3")
    mid = list_checkpoints(tmp_path / "split")[-1]
    assert read_state(mid)["open_group_micro_batches"] == 1 and read_state(mid)["num_processes"] == 2
    _launch_sdxl(tmp_path / "split", tmp_path, "max_iterations=4", "resume=latest")
    a, b = list_checkpoints(tmp_path / "straight")[-1], list_checkpoints(tmp_path / "split")[-1]
    assert a.name == b.name == "iter-00000004" and read_state(a)["optimizer_step"] == read_state(b)["optimizer_step"] == 2
    wa, wb = load_file(str(a / "lora.safetensors")), load_file(str(b / "lora.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_two_process_spm_training_merges_pickscores_labels(tmp_path):
    """Each process relabels the pairs of its own batches; the checkpoint holds the union, PickScore's labels."""
    import torch

    from spotune.data.pickapic import synthetic_pairs, write_pairs_parquet
    from spotune.recipes.train_spm import RELABEL_FILE

    pairs = write_pairs_parquet(tmp_path / "pairs.parquet", *synthetic_pairs(8, 32, seed=0))
    out = tmp_path / "spm"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        "-m", "spotune.cli", "train-spm", "--config", str(ROOT / "configs" / "tiny_spm.yaml"),
        f"output_dir={out}", f"train_data={pairs}", "pretrained_model=builtin:tiny-sdxl", "relabel_with=pickscore",
        "relabel_clip_path=builtin:tiny-clip", "relabel_tie_margin=0.01", "train_batch_size=2", "max_steps=1",
        "guidance_scale=1.0", "log_with=none", "progress=false",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (ckpt,) = list_checkpoints(out)
    labels = load_file(str(ckpt / RELABEL_FILE))["labels"]  # [8, 2], NaN for pairs no process has seen
    known = ~torch.isnan(labels[:, 0])
    assert int(known.sum()) == 4  # one micro-batch of 2 pairs on each of the 2 processes
    # The same labels the relabelling model gives those pairs here, in one process.
    from spotune.data.pickapic import PickAPicPairs, collate_pairs
    from spotune.preference.relabel import LabelCache, PickScoreRelabeller

    relabeller = PickScoreRelabeller.from_pretrained("builtin:tiny-clip", None, 0.01)
    data = PickAPicPairs(pairs, resolution=32)
    data.clip_pixels = relabeller.pixels
    batch = relabeller.relabel_batch(collate_pairs([data[i] for i in range(8)]), LabelCache(8))
    expected = torch.stack([batch.label_0, batch.label_1], dim=1)
    assert torch.equal(labels[known], expected[known])
