"""SPO training with the SDXL sampler on tiny SDXL models: two-state tuples, carried accumulation
groups, resume across a round boundary with a group open, and the config's bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spotune.checkpoint import ACCUMULATION_FILE, list_checkpoints, read_state
from spotune.cli import main
from spotune.config import load_config
from spotune.recipes.train_spo import SPOTrainer
from spotune.recipes.train_spo_config import TrainSPOConfig

from run_checks import check_trees_and_log

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "tiny_sdxl.yaml"
# 8 DDIM steps, divert 4, 1 inner step: branch at 4 and 6, judge at 6 and (the x0s) at 7; every segment kept.
FAST = [
    "num_inference_steps=8", "divert_start_step=4", "num_inner_steps=1", "sample_batch_size=1",
    "preference_threshold=0.0", "log_with=none", "progress=false", "validate_every_epochs=0", "max_grad_norm=0",
]


def _trainer(tmp_path: Path, *extra: str) -> SPOTrainer:
    trainer = SPOTrainer(load_config(TrainSPOConfig, CONFIG, [f"output_dir={tmp_path}", *FAST, *extra]))
    trainer.setup()
    return trainer


def test_tiny_sdxl_config_changes_every_lora_parameter(tmp_path):
    from spotune.models.lora import add_lora, lora_state_dict
    from spotune.models.tiny import build_tiny_sdxl_unet

    out = tmp_path / "run"
    assert main(["train", "--config", str(CONFIG), f"output_dir={out}", "max_iterations=2", "log_with=none",
                 "progress=false", "validate_every_epochs=0"]) == 0
    ckpt = list_checkpoints(out)[-1]
    state = read_state(ckpt)
    assert state["iteration"] == 2 and state["optimizer_step"] >= 2
    assert state["config"]["sampler"] == "sdxl" and state["config"]["num_inner_steps"] == 3
    check_trees_and_log(out, "sdxl", 2)
    trained = load_file(str(ckpt / "lora.safetensors"))
    unet = build_tiny_sdxl_unet(seed=2)  # the seed builtin:tiny-sdxl uses for its UNet
    torch.manual_seed(42)
    add_lora(unet, rank=4, targets=["to_q", "to_k", "to_v", "to_out.0"])
    initial = lora_state_dict(unet)
    assert set(trained) == set(initial) and len(trained) > 0
    unchanged = [k for k in trained if torch.equal(trained[k], initial[k])]
    assert not unchanged, f"parameters that did not change: {unchanged[:5]}"


def test_two_state_tuples_take_four_passes_and_shared_ones_two(tmp_path):
    """In one micro-batch of mixed tuples the policy and the reference each run on n + (two-state) rows,
    and the loss of the mix is the mean of the tuples' own losses (each lose state where it belongs)."""
    trainer = _trainer(tmp_path / "run")
    try:
        pairs = trainer.sample(trainer._prompts_for(0, 0)).pairs
        assert len(pairs) == 4 and pairs.shared.tolist() == [True, False, True, False]  # steps 4, 5, 6, 7
        torch.manual_seed(0)  # move the adapter off its zero start, so policy and reference differ
        with torch.no_grad():
            for p in trainer.trainable:
                p.add_(0.2 * torch.randn_like(p))
        rows: list[int] = []
        hook = trainer.unet.register_forward_pre_hook(lambda module, args, kwargs: rows.append(args[0].shape[0]), with_kwargs=True)
        try:
            with torch.no_grad():
                loss, _ = trainer._pair_loss(pairs)
        finally:
            hook.remove()
        two = int((~pairs.shared).sum())
        # policy and reference, each one call on 4 + 2 states, doubled for guidance: 2 passes per shared
        # tuple (its one state, twice), 4 per two-state tuple
        assert rows == [2 * (len(pairs) + two)] * 2
        with torch.no_grad():
            alone = [trainer._pair_loss(pairs.select(torch.tensor([i])))[0] for i in range(len(pairs))]
            # the two-state tuple's losing state matters: with the winner's x_t in its place the loss changes
            wrong = pairs.select(torch.tensor([1]))
            wrong.latents_lose = wrong.latents.clone()
            wrong_loss = trainer._pair_loss(wrong)[0]
        torch.testing.assert_close(loss, torch.stack(alone).mean(), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(wrong_loss, alone[1])
    finally:
        trainer.cleanup()


def test_loss_matches_the_authors_four_passes(tmp_path):
    """The authors' SDXL trainer restated: policy and reference on sample_0 (the winner's x_t) and on
    sample_1 (the loser's), four guided calls, clipped ratios, -log sigmoid; equal to spotune's mixed batch."""
    from spotune.diffusion.ddim import ddim_step_with_logprob
    from spotune.diffusion.sampler import guided_noise_pred
    from spotune.models.lora import adapter_disabled

    trainer = _trainer(tmp_path / "run")
    try:
        pairs = trainer.sample(trainer._prompts_for(0, 0)).pairs
        torch.manual_seed(1)
        with torch.no_grad():
            for p in trainer.trainable:
                p.add_(0.2 * torch.randn_like(p))
            loss, _ = trainer._pair_loss(pairs)
            s, neg, w, cfg = trainer.scheduler, trainer.negative, 5.0, trainer.config
            unet = trainer.accelerator.unwrap_model(trainer.unet)

            def logp(model_x_t, target):
                out = guided_noise_pred(unet, model_x_t, pairs.timesteps, pairs.cond, neg, w)
                with adapter_disabled(unet):
                    out_ref = guided_noise_pred(unet, model_x_t, pairs.timesteps, pairs.cond, neg, w)
                lp = ddim_step_with_logprob(s, out, pairs.timesteps, model_x_t, 1.0, prev_sample=target)[1]
                lp_ref = ddim_step_with_logprob(s, out_ref, pairs.timesteps, model_x_t, 1.0, prev_sample=target)[1]
                return lp, lp_ref

            lp0, ref0 = logp(pairs.latents, pairs.win)  # sample_0: x_t of the winning chain
            lp1, ref1 = logp(pairs.latents_lose, pairs.lose)  # sample_1: x_t of the losing chain
            ratio_0 = torch.clamp(torch.exp(lp0 - ref0), 1 - cfg.eps, 1 + cfg.eps)
            ratio_1 = torch.clamp(torch.exp(lp1 - ref1), 1 - cfg.eps, 1 + cfg.eps)
            expected = -torch.log(torch.sigmoid(cfg.beta * torch.log(ratio_0) - cfg.beta * torch.log(ratio_1))).mean()
    finally:
        trainer.cleanup()
    assert abs(float(expected) - 0.6931) > 1e-4  # the adapter moved: a loss away from log 2
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def _per_tuple_gradient(trainer: SPOTrainer, pairs, i: int) -> list[torch.Tensor]:
    loss, _ = trainer._pair_loss(pairs.select(torch.tensor([i])))
    return [g.detach() for g in torch.autograd.grad(loss, trainer.trainable)]


def test_accumulation_groups_carry_over_into_the_next_round(tmp_path):
    """3 micro-batches per round, accumulation 2: round 1 steps once and leaves one micro-batch open,
    round 2 closes that group with its first micro-batch and steps once more, as the authors' loop does;
    each step applies the mean of its two micro-batches' losses."""
    trainer = _trainer(tmp_path / "run", "train_batch_size=1", "gradient_accumulation_steps=2")
    try:
        pairs = trainer.sample(trainer._prompts_for(0, 0)).pairs.select(torch.arange(3))
        share = trainer._gather_and_shuffle(pairs)  # the order train_on_pairs trains in (same iteration: same order)
        recorded: list[list[torch.Tensor]] = []
        trainer.optimizer.step = lambda *a, **k: recorded.append([p.grad.detach().clone() for p in trainer.trainable])
        first = trainer.train_on_pairs(pairs)
        assert len(recorded) == 1 and trainer.open_group_size == 1 and first["optimizer_steps"] == 1
        second = trainer.train_on_pairs(pairs)
        assert len(recorded) == 3 and trainer.open_group_size == 0 and second["optimizer_steps"] == 2
        assert trainer.optimizer_step == 3
        trainer.scheduler.set_timesteps(8)
        g = [_per_tuple_gradient(trainer, share, i) for i in range(3)]  # the weights never moved
    finally:
        trainer.cleanup()
    for got, (a, b) in zip(recorded, [(0, 1), (2, 0), (1, 2)]):  # the second group spans the round boundary
        for r, ga, gb in zip(got, g[a], g[b]):
            torch.testing.assert_close(r, (ga + gb) / 2, rtol=1e-4, atol=1e-7)


def _train(out: Path, *extra: str) -> int:
    return main(["train", "--config", str(CONFIG), f"output_dir={out}", *FAST, "train_batch_size=4",
                 "gradient_accumulation_steps=2", "lr_scheduler=constant_with_warmup", "lr_warmup_steps=3", *extra])


def test_a_sigterm_with_an_open_accumulation_group_checkpoints_it_and_the_resume_is_bit_exact(tmp_path, capsys, sigterm_during):
    """One micro-batch per round and accumulation 2: a SIGTERM while round 3 trains (no checkpoint due) checkpoints
    the state after it, an open group included, and exits 143; resuming from it ends where the uninterrupted run
    does, bit for bit."""
    assert _train(tmp_path / "straight", "max_iterations=4", "checkpoint_every=1") == 0
    sigterm_during(SPOTrainer, "train_on_pairs", lambda trainer: trainer.iteration == 2)
    assert _train(tmp_path / "split", "max_iterations=4", "checkpoint_every=0") == 143
    assert "preempted (SIGTERM) at iteration 3; checkpoint " in capsys.readouterr().err
    assert len(list_checkpoints(tmp_path / "split")) == 1
    mid = list_checkpoints(tmp_path / "split")[-1]
    assert mid.name == "iter-00000003" and read_state(mid)["open_group_micro_batches"] == 1
    assert read_state(mid)["optimizer_step"] == 1 and (mid / ACCUMULATION_FILE).is_file()
    # the uninterrupted run held the same open group at that point
    same = list_checkpoints(tmp_path / "straight")[2]
    ga, gb = load_file(str(same / ACCUMULATION_FILE)), load_file(str(mid / ACCUMULATION_FILE))
    assert set(ga) == set(gb) and all(torch.equal(ga[k], gb[k]) for k in ga)
    assert any(k.startswith("grad.") and ga[k].abs().sum() > 0 for k in ga)
    assert _train(tmp_path / "split", "max_iterations=4", "checkpoint_every=0", "resume=latest") == 0
    a, b = list_checkpoints(tmp_path / "straight")[-1], list_checkpoints(tmp_path / "split")[-1]
    assert a.name == b.name == "iter-00000004"
    assert read_state(a)["optimizer_step"] == read_state(b)["optimizer_step"] == 2
    assert read_state(b)["open_group_micro_batches"] == 0 and not (b / ACCUMULATION_FILE).exists()
    for name in ("lora.safetensors", "optimizer.safetensors"):
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa), name


def test_fewer_micro_batches_than_one_group_is_a_clear_error(tmp_path, capsys):
    assert _train(tmp_path / "short", "max_iterations=1") == 1
    err = capsys.readouterr().err
    assert "no optimizer step" in err and "gradient_accumulation_steps=2" in err and "max_iterations" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("extra,needle", [
    (["num_inference_steps=8", "divert_start_step=7"], "no evaluation step after its first branch"),
    (["sampler=sd15", "num_inner_steps=3"], "needs sampler=sdxl"),
    (["algorithm=gradspo", "num_inner_steps=3"], "algorithm=gradspo needs num_inner_steps=0"),
    (["num_inner_steps=-1"], "num_inner_steps must be >= 0"),
])
def test_bad_sampler_settings_are_one_line(tmp_path, capsys, extra, needle):
    assert main(["train", "--config", str(CONFIG), f"output_dir={tmp_path / 'bad'}", *extra]) == 1
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1


def test_inner_steps_on_an_sd15_model_need_the_sdxl_sampler(tmp_path, capsys):
    assert main(["train", "--config", str(ROOT / "configs" / "tiny_cpu.yaml"), f"output_dir={tmp_path / 'bad'}",
                 "num_inner_steps=3", "log_with=none", "progress=false"]) == 1
    err = capsys.readouterr().err
    assert "num_inner_steps=3 needs the SDXL sampler" in err and "sampler=sdxl" in err


def test_checkpoint_keeps_the_fp16_loss_scale(tmp_path):
    """An open group's gradients carry fp16's loss scale, so a checkpoint keeps the scaler's state
    (CUDA-only in accelerate; a CPU GradScaler stands in for it here)."""
    out = tmp_path / "run"
    trainer = _trainer(out, "max_iterations=2")
    try:
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
        trainer.iteration = 1
        trainer.save_checkpoint()
    finally:
        trainer.cleanup()
    ckpt = list_checkpoints(out)[-1]
    import json

    assert json.loads((ckpt / "scaler.json").read_text())["scale"] == 1024.0
    resumed = _trainer(tmp_path / "other", "max_iterations=2")
    try:
        resumed.accelerator.scaler = torch.amp.GradScaler("cpu")
        resumed._load_open_group(ckpt, read_state(ckpt))
        assert resumed.accelerator.scaler.get_scale() == 1024.0
        assert resumed.accelerator.scaler.state_dict()["growth_interval"] == 7
    finally:
        resumed.cleanup()
