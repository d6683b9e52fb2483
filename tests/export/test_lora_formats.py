"""diffusers and webui LoRA exports: loadable by diffusers itself, exact names and metadata, read back equal."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from spotune.export import export_checkpoint, load_lora_file
from spotune.models.loading import load_pipeline

from export_helpers import LORA_ALPHA, LORA_RANK

KOHYA_KEY = re.compile(
    r"lora_unet_(down_blocks_\d+_attentions_\d+|mid_block_attentions_0|up_blocks_\d+_attentions_\d+)"
    r"_transformer_blocks_0_(attn1|attn2)_(to_q|to_k|to_v|to_out_0)\.(lora_down\.weight|lora_up\.weight|alpha)"
)


def _diffusers_unet_output(base_dir, lora_path, probe) -> torch.Tensor:
    pipe = load_pipeline(str(base_dir))
    pipe.load_lora_weights(str(lora_path))
    return probe(pipe.unet)


def test_the_fixture_lora_changes_the_output(lora_run):
    # Otherwise every "matches" below would pass with the LoRA silently dropped.
    assert (lora_run.expected - lora_run.base_output).abs().max() > 1e-2


def test_webui_file_loads_in_diffusers_and_matches_the_adapter(lora_run, base_dir, probe, tmp_path):
    out = export_checkpoint(lora_run.run, "webui", tmp_path / "spo.safetensors", dtype="fp32")
    got = _diffusers_unet_output(base_dir, out, probe)
    assert (got - lora_run.expected).abs().max() < 1e-4


@pytest.mark.parametrize("name", ["lora-folder", "spo_diffusers.safetensors"])
def test_diffusers_export_loads_in_diffusers_and_matches_the_adapter(lora_run, base_dir, probe, tmp_path, name):
    out = export_checkpoint(lora_run.checkpoint, "diffusers", tmp_path / name, dtype="fp32")
    file = out if out.suffix else out / "pytorch_lora_weights.safetensors"
    assert file.is_file()
    got = _diffusers_unet_output(base_dir, out, probe)
    assert (got - lora_run.expected).abs().max() < 1e-4


def test_diffusers_file_has_the_layout_of_diffusers_save_lora_weights(lora_run, tmp_path):
    from diffusers import StableDiffusionPipeline

    ours = export_checkpoint(lora_run.run, "diffusers", tmp_path / "ours", dtype="fp32") / "pytorch_lora_weights.safetensors"
    StableDiffusionPipeline.save_lora_weights(tmp_path / "theirs", unet_lora_layers=lora_run.lora)
    theirs = load_file(str(tmp_path / "theirs" / "pytorch_lora_weights.safetensors"))
    mine = load_file(str(ours))
    assert set(mine) == set(theirs)
    # Same tensors, except that alpha / rank (2 / 4) is folded into lora_B so every version scales by 1.
    for key, value in mine.items():
        expected = theirs[key] * (LORA_ALPHA / LORA_RANK) if ".lora_B." in key else theirs[key]
        assert torch.equal(value, expected), key
    with safe_open(str(ours), "pt") as handle:
        meta = handle.metadata()
    config = json.loads(meta["lora_adapter_metadata"])
    assert meta["format"] == "pt"
    assert config["unet.r"] == LORA_RANK and config["unet.lora_alpha"] == LORA_RANK
    assert config["unet.rank_pattern"] == {} and config["unet.alpha_pattern"] == {}


def test_webui_key_names_and_metadata(lora_run, tmp_path):
    out = export_checkpoint(lora_run.run, "webui", tmp_path / "spo.safetensors")
    with safe_open(str(out), "pt") as handle:
        keys = set(handle.keys())
        meta = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in keys}
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_up.weight" in keys
    assert "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_v.alpha" in keys
    assert all(KOHYA_KEY.fullmatch(k) for k in keys), sorted(k for k in keys if not KOHYA_KEY.fullmatch(k))[:3]
    # 16 transformer blocks (3 down x 2, mid, 3 up x 3) x 2 attentions x 4 projections x 3 tensors.
    assert len(keys) == 16 * 2 * 4 * 3
    assert all("." not in k.split(".", 1)[0][len("lora_unet_"):] for k in keys)
    q_down = tensors["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"]
    q_up = tensors["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight"]
    peft_a = lora_run.lora["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"]
    peft_b = lora_run.lora["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight"]
    assert q_down.dtype == torch.float16 and q_down.shape == peft_a.shape and q_up.shape == peft_b.shape
    assert torch.allclose(q_down.float(), peft_a, atol=1e-3) and torch.allclose(q_up.float(), peft_b, atol=1e-3)
    alpha = tensors["lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_v.alpha"]
    assert alpha.ndim == 0 and alpha.item() == LORA_ALPHA
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == str(LORA_RANK)
    assert float(meta["ss_network_alpha"]) == LORA_ALPHA
    assert meta["ss_base_model_version"] == "sd_v1"
    assert meta["modelspec.sai_model_spec"] == "1.0.1"  # kohya's current ModelSpec version
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.implementation"] == "diffusers"
    assert meta["modelspec.title"] == "lora-run-iter-00000010"
    assert meta["modelspec.resolution"] == "32x32"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", meta["modelspec.date"])


def test_every_format_reads_back_the_same_weights(lora_run, tmp_path):
    webui = export_checkpoint(lora_run.run, "webui", tmp_path / "w.safetensors", dtype="fp32")
    folder = export_checkpoint(lora_run.run, "diffusers", tmp_path / "d", dtype="fp32")
    single = export_checkpoint(lora_run.run, "diffusers", tmp_path / "d.safetensors", dtype="fp32")
    reference = load_lora_file(lora_run.run)
    for name, path in {"run": lora_run.run, "checkpoint": lora_run.checkpoint, "webui": webui}.items():
        weights = load_lora_file(path)
        assert (weights.rank, weights.alpha) == (LORA_RANK, LORA_ALPHA), name
        assert set(weights.state_dict) == set(lora_run.lora), name
        assert all(torch.equal(weights.state_dict[k], lora_run.lora[k]) for k in lora_run.lora), name
    for name, path in {"folder": folder, "file": single}.items():
        # The diffusers files carry alpha / rank inside lora_B: alpha reads back as the rank, the update is the same.
        weights = load_lora_file(path)
        assert (weights.rank, weights.alpha) == (LORA_RANK, float(LORA_RANK)), name
        assert weights.modules == reference.modules, name
        for module in reference.modules:
            assert torch.allclose(weights.delta(module), reference.delta(module), atol=1e-7), (name, module)
    assert load_lora_file(webui).source_format == "webui"
    assert load_lora_file(folder).source_format == "diffusers"
    assert load_lora_file(lora_run.run).source_format == "spotune"


def test_fp16_export_is_close_and_bf16_is_accepted(lora_run, tmp_path):
    half = load_lora_file(export_checkpoint(lora_run.run, "webui", tmp_path / "h.safetensors"))
    assert all(v.dtype == torch.float16 for v in half.state_dict.values())
    bf16 = load_lora_file(export_checkpoint(lora_run.run, "diffusers", tmp_path / "b", dtype="bf16"))
    assert all(v.dtype == torch.bfloat16 for v in bf16.state_dict.values())
    for key, value in lora_run.lora.items():
        assert torch.allclose(half.state_dict[key].float(), value, atol=2e-3)
    reference = load_lora_file(lora_run.run)
    for module in reference.modules:
        assert torch.allclose(bf16.delta(module), reference.delta(module), atol=2e-2)
