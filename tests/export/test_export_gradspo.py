"""`spotune export --weights trained|ema` on a real (tiny) GradSPO run."""

from __future__ import annotations

from pathlib import Path

import torch

from spotune.checkpoint import list_checkpoints
from spotune.cli import main
from spotune.export import load_lora_file

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml"
FAST = ["num_inference_steps=6", "divert_start_step=4", "sample_batch_size=2", "train_batch_size=4",
        "log_with=none", "progress=false", "validate_every_epochs=0", "max_iterations=1"]


def test_trained_by_default_and_ema_on_request(tmp_path, capsys):
    run = tmp_path / "grad"
    assert main(["train", "--config", str(CONFIG), f"output_dir={run}", "algorithm=gradspo", *FAST]) == 0
    (ckpt,) = list_checkpoints(run)
    trained = load_lora_file(ckpt)
    ema = load_lora_file(ckpt, weights="ema")
    assert set(trained.state_dict) == set(ema.state_dict)
    assert any(not torch.equal(trained.state_dict[k], ema.state_dict[k]) for k in trained.state_dict)

    default_out, ema_out = tmp_path / "default.safetensors", tmp_path / "ema.safetensors"
    base = ["export", str(run), "--format", "webui", "--dtype", "fp32"]
    assert main([*base, "--output", str(default_out)]) == 0
    assert main([*base, "--output", str(ema_out), "--weights", "ema"]) == 0
    for out, expected in ((default_out, trained), (ema_out, ema)):
        got = load_lora_file(out)
        # the exported file read back gives the same weight update per module as the checkpoint's file
        assert got.modules == expected.modules
        for module in expected.modules:
            torch.testing.assert_close(got.delta(module), expected.delta(module))

    spo_run = tmp_path / "spo"
    # threshold 0: this short plain run keeps no pair at 0.05, and a run without an optimizer step fails
    assert main(["train", "--config", str(CONFIG), f"output_dir={spo_run}", *FAST, "preference_threshold=0.0"]) == 0
    capsys.readouterr()
    assert main(["export", str(spo_run), "--format", "webui", "--output", str(tmp_path / "x.safetensors"), "--weights", "ema"]) == 1
    err = capsys.readouterr().err
    assert "ema.safetensors does not exist" in err and "algorithm=spo" in err and "--weights trained" in err
    assert not (tmp_path / "x.safetensors").exists()
