"""`spotune train algorithm=gradspo` on tiny SDXL models: the family picks GradSPO's SDXL sampler, a short
CLI run trains every LoRA weight, and bad sampler settings are one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spotune.checkpoint import list_checkpoints, read_state
from spotune.cli import main
from spotune.config import load_config
from spotune.recipes.train_gradspo import GradSPOTrainer
from spotune.recipes.train_spo_config import TrainSPOConfig

from run_checks import check_trees_and_log

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "tiny_sdxl.yaml"
QUIET = ["log_with=none", "progress=false", "validate_every_epochs=0"]
# tiny_sdxl.yaml is SPO's SDXL recipe in small (3 inner steps); GradSPO's SDXL recipe has none.
GRADSPO = ["algorithm=gradspo", "num_inner_steps=0"]


def _initial_lora() -> dict[str, torch.Tensor]:
    from spotune.models.lora import add_lora, lora_state_dict
    from spotune.models.tiny import build_tiny_sdxl_unet

    unet = build_tiny_sdxl_unet(seed=2)  # the seed builtin:tiny-sdxl uses for its UNet
    torch.manual_seed(42)  # the run's seed, which also initialises the adapter
    add_lora(unet, rank=4, targets=["to_q", "to_k", "to_v", "to_out.0"])
    return lora_state_dict(unet)


def test_two_iterations_through_the_cli_change_every_lora_parameter(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--config", str(CONFIG), f"output_dir={out}", *GRADSPO, "max_iterations=2", *QUIET]) == 0
    (ckpt,) = list_checkpoints(out)
    state = read_state(ckpt)
    assert state["config"]["algorithm"] == "gradspo" and state["config"]["sampler"] == "sdxl"
    check_trees_and_log(out, "gradspo-sdxl", 2)
    assert state["iteration"] == 2 and state["optimizer_step"] >= 2
    trained = load_file(str(ckpt / "lora.safetensors"))
    ema = load_file(str(ckpt / "ema.safetensors"))
    initial = _initial_lora()
    assert set(trained) == set(initial) == set(ema) and len(trained) > 0
    unchanged = [k for k in trained if torch.equal(trained[k], initial[k])]
    assert not unchanged, f"parameters that did not change: {unchanged[:5]}"
    assert any(not torch.equal(ema[k], initial[k]) for k in ema)


@pytest.mark.parametrize("sampler,ending", [("auto", "sdxl"), ("sdxl", "sdxl"), ("sd15", "sd15")])
def test_the_sampler_kind_picks_gradspos_ending(tmp_path, monkeypatch, sampler, ending):
    """sampler=auto takes the SDXL family's kind; the trainer samples with the EMA model and that ending:
    with 8 steps and divert 4 the sdxl ending keeps tuples for steps 4..6 and judges the x0s at t = 0,
    the sd15 one keeps step 7 too (judged at t_7 = 1)."""
    from spotune.recipes import train_gradspo

    cfg = load_config(TrainSPOConfig, CONFIG, [
        f"output_dir={tmp_path / 'unit'}", *GRADSPO, f"sampler={sampler}", "num_inference_steps=8",
        "divert_start_step=4", "preference_threshold=0.0", *QUIET,
    ])
    trainer = GradSPOTrainer(cfg)
    trainer.setup()
    try:
        assert trainer.sampler_kind == ending
        calls = []
        real = train_gradspo.gradspo_sample

        def spy(unet, *args, **kwargs):
            calls.append((unet, kwargs["ending"]))
            return real(unet, *args, **kwargs)

        monkeypatch.setattr(train_gradspo, "gradspo_sample", spy)
        result = trainer.sample(trainer._prompts_for(0, 0))
        assert calls == [(trainer.ema_unet, ending)]
        b, k = cfg.sample_batch_size, cfg.num_samples_per_step
        steps = list(range(4, 7 if ending == "sdxl" else 8))
        assert result.pairs.step_index.tolist() == [s for s in steps for _ in range(b)]
        assert result.final_latents.shape[0] == (k * b if ending == "sdxl" else b)
        assert result.judge_calls == len(steps)
    finally:
        trainer.cleanup()


@pytest.mark.parametrize("extra,needle", [
    (["sampler=sdxl", "num_inference_steps=8", "divert_start_step=7"], "no evaluation step after its first branch"),
    # sampler=auto: the SDXL family's kind, checked once the model is loaded
    (["sampler=auto", "num_inference_steps=8", "divert_start_step=7"], "no evaluation step after its first branch"),
    (["num_inner_steps=3"], "algorithm=gradspo needs num_inner_steps=0"),
])
def test_bad_gradspo_sampler_settings_are_one_line(tmp_path, capsys, extra, needle):
    argv = ["train", "--config", str(CONFIG), f"output_dir={tmp_path / 'bad'}", *GRADSPO, *extra, *QUIET]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
