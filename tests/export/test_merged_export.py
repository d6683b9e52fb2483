"""Merged pipeline and single-file exports carry the trained UNet; the single file reads back exactly."""

from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file

from spotune.export import export_checkpoint
from spotune.models.loading import load_pipeline
from spotune.models.single_file import load_single_file_pipeline


def test_merged_pipeline_unet_matches_the_adapter(lora_run, probe, tmp_path):
    out = export_checkpoint(lora_run.run, "merged", tmp_path / "merged", dtype="fp32")
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    assert not getattr(pipe.unet, "peft_config", None)  # fused: a plain UNet, usable anywhere
    assert (probe(pipe.unet) - lora_run.expected).abs().max() < 1e-4


def test_merged_default_dtype_is_fp16(lora_run, tmp_path):
    out = export_checkpoint(lora_run.run, "merged", tmp_path / "merged16")
    weights = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in weights.values()} == {torch.float16}


def test_full_finetune_merges_the_trained_unet(full_run, probe, tmp_path):
    out = export_checkpoint(full_run.run, "merged", tmp_path / "full", dtype="fp32")
    pipe = load_pipeline(str(out))
    assert (probe(pipe.unet) - full_run.expected).abs().max() < 1e-5
    assert (full_run.expected - full_run.base_output).abs().max() > 1e-2


def test_base_model_override_is_used(lora_run, tmp_path):
    missing = tmp_path / "no-such-model"
    try:
        export_checkpoint(lora_run.run, "merged", tmp_path / "m", base_model=str(missing))
    except Exception as exc:  # the error must come from loading the override, not the recorded base
        assert str(missing) in str(exc)
    else:
        raise AssertionError("a missing base model override was not used")
    assert not (tmp_path / "m").exists()


def test_single_file_round_trip(lora_run, base_dir, probe, tmp_path):
    out = export_checkpoint(lora_run.run, "single-file", tmp_path / "spo-merged.safetensors", dtype="fp32")
    with safe_open(str(out), "pt") as handle:
        keys = list(handle.keys())
        meta = handle.metadata()
    assert any(k.startswith("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.") for k in keys)
    assert "first_stage_model.decoder.up.3.block.2.conv2.weight" in keys
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in keys
    assert meta["modelspec.architecture"] == "stable-diffusion-v1"

    loaded = load_single_file_pipeline(out, config_folder=base_dir)
    assert (probe(loaded.unet) - lora_run.expected).abs().max() < 1e-4

    base = load_pipeline(str(base_dir))
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ids = base.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(loaded.vae.encode(image).latent_dist.mean, base.vae.encode(image).latent_dist.mean, atol=1e-5)
        latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
        assert torch.allclose(loaded.vae.decode(latents).sample, base.vae.decode(latents).sample, atol=1e-5)
        assert torch.allclose(loaded.text_encoder(ids)[0], base.text_encoder(ids)[0], atol=1e-5)


def test_single_file_agrees_with_diffusers_own_converter(lora_run, base_dir, tmp_path):
    """diffusers' LDM->diffusers conversion of our file gives back the merged weights key for key."""
    out = export_checkpoint(lora_run.run, "single-file", tmp_path / "m.safetensors", dtype="fp32")
    merged = load_pipeline(str(export_checkpoint(lora_run.run, "merged", tmp_path / "m", dtype="fp32")))
    checkpoint = load_file(str(out))
    for converted, model in (
        (convert_ldm_unet_checkpoint(checkpoint, merged.unet.config), merged.unet),
        (convert_ldm_vae_checkpoint(checkpoint, merged.vae.config), merged.vae),
    ):
        expected = model.state_dict()
        assert set(converted) == set(expected)
        for key, value in expected.items():
            assert torch.equal(converted[key].reshape(value.shape), value), key


def test_merged_text_encoder_has_transformers_4_names_and_loads_unchanged(lora_run, base_dir, tmp_path):
    from transformers import CLIPTextModel

    out = export_checkpoint(lora_run.run, "merged", tmp_path / "merged", dtype="fp32")
    files = sorted((out / "text_encoder").glob("*.safetensors"))
    assert files
    for file in files:
        with safe_open(str(file), "pt") as handle:
            keys = list(handle.keys())
        # transformers 4 finds nothing without the prefix and silently initialises the encoder at random.
        assert keys and all(k.startswith("text_model.") for k in keys), keys[:3]
    loaded, info = CLIPTextModel.from_pretrained(out / "text_encoder", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    base = load_pipeline(str(base_dir)).text_encoder
    ids = torch.tensor([[1, 5, 9, 2] + [0] * 4])
    with torch.no_grad():
        assert torch.equal(loaded(ids)[0], base(ids)[0])


def test_merged_tokenizer_loads_from_vocab_and_merges_alone(lora_run, base_dir, tmp_path):
    import shutil

    from transformers import CLIPTokenizer

    out = export_checkpoint(lora_run.run, "merged", tmp_path / "merged", dtype="fp32")
    assert (out / "tokenizer" / "vocab.json").is_file() and (out / "tokenizer" / "merges.txt").is_file()
    assert (out / "tokenizer" / "merges.txt").read_text(encoding="utf-8").startswith("#version: 0.2\n")
    # What the slow CLIPTokenizer of transformers 4 reads: the folder without tokenizer.json.
    slow_only = tmp_path / "slow"
    shutil.copytree(out / "tokenizer", slow_only)
    (slow_only / "tokenizer.json").unlink()
    slow = CLIPTokenizer.from_pretrained(str(slow_only), local_files_only=True)
    fast = CLIPTokenizer.from_pretrained(str(out / "tokenizer"), local_files_only=True)
    assert slow.get_vocab() == fast.get_vocab()
    for prompt in ("a red circle on a blue background", "Déjà vu, 4K!!", ""):
        assert slow(prompt).input_ids == fast(prompt).input_ids == load_pipeline(str(base_dir)).tokenizer(prompt).input_ids
