"""Original-layout SD1.5 checkpoints: shipped configs, the CLIP tokenizer, loading, and clear refusals."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import save_file

from spotune.export.original_layout import original_key_maps, to_original
from spotune.models.loading import ModelLoadError, load_pipeline
from spotune.models.single_file import (
    CLIP_BPE_SHA256,
    SingleFileError,
    _clip_bpe_path,
    _empty_models,
    build_sd15_tokenizer,
    load_component_configs,
    load_single_file_pipeline,
    sd15_resources,
)
from spotune.models.tiny import build_tiny_text_encoder, build_tiny_tokenizer, sd15_ddim_scheduler


def _sd15_shaped_tiny_pipeline() -> StableDiffusionPipeline:
    """SD1.5's block structure (4 levels, 2 layers per block) at toy width."""
    torch.manual_seed(3)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(8, 16, 16, 16), layers_per_block=2, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=2, norm_num_groups=4,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, norm_num_groups=4, latent_channels=4,
    )
    tokenizer = build_tiny_tokenizer()
    return StableDiffusionPipeline(
        vae=vae, text_encoder=build_tiny_text_encoder(tokenizer, 4), tokenizer=tokenizer, unet=unet,
        scheduler=sd15_ddim_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(pipeline, its diffusers folder, its original-layout state dict)."""
    pipe = _sd15_shaped_tiny_pipeline()
    folder = tmp_path_factory.mktemp("tiny-sd15-shaped")
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe, folder, to_original(pipe.unet, pipe.vae, pipe.text_encoder)


def _assert_same_models(a: StableDiffusionPipeline, b: StableDiffusionPipeline) -> None:
    for name in ("unet", "vae", "text_encoder"):
        left, right = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert set(left) == set(right), name
        for key in left:
            assert torch.equal(left[key], right[key]), f"{name}: {key}"


# -- shipped SD1.5 configs and tokenizer -------------------------------------------------------------


def test_shipped_configs_build_sd15_at_its_published_size():
    unet, vae, text = _empty_models(load_component_configs(sd15_resources()))
    counts = [sum(p.numel() for p in m.parameters()) for m in (unet, vae, text)]
    assert counts == [859_520_964, 83_653_863, 123_060_480]


def test_sd15_key_mapping_gives_the_original_names():
    configs = load_component_configs(sd15_resources())
    unet, vae, text = _empty_models(configs)
    maps = original_key_maps(unet.state_dict(), configs["unet"], vae.state_dict(), configs["vae"], text.state_dict())
    keys = {v for m in maps.values() for v in m.values()}
    assert [len(m) for m in maps.values()] == [686, 248, 196]
    assert len(keys) == 686 + 248 + 196  # the mapping is one-to-one
    for key in (
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight",
        "model.diffusion_model.input_blocks.8.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.input_blocks.11.0.out_layers.3.weight",
        "model.diffusion_model.middle_block.1.proj_out.weight",
        "model.diffusion_model.middle_block.2.emb_layers.1.bias",
        "model.diffusion_model.output_blocks.2.1.conv.weight",
        "model.diffusion_model.output_blocks.5.2.conv.weight",
        "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight",
        "model.diffusion_model.time_embed.2.weight",
        "model.diffusion_model.out.2.bias",
        "first_stage_model.encoder.down.0.block.1.norm1.weight",
        "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
        "first_stage_model.encoder.mid.attn_1.q.weight",
        "first_stage_model.decoder.up.0.block.2.conv2.weight",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
        "first_stage_model.post_quant_conv.weight",
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight",
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
    ):
        assert key in keys, key
    assert not any("output_blocks.12" in k or "input_blocks.12" in k for k in keys)


def test_the_shipped_bpe_file_is_clips_and_gives_clips_token_ids():
    assert hashlib.sha256(_clip_bpe_path().read_bytes()).hexdigest() == CLIP_BPE_SHA256
    tokenizer = build_sd15_tokenizer()
    assert len(tokenizer) == 49408 and tokenizer.model_max_length == 77
    # Token ids of CLIP ViT-L/14 (the ids SD1.5's text encoder was trained on).
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer("An astronaut riding a horse on Mars!").input_ids[1:-1] == [550, 18376, 6765, 320, 4558, 525, 7496, 256]
    padded = tokenizer("a cat", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[3:] == [49407] * 74


# -- loading -----------------------------------------------------------------------------------------


def test_safetensors_round_trip_is_exact(tiny, tmp_path):
    pipe, folder, original = tiny
    file = tmp_path / "tiny.safetensors"
    save_file(original, str(file))
    loaded = load_single_file_pipeline(file, config_folder=folder)
    _assert_same_models(pipe, loaded)
    assert loaded.tokenizer("a cat").input_ids == pipe.tokenizer("a cat").input_ids  # config_folder/tokenizer


def test_ckpt_with_state_dict_nesting_and_fp16(tiny, tmp_path):
    pipe, folder, original = tiny
    file = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": {k: v.half() if v.is_floating_point() else v for k, v in original.items()}, "epoch": 3}, file)
    loaded = load_single_file_pipeline(file, config_folder=folder, tokenizer_path=folder / "tokenizer")
    assert all(p.dtype == torch.float32 for p in loaded.unet.parameters())
    x, c = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    with torch.no_grad():
        assert (loaded.unet(x, 10, c).sample - pipe.unet(x, 10, c).sample).abs().max() < 5e-3


def test_old_text_encoder_names_without_text_model_are_read(tiny, tmp_path):
    pipe, folder, original = tiny
    old = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v for k, v in original.items()}
    file = tmp_path / "old.safetensors"
    save_file(old, str(file))
    _assert_same_models(pipe, load_single_file_pipeline(file, config_folder=folder))


def _refused(file, match, **kwargs):
    with pytest.raises(SingleFileError, match=match) as info:
        load_single_file_pipeline(file, **kwargs)
    assert file.name in str(info.value)
    return str(info.value)


def test_corrupt_file_is_named(tmp_path):
    file = tmp_path / "corrupt.safetensors"
    file.write_bytes(os.urandom(64))
    _refused(file, "cannot read")
    pickle = tmp_path / "corrupt.ckpt"
    pickle.write_bytes(b"not a zip and not a pickle")
    _refused(pickle, "cannot read")


def test_other_architectures_are_refused(tmp_path):
    cases = {
        "sdxl": ({"conditioner.embedders.0.transformer.text_model.x": torch.zeros(1), "model.diffusion_model.x": torch.zeros(1)}, "SDXL"),
        "sd2": ({"cond_stage_model.model.ln_final.weight": torch.zeros(1), "model.diffusion_model.x": torch.zeros(1)}, "SD 2"),
        "lora": ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(1)}, "LoRA"),
        "other": ({"weight": torch.zeros(1)}, "not an original-layout"),
        "novae": ({"model.diffusion_model.x": torch.zeros(1), "cond_stage_model.transformer.x": torch.zeros(1)}, "no VAE"),
    }
    for name, (tensors, match) in cases.items():
        file = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(file))
        _refused(file, match)


def test_a_file_of_another_size_names_the_key(tiny, tmp_path):
    _, _, original = tiny
    file = tmp_path / "tiny.safetensors"
    save_file(original, str(file))
    message = _refused(file, "shape")  # the shipped SD1.5 configs are 40x wider
    assert "model.diffusion_model." in message or "first_stage_model." in message


def test_missing_and_extra_keys_are_named(tiny, tmp_path):
    pipe, folder, original = tiny
    missing = dict(original)
    del missing["model.diffusion_model.out.2.bias"]
    file = tmp_path / "missing.safetensors"
    save_file(missing, str(file))
    assert "model.diffusion_model.out.2.bias" in _refused(file, "missing", config_folder=folder)
    extra = {**original, "model.diffusion_model.input_blocks.12.0.op.weight": torch.zeros(1)}
    file = tmp_path / "extra.safetensors"
    save_file(extra, str(file))
    assert "input_blocks.12" in _refused(file, "not part of the model", config_folder=folder)


def test_load_pipeline_routes_single_files_here(tiny, tmp_path):
    _, _, original = tiny
    file = tmp_path / "tiny.safetensors"
    save_file(original, str(file))
    with pytest.raises(ModelLoadError, match="tiny.safetensors"):
        load_pipeline(str(file))  # shipped SD1.5 configs; the tiny file does not fit them


@pytest.mark.real_weights
@pytest.mark.skipif(not os.environ.get("SPOTUNE_SD15_FILE"), reason="set SPOTUNE_SD15_FILE to an SD1.5 .safetensors")
def test_real_sd15_file_loads_and_denoises():
    pipe = load_pipeline(os.environ["SPOTUNE_SD15_FILE"])
    image = pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, output_type="pt").images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()


def test_round_trip_of_a_different_block_structure(tmp_path):
    """The mapping follows the config: the two-level, one-layer builtin tiny model round-trips too."""
    from spotune.models.tiny import build_tiny_sd15_pipeline

    pipe = build_tiny_sd15_pipeline(seed=5)
    pipe.save_pretrained(tmp_path / "cfg", safe_serialization=True)
    file = tmp_path / "builtin.safetensors"
    save_file(to_original(pipe.unet, pipe.vae, pipe.text_encoder), str(file))
    _assert_same_models(pipe, load_single_file_pipeline(file, config_folder=tmp_path / "cfg"))
