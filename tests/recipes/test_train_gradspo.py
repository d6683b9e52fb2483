"""`spotune train algorithm=gradspo` on tiny models: every LoRA weight trains, the EMA follows its rule and
samples, checkpoints carry it, and a resumed run is bit-exact."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from spotune.checkpoint import list_checkpoints, read_state
from spotune.cli import main

from run_checks import check_trees_and_log


CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml"
FAST = [
    "algorithm=gradspo", "num_inference_steps=8", "divert_start_step=4", "sample_batch_size=2", "train_batch_size=4",
    "log_with=none", "progress=false", "validate_every_epochs=0",
]


def train(out: Path, *extra: str) -> int:
    return main(["train", "--config", str(CONFIG), f"output_dir={out}", *FAST, *extra])


def _initial_lora() -> dict[str, torch.Tensor]:
    from spotune.models.lora import add_lora, lora_state_dict
    from spotune.models.tiny import build_tiny_unet

    unet = build_tiny_unet(seed=2)  # the seed builtin:tiny-sd15 uses for its UNet
    torch.manual_seed(42)
    add_lora(unet, rank=4, targets=["to_q", "to_k", "to_v", "to_out.0"])
    return lora_state_dict(unet)


def test_two_iterations_change_every_lora_parameter_and_keep_the_ema(tmp_path):
    assert train(tmp_path / "run", "max_iterations=2") == 0
    (ckpt,) = list_checkpoints(tmp_path / "run")
    state = read_state(ckpt)
    assert state["config"]["algorithm"] == "gradspo" and state["ema"] == {"file": "ema.safetensors", "decay": 0.9}
    check_trees_and_log(tmp_path / "run", "gradspo-sd15", 2)
    assert state["optimizer_step"] >= 2
    trained = load_file(str(ckpt / "lora.safetensors"))
    ema = load_file(str(ckpt / "ema.safetensors"))
    initial = _initial_lora()
    assert set(trained) == set(initial) == set(ema) and len(trained) > 0
    unchanged = [k for k in trained if torch.equal(trained[k], initial[k])]
    assert not unchanged, f"parameters that did not change: {unchanged[:5]}"
    # the EMA lags the trained weights: moved from the start, not equal to the end
    assert all(v.dtype == torch.float32 for v in ema.values())
    assert any(not torch.equal(ema[k], initial[k]) for k in ema)
    assert all(not torch.equal(ema[k], trained[k]) for k in ema if "lora_B" in k)


def test_ema_follows_the_official_rule_and_samples(tmp_path, monkeypatch):
    """The official loop updates the EMA after every training batch whose index in its round (from 1) is a
    multiple of gradient_accumulation_steps, not after every optimizer step: with 8 one-tuple batches per
    round and accumulation 3, round 2's optimizer steps follow its batches 1, 4, 7 (the group left open by
    round 1 closes first) while its EMA updates follow batches 3 and 6, with the weights of those steps."""
    from spotune.config import load_config
    from spotune.models.lora import lora_state_dict
    from spotune.recipes import train_gradspo
    from spotune.recipes.train_gradspo import GradSPOTrainer
    from spotune.recipes.train_spo_config import TrainSPOConfig

    cfg = load_config(TrainSPOConfig, CONFIG, [
        f"output_dir={tmp_path / 'unit'}", *FAST, "train_batch_size=1", "gradient_accumulation_steps=3",
        "preference_threshold=0.0", "ema_decay=0.75",
    ])
    trainer = GradSPOTrainer(cfg)
    trainer.setup()
    sampled_with = []
    real_sample = train_gradspo.gradspo_sample
    monkeypatch.setattr(train_gradspo, "gradspo_sample", lambda unet, *a, **k: sampled_with.append(unet) or real_sample(unet, *a, **k))
    try:
        expected = {k: v.clone() for k, v in lora_state_dict(trainer.ema_unet).items()}
        events = []  # (round, batch index, optimizer steps so far, EMA moved)
        original = trainer._after_training_batch

        def track(index):
            before = {k: v.clone() for k, v in lora_state_dict(trainer.ema_unet).items()}
            weights = lora_state_dict(trainer.accelerator.unwrap_model(trainer.unet))
            original(index)
            after = lora_state_dict(trainer.ema_unet)
            moved = any(not torch.equal(before[k], after[k]) for k in after)
            if index % 3 == 0:  # ema = decay * ema + (1 - decay) * w, w the weights after this batch
                for k, w in weights.items():
                    expected[k] = 0.75 * expected[k] + 0.25 * w.detach()
            events.append((trainer.iteration, index, trainer.optimizer_step, moved))

        trainer._after_training_batch = track
        prompts = ["a red circle on a white background", "a blue square on a black background"]
        for _ in range(2):
            pairs = trainer.sample(prompts).pairs
            assert len(pairs) == 8 and pairs.noise_delta is not None  # 4 branching steps x 2 prompts
            trainer.train_on_pairs(pairs)
            trainer.iteration += 1
        assert sampled_with == [trainer.ema_unet] * 2
        assert [i for r, i, _, moved in events if moved] == [3, 6, 3, 6]
        steps_after = [n for _, _, n, _ in events]
        assert steps_after == [0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5]
        ema = lora_state_dict(trainer.ema_unet)
        for k in expected:
            torch.testing.assert_close(ema[k], expected[k], rtol=1e-6, atol=1e-8)
        assert trainer._sampling_unet() is trainer.ema_unet  # validation images come from the EMA too
    finally:
        trainer.cleanup()


def test_a_sigterm_while_training_checkpoints_and_the_resume_is_bit_exact_with_the_ema(tmp_path, capsys, sigterm_during):
    """SIGTERM while iteration 2 trains, no checkpoint due: the iteration is finished and checkpointed (the EMA
    included), exit 143; resume=latest ends where the uninterrupted run does, bit for bit."""
    from spotune.recipes.train_gradspo import GradSPOTrainer

    assert train(tmp_path / "straight", "max_iterations=4") == 0
    sigterm_during(GradSPOTrainer, "train_on_pairs", lambda trainer: trainer.iteration == 1)
    assert train(tmp_path / "split", "max_iterations=4", "checkpoint_every=0") == 143
    assert "preempted (SIGTERM) at iteration 2; checkpoint " in capsys.readouterr().err
    assert [c.name for c in list_checkpoints(tmp_path / "split")] == ["iter-00000002"]
    assert train(tmp_path / "split", "max_iterations=4", "checkpoint_every=0", "resume=latest") == 0
    a = list_checkpoints(tmp_path / "straight")[-1]
    b = list_checkpoints(tmp_path / "split")[-1]
    assert a.name == b.name == "iter-00000004"
    for name in ("lora.safetensors", "ema.safetensors", "optimizer.safetensors"):
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa), name
    assert read_state(a)["optimizer_step"] == read_state(b)["optimizer_step"]


def test_resume_with_the_other_algorithm_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out, "max_iterations=1") == 0
    assert main(["train", "--config", str(CONFIG), f"output_dir={out}", *FAST[1:], "max_iterations=2", "resume=latest"]) == 1
    err = capsys.readouterr().err
    # The resume check names the changed key and both values before anything is loaded.
    assert "resume changes algorithm" in err and "'gradspo' -> 'spo'" in err and "Traceback" not in err


def test_gradspo_needs_step_pairs(capsys):
    assert main(["train", "--config", str(CONFIG), "algorithm=gradspo", "pairing=trajectory"]) == 1
    assert "algorithm=gradspo needs pairing=step" in capsys.readouterr().err
