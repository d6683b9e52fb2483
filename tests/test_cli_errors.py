"""Bad input and interruptions as a user meets them on the command line: one line on stderr naming the
file or key, a non-zero exit, no traceback (kept for --debug / SPOTUNE_DEBUG), and exit 130 on Ctrl-C."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import save_file

from spotune.checkpoint import list_checkpoints
from spotune.cli import main
from spotune.errors import SpotuneError

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny_cpu.yaml"
SPM_CONFIG = ROOT / "configs" / "tiny_spm.yaml"
# A tiny run: 8 DDIM steps, 2 prompts per round, every pair kept (threshold 0).
FAST = [
    "num_inference_steps=8", "divert_start_step=4", "sample_batch_size=2", "train_batch_size=4",
    "preference_threshold=0.0", "log_with=none", "progress=false", "validate_every_epochs=0",
]


def train(out: Path, *extra: str) -> int:
    return main(["train", "--config", str(CONFIG), f"output_dir={out}", *FAST, *extra])


def one_line_error(capsys, *needles: str) -> str:
    """stderr of the last command: exactly one line, no traceback, holding every needle."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    errors = [line for line in lines if ": error: " in line]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


# -- values that would make a run silently wrong: refused when the config is read -------------------


@pytest.mark.parametrize("override, needle", [
    ("preference_threshold=2", "preference_threshold must be in [0, 1), got preference_threshold=2.0"),
    ("preference_threshold=-0.1", "preference_threshold must be in [0, 1)"),
    ("learning_rate=0", "learning_rate must be > 0, got learning_rate=0.0"),
    ("beta=-1", "beta must be > 0, got beta=-1.0"),
    ("eps=1", "eps must be in (0, 1), got eps=1.0"),
    ("decode_chunk_size=-1", "decode_chunk_size must be >= 0 (0: sized by free CUDA memory), got decode_chunk_size=-1"),
    ("sample_micro_batch_size=0", "sample_micro_batch_size must be >= 1 (or unset), got sample_micro_batch_size=0"),
    ("keep_checkpoints=0", "keep_checkpoints must be >= 1 when set"),
    ("checkpoint_every=-1", "checkpoint_every must be >= 0"),
    ("lora_init=pissa", "lora_init must be one of gaussian, true, kaiming, default, got lora_init=pissa"),
    ("lora_targets=[]", "lora_targets must name at least one"),
    ("compile=true compile_backend=nonesuch", "compile_backend must be a torch.compile backend"),
    ("seed=-1", "seed must be >= 0, got seed=-1"),
])
def test_train_refuses_values_that_make_a_run_silently_wrong(override, needle, capsys):
    assert main(["train", "--config", str(CONFIG), *override.split(), "--print-config"]) == 1
    one_line_error(capsys, needle)


@pytest.mark.parametrize("override, needle", [
    ("learning_rate=0", "learning_rate must be > 0"),
    ("decode_chunk_size=0", "decode_chunk_size must be >= 1"),
    ("checkpoint_every=-2", "checkpoint_every must be >= 0"),
    ("keep_checkpoints=0", "keep_checkpoints must be >= 1 when set"),
    ("seed=-1", "seed must be >= 0, got seed=-1"),
])
def test_train_spm_refuses_the_same_values(override, needle, capsys):
    assert main(["train-spm", "--config", str(SPM_CONFIG), "train_data=x.parquet", override, "--print-config"]) == 1
    one_line_error(capsys, needle)


@pytest.mark.parametrize("value", ["true", "True", "kaiming", "gaussian"])
def test_the_allowed_lora_inits_pass(value):
    from spotune.config import load_config
    from spotune.recipes.train_spo_config import TrainSPOConfig

    assert load_config(TrainSPOConfig, None, [f"lora_init={value}"]).lora_init.lower() == value.lower()


def test_lora_targets_that_match_nothing_are_named_before_peft(tmp_path, capsys):
    assert train(tmp_path / "run", "lora_targets=[to_q,attn9]", "max_iterations=1") == 1
    one_line_error(capsys, "lora_targets=['to_q', 'attn9']", "['attn9']", "lora_targets=[to_q,to_k,to_v,to_out.0]")
    assert not list_checkpoints(tmp_path / "run")


def test_a_run_without_a_single_optimizer_step_fails_and_says_why(tmp_path, capsys):
    # The tiny random judge never separates candidates by a softmax gap of 0.99.
    assert train(tmp_path / "run", "preference_threshold=0.99", "max_iterations=1") == 1
    one_line_error(capsys, "no optimizer step was taken in 1 iteration(s)", "0 decisive pair(s)",
                   "preference_threshold=0.99")


# -- one line instead of a traceback ----------------------------------------------------------------


def test_truncated_optimizer_file_on_resume_names_it_and_the_previous_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out, "max_iterations=2", "checkpoint_every=1") == 0
    first, second = list_checkpoints(out)
    optimizer = second / "optimizer.safetensors"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    assert train(out, "max_iterations=3", "checkpoint_every=1", "resume=latest") == 1
    one_line_error(capsys, f"{optimizer} is damaged or truncated", f"resume={first}")
    # The suggested command works: it resumes from the previous checkpoint.
    assert train(out, "max_iterations=3", "checkpoint_every=1", f"resume={first}") == 0
    assert list_checkpoints(out)[-1].name == "iter-00000003"


def test_resume_with_another_lora_rank_names_the_rank(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out, "max_iterations=1") == 0
    assert train(out, "max_iterations=2", "resume=latest", "lora_rank=8") == 1
    # The resume check refuses the changed key before any weights load.
    one_line_error(capsys, "iter-00000001", "lora_rank: 4 -> 8")


def test_a_lora_file_of_another_rank_names_the_rank():
    from spotune.models.lora import LoRAMismatchError, add_lora, load_lora_state_dict, lora_state_dict
    from spotune.models.tiny import build_tiny_unet

    unet, other = build_tiny_unet(seed=2), build_tiny_unet(seed=2)
    add_lora(unet, 8, None, ["to_q"])
    add_lora(other, 4, None, ["to_q"])
    with pytest.raises(LoRAMismatchError, match=r"LoRA rank 4 in the file, lora_rank=8 in the config: pass lora_rank=4"):
        load_lora_state_dict(unet, lora_state_dict(other), source="lora.safetensors")


def test_resume_naming_a_checkpoint_folder_without_state_json(tmp_path, capsys):
    out = tmp_path / "run"
    broken = out / "checkpoints" / "iter-00000004"
    broken.mkdir(parents=True)
    save_file({}, str(broken / "lora.safetensors"))
    assert train(out, f"resume={broken}") == 1
    one_line_error(capsys, f"checkpoint folder {broken} has no state.json")


def test_corrupt_parquet_prompt_file(tmp_path, capsys):
    bad = tmp_path / "prompts.parquet"
    bad.write_bytes(b"PAR1 this is not really parquet")
    assert train(tmp_path / "run", f"prompts={bad}") == 1
    one_line_error(capsys, f"{bad}: cannot read it as parquet")


def test_pipeline_folder_without_unet(tmp_path, capsys):
    folder = tmp_path / "pipe"
    for sub in ("vae", "text_encoder", "tokenizer", "scheduler"):
        (folder / sub).mkdir(parents=True)
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    assert train(tmp_path / "run", f"pretrained_model={folder}") == 1
    one_line_error(capsys, f"pipeline folder {folder} has no unet/")


def test_demo_cache_dir_that_is_a_file(tmp_path, capsys):
    cache = tmp_path / "cache"
    cache.write_text("not a folder")
    assert main(["demo", f"cache_dir={cache}", "--output", str(tmp_path / "report")]) == 1
    one_line_error(capsys, f"cache_dir: {cache} is a file", "cache_dir=FOLDER")
    assert not (tmp_path / "report").exists()


def test_lora_scale_that_is_not_a_number(tmp_path, capsys):
    lora = tmp_path / "style.safetensors"
    save_file({}, str(lora))
    assert main(["generate", "--model", "builtin:tiny-sd15", "--lora", f"{lora}:strong", "--prompt", "a cat",
                 "--out", str(tmp_path / "gens")]) == 1
    one_line_error(capsys, f"LoRA entry '{lora}:strong'", "'strong'", "is not a number", f"{lora}:0.8")


def test_disk_full_names_the_file_and_the_free_space(tmp_path, monkeypatch):
    import spotune.utils.io as io

    def full(tensors, path, metadata=None):
        raise RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')

    monkeypatch.setattr(io, "save_file", full)  # safetensors reports a full disk as its own error type
    target = tmp_path / "weights.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(io.DiskFullError, match=r"while writing .*weights\.safetensors: [0-9.]+ MiB free there"):
        io.atomic_save_safetensors({}, target)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["weights.safetensors"]


def test_debug_flag_and_environment_keep_the_traceback(tmp_path, monkeypatch, capsys):
    args = ["train", "--config", str(CONFIG), "learning_rate=0", "--print-config"]
    assert main(args) == 1
    with pytest.raises(SpotuneError, match="learning_rate must be > 0"):
        main(["--debug", *args])
    with pytest.raises(SpotuneError, match="learning_rate must be > 0"):
        main([*args, "--debug"])  # after the command too
    monkeypatch.setenv("SPOTUNE_DEBUG", "1")
    with pytest.raises(SpotuneError, match="learning_rate must be > 0"):
        main(args)
    monkeypatch.setenv("SPOTUNE_DEBUG", "0")
    assert main(args) == 1


# -- a short run still shows its images and says what to do next ------------------------------------


def test_a_run_shorter_than_an_epoch_writes_one_grid_and_prints_the_export_command(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--config", str(CONFIG), f"output_dir={out}", *FAST[:-1], "max_iterations=1"]) == 0
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["base.png", "iter-00000001.png"]  # and the base model's
    printed = capsys.readouterr().out
    (line,) = [line for line in printed.splitlines() if line.startswith("next: spotune export")]
    # The printed command works as printed.
    assert main(shlex.split(line[len("next: spotune "):])) == 0
    assert (tmp_path / "run_lora.safetensors").is_file()


# -- Ctrl-C -----------------------------------------------------------------------------------------


def test_ctrl_c_stops_with_one_line_and_exit_130(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "spotune.cli", "train", "--config", str(CONFIG), f"output_dir={out}", *FAST,
           "num_epochs=60", "max_iterations=1000", "checkpoint_every=1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not list_checkpoints(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        assert list_checkpoints(out), "no checkpoint within the time limit"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    (line,) = [line for line in err.splitlines() if "interrupted" in line]
    last = list_checkpoints(out)[-1]
    assert line.startswith("spotune train: interrupted at iteration ") and f"the last checkpoint is {last}" in line
    assert "resume=latest" in line


def test_ctrl_c_in_other_commands_is_one_line_too(tmp_path, monkeypatch, capsys):
    import spotune.generation.runner as runner

    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_generate", interrupted)
    assert main(["generate", "--model", "builtin:tiny-sd15", "--prompt", "a cat", "--out", str(tmp_path / "g")]) == 130
    err = capsys.readouterr().err
    assert err == "spotune generate: interrupted; the images written so far are kept and the same command makes the rest\n"


@pytest.mark.parametrize("command, module, function, argv, line", [
    ("generate", "spotune.generation.runner", "run_generate",
     ["--model", "builtin:tiny-sd15", "--prompt", "a cat", "--out", "OUT"],
     "terminated by SIGTERM; the images written so far are kept and the same command makes the rest"),
    ("eval", "spotune.eval.runner", "run_eval", ["--images", "OUT", "--out", "OUT/report"],
     "terminated by SIGTERM; no report was written under output_dir (its temporary files were removed)"),
])
def test_sigterm_in_other_commands_is_one_line_and_exit_143(tmp_path, monkeypatch, capsys, command, module, function, argv, line):
    """A scheduler's SIGTERM raises in the main thread as Ctrl-C does (the writers' cleanup runs), exit 143."""
    import importlib

    def terminated(config):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        raise AssertionError("SIGTERM did not stop the command")

    monkeypatch.setattr(importlib.import_module(module), function, terminated)
    (tmp_path / "OUT").mkdir()
    argv = [a.replace("OUT", str(tmp_path / "OUT")) for a in argv]
    assert main([command, *argv]) == 143
    assert capsys.readouterr().err == f"spotune {command}: {line}\n"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the CLI's handler is gone again


def test_ctrl_c_during_setup_says_no_step_was_taken(tmp_path):
    from spotune.errors import RunInterrupted
    from spotune.recipes.common import run_recipe

    class Stopped:
        output_dir, iteration = tmp_path / "run", 0

        def setup(self):
            raise KeyboardInterrupt

    with pytest.raises(RunInterrupted, match="interrupted while setting up the run in .*run; no training step"):
        run_recipe(Stopped())
