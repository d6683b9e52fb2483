"""load_pipeline for SDXL: family detection, model_family=, vae=, the VAE's precision, hub ids, single files."""

from __future__ import annotations

import json
import shutil
import sys
import types

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import save_file

from spotune.models.family import SD15, SDXL, FamilyError, ResolutionError, family_of, resolve_resolution
from spotune.models.loading import (
    BUILTIN_TINY_SD15,
    BUILTIN_TINY_SDXL,
    ModelLoadError,
    folder_family,
    load_pipeline,
    single_file_family,
)
from spotune.models.tiny import SDXL_VAE_SCALING_FACTOR, build_tiny_sdxl_pipeline, build_tiny_vae


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sdxl")
    build_tiny_sdxl_pipeline().save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def sd15_vae_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd15-vae")
    build_tiny_vae(5).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def fp16_fix_vae_dir(tmp_path_factory):
    """An SDXL-scaled VAE that does not ask for fp32, as madebyollin/sdxl-vae-fp16-fix's config says."""
    folder = tmp_path_factory.mktemp("sdxl-vae-fp16-fix")
    build_tiny_vae(7, scaling_factor=SDXL_VAE_SCALING_FACTOR, force_upcast=False).save_pretrained(folder)
    return folder


def sdxl_unet_out(pipe) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    emb, pooled = torch.randn(2, 77, 64, generator=gen), torch.randn(2, 32, generator=gen)
    time_ids = torch.tensor([[32.0, 32, 0, 0, 32, 32]]).repeat(2, 1)
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([500, 20]), emb, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample


def test_sdxl_folder_round_trip_gives_the_same_model(sdxl_dir):
    built = load_pipeline(BUILTIN_TINY_SDXL)
    loaded = load_pipeline(str(sdxl_dir))
    assert isinstance(loaded, StableDiffusionXLPipeline) and family_of(loaded) is SDXL
    torch.testing.assert_close(sdxl_unet_out(loaded), sdxl_unet_out(built), rtol=0, atol=0)
    ids = loaded.tokenizer_2(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(loaded.text_encoder_2(ids)[0], built.text_encoder_2(ids)[0], rtol=0, atol=0)


def test_family_detection_of_folders_and_builtins(sdxl_dir, tiny_pipeline_dir, tmp_path):
    assert folder_family(sdxl_dir) is SDXL and folder_family(tiny_pipeline_dir) is SD15
    assert family_of(load_pipeline(BUILTIN_TINY_SD15)) is SD15
    assert isinstance(load_pipeline(str(tiny_pipeline_dir)), StableDiffusionPipeline)
    # Each sign alone is enough: the pipeline class, a listed text_encoder_2, the UNet's text_time embedding.
    for index, unet in (
        ({"_class_name": "StableDiffusionXLPipeline"}, {}),
        ({"_class_name": "DiffusionPipeline", "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}, {}),
        ({"_class_name": "DiffusionPipeline"}, {"addition_embed_type": "text_time"}),
    ):
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        (folder / "unet").mkdir(parents=True)
        (folder / "model_index.json").write_text(json.dumps(index))
        (folder / "unet" / "config.json").write_text(json.dumps(unet))
        assert folder_family(folder) is SDXL, index


def test_forcing_the_other_family_names_both(sdxl_dir, tiny_pipeline_dir):
    with pytest.raises(FamilyError, match=r"is an SDXL model but model_family=sd15 asks for an SD1\.5-family model"):
        load_pipeline(str(sdxl_dir), model_family="sd15")
    with pytest.raises(FamilyError, match=r"SD1\.5-family model but model_family=sdxl asks for an SDXL model"):
        load_pipeline(str(tiny_pipeline_dir), model_family="sdxl")
    with pytest.raises(FamilyError, match="model_family=sdxl"):
        load_pipeline(BUILTIN_TINY_SD15, model_family="sdxl")
    with pytest.raises(FamilyError, match="must be one of auto, sd15, sdxl"):
        load_pipeline(BUILTIN_TINY_SD15, model_family="sd2")
    assert family_of(load_pipeline(str(sdxl_dir), model_family="sdxl")) is SDXL
    assert family_of(load_pipeline(BUILTIN_TINY_SD15, model_family="sd15")) is SD15


def test_sdxl_folder_without_its_second_text_encoder(sdxl_dir, tmp_path):
    broken = tmp_path / "xl"
    shutil.copytree(sdxl_dir, broken)
    shutil.rmtree(broken / "text_encoder_2")
    shutil.rmtree(broken / "tokenizer_2")
    with pytest.raises(ModelLoadError) as err:
        load_pipeline(str(broken))
    message = str(err.value)
    assert f"pipeline folder {broken} has no text_encoder_2/, tokenizer_2/ sub-folder(s), which an SDXL model needs" in message
    assert "\n" not in message


def test_vae_of_the_other_family_is_refused(sd15_vae_dir, fp16_fix_vae_dir):
    with pytest.raises(FamilyError) as err:
        load_pipeline(BUILTIN_TINY_SDXL, vae=str(sd15_vae_dir))
    assert "an SD1.5 VAE (scaling_factor 0.18215)" in str(err.value) and "an SDXL VAE (scaling_factor 0.13025)" in str(err.value)
    with pytest.raises(FamilyError, match=r"is an SDXL VAE .* but the model is an SD1\.5-family model"):
        load_pipeline(BUILTIN_TINY_SD15, vae=str(fp16_fix_vae_dir))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_pipeline(BUILTIN_TINY_SDXL, vae=str(sd15_vae_dir / "nope"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_pipeline(BUILTIN_TINY_SDXL, vae=str(sd15_vae_dir.parent))


def test_sdxl_vae_precision(fp16_fix_vae_dir, sdxl_dir):
    # Without vae=, the SDXL VAE (force_upcast) stays fp32 under fp16 and bf16; the rest takes the dtype.
    for dtype in (torch.float16, torch.bfloat16):
        pipe = load_pipeline(BUILTIN_TINY_SDXL, dtype=dtype)
        assert pipe.unet.dtype == pipe.text_encoder.dtype == pipe.text_encoder_2.dtype == dtype
        assert pipe.vae.dtype == torch.float32
    # The fp16-fix VAE replaces it and runs in the run's dtype.
    pipe = load_pipeline(str(sdxl_dir), dtype=torch.float16, vae=str(fp16_fix_vae_dir))
    assert pipe.vae.dtype == torch.float16 and not pipe.vae.config.force_upcast
    expected = build_tiny_vae(7).state_dict()
    torch.testing.assert_close(pipe.vae.state_dict()["decoder.conv_out.weight"], expected["decoder.conv_out.weight"].half())
    # A pipeline folder works as vae= too (its vae/ sub-folder).
    assert load_pipeline(BUILTIN_TINY_SDXL, vae=str(sdxl_dir)).vae.config.scaling_factor == SDXL_VAE_SCALING_FACTOR
    # SD1.5 keeps its VAE in the dtype, as before (its pipeline ignores force_upcast).
    assert load_pipeline(BUILTIN_TINY_SD15, dtype=torch.float16).vae.dtype == torch.float16


def test_resolution_must_fit_the_vae():
    # SDXL base 1.0's and SD1.5's own config values (unet/config.json sample_size, vae/config.json blocks).
    sdxl_unet, sd15_unet = types.SimpleNamespace(config=types.SimpleNamespace(sample_size=128)), types.SimpleNamespace(
        config=types.SimpleNamespace(sample_size=64))
    vae = types.SimpleNamespace(config=types.SimpleNamespace(block_out_channels=[128, 256, 512, 512]))
    assert resolve_resolution(None, sdxl_unet, vae) == 1024 and resolve_resolution(0, sd15_unet, vae) == 512
    with pytest.raises(ResolutionError, match=r"resolution=1020 is not a positive multiple of the VAE's factor 8.*resolution=1024"):
        resolve_resolution(1020, sdxl_unet, vae)
    pipe = load_pipeline(BUILTIN_TINY_SDXL)
    assert resolve_resolution(None, pipe.unet, pipe.vae) == 32  # tiny: 8 latents x factor 4
    assert resolve_resolution(48, pipe.unet, pipe.vae) == 48
    with pytest.raises(ResolutionError, match=r"config: resolution=30 is not a positive multiple of the VAE's factor 4"):
        resolve_resolution(30, pipe.unet, pipe.vae)
    with pytest.raises(ResolutionError, match=r"^generate: width=-8"):
        resolve_resolution(-8, pipe.unet, pipe.vae, key="width", where="generate")


def test_hub_id_from_the_cache_never_tries_the_network(tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline
    from huggingface_hub import constants

    commit = "0" * 40
    repo = tmp_path / "models--acme--tiny-xl"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    build_tiny_sdxl_pipeline().save_pretrained(repo / "snapshots" / commit, safe_serialization=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls = []
    real = DiffusionPipeline.download.__func__

    def recording(cls, name, **kwargs):
        calls.append(kwargs.get("local_files_only"))
        if not kwargs.get("local_files_only"):
            raise AssertionError("the network was tried")
        return real(cls, name, **kwargs)

    monkeypatch.setattr(DiffusionPipeline, "download", classmethod(recording))
    pipe = load_pipeline("acme/tiny-xl")
    assert isinstance(pipe, StableDiffusionXLPipeline) and calls == [True]
    with pytest.raises(FamilyError, match="hub model 'acme/tiny-xl' is an SDXL model"):
        load_pipeline("acme/tiny-xl", model_family="sd15")


def test_hub_id_offline_and_not_cached(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="not in the local hub cache, and the hub is offline"):
        load_pipeline("acme/absent")


def test_single_file_family_from_its_keys(tmp_path, monkeypatch):
    xl, sd15 = tmp_path / "xl.safetensors", tmp_path / "sd15.safetensors"
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.ones(2),
               "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.ones(2)}, str(xl))
    save_file({"cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.ones(2)}, str(sd15))
    assert single_file_family(xl) is SDXL and single_file_family(sd15) is SD15
    torch.save({"state_dict": {"conditioner.embedders.1.model.ln_final.weight": torch.ones(2)}}, tmp_path / "xl.ckpt")
    assert single_file_family(tmp_path / "xl.ckpt") is SDXL
    # The forced family is checked from the keys, before any conversion.
    with pytest.raises(FamilyError, match=f"checkpoint {xl} is an SDXL model but model_family=sd15"):
        load_pipeline(str(xl), model_family="sd15")
    # SDXL files go to the SDXL single-file converter, with the run's dtype.
    seen = []
    fake = types.ModuleType("spotune.models.single_file_sdxl")
    fake.load_sdxl_single_file = lambda path, dtype: seen.append((path, dtype)) or build_tiny_sdxl_pipeline()
    monkeypatch.setitem(sys.modules, "spotune.models.single_file_sdxl", fake)
    pipe = load_pipeline(str(xl), dtype=torch.bfloat16)
    assert seen == [(xl, torch.bfloat16)] and family_of(pipe) is SDXL and pipe.unet.dtype == torch.bfloat16

