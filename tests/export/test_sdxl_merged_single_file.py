"""SDXL merged pipeline folders and single files: both text encoders, read back by diffusers and by spotune.

The single file is SDXL's sgm layout (``conditioner.embedders.0/1``); diffusers'
``StableDiffusionXLPipeline.from_single_file(file, config=folder, local_files_only=True)`` and
:func:`load_sdxl_single_file` read it back with every model's weights equal. diffusers tells SDXL's two
text encoders apart by width (768 vs 1280); the builtin tiny SDXL has both 32 wide, so its second
encoder is checked through spotune's loader, and a variant with a 48-wide second encoder checks it
through diffusers as well.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModelWithProjection

from spotune.export import export_checkpoint
from spotune.export.original_layout_sdxl import to_original_sdxl
from spotune.models.loading import load_pipeline
from spotune.models.single_file import SingleFileError
from spotune.models.single_file_sdxl import load_sdxl_single_file, sdxl_resources
from spotune.models.tiny import tiny_text_config

TINY_SDXL = "builtin:tiny-sdxl"
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _config_folder(pipe, folder):
    """``pipe``'s configs and tokenizers without weights: what a single file is read with."""
    pipe.save_pretrained(folder)
    for file in folder.rglob("*.safetensors"):
        file.unlink()
    return folder


def _assert_equal_models(expected, got, names=COMPONENTS):
    for name in names:
        a, b = getattr(expected, name).state_dict(), getattr(got, name).state_dict()
        assert set(a) == set(b), (name, sorted(set(a) ^ set(b))[:3])
        for key in a:
            assert torch.allclose(a[key].float(), b[key].float(), atol=1e-5), (name, key)


def test_merged_folder_loads_with_from_pretrained_and_matches(sdxl_lora_run, sdxl_probe, tmp_path):
    out = export_checkpoint(sdxl_lora_run.run, "merged", tmp_path / "merged", dtype="fp32")
    assert {"text_encoder_2", "tokenizer_2"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    pipe = StableDiffusionXLPipeline.from_pretrained(str(out), local_files_only=True)
    assert (sdxl_probe(pipe.unet) - sdxl_lora_run.expected).abs().max() < 1e-4
    base = load_pipeline(TINY_SDXL)
    _assert_equal_models(base, pipe, ("vae", "text_encoder", "text_encoder_2"))
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.pad_token == base.tokenizer.pad_token
    # transformers 4 reads both text encoders only with text_model.-prefixed keys and the slow tokenizers' files.
    for name in ("text_encoder", "text_encoder_2"):
        keys = load_file(str(out / name / "model.safetensors")).keys()
        assert all(k.startswith(("text_model.", "text_projection.")) for k in keys), name
    for name in ("tokenizer", "tokenizer_2"):
        assert (out / name / "vocab.json").is_file() and (out / name / "merges.txt").is_file()


def test_single_file_has_sgm_keys_and_reads_back_through_both_loaders(sdxl_lora_run, sdxl_probe, tmp_path):
    out = export_checkpoint(sdxl_lora_run.run, "single-file", tmp_path / "spo_sdxl.safetensors", dtype="fp32")
    with safe_open(str(out), "pt") as handle:
        keys, meta = set(handle.keys()), handle.metadata()
    for prefix in ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer.text_model.",
                   "conditioner.embedders.1.model."):
        assert any(k.startswith(prefix) for k in keys), prefix
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    assert "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight" in keys
    # The two keys SDXL base carries beside the models' weights (clients that list missing keys list none).
    assert {"conditioner.embedders.0.transformer.text_model.embeddings.position_ids", "conditioner.embedders.1.model.logit_scale"} <= keys
    assert not any(k.startswith("cond_stage_model.") for k in keys)
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert meta["modelspec.resolution"] == "32x32"

    base = load_pipeline(TINY_SDXL)
    folder = _config_folder(base, tmp_path / "configs")
    ours = load_sdxl_single_file(out, config_folder=folder)
    assert (sdxl_probe(ours.unet) - sdxl_lora_run.expected).abs().max() < 1e-4
    _assert_equal_models(base, ours, ("vae", "text_encoder", "text_encoder_2"))
    assert ours.tokenizer_2.pad_token == "!"
    theirs = StableDiffusionXLPipeline.from_single_file(str(out), config=str(folder), local_files_only=True)
    assert (sdxl_probe(theirs.unet) - sdxl_lora_run.expected).abs().max() < 1e-4
    _assert_equal_models(base, theirs, ("vae", "text_encoder"))


def test_diffusers_reads_both_text_encoders_when_their_widths_differ(tmp_path):
    pipe = load_pipeline(TINY_SDXL)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        config = tiny_text_config(pipe.tokenizer_2, hidden_size=48)
        config.projection_dim = 40  # the projection is not square: its transpose is checked
        pipe.text_encoder_2 = CLIPTextModelWithProjection(config)
        unet_config = dict(pipe.unet.config, cross_attention_dim=32 + 48, projection_class_embeddings_input_dim=40 + 6 * 8)
        pipe.unet = UNet2DConditionModel.from_config(unet_config)
    file = tmp_path / "wide.safetensors"
    save_file(to_original_sdxl(pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2), str(file))
    folder = _config_folder(pipe, tmp_path / "configs")
    for loaded in (
        StableDiffusionXLPipeline.from_single_file(str(file), config=str(folder), local_files_only=True),
        load_sdxl_single_file(file, config_folder=folder),
    ):
        _assert_equal_models(pipe, loaded)
        ids = pipe.tokenizer_2(["a red circle"], padding="max_length", return_tensors="pt").input_ids
        with torch.no_grad():
            assert torch.allclose(loaded.text_encoder_2(ids)[0], pipe.text_encoder_2(ids)[0], atol=1e-5)


def test_a_missing_second_text_encoder_is_one_error_naming_it(tmp_path):
    pipe = load_pipeline(TINY_SDXL)
    tensors = to_original_sdxl(pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)
    file = tmp_path / "no-te2.safetensors"
    save_file({k: v for k, v in tensors.items() if not k.startswith("conditioner.embedders.1.")}, str(file))
    with pytest.raises(SingleFileError, match="second text encoder") as info:
        load_sdxl_single_file(file, config_folder=_config_folder(pipe, tmp_path / "configs"))
    assert "no-te2.safetensors" in str(info.value) and "conditioner.embedders.1.model." in str(info.value)


def test_a_tensor_of_the_wrong_shape_names_its_key(tmp_path):
    pipe = load_pipeline(TINY_SDXL)
    tensors = to_original_sdxl(pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)
    key = "conditioner.embedders.1.model.text_projection"
    tensors[key] = torch.zeros(32, 16)
    file = tmp_path / "bad.safetensors"
    save_file(tensors, str(file))
    with pytest.raises(SingleFileError) as info:
        load_sdxl_single_file(file, config_folder=_config_folder(pipe, tmp_path / "configs"))
    assert key in str(info.value) and "bad.safetensors" in str(info.value)


def test_shipped_sdxl_configs_are_sdxl_base_1_0():
    folder = sdxl_resources()
    unet = json.loads((folder / "unet" / "config.json").read_text())
    assert unet["block_out_channels"] == [320, 640, 1280] and unet["transformer_layers_per_block"] == [1, 2, 10]
    assert unet["cross_attention_dim"] == 2048 and unet["projection_class_embeddings_input_dim"] == 2816
    assert unet["addition_embed_type"] == "text_time" and unet["addition_time_embed_dim"] == 256
    # 2816 = text_encoder_2's projection (1280) + 6 time ids x 256.
    te2 = json.loads((folder / "text_encoder_2" / "config.json").read_text())
    assert te2["projection_dim"] + 6 * unet["addition_time_embed_dim"] == unet["projection_class_embeddings_input_dim"]
    te1 = json.loads((folder / "text_encoder" / "config.json").read_text())
    assert te1["hidden_size"] + te2["hidden_size"] == unet["cross_attention_dim"]
    vae = json.loads((folder / "vae" / "config.json").read_text())
    assert vae["scaling_factor"] == 0.13025 and vae["force_upcast"] is True
    assert unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1) == 1024
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    # Both tokenizers are CLIP's BPE, derived from the same shipped merges file as SD1.5's.
    sd15 = folder.parent / "sd15" / "tokenizer"
    for name in ("tokenizer", "tokenizer_2"):
        for file in ("vocab.json", "merges.txt"):
            assert (folder / name / file).read_bytes() == (sd15 / file).read_bytes(), (name, file)
    assert json.loads((folder / "tokenizer_2" / "tokenizer_config.json").read_text())["pad_token"] == "!"
