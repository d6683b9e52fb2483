"""`spotune train` end to end through the CLI on tiny models: training, resume, and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spotune.checkpoint import list_checkpoints, read_state
from spotune.cli import main
from spotune.recipes.run_log import read_metrics

from run_checks import check_trees_and_log

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml"
# Small and fast: 8 DDIM steps, 2 prompts per round, every pair kept (threshold 0).
FAST = [
    "num_inference_steps=8", "divert_start_step=4", "sample_batch_size=2", "train_batch_size=4",
    "preference_threshold=0.0", "log_with=none", "progress=false", "validate_every_epochs=0",
    "lr_scheduler=constant_with_warmup", "lr_warmup_steps=3",
]


def train(out: Path, *extra: str) -> int:
    return main(["train", "--config", str(CONFIG), f"output_dir={out}", *FAST, *extra])


def test_two_iterations_change_every_lora_parameter(tmp_path):
    from spotune.models.lora import add_lora, lora_state_dict
    from spotune.models.tiny import build_tiny_unet

    assert train(tmp_path / "run", "max_iterations=2") == 0
    (ckpt,) = list_checkpoints(tmp_path / "run")
    state = read_state(ckpt)
    assert state["iteration"] == 2 and state["optimizer_step"] >= 2 and state["finetune"] == "lora"
    trained = load_file(str(ckpt / "lora.safetensors"))
    unet = build_tiny_unet(seed=2)  # the seed builtin:tiny-sd15 uses for its UNet
    torch.manual_seed(42)
    add_lora(unet, rank=4, targets=["to_q", "to_k", "to_v", "to_out.0"])
    initial = lora_state_dict(unet)
    assert set(trained) == set(initial) and len(trained) > 0
    unchanged = [k for k in trained if torch.equal(trained[k], initial[k])]
    assert not unchanged, f"parameters that did not change: {unchanged[:5]}"
    from spotune.config import load_config
    from spotune.recipes.train_spo_config import TrainSPOConfig

    saved = load_config(TrainSPOConfig, tmp_path / "run" / "config.yaml")  # the run can be reproduced from it
    assert saved.max_iterations == 2 and saved.output_dir == str(tmp_path / "run") and saved.preference_threshold == 0.0
    for name in ("optimizer.safetensors", "optimizer.json", "scheduler.json", "rng_rank0.safetensors", "rng_rank0.json"):
        assert (ckpt / name).is_file()
    check_trees_and_log(tmp_path / "run", "spo", 2)


def test_a_sigterm_mid_epoch_checkpoints_and_the_resume_is_bit_exact(tmp_path, capsys, sigterm_during):
    """A scheduler's SIGTERM while iteration 3 samples, with no checkpoint due: the iteration is abandoned,
    the state after iteration 2 is checkpointed, exit 143 with one line; resume=latest then ends where the
    uninterrupted run does, bit for bit."""
    from spotune.recipes.train_spo import SPOTrainer

    assert train(tmp_path / "straight", "max_iterations=4") == 0
    sigterm_during(SPOTrainer, "sample", lambda trainer: trainer.iteration == 2)
    assert train(tmp_path / "split", "max_iterations=4", "checkpoint_every=0") == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"spotune train: preempted (SIGTERM) during iteration 3, which was abandoned before it trained (it is "
        f"redone on resume); checkpoint {tmp_path / 'split' / 'checkpoints' / 'iter-00000002'}; continue with "
        f"resume=latest output_dir={tmp_path / 'split'}"
    ), err
    assert [c.name for c in list_checkpoints(tmp_path / "split")] == ["iter-00000002"]
    assert train(tmp_path / "split", "max_iterations=4", "checkpoint_every=0", "resume=latest") == 0
    a = list_checkpoints(tmp_path / "straight")[-1]
    b = list_checkpoints(tmp_path / "split")[-1]
    assert a.name == b.name == "iter-00000004"
    wa, wb = load_file(str(a / "lora.safetensors")), load_file(str(b / "lora.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    oa, ob = load_file(str(a / "optimizer.safetensors")), load_file(str(b / "optimizer.safetensors"))
    assert all(torch.equal(oa[k], ob[k]) for k in oa)
    assert json.loads((a / "scheduler.json").read_text()) == json.loads((b / "scheduler.json").read_text())
    assert read_state(a)["optimizer_step"] == read_state(b)["optimizer_step"]
    # The log of the resumed run reads as the uninterrupted run's: iteration 3, abandoned and redone, once.
    def logged(run):
        return [{k: v for k, v in r.items() if k != "time" and not k.startswith("seconds_")} for r in read_metrics(run)]
    assert logged(tmp_path / "split") == logged(tmp_path / "straight")
    assert [r["iteration"] for r in read_metrics(tmp_path / "split")] == [1, 2, 3, 4]


def test_full_finetune_runs_and_saves_the_unet(tmp_path):
    assert train(tmp_path / "full", "finetune=full", "max_iterations=1", "learning_rate=1e-4") == 0
    (ckpt,) = list_checkpoints(tmp_path / "full")
    assert read_state(ckpt)["finetune"] == "full"
    weights = load_file(str(ckpt / "unet.safetensors"))
    assert "conv_in.weight" in weights and not any("lora" in k for k in weights)


def _prompt_file(tmp_path: Path, n: int) -> Path:
    f = tmp_path / "prompts.json"
    f.write_text(json.dumps([{"caption": f"a red circle number {i}"} for i in range(n)]))
    return f


# -- bad input: clear errors, nothing lost ---------------------------------------------------------


def test_unknown_key_lists_the_valid_ones(tmp_path, capsys):
    assert main(["train", "--config", str(CONFIG), f"output_dir={tmp_path}", "learning_rat=1e-4"]) == 1
    err = capsys.readouterr().err
    assert "unknown key(s) ['learning_rat']" in err and "learning_rate" in err


def test_bad_values_are_named(tmp_path, capsys):
    assert main(["train", "--config", str(CONFIG), "num_samples_per_step=many"]) == 1
    assert "num_samples_per_step" in capsys.readouterr().err
    assert main(["train", "--config", str(CONFIG), "eta=0"]) == 1
    assert "eta must be > 0" in capsys.readouterr().err


def test_existing_run_is_refused_unless_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out, "max_iterations=1") == 0
    (ckpt,) = list_checkpoints(out)
    before = (ckpt / "lora.safetensors").read_bytes()
    assert train(out, "max_iterations=1") == 1
    assert "already holds a run" in capsys.readouterr().err
    assert (ckpt / "lora.safetensors").read_bytes() == before
    assert train(out, "max_iterations=1", "overwrite=true") == 0


def test_missing_model_and_prompt_files(tmp_path, capsys):
    assert train(tmp_path / "a", "pretrained_model=" + str(tmp_path / "nope")) == 1
    assert "nope does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert train(tmp_path / "b", f"prompts={empty}") == 1
    assert "holds no prompts" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('[{"caption": "ok"}, {"text": "no caption"}]')
    assert train(tmp_path / "c", f"prompts={bad}") == 1
    assert "row 2 has no 'caption'" in capsys.readouterr().err  # the second prompt: rows count from 1
    corrupt = tmp_path / "model"
    corrupt.mkdir()
    (corrupt / "model_index.json").write_text("{not json")
    assert train(tmp_path / "d", f"pretrained_model={corrupt}") == 1
    assert str(corrupt) in capsys.readouterr().err


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert train(out, "max_iterations=1") == 0
    good = (list_checkpoints(out)[0] / "lora.safetensors").read_bytes()
    import spotune.recipes.train_spo as recipe

    real = recipe.spo_loss

    def poisoned(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        return loss * math.nan, stats

    monkeypatch.setattr(recipe, "spo_loss", poisoned)
    assert train(out, "max_iterations=2", "resume=latest") == 1
    err = capsys.readouterr().err
    assert "loss is nan at iteration 2" in err and "iter-00000001" in err
    assert [c.name for c in list_checkpoints(out)] == ["iter-00000001"]
    assert (list_checkpoints(out)[0] / "lora.safetensors").read_bytes() == good


def test_disk_failure_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert train(out, "max_iterations=1") == 0
    good = list_checkpoints(out)[0]
    good_bytes = (good / "lora.safetensors").read_bytes()
    import spotune.utils.io as io

    calls = {"n": 0}
    real = io.save_file

    def failing(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:  # the optimizer file, after the weights were already written
            raise OSError(28, "No space left on device")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(io, "save_file", failing)
    assert train(out, "max_iterations=2", "resume=latest") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "no space left on the device while writing" in err and "iter-00000002 (optimizer.safetensors)" in err
    assert "MiB free there" in err
    assert [c.name for c in list_checkpoints(out)] == ["iter-00000001"]
    assert (good / "lora.safetensors").read_bytes() == good_bytes
    leftovers = [p.name for p in (out / "checkpoints").iterdir() if p.name != "iter-00000001"]
    assert leftovers == [], f"half-written checkpoint folders left behind: {leftovers}"


def test_trajectory_baseline_trains(tmp_path):
    assert train(tmp_path / "traj", "pairing=trajectory", "max_iterations=2") == 0
    (ckpt,) = list_checkpoints(tmp_path / "traj")
    state = read_state(ckpt)
    assert state["config"]["pairing"] == "trajectory" and state["optimizer_step"] >= 1
    assert any(v.abs().sum() > 0 for k, v in load_file(str(ckpt / "lora.safetensors")).items() if "lora_B" in k)


def test_bf16_mixed_precision_keeps_lora_weights_in_fp32(tmp_path):
    assert train(tmp_path / "bf16", "mixed_precision=bf16", "max_iterations=1", "gradient_checkpointing=true") == 0
    (ckpt,) = list_checkpoints(tmp_path / "bf16")
    weights = load_file(str(ckpt / "lora.safetensors"))
    assert all(v.dtype == torch.float32 for v in weights.values())
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)


def _accumulated_gradients(tmp_path, name: str, overrides: list[str], pairs=None):
    """Set up a trainer, train on ``pairs`` (sampled when None), and return the gradient at each optimizer step."""
    from spotune.config import load_config
    from spotune.recipes.train_spo import SPOTrainer
    from spotune.recipes.train_spo_config import TrainSPOConfig

    cfg = load_config(TrainSPOConfig, CONFIG, [f"output_dir={tmp_path / name}", *FAST, "sample_batch_size=1", *overrides])
    trainer = SPOTrainer(cfg)
    trainer.setup()
    try:
        pairs = pairs if pairs is not None else trainer.sample(["a red circle on a white background"]).pairs
        grads = []
        trainer.optimizer.step = lambda *a, **k: grads.append([p.grad.clone() for p in trainer.trainable])
        trainer.train_on_pairs(pairs)
    finally:
        trainer.cleanup()
    return pairs, grads


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """Two accumulated micro-batches of 2 give the gradient of one batch of 4 (same tuples, same order)."""
    common = ["max_grad_norm=0", "num_inference_steps=8", "divert_start_step=4"]  # 4 tuples per round
    pairs, big = _accumulated_gradients(tmp_path, "big", [*common, "train_batch_size=4"])
    assert len(pairs) == 4 and len(big) == 1
    _, acc = _accumulated_gradients(tmp_path, "acc", [*common, "train_batch_size=2", "gradient_accumulation_steps=2"], pairs)
    _, two = _accumulated_gradients(tmp_path, "two", [*common, "train_batch_size=2"], pairs)
    assert len(acc) == 1 and len(two) == 2
    assert any(g.abs().sum() > 0 for g in big[0])
    for g_big, g_acc in zip(big[0], acc[0]):
        torch.testing.assert_close(g_acc, g_big, rtol=1e-4, atol=1e-7)
    # without accumulation each micro-batch steps on its own, with half the tuples: a different gradient
    assert any(not torch.allclose(g_big, g_two, rtol=1e-3, atol=1e-6) for g_big, g_two in zip(big[0], two[0]))


def test_wandb_without_the_package_is_a_clear_error(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    assert train(tmp_path / "w", "log_with=wandb", "max_iterations=1") == 1
    assert "needs the 'wandb' package" in capsys.readouterr().err
