"""``spotune generate`` on the tiny SDXL-architecture model: the CLI end to end, zero negatives, the VAE's
dtype, PNG parameters naming the family and size, vae= in the run's identity, family errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from spotune.cli import main
from spotune.generation import GenerateConfig, GenerateError, run_generate
from spotune.generation.layout import read_metadata
from spotune.generation.pnginfo import parse_parameters, read_parameters
from spotune.models import loading
from spotune.models.family import SDXL
from spotune.models.tiny import SDXL_VAE_SCALING_FACTOR, build_tiny_vae

PROMPTS = ["a red cat", "a blue dog"]


def one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen-xl")
    args = ["generate", "--model", "builtin:tiny-sdxl", "--out", str(out), "steps=2", "images_per_prompt=2"]
    for prompt in PROMPTS:
        args += ["--prompt", prompt]
    assert main(args) == 0
    return out


def test_generate_sdxl_through_the_cli(cli_run):
    folder = cli_run / "base"
    files = sorted(p.name for p in folder.glob("*.png"))
    assert files == ["00000-000.png", "00000-001.png", "00001-000.png", "00001-001.png"]
    assert (cli_run / "grid.png").is_file()
    for name in files:
        with Image.open(folder / name) as im:
            assert im.size == (32, 32)  # the tiny model's native size: 8 latents x VAE factor 4
        params = parse_parameters(read_parameters(folder / name))
        assert params["Size"] == "32x32" and params["Model"] == "tiny-sdxl" and params["Model family"] == "sdxl"
    records = read_metadata(folder)
    assert {r["model_family"] for r in records} == {"sdxl"} and {(r["width"], r["height"]) for r in records} == {(32, 32)}
    assert json.loads((folder / "generation.json").read_text())["model_family"] == "sdxl"
    # Different seeds, different images (the sampler really ran).
    pixels = [np.asarray(Image.open(folder / n).convert("RGB"), dtype=np.int16) for n in files]
    assert np.abs(pixels[0] - pixels[1]).max() > 0


def spy_unet_inputs(monkeypatch) -> list[dict]:
    """Record every UNet call's conditioning of pipelines that run_generate loads."""
    calls: list[dict] = []
    real = loading.load_pipeline

    def load(*args, **kwargs):
        pipe = real(*args, **kwargs)

        def hook(module, args, kwargs):
            added = kwargs.get("added_cond_kwargs") or {}
            calls.append({
                "embeds": kwargs["encoder_hidden_states"].detach().clone(),
                "pooled": added["text_embeds"].detach().clone(),
                "time_ids": added["time_ids"].detach().clone(),
            })

        pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
        calls.append({"pipe": pipe})
        return pipe

    monkeypatch.setattr(loading, "load_pipeline", load)
    return calls


def test_sdxl_empty_negative_prompt_is_zeros_as_in_training(tmp_path, monkeypatch):
    calls = spy_unet_inputs(monkeypatch)
    run_generate(GenerateConfig(model="builtin:tiny-sdxl", prompts=PROMPTS, steps=2, batch_size=2, output_dir=str(tmp_path), grid=False))
    pipe, steps = calls[0]["pipe"], calls[1:]
    assert len(steps) == 2
    # The conditioning spotune trains with: both encoders' penultimate states, text_encoder_2's pooled
    # output, time ids (32, 32, 0, 0, 32, 32); the negative half all zeros (force_zeros_for_empty_prompt).
    conditioner = SDXL.conditioner(pipe, 32)
    cond, negative = conditioner.encode(PROMPTS), conditioner.negative("")
    for step in steps:
        uncond_embeds, cond_embeds = step["embeds"].chunk(2)
        uncond_pooled, cond_pooled = step["pooled"].chunk(2)
        assert torch.count_nonzero(uncond_embeds) == 0 and torch.count_nonzero(uncond_pooled) == 0
        torch.testing.assert_close(cond_embeds, cond.prompt_embeds)
        torch.testing.assert_close(cond_pooled, cond.pooled)
        torch.testing.assert_close(step["time_ids"], torch.tensor([[32.0, 32, 0, 0, 32, 32]]).repeat(4, 1))
    assert torch.count_nonzero(negative.prompt_embeds) == 0
    # A real negative prompt is encoded, not zeroed.
    calls.clear()
    run_generate(GenerateConfig(model="builtin:tiny-sdxl", prompts=PROMPTS, steps=1, batch_size=2, negative_prompt="blurry",
                                output_dir=str(tmp_path / "neg"), grid=False))
    uncond_embeds, _ = calls[1]["embeds"].chunk(2)
    torch.testing.assert_close(uncond_embeds, conditioner.negative("blurry").prompt_embeds.expand(2, -1, -1))


def test_fp16_unet_with_the_fp32_sdxl_vae(tmp_path):
    """fp16: the UNet runs in fp16, the SDXL VAE stays fp32 and the latents are decoded in the VAE's dtype
    (diffusers' own decoding would fail on the mixed dtypes)."""
    out = tmp_path / "fp16"
    run_generate(GenerateConfig(model="builtin:tiny-sdxl", prompts=PROMPTS[:1], steps=2, dtype="float16", device="cpu",
                                output_dir=str(out), grid=False))
    fp32 = tmp_path / "fp32"
    run_generate(GenerateConfig(model="builtin:tiny-sdxl", prompts=PROMPTS[:1], steps=2, dtype="float32",
                                output_dir=str(fp32), grid=False))
    a = np.asarray(Image.open(out / "base" / "00000-000.png").convert("RGB"), dtype=np.int16)
    b = np.asarray(Image.open(fp32 / "base" / "00000-000.png").convert("RGB"), dtype=np.int16)
    assert np.abs(a - b).max() <= 8  # the same image up to fp16 rounding


def test_vae_is_named_and_part_of_the_identity(tmp_path):
    vae_dir = tmp_path / "sdxl-vae-fp16-fix"
    build_tiny_vae(7, scaling_factor=SDXL_VAE_SCALING_FACTOR, force_upcast=False).save_pretrained(vae_dir)
    out = tmp_path / "gens"
    base = dict(model="builtin:tiny-sdxl", prompts=PROMPTS[:1], steps=1, output_dir=str(out), grid=False)
    run_generate(GenerateConfig(**base))
    with pytest.raises(GenerateError, match=r"settings changed \(vae: '' -> '.*sdxl-vae-fp16-fix'\)"):
        run_generate(GenerateConfig(**base, vae=str(vae_dir)))
    run_generate(GenerateConfig(**base, vae=str(vae_dir), overwrite=True))
    params = parse_parameters(read_parameters(out / "base" / "00000-000.png"))
    assert params["VAE"] == "sdxl-vae-fp16-fix" and params["Model family"] == "sdxl"
    assert read_metadata(out / "base")[0]["vae"] == str(vae_dir)


def test_folder_written_before_vae_existed_still_resumes(tmp_path):
    out = tmp_path / "gens"
    cfg = dict(model="builtin:tiny-sd15", prompts=PROMPTS, steps=1, output_dir=str(out), grid=False)
    run_generate(GenerateConfig(**cfg, max_prompts=1))
    record = out / "base" / "generation.json"
    data = json.loads(record.read_text())
    del data["vae"]
    record.write_text(json.dumps(data))
    result = run_generate(GenerateConfig(**cfg))
    assert result.kept["base"] == 1 and result.generated["base"] == 1


def test_family_and_size_errors_are_one_line(tmp_path, capsys):
    out = str(tmp_path / "x")
    assert main(["generate", "--model", "builtin:tiny-sdxl", "--out", out, "--prompt", "a", "model_family=sd15"]) == 1
    one_line_error(capsys, "is an SDXL model but model_family=sd15 asks for an SD1.5-family model")
    assert main(["generate", "--model", "builtin:tiny-sdxl", "--out", out, "--prompt", "a", "model_family=xl"]) == 1
    one_line_error(capsys, "'model_family' must be auto, sd15 or sdxl")
    assert main(["generate", "--model", "builtin:tiny-sdxl", "--out", out, "--prompt", "a", "width=36"]) == 1
    one_line_error(capsys, "'width' must be 0 (model default) or a positive multiple of 8, got 36")
    sd15_vae = tmp_path / "sd15-vae"
    build_tiny_vae(1).save_pretrained(sd15_vae)
    assert main(["generate", "--model", "builtin:tiny-sdxl", "--out", out, "--prompt", "a", f"vae={sd15_vae}"]) == 1
    one_line_error(capsys, "is an SD1.5 VAE (scaling_factor 0.18215) but the model is an SDXL model")
