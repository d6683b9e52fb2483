"""Full-size SDXL from the shipped configs, on the meta device: every real module name and key maps.

* A rank-4 attention LoRA on SDXL base's UNet (2.6 B parameters in shape only) exported as a webui file:
  its 560 modules are kohya's SDXL names, which ComfyUI, webui and kohya map, with the shapes of the
  real modules; ComfyUI's patch of random fp16 base weights is base + (alpha / r) * up @ down.
* The sgm single-file layout of all four models (UNet, VAE, CLIP ViT-L, OpenCLIP bigG) is what
  diffusers' own single-file converters turn back into every key of the diffusers models, shapes equal,
  and what spotune's loader reads with nothing missing or left over.
"""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from client_rules import (
    comfy_load_lora,
    comfy_lora_key_map,
    comfy_patch,
    comfy_unet_config,
    comfy_unet_to_diffusers,
    kohya_dims_and_alphas,
    kohya_sdxl_unet_module_names,
    webui_layer_names,
    webui_load,
)
from export_helpers import LORA_ALPHA, LORA_RANK, write_checkpoint
from spotune.export import export_checkpoint, load_lora_file
from spotune.export.original_layout_sdxl import (
    SDXL_TEXT_ENCODER_2_PREFIX,
    clip_l_to_original,
    open_clip_to_original,
    sdxl_from_original,
    unet_vae_key_maps,
)
from spotune.models.lora import add_lora, lora_state_dict
from spotune.models.single_file_sdxl import sdxl_resources

HUB_ID = "stabilityai/stable-diffusion-xl-base-1.0"
# 70 transformer layers (level 1: 2 x 2, level 2: 2 x 10, mid 10, up: 3 x 10 + 3 x 2) x 2 attentions x 4.
SDXL_ATTENTION_MODULES = 70 * 2 * 4


def _config(name: str) -> dict:
    return json.loads((sdxl_resources() / name / "config.json").read_text())


def _meta_unet() -> UNet2DConditionModel:
    with init_empty_weights():
        return UNet2DConditionModel.from_config(_config("unet")).half()


@pytest.fixture(scope="module")
def sdxl_export(tmp_path_factory):
    adapted = _meta_unet()
    add_lora(adapted, rank=LORA_RANK, alpha=LORA_ALPHA)
    g = torch.Generator().manual_seed(0)
    lora = {k: 0.05 * torch.randn(v.shape, generator=g) for k, v in lora_state_dict(adapted).items()}
    run = tmp_path_factory.mktemp("full-size") / "sdxl-run"
    ckpt = write_checkpoint(run, 1, "lora", HUB_ID, {"lora.safetensors": lora})
    state = json.loads((ckpt / "state.json").read_text())
    state["config"]["resolution"] = 1024
    (ckpt / "state.json").write_text(json.dumps(state))
    out = export_checkpoint(run, "webui", run.parent / "sdxl-spo.safetensors")
    return run, out


def test_full_size_sdxl_webui_file_has_560_modules_every_client_maps(sdxl_export):
    run, out = sdxl_export
    config = _config("unet")
    tensors = load_file(str(out))
    modules = {k.split(".")[0] for k in tensors}
    assert len(modules) == SDXL_ATTENTION_MODULES and len(tensors) == 3 * SDXL_ATTENTION_MODULES
    assert "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_k" in modules
    assert "lora_unet_output_blocks_5_1_transformer_blocks_1_attn1_to_out_0" in modules

    shapes = {k: v.shape for k, v in _meta_unet().state_dict().items()}
    patches, not_loaded = comfy_load_lora(tensors, comfy_lora_key_map(config))
    assert not_loaded == [] and len(patches) == SDXL_ATTENTION_MODULES
    to_diffusers = {"diffusion_model." + l: d for d, l in comfy_unet_to_diffusers(comfy_unet_config(config)).items()}
    for weight_key, (up, down, _) in patches.items():
        assert shapes[to_diffusers[weight_key]] == (up.shape[0], down.shape[1]), weight_key
    matched, failed = webui_load(tensors, webui_layer_names(list(to_diffusers)))
    assert failed == [] and len(matched) == SDXL_ATTENTION_MODULES
    dims, alphas = kohya_dims_and_alphas(tensors)
    kohya_names = kohya_sdxl_unet_module_names()
    assert set(dims) == {n for n in kohya_names if n.endswith(("_to_q", "_to_k", "_to_v", "_to_out_0"))}
    assert set(alphas.values()) == {LORA_ALPHA}

    # ComfyUI's patch on random fp16 base weights (one module in ten: the arithmetic, not the names).
    trained = load_lora_file(run)
    g = torch.Generator().manual_seed(1)
    for weight_key, (up, down, alpha) in list(patches.items())[::10]:
        key = to_diffusers[weight_key]
        base = torch.randn(shapes[key], generator=g).half()
        expected = base.float() + trained.delta(key.removesuffix(".weight"))
        assert torch.allclose(comfy_patch(base, up, down, alpha), expected, atol=1e-4), key


def test_full_size_sdxl_metadata(sdxl_export):
    _, out = sdxl_export
    with safe_open(str(out), "pt") as handle:
        meta = handle.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.resolution"] == "1024x1024"
    assert meta["ss_sd_model_name"] == HUB_ID


def _meta_models() -> dict[str, torch.nn.Module]:
    with init_empty_weights():
        return {
            "unet": UNet2DConditionModel.from_config(_config("unet")),
            "vae": AutoencoderKL.from_config(_config("vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_dict(_config("text_encoder"))),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig.from_dict(_config("text_encoder_2"))),
        }


def test_full_size_sgm_layout_is_what_diffusers_converters_read_back():
    models = _meta_models()
    states = {name: model.state_dict() for name, model in models.items()}
    maps = unet_vae_key_maps(states["unet"], models["unet"].config, states["vae"], models["vae"].config)
    checkpoint = {new: states[c][old] for c in ("unet", "vae") for old, new in maps[c].items()}
    checkpoint.update(clip_l_to_original(states["text_encoder"]))
    checkpoint.update(open_clip_to_original(states["text_encoder_2"]))
    assert checkpoint[SDXL_TEXT_ENCODER_2_PREFIX + "transformer.resblocks.31.attn.in_proj_weight"].shape == (3840, 1280)

    converted = {
        "unet": convert_ldm_unet_checkpoint(checkpoint, dict(models["unet"].config)),
        "vae": convert_ldm_vae_checkpoint(checkpoint, dict(models["vae"].config)),
        "text_encoder": convert_ldm_clip_checkpoint(checkpoint),
        "text_encoder_2": convert_open_clip_checkpoint(models["text_encoder_2"], checkpoint, prefix=SDXL_TEXT_ENCODER_2_PREFIX),
    }
    strip = lambda keys: {k.removeprefix("text_model.") for k in keys}  # noqa: E731 (transformers 4 and 5 spellings)
    for name, state in states.items():
        got = converted[name]
        if name == "vae":  # diffusers keeps the VAE attention as 1x1 convolutions until it loads them
            got = {k: (v.flatten(1) if v.ndim == 4 and ".attentions." in k else v) for k, v in got.items()}
        expected = {k: v for k, v in state.items() if not k.endswith("position_ids")}
        assert strip(got) == strip(expected), (name, sorted(strip(got) ^ strip(expected))[:4])
        by_stripped = {k.removeprefix("text_model."): v for k, v in got.items()}
        for key, value in expected.items():
            assert by_stripped[key.removeprefix("text_model.")].shape == value.shape, (name, key)

    shapes = {name: {k: v.shape for k, v in state.items()} for name, state in states.items()}
    configs = {"unet": models["unet"].config, "vae": models["vae"].config}
    read, missing, known = sdxl_from_original(checkpoint, shapes, configs)
    assert all(not m for m in missing.values()), missing
    assert set(checkpoint) <= known
    for name, state in read.items():
        assert set(state) == {k for k in shapes[name] if not k.endswith("position_ids")}, name


def test_shipped_sdxl_folder_loads_as_a_diffusers_config_folder():
    folder = sdxl_resources()
    assert UNet2DConditionModel.load_config(str(folder), subfolder="unet")["addition_embed_type"] == "text_time"
    assert CLIPTextConfig.from_pretrained(str(folder), subfolder="text_encoder_2").hidden_size == 1280
    tokenizer_2 = CLIPTokenizer.from_pretrained(str(folder), subfolder="tokenizer_2", local_files_only=True)
    ids = tokenizer_2("a child and a penguin", padding="max_length", max_length=77).input_ids
    assert ids[0] == 49406 and 49407 in ids and ids[-1] == 0 and len(tokenizer_2) == 49408  # pads with "!" (id 0)
