"""An SDXL LoRA on an SD1.5 model, or the reverse, is one FamilyError naming both, in export and generate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from spotune.cli import main
from spotune.export import LoraWeights, apply_lora, export_checkpoint, load_lora_file
from spotune.export.lora_layout import lora_family
from spotune.generation.runner import LoraSpec, apply_loras
from spotune.models.family import SD15, SDXL, FamilyError
from spotune.models.loading import load_pipeline

TINY_SD15 = "builtin:tiny-sd15"
TINY_SDXL = "builtin:tiny-sdxl"


def _weights(modules: dict[str, tuple[int, int]], layout: str = "diffusers") -> LoraWeights:
    state = {}
    for module, (out_dim, in_dim) in modules.items():
        state[f"{module}.lora_A.weight"] = torch.zeros(4, in_dim)
        state[f"{module}.lora_B.weight"] = torch.zeros(out_dim, 4)
    return LoraWeights(state, 4, 4.0, "webui", Path("x.safetensors"), layout=layout)


def test_family_is_read_from_names_and_shapes():
    assert lora_family(_weights({"input_blocks.4.1.transformer_blocks.0.attn1.to_q": (8, 8)}, "original"))[0] is SDXL
    assert lora_family(_weights({"mid_block.attentions.0.transformer_blocks.0.attn2.to_k": (640, 2048)}))[0] is SDXL
    assert lora_family(_weights({"mid_block.attentions.0.transformer_blocks.0.attn2.to_k": (1280, 768)}))[0] is SD15
    assert lora_family(_weights({"down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q": (8, 8)}))[0] is SDXL
    assert lora_family(_weights({"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (8, 8)}))[0] is SD15
    assert lora_family(_weights({"mid_block.attentions.0.transformer_blocks.0.attn1.to_q": (8, 8)}))[0] is None


def test_sdxl_lora_on_sd15_and_sd15_lora_on_sdxl_are_refused_before_any_change(sdxl_lora_run, tmp_path):
    webui = export_checkpoint(sdxl_lora_run.run, "webui", tmp_path / "sdxl.safetensors", dtype="fp32")
    sd15_lora = tmp_path / "sd15.safetensors"
    sd15_pipe = load_pipeline(TINY_SD15)
    from spotune.models.lora import add_lora, lora_state_dict

    add_lora(sd15_pipe.unet, rank=4)
    from safetensors.torch import save_file

    save_file({f"unet.{k}": v.contiguous() for k, v in lora_state_dict(sd15_pipe.unet).items()}, str(sd15_lora))
    for lora, base, found, target in ((webui, TINY_SD15, "an SDXL model", "an SD1.5-family model"),
                                      (sd15_lora, TINY_SDXL, "an SD1.5-family model", "an SDXL model")):
        unet = load_pipeline(base).unet
        before = {k: v.clone() for k, v in unet.state_dict().items()}
        for fuse in (False, True):
            with pytest.raises(FamilyError) as info:
                apply_lora(unet, load_lora_file(lora), fuse=fuse)
            message = str(info.value)
            assert lora.name in message and f"LoRA for {found}" in message and f"base model is {target}" in message
        assert not getattr(unet, "peft_config", None)
        assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
        with pytest.raises(FamilyError):  # the generate path
            apply_loras(load_pipeline(base), (LoraSpec(path=lora, scale=1.0, name="x"),))


@pytest.mark.parametrize("fmt", ["webui", "diffusers", "merged", "single-file"])
def test_export_with_a_base_of_the_other_family_is_one_line(sdxl_lora_run, tmp_path, capsys, fmt):
    out = tmp_path / ("out" if fmt == "merged" else "out.safetensors")
    argv = ["export", str(sdxl_lora_run.run), "--format", fmt, "--output", str(out), "--base-model", TINY_SD15]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "an SDXL model" in err and "an SD1.5-family model" in err
    assert not out.exists()
