"""Foreign, corrupt and clashing inputs fail with the file and key named, and leave files as they were."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from spotune.export import ExportError, LoraFormatError, apply_lora, export_checkpoint, load_lora_file
from spotune.models.family import FamilyError
from spotune.models.loading import load_pipeline


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _kohya(path, keys: dict[str, tuple[int, ...]]):
    save_file({k: torch.zeros(shape) for k, shape in keys.items()}, str(path))
    return path


def test_sdxl_kohya_names_on_an_sd15_model_are_one_family_error(tmp_path, base_dir):
    # kohya's SDXL naming (the original sgm layout) is read, and refused on an SD1.5 UNet naming both families.
    key = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight"
    file = _kohya(tmp_path / "sdxl.safetensors", {key: (4, 640), key.replace("down", "up"): (640, 4)})
    weights = load_lora_file(file)
    assert weights.layout == "original" and weights.modules == ["input_blocks.4.1.transformer_blocks.0.attn1.to_q"]
    with pytest.raises(FamilyError) as info:
        apply_lora(load_pipeline(str(base_dir)).unet, weights)
    message = str(info.value)
    assert "sdxl.safetensors" in message and "an SDXL model" in message and "an SD1.5-family model" in message


def test_text_encoder_only_lora_is_refused(tmp_path):
    key = "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"
    file = _kohya(tmp_path / "te.safetensors", {key: (4, 768), key.replace("down", "up"): (768, 4)})
    with pytest.raises(LoraFormatError, match="only text-encoder") as info:
        load_lora_file(file)
    assert "te.safetensors" in str(info.value) and key in str(info.value)


def test_modules_this_unet_lacks_are_refused(tmp_path, base_dir):
    key = "lora_unet_down_blocks_7_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"
    file = _kohya(tmp_path / "other.safetensors", {key: (4, 8), key.replace("down.", "up."): (8, 4)})
    weights = load_lora_file(file)
    unet = load_pipeline(str(base_dir)).unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with pytest.raises(LoraFormatError) as info:
        apply_lora(unet, weights)
    assert "other.safetensors" in str(info.value) and "down_blocks.7.attentions.0" in str(info.value)
    assert not getattr(unet, "peft_config", None)
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())


def test_shapes_that_do_not_fit_are_refused(tmp_path, base_dir):
    # SD1.5-sized projection (320 wide) on the toy model (8 wide): the module exists, the shape does not.
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k.lora_down.weight"
    file = _kohya(tmp_path / "big.safetensors", {key: (4, 320), key.replace("down.", "up."): (320, 4)})
    with pytest.raises(LoraFormatError) as info:
        apply_lora(load_pipeline(str(base_dir)).unet, load_lora_file(file), fuse=True)
    message = str(info.value)
    assert "big.safetensors" in message and "attn1.to_k" in message and "(4, 320)" in message


def test_corrupt_lora_file_is_named(tmp_path):
    file = tmp_path / "broken.safetensors"
    file.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(LoraFormatError) as info:
        load_lora_file(file)
    assert "broken.safetensors" in str(info.value)


def test_corrupt_source_leaves_the_output_folder_untouched(tmp_path):
    file = tmp_path / "broken.safetensors"
    file.write_bytes(b"garbage" * 10)
    (tmp_path / "out").mkdir()
    before = _snapshot(tmp_path)
    with pytest.raises(LoraFormatError):
        export_checkpoint(file, "diffusers", tmp_path / "out" / "lora")
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("fmt,name", [("webui", "x.safetensors"), ("diffusers", "folder"), ("merged", "pipe")])
def test_existing_output_is_refused_and_kept(lora_run, tmp_path, fmt, name):
    target = tmp_path / name
    if target.suffix:
        target.write_bytes(b"precious")
    else:
        target.mkdir()
        (target / "keep.txt").write_text("precious")
    before = _snapshot(tmp_path)
    with pytest.raises(ExportError, match="already exists") as info:
        export_checkpoint(lora_run.run, fmt, target)
    assert str(target) in str(info.value)
    assert _snapshot(tmp_path) == before  # nothing replaced, no temporary left behind


def test_overwrite_replaces_earlier_exports_only(lora_run, tmp_path):
    file = tmp_path / "x.safetensors"
    export_checkpoint(lora_run.run, "webui", file, dtype="fp32")
    export_checkpoint(lora_run.run, "webui", file, overwrite=True)
    assert load_lora_file(file).rank == 4 and next(iter(load_lora_file(file).state_dict.values())).dtype == torch.float16
    folder = tmp_path / "d"
    export_checkpoint(lora_run.run, "diffusers", folder)
    export_checkpoint(lora_run.run, "diffusers", folder, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == ["pytorch_lora_weights.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "x.safetensors"]  # no temporary left


def test_output_may_not_replace_the_source(lora_run):
    before = _snapshot(lora_run.run)
    with pytest.raises(ExportError, match="reads"):
        export_checkpoint(lora_run.checkpoint, "diffusers", lora_run.run, overwrite=True)
    assert _snapshot(lora_run.run) == before


def test_full_finetune_cannot_become_a_lora(full_run, tmp_path):
    with pytest.raises(ExportError, match="full fine-tune"):
        export_checkpoint(full_run.run, "webui", tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_bad_format_dtype_and_suffix(lora_run, tmp_path):
    with pytest.raises(ExportError, match="unknown export format"):
        export_checkpoint(lora_run.run, "ckpt", tmp_path / "a")
    with pytest.raises(ExportError, match="unknown dtype"):
        export_checkpoint(lora_run.run, "webui", tmp_path / "a.safetensors", dtype="int8")
    with pytest.raises(ExportError, match=r"\.safetensors"):
        export_checkpoint(lora_run.run, "webui", tmp_path / "a.pt")
    assert list(tmp_path.iterdir()) == []
