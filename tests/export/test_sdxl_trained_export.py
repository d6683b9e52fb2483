"""A real 2-iteration ``spotune train --config configs/tiny_sdxl.yaml`` (the SDXL sampler on ``builtin:tiny-sdxl``),
exported to every format and loaded back.

The in-memory adapter is rebuilt the way training holds it (``add_lora`` with the run's rank, alpha and
targets, then the checkpoint's LoRA state); each export, read by diffusers' own loaders (or spotune's
single-file loader), must give the same UNet output within 1e-4 in fp32.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from diffusers import StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import load_file

from spotune.cli import main
from spotune.export import export_checkpoint
from spotune.models.loading import load_pipeline
from spotune.models.lora import add_lora, load_lora_state_dict
from spotune.models.single_file_sdxl import load_sdxl_single_file

TINY_SDXL = "builtin:tiny-sdxl"
TINY_SDXL_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny_sdxl.yaml"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sdxl_probe):
    """(run folder, the trained adapter's probe output, the base's)."""
    run = tmp_path_factory.mktemp("train") / "sdxl-run"
    # Threshold 0 keeps every segment of the random tiny judge, so both iterations step the optimizer.
    argv = ["train", "--config", str(TINY_SDXL_CONFIG), "num_inference_steps=8", "preference_threshold=0",
            "max_iterations=2", "progress=false", "validate_every_epochs=0", f"output_dir={run}"]
    assert main(argv) == 0
    checkpoint = sorted((run / "checkpoints").iterdir())[-1]
    state = json.loads((checkpoint / "state.json").read_text())
    unet = load_pipeline(TINY_SDXL).unet
    base = sdxl_probe(unet)
    lora = state["lora"]
    add_lora(unet, rank=lora["rank"], alpha=lora["alpha"], targets=lora["targets"], init=lora["init"])
    load_lora_state_dict(unet, load_file(str(checkpoint / "lora.safetensors")))
    return run, sdxl_probe(unet), base


def test_training_moved_the_lora(trained):
    _, expected, base = trained
    # Ten times the tolerance below (0.014 measured): an export that lost the LoRA would fail there.
    assert (expected - base).abs().max() > 1e-3


@pytest.mark.parametrize("fmt", ["webui", "diffusers", "merged", "single-file"])
def test_every_format_loads_back_equal_to_the_adapter(trained, sdxl_probe, tmp_path, fmt):
    run, expected, _ = trained
    out = export_checkpoint(run, fmt, tmp_path / ("merged" if fmt == "merged" else "out.safetensors"), dtype="fp32")
    if fmt in ("webui", "diffusers"):
        pipe = load_pipeline(TINY_SDXL)
        pipe.load_lora_weights(str(out))
        unet = pipe.unet
    elif fmt == "merged":
        unet = StableDiffusionXLPipeline.from_pretrained(str(out), local_files_only=True).unet
    else:
        config = tmp_path / "configs"
        load_pipeline(TINY_SDXL).save_pretrained(config)
        unet = load_sdxl_single_file(out, config_folder=config).unet
    assert (sdxl_probe(unet) - expected).abs().max() < 1e-4
    if fmt == "webui":
        with safe_open(str(out), "pt") as handle:
            meta = handle.metadata()
        assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["modelspec.resolution"] == "32x32"
