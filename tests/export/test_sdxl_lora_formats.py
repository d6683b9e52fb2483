"""SDXL LoRA exports on the tiny SDXL model: kohya's SDXL names and metadata, and every client reads them.

The run (``sdxl_lora_run``, conftest) holds a rank-4, alpha-2 LoRA on ``builtin:tiny-sdxl``'s attention
projections, with two transformer layers per attention so that names like
``input_blocks_4_1_transformer_blocks_1`` occur. Each test applies an exported file the way one client
does and compares the UNet's output with the in-memory adapter's (fp32, 1e-4).
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file

from client_rules import (
    comfy_load_lora,
    comfy_lora_key_map,
    comfy_patch,
    comfy_unet_config,
    comfy_unet_to_diffusers,
    diffusers_delta,
    diffusers_scales_before_034,
    diffusers_scales_from_034,
    webui_layer_names,
    webui_load,
    webui_updown,
)
from export_helpers import LORA_ALPHA, LORA_RANK
from spotune.export import apply_lora, export_checkpoint, load_lora_file
from spotune.models.loading import load_pipeline

TINY_SDXL = "builtin:tiny-sdxl"
# kohya's SDXL naming: original-layout blocks, transformer layer, projection.
SDXL_KOHYA_KEY = re.compile(
    r"lora_unet_(input_blocks_\d+_1|middle_block_1|output_blocks_\d+_1)_transformer_blocks_\d+_(attn1|attn2)_"
    r"(to_q|to_k|to_v|to_out_0)\.(lora_down\.weight|lora_up\.weight|alpha)"
)
# tiny SDXL: level 1 (2 attentions x 2 layers), mid (2 layers), up level 0 (3 attentions x 2 layers).
TINY_SDXL_MODULES = (2 * 2 + 2 + 3 * 2) * 2 * 4


@pytest.fixture(scope="module")
def base_unet() -> UNet2DConditionModel:
    return load_pipeline(TINY_SDXL).unet.eval()


@pytest.fixture(scope="module")
def webui_file(sdxl_lora_run, tmp_path_factory):
    return export_checkpoint(sdxl_lora_run.run, "webui", tmp_path_factory.mktemp("sdxl") / "spo.safetensors", dtype="fp32")


def _output_with(unet, new_weights, probe) -> torch.Tensor:
    patched = UNet2DConditionModel.from_config(unet.config)
    patched.load_state_dict({**unet.state_dict(), **new_weights})
    return probe(patched)


def test_the_fixture_lora_changes_the_output(sdxl_lora_run):
    assert (sdxl_lora_run.expected - sdxl_lora_run.base_output).abs().max() > 1e-2


def test_webui_file_has_kohya_sdxl_names_and_metadata(webui_file, sdxl_lora_run):
    with safe_open(str(webui_file), "pt") as handle:
        keys, meta = set(handle.keys()), handle.metadata()
    assert all(SDXL_KOHYA_KEY.fullmatch(k) for k in keys), sorted(k for k in keys if not SDXL_KOHYA_KEY.fullmatch(k))[:3]
    assert len(keys) == 3 * TINY_SDXL_MODULES
    # down_blocks.1.attentions.0 is input block 1 + 1 * 3 + 0; up_blocks.0.attentions.2 output block 2.
    assert "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k.lora_down.weight" in keys
    assert "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_out_0.alpha" in keys
    assert "lora_unet_output_blocks_2_1_transformer_blocks_1_attn1_to_v.lora_up.weight" in keys
    assert not any(k.startswith(("lora_unet_down_blocks", "lora_unet_up_blocks", "lora_unet_mid_block")) for k in keys)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert meta["modelspec.resolution"] == "32x32"  # the run's resolution
    assert meta["ss_network_dim"] == str(LORA_RANK) and float(meta["ss_network_alpha"]) == LORA_ALPHA
    assert meta["ss_sd_model_name"] == TINY_SDXL


def test_comfyui_loads_every_key_and_patches_base_plus_scaled_update(webui_file, base_unet, sdxl_lora_run, sdxl_probe):
    tensors = load_file(str(webui_file))
    patches, not_loaded = comfy_load_lora(tensors, comfy_lora_key_map(base_unet.config))
    assert not_loaded == [] and len(patches) == TINY_SDXL_MODULES
    to_diffusers = {"diffusion_model." + l: d for d, l in comfy_unet_to_diffusers(comfy_unet_config(base_unet.config)).items()}
    state, reference = base_unet.state_dict(), load_lora_file(sdxl_lora_run.run)
    new = {}
    for weight_key, (up, down, alpha) in patches.items():
        key = to_diffusers[weight_key]
        new[key] = comfy_patch(state[key], up, down, alpha)
        assert torch.allclose(new[key], state[key] + reference.delta(key.removesuffix(".weight")), atol=1e-7), key
    assert (_output_with(base_unet, new, sdxl_probe) - sdxl_lora_run.expected).abs().max() < 1e-4
    # The control: the same file with one module's alpha doubled is off.
    first = next(iter(new))
    wrong = dict(new, **{first: state[first] + 2 * reference.delta(first.removesuffix(".weight"))})
    assert (_output_with(base_unet, wrong, sdxl_probe) - sdxl_lora_run.expected).abs().max() > 1e-3


def test_webui_matches_every_key_through_its_sdxl_fallback(webui_file, base_unet, sdxl_lora_run, sdxl_probe):
    tensors = load_file(str(webui_file))
    to_diffusers = {"diffusion_model." + l: d for d, l in comfy_unet_to_diffusers(comfy_unet_config(base_unet.config)).items()}
    layers = {k.removesuffix(".weight").replace(".", "_"): v for k, v in to_diffusers.items()}
    matched, failed = webui_load(tensors, webui_layer_names(list(to_diffusers)))
    assert failed == [] and len(matched) == TINY_SDXL_MODULES
    state = base_unet.state_dict()
    new = {}
    for layer, parts in matched.items():
        assert set(parts) == {"lora_up.weight", "lora_down.weight", "alpha"}
        key = layers[layer]
        new[key] = state[key] + webui_updown(parts, state[key].shape)
    assert (_output_with(base_unet, new, sdxl_probe) - sdxl_lora_run.expected).abs().max() < 1e-4


def test_webui_file_loads_in_diffusers_sdxl_pipeline(webui_file, sdxl_lora_run, sdxl_probe):
    pipe = load_pipeline(TINY_SDXL)
    pipe.load_lora_weights(str(webui_file))  # diffusers' own kohya-SDXL converter
    assert (sdxl_probe(pipe.unet) - sdxl_lora_run.expected).abs().max() < 1e-4


def test_webui_file_reads_back_and_applies_equal(webui_file, sdxl_lora_run, sdxl_probe):
    weights = load_lora_file(webui_file)
    assert weights.layout == "original" and weights.source_format == "webui"
    assert (weights.rank, weights.alpha) == (LORA_RANK, LORA_ALPHA)
    for fuse in (False, True):
        unet = load_pipeline(TINY_SDXL).unet
        apply_lora(unet, weights, fuse=fuse)
        assert (sdxl_probe(unet) - sdxl_lora_run.expected).abs().max() < 1e-4, fuse


@pytest.mark.parametrize("name", ["lora-folder", "spo_diffusers.safetensors"])
def test_diffusers_export_loads_in_diffusers_sdxl_pipeline(sdxl_lora_run, sdxl_probe, tmp_path, name):
    out = export_checkpoint(sdxl_lora_run.checkpoint, "diffusers", tmp_path / name, dtype="fp32")
    pipe = load_pipeline(TINY_SDXL)
    pipe.load_lora_weights(str(out))
    assert (sdxl_probe(pipe.unet) - sdxl_lora_run.expected).abs().max() < 1e-4


def test_diffusers_file_is_sdxl_save_lora_weights_layout_and_version_proof(sdxl_lora_run, base_unet, sdxl_probe, tmp_path):
    ours = export_checkpoint(sdxl_lora_run.run, "diffusers", tmp_path / "ours", dtype="fp32") / "pytorch_lora_weights.safetensors"
    StableDiffusionXLPipeline.save_lora_weights(tmp_path / "theirs", unet_lora_layers=sdxl_lora_run.lora)
    theirs = load_file(str(tmp_path / "theirs" / "pytorch_lora_weights.safetensors"))
    mine = load_file(str(ours))
    assert set(mine) == set(theirs)
    with safe_open(str(ours), "pt") as handle:
        metadata = handle.metadata()
    assert json.loads(metadata["lora_adapter_metadata"])["unet.r"] == LORA_RANK
    state = base_unet.state_dict()
    for scales in (diffusers_scales_before_034(mine), diffusers_scales_from_034(mine, metadata)):
        new = {f"{m}.weight": state[f"{m}.weight"] + diffusers_delta(mine, m, s) for m, s in scales.items()}
        assert (_output_with(base_unet, new, sdxl_probe) - sdxl_lora_run.expected).abs().max() < 1e-4


def test_webui_and_diffusers_exports_convert_into_each_other(webui_file, sdxl_lora_run, tmp_path):
    # A bare SDXL kohya file (no run, no --base-model) to diffusers and back: names read against SDXL's layout.
    diffusers_out = export_checkpoint(webui_file, "diffusers", tmp_path / "d.safetensors", dtype="fp32")
    again = export_checkpoint(diffusers_out, "webui", tmp_path / "w.safetensors", dtype="fp32")
    assert set(load_file(str(again))) == set(load_file(str(webui_file)))
    reference = load_lora_file(sdxl_lora_run.run)
    back = load_lora_file(diffusers_out)
    assert back.layout == "diffusers" and back.modules == reference.modules
    for module in reference.modules:
        assert torch.allclose(back.delta(module), reference.delta(module), atol=1e-6), module
    with safe_open(str(again), "pt") as handle:
        meta = handle.metadata()
    # No run: the family's own size, SDXL's 1024.
    assert meta["modelspec.resolution"] == "1024x1024" and meta["ss_base_model_version"] == "sdxl_base_v1-0"
