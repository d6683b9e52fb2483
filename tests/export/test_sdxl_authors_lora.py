"""The SPO authors' released SDXL LoRA format as an export source and as a ``generate`` LoRA.

``train_spo_sdxl.py`` saves with ``StableDiffusionXLPipeline.save_lora_weights(unet_lora_layers=
convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)))`` under diffusers 0.26.1: a
``pytorch_lora_weights.safetensors`` with ``unet.<module>.lora.down.weight`` / ``lora.up.weight`` keys,
no alpha and no ``lora_adapter_metadata`` header (their LoraConfig has lora_alpha = r, so the scale is 1).
The file here is written the same way, on the tiny SDXL UNet.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open

from spotune.cli import main
from spotune.export import apply_lora, load_lora_file
from spotune.generation.runner import apply_loras
from spotune.models.loading import load_pipeline

TINY_SDXL = "builtin:tiny-sdxl"
RANK = 8


@pytest.fixture(scope="module")
def authors_lora(tmp_path_factory, sdxl_probe):
    """(folder with the authors' file, the adapted UNet's probe output)."""
    unet = load_pipeline(TINY_SDXL).unet
    # The authors' LoraConfig (their rank is 64; alpha = rank in their code).
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=g))
    folder = tmp_path_factory.mktemp("authors") / "SPO-SDXL_4k-p_10ep_LoRA"
    StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)))
    return folder, sdxl_probe(unet)


def test_the_file_has_the_authors_key_spelling(authors_lora):
    folder, _ = authors_lora
    with safe_open(str(folder / "pytorch_lora_weights.safetensors"), "pt") as handle:
        keys = list(handle.keys())
    assert all(k.startswith("unet.") and k.endswith((".lora.down.weight", ".lora.up.weight")) for k in keys)
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k.lora.down.weight" in keys


def test_authors_lora_is_read_as_sdxl_and_applied_equal(authors_lora, sdxl_probe):
    folder, expected = authors_lora
    weights = load_lora_file(folder)
    assert weights.source_format == "diffusers" and (weights.rank, weights.alpha) == (RANK, float(RANK))
    unet = load_pipeline(TINY_SDXL).unet
    base = sdxl_probe(unet)
    assert (expected - base).abs().max() > 1e-2  # the LoRA does something, so "equal" below can fail
    apply_lora(unet, weights)
    assert (sdxl_probe(unet) - expected).abs().max() < 1e-4


def test_authors_lora_as_a_generate_lora(authors_lora, sdxl_probe):
    from spotune.generation.runner import LoraSpec

    folder, expected = authors_lora
    pipe = load_pipeline(TINY_SDXL)
    apply_loras(pipe, (LoraSpec(path=folder, scale=1.0, name="spo-sdxl"),))
    assert (sdxl_probe(pipe.unet) - expected).abs().max() < 1e-4


@pytest.mark.parametrize("fmt", ["webui", "diffusers", "merged", "single-file"])
def test_authors_lora_exports_to_every_format(authors_lora, sdxl_probe, tmp_path, fmt, capsys):
    folder, expected = authors_lora
    out = tmp_path / ("merged" if fmt == "merged" else f"spo.{fmt}.safetensors")
    argv = ["export", str(folder / "pytorch_lora_weights.safetensors"), "--format", fmt, "--output", str(out),
            "--base-model", TINY_SDXL, "--dtype", "fp32"]
    assert main(argv) == 0, capsys.readouterr().err
    if fmt in ("webui", "diffusers"):
        unet = load_pipeline(TINY_SDXL).unet
        apply_lora(unet, load_lora_file(out))
    elif fmt == "merged":
        unet = StableDiffusionXLPipeline.from_pretrained(str(out), local_files_only=True).unet
    else:
        from spotune.models.single_file_sdxl import load_sdxl_single_file

        config = tmp_path / "configs"
        load_pipeline(TINY_SDXL).save_pretrained(config)
        unet = load_sdxl_single_file(out, config_folder=config).unet
    assert (sdxl_probe(unet) - expected).abs().max() < 1e-4
    if fmt == "webui":
        with safe_open(str(out), "pt") as handle:
            keys, meta = list(handle.keys()), handle.metadata()
        assert all(k.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")) for k in keys)
        assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_network_dim"] == str(RANK)
