"""The diffusers <-> original (sgm) module map of SDXL-shaped UNets, and what export reads of a base model."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from spotune.export.base_config import base_unet_config
from spotune.export.lora_layout import diffusers_module_names
from spotune.export.metadata import model_default_resolution
from spotune.export.naming import module_from_kohya
from spotune.export.original_layout import original_module_names
from spotune.models.loading import load_pipeline
from spotune.models.single_file_sdxl import sdxl_resources

SDXL_CONFIG = json.loads((sdxl_resources() / "unet" / "config.json").read_text())
# SDXL refiner-like: four levels, attention at the middle two (a shape kohya's names must follow too).
FOUR_LEVELS = dict(
    SDXL_CONFIG,
    block_out_channels=[32, 64, 64, 64],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    transformer_layers_per_block=[1, 1, 3, 1],
    attention_head_dim=[2, 4, 4, 4],
    norm_num_groups=8,
    cross_attention_dim=64,
)


def test_sdxl_base_block_numbers():
    names = original_module_names(
        [
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
            "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k",
            "mid_block.attentions.0.transformer_blocks.3.ff.net.2",
            "up_blocks.0.attentions.2.proj_out",
            "up_blocks.1.attentions.0.transformer_blocks.1.attn1.to_out.0",
            "down_blocks.0.resnets.1.conv1",
            "down_blocks.1.downsamplers.0.conv",
            "up_blocks.0.upsamplers.0.conv",
            "add_embedding.linear_2",
        ],
        SDXL_CONFIG,
    )
    assert list(names.values()) == [
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q",  # 1 + level 1 * 3 + layer 0
        "input_blocks.8.1.transformer_blocks.9.attn2.to_k",
        "middle_block.1.transformer_blocks.3.ff.net.2",
        "output_blocks.2.1.proj_out",
        "output_blocks.3.1.transformer_blocks.1.attn1.to_out.0",
        "input_blocks.2.0.in_layers.2",  # a resnet's conv1, renamed as its weight is
        "input_blocks.6.0.op",
        "output_blocks.2.2.conv",
        "label_emb.0.2",
    ]


@pytest.mark.parametrize("config", [SDXL_CONFIG, FOUR_LEVELS], ids=["sdxl-base", "four-levels"])
def test_every_unet_module_maps_to_original_and_back(config):
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)
    modules = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    originals = original_module_names(modules, config)
    assert len(set(originals.values())) == len(modules)  # no two modules share a name
    back = diffusers_module_names(originals.values(), config)
    assert {back[o]: d for d, o in originals.items()} == {d: d for d in modules}
    # kohya's underscored form reads back to the same dotted original name.
    for original in originals.values():
        assert module_from_kohya("lora_unet_" + original.replace(".", "_")) == original


def test_base_config_and_resolution_of_each_kind_of_source(tmp_path):
    assert base_unet_config("builtin:tiny-sdxl")["addition_embed_type"] == "text_time"
    assert base_unet_config("builtin:tiny-sd15").get("addition_embed_type") is None
    assert model_default_resolution("builtin:tiny-sdxl") == 32
    folder = tmp_path / "sdxl"
    load_pipeline("builtin:tiny-sdxl").save_pretrained(folder)
    assert base_unet_config(str(folder))["transformer_layers_per_block"] == [1, 2]
    single = tmp_path / "sdxl.safetensors"
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(2), "model.diffusion_model.out.2.bias": torch.zeros(2)}, str(single))
    assert base_unet_config(str(single))["cross_attention_dim"] == 2048  # read with the shipped SDXL configs
    assert model_default_resolution(str(single)) == 1024
    assert base_unet_config("nobody/not-cached-anywhere") is None


def test_a_bare_lora_with_a_block_sdxl_base_lacks_asks_for_the_base_model(tmp_path):
    from spotune.export import ExportError, export_checkpoint

    # An SDXL-refiner-like fourth level (down_blocks.3) that SDXL base's layout has no block for.
    module = "down_blocks.3.attentions.0.transformer_blocks.1.attn1.to_q"
    file = tmp_path / "refiner_lora.safetensors"
    save_file({f"unet.{module}.lora_A.weight": torch.ones(4, 8), f"unet.{module}.lora_B.weight": torch.ones(8, 4)}, str(file))
    with pytest.raises(ExportError, match="--base-model") as info:
        export_checkpoint(file, "webui", tmp_path / "out.safetensors")
    assert "refiner_lora.safetensors" in str(info.value) and "down_blocks.3.attentions.0" in str(info.value)
    assert not (tmp_path / "out.safetensors").exists()
