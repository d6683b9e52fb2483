"""The recipe's speed and memory options compute what the plain recipe computes.

Micro-batches with accumulation give the gradient of the mean over the whole training batch;
``compile=true`` gives the same tuples and loss; cached prompt embeddings equal encoded ones.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from spotune.config import load_config
from spotune.models.text import encode_prompts
from spotune.recipes.train_spo import SPOTrainer
from spotune.recipes.train_spo_config import TrainSPOConfig

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml"
FAST = [
    "num_inference_steps=6", "divert_start_step=2", "sample_batch_size=3", "preference_threshold=0.0",
    "log_with=none", "progress=false", "validate_every_epochs=0", "max_grad_norm=0",
]


def _trainer(tmp_path: Path, *extra: str) -> SPOTrainer:
    config = load_config(TrainSPOConfig, CONFIG, [f"output_dir={tmp_path}", *FAST, *extra])
    trainer = SPOTrainer(config)
    trainer.setup()
    return trainer


def _gradients_per_step(trainer: SPOTrainer, pairs) -> list[list[torch.Tensor]]:
    """Run train_on_pairs with the optimizer step replaced by a recorder of the accumulated gradients."""
    recorded: list[list[torch.Tensor]] = []

    def record(*args, **kwargs):
        recorded.append([p.grad.detach().clone() for p in trainer.trainable])

    real_step = trainer.optimizer.step
    trainer.optimizer.step = record
    try:
        trainer.train_on_pairs(pairs)
    finally:
        trainer.optimizer.step = real_step
    return recorded


def _assert_same_gradients(expected: list[torch.Tensor], actual: list[torch.Tensor]) -> None:
    """Equal up to float32 summation order: within 1e-5 of the largest gradient entry."""
    scale = max(float(g.abs().max()) for g in expected)
    assert scale > 0
    for a, b in zip(expected, actual):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * scale)


def test_micro_batches_give_the_gradient_of_the_batch_mean(tmp_path):
    trainer = _trainer(tmp_path / "run", "train_batch_size=10")
    try:
        pairs = trainer.sample(trainer._prompts_for(0, 0)).pairs
        assert len(pairs) == 12  # (6 - 2) branching steps x 3 prompts: batches of 10 and 2
        sizes: list[int] = []
        real_loss = trainer._pair_loss

        def counting(batch):
            sizes.append(len(batch))
            return real_loss(batch)

        trainer._pair_loss = counting
        whole = _gradients_per_step(trainer, pairs)
        assert sizes == [10, 2]
        sizes.clear()
        trainer.config.train_micro_batch_size = 3  # parts 3, 3, 3, 1 (short last part), then 2
        split = _gradients_per_step(trainer, pairs)
        assert sizes == [3, 3, 3, 1, 2]
    finally:
        trainer.cleanup()
    assert len(whole) == len(split) == 2
    for step_whole, step_split in zip(whole, split):
        _assert_same_gradients(step_whole, step_split)


def test_micro_batches_with_accumulation_match_one_big_batch(tmp_path):
    """Two accumulated batches of 6 in parts of 4 (4+2, 4+2) = the mean over each batch, averaged."""
    trainer = _trainer(tmp_path / "run", "train_batch_size=6", "gradient_accumulation_steps=2")
    try:
        pairs = trainer.sample(trainer._prompts_for(0, 0)).pairs
        whole = _gradients_per_step(trainer, pairs)
        trainer.config.train_micro_batch_size = 4
        split = _gradients_per_step(trainer, pairs)
    finally:
        trainer.cleanup()
    assert len(whole) == len(split) == 1
    _assert_same_gradients(whole[0], split[0])


def test_cached_prompt_embeddings_equal_encoded_ones(tmp_path):
    trainer = _trainer(tmp_path / "run", "offload_text_encoder=true")
    try:
        prompts = trainer._prompts_for(0, 0)
        assert all(encoder.device.type == "cpu" for encoder in trainer.conditioner.text_encoders)
        assert set(prompts) <= set(trainer._cond_cache)
        fresh = encode_prompts(trainer.conditioner.tokenizer, trainer.conditioner.text_encoder, prompts, "cpu")
        torch.testing.assert_close(trainer._prompt_conditioning(prompts).prompt_embeds, fresh, rtol=1e-5, atol=1e-5)
    finally:
        trainer.cleanup()


@pytest.mark.slow
@pytest.mark.skipif(bool(os.environ.get("SPOTUNE_SKIP_COMPILE_TESTS")), reason="SPOTUNE_SKIP_COMPILE_TESTS is set")
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_compiled_models_give_the_same_tuples_and_loss(tmp_path):
    # aot_eager traces the same graphs as inductor (dynamo + AOT autograd) but runs them with eager
    # kernels, so no C++ compiler runs; inductor is the recipe's default. Even so, tracing the UNet for
    # its four graphs (sampling batch, candidate batch, training, adapter-off reference) takes about a
    # minute on 2 cores (54 s on a quiet machine); SPOTUNE_SKIP_COMPILE_TESTS=1 skips it in a quick local run.
    small = ["num_inference_steps=3", "divert_start_step=1", "sample_batch_size=2", "num_samples_per_step=2", "train_batch_size=4"]
    plain = _trainer(tmp_path / "plain", *small)
    compiled = _trainer(tmp_path / "compiled", *small, "compile=true", "compile_backend=aot_eager")
    try:
        prompts = plain._prompts_for(0, 0)
        a, b = plain.sample(prompts), compiled.sample(prompts)
        assert getattr(compiled.unet, "_spotune_compiled", False) or getattr(
            compiled.accelerator.unwrap_model(compiled.unet), "_spotune_compiled", False)
        torch.testing.assert_close(b.scores, a.scores, rtol=1e-4, atol=1e-4)
        assert torch.equal(b.valid, a.valid) and torch.equal(b.choices, a.choices)
        for key, value in a.pairs.tensors().items():
            torch.testing.assert_close(b.pairs.tensors()[key], value, rtol=1e-4, atol=1e-5, msg=key)
        plain.scheduler.set_timesteps(plain.config.num_inference_steps)
        compiled.scheduler.set_timesteps(compiled.config.num_inference_steps)
        loss_a, _ = plain._pair_loss(a.pairs)
        loss_b, _ = compiled._pair_loss(a.pairs)
        torch.testing.assert_close(loss_b, loss_a, rtol=1e-4, atol=1e-5)
    finally:
        plain.cleanup()
        compiled.cleanup()
