"""A rank-4 attention LoRA on the full-size SD1.5 UNet (the shipped config): the webui file every client maps.

The UNet is built on the meta device (SD1.5's 860 M parameters in shape only), so the LoRA has the
real module names and shapes at no memory cost; the base weights that the clients patch are drawn at
random in fp16 for the adapted modules only.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save

from client_rules import (
    comfy_load_lora,
    comfy_lora_key_map,
    comfy_patch,
    comfy_unet_config,
    comfy_unet_to_diffusers,
    kohya_dims_and_alphas,
    kohya_unet_module_names,
    webui_layer_names,
    webui_load,
)
from export_helpers import LORA_ALPHA, LORA_RANK, write_checkpoint
from spotune.export import export_checkpoint, load_lora_file
from spotune.models.lora import add_lora, lora_state_dict
from spotune.models.single_file import sd15_resources

HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SD15_ATTENTION_MODULES = 16 * 2 * 4  # transformer blocks x (attn1, attn2) x (to_q, to_k, to_v, to_out.0)


def _meta_unet(config: dict) -> UNet2DConditionModel:
    with init_empty_weights():
        return UNet2DConditionModel.from_config(config).half()


@pytest.fixture(scope="module")
def sd15_export(tmp_path_factory):
    config = json.loads((sd15_resources() / "unet" / "config.json").read_text())
    adapted = _meta_unet(config)
    add_lora(adapted, rank=LORA_RANK, alpha=LORA_ALPHA)
    g = torch.Generator().manual_seed(0)
    lora = {k: 0.05 * torch.randn(v.shape, generator=g) for k, v in lora_state_dict(adapted).items()}
    run = tmp_path_factory.mktemp("full-size") / "sd15-run"
    ckpt = write_checkpoint(run, 1, "lora", HUB_ID, {"lora.safetensors": lora})
    state = json.loads((ckpt / "state.json").read_text())
    state["config"]["resolution"] = None  # SD1.5's own 512, from the model
    (ckpt / "state.json").write_text(json.dumps(state))
    out = export_checkpoint(run, "webui", run.parent / "sd15-spo.safetensors")
    return config, run, out


def test_full_size_webui_file_has_128_modules_and_every_client_maps_them(sd15_export):
    config, run, out = sd15_export
    tensors = load_file(str(out))
    modules = {k.split(".")[0] for k in tensors}
    assert len(modules) == SD15_ATTENTION_MODULES and len(tensors) == 3 * SD15_ATTENTION_MODULES
    assert all(tensors[f"{m}.lora_down.weight"].shape[0] == LORA_RANK for m in modules)

    plain = _meta_unet(config)
    shapes = {k: v.shape for k, v in plain.state_dict().items()}
    patches, not_loaded = comfy_load_lora(tensors, comfy_lora_key_map(config))
    assert not_loaded == [] and len(patches) == SD15_ATTENTION_MODULES
    to_diffusers = {"diffusion_model." + l: d for d, l in comfy_unet_to_diffusers(comfy_unet_config(config)).items()}
    for weight_key, (up, down, _) in patches.items():
        assert shapes[to_diffusers[weight_key]] == (up.shape[0], down.shape[1]), weight_key
    matched, failed = webui_load(tensors, webui_layer_names(list(to_diffusers)))
    assert failed == [] and len(matched) == SD15_ATTENTION_MODULES
    dims, alphas = kohya_dims_and_alphas(tensors)
    assert set(dims) <= kohya_unet_module_names(plain) and set(alphas.values()) == {LORA_ALPHA}

    # The patch ComfyUI applies to random fp16 base weights is base + (alpha / r) * up @ down of the run.
    trained = load_lora_file(run)
    g = torch.Generator().manual_seed(1)
    for weight_key, (up, down, alpha) in patches.items():
        key = to_diffusers[weight_key]
        base = torch.randn(shapes[key], generator=g).half()
        expected = base.float() + trained.delta(key.removesuffix(".weight"))
        assert torch.allclose(comfy_patch(base, up, down, alpha), expected, atol=1e-4), key


def test_full_size_metadata_and_kohya_hashes(sd15_export):
    _, _, out = sd15_export
    with safe_open(str(out), "pt") as handle:
        meta = handle.metadata()
    assert meta["ss_network_dim"] == str(LORA_RANK) and float(meta["ss_network_alpha"]) == LORA_ALPHA
    assert meta["modelspec.resolution"] == "512x512"
    assert meta["ss_sd_model_name"] == HUB_ID and HUB_ID in meta["modelspec.description"]
    data = out.read_bytes()
    assert len(data) > 0x110000  # the legacy hash reads real tensor bytes here
    header = 8 + int.from_bytes(data[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(data[header:]).hexdigest()
    ss_only = save(load_file(str(out)), {k: v for k, v in meta.items() if k.startswith("ss_")})
    assert meta["sshs_legacy_hash"] == hashlib.sha256(ss_only[0x100000:0x110000]).hexdigest()[:8]
    assert meta["sshs_legacy_hash"] != hashlib.sha256(b"").hexdigest()[:8]
