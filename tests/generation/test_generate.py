"""``spotune generate`` on the tiny SD1.5-architecture pipeline: seeds, LoRAs, PNG parameters, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from spotune.config import ConfigError
from spotune.generation import GenerateConfig, GenerateError, derive_seed, initial_latents, run_generate
from spotune.generation.layout import read_metadata
from spotune.generation.pnginfo import parse_parameters, read_parameters

PROMPTS = ["a red circle", "a blue square on white", "a green triangle"]
STEPS = 2  # enough denoising for a LoRA to show; the paper's 20 are the default


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def webui_lora(tmp_path_factory):
    """A random rank-2 LoRA on every attention projection of the tiny UNet, written with kohya/webui keys."""
    from spotune.models.tiny import build_tiny_unet

    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name, module in build_tiny_unet().named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(("to_q", "to_k", "to_v", "to_out.0")):
            key = "lora_unet_" + name.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = torch.randn(2, module.in_features, generator=gen)
            tensors[f"{key}.lora_up.weight"] = torch.randn(module.out_features, 2, generator=gen)
            tensors[f"{key}.alpha"] = torch.tensor(2.0)
    path = tmp_path_factory.mktemp("lora") / "shapes_lora.safetensors"
    save_file(tensors, str(path))
    return path


def config(output_dir, **overrides) -> GenerateConfig:
    values = dict(
        model="builtin:tiny-sd15", prompts=PROMPTS, images_per_prompt=2, steps=STEPS, batch_size=4,
        output_dir=str(output_dir),
    )
    values.update(overrides)
    return GenerateConfig(**values)


@pytest.fixture(scope="module")
def generated(tmp_path_factory, webui_lora):
    """Base and base + LoRA at scale 0, on the same seeds, in one output folder."""
    out = tmp_path_factory.mktemp("gen")
    result = run_generate(config(out, loras=[f"{webui_lora}:0"], compare_base=True, name="lora0"))
    return out, result


def test_lora_at_scale_zero_equals_base_on_identical_seeds(generated):
    out, result = generated
    assert result.generated == {"base": 6, "lora0": 6}
    base, lora = read_metadata(out / "base"), read_metadata(out / "lora0")
    assert [r["file"] for r in base] == [r["file"] for r in lora] and len(base) == 6
    assert [r["seed"] for r in base] == [r["seed"] for r in lora]
    assert len({r["seed"] for r in base}) == 6  # every image has its own noise
    for record in base:
        assert np.array_equal(pixels(out / "base" / record["file"]), pixels(out / "lora0" / record["file"]))


def test_lora_at_scale_one_changes_the_images(tmp_path, generated, webui_lora):
    out, _ = generated
    tuned = run_generate(config(tmp_path, loras=[str(webui_lora)], max_prompts=1, grid=False))
    for file in ("00000-000.png", "00000-001.png"):
        assert np.abs(pixels(tuned.folders["shapes_lora"] / file) - pixels(out / "base" / file)).mean() > 2.0


def test_seeds_reproduce_across_batch_sizes_with_eta_noise(tmp_path):
    # With eta = 1 DDIM draws fresh noise every step: it too must come from each image's own seed.
    one = run_generate(config(tmp_path / "one", eta=1.0, max_prompts=1, batch_size=2, grid=False))
    two = run_generate(config(tmp_path / "two", eta=1.0, max_prompts=1, batch_size=1, grid=False))
    for file in ("00000-000.png", "00000-001.png"):
        a, b = pixels(one.folders["base"] / file), pixels(two.folders["base"] / file)
        assert np.abs(a - b).max() <= 1  # float noise of another batch size may move a pixel by one level
    # Each image's noise is its own: the two images of the prompt differ.
    assert np.abs(a - pixels(one.folders["base"] / "00000-000.png")).mean() > 2.0


def test_png_parameters_metadata_and_grid(generated, webui_lora):
    out, result = generated
    record = read_metadata(out / "lora0")[3]
    params = parse_parameters(read_parameters(out / "lora0" / record["file"]))
    assert params["prompt"] == record["prompt"] == PROMPTS[1]
    assert params["prompt_with_tags"].endswith("<lora:shapes_lora:0>")
    assert params["Seed"] == str(record["seed"]) == str(derive_seed(0, 1, 1))
    assert (params["Steps"], params["Sampler"], params["CFG scale"], params["Size"]) == (str(STEPS), "DDIM", "5.0", "32x32")
    assert params["Model"] == "tiny-sd15" and params["Eta DDIM"] == "0.0"
    assert record["loras"] == [{"path": str(webui_lora.resolve()), "scale": 0.0}]
    generation = json.loads((out / "lora0" / "generation.json").read_text())
    assert (generation["steps"], generation["guidance_scale"], generation["sampler"]) == (STEPS, 5.0, "DDIM")
    with Image.open(result.grid) as grid:  # 2 rows (models) x 6 columns (seeds), 128 px cells, labels
        assert grid.size == (140 + 6 * 128, 18 + 2 * 128)


def test_resume_makes_only_missing_images(generated, webui_lora):
    out, _ = generated
    cfg = config(out, loras=[f"{webui_lora}:0"], compare_base=True, name="lora0")
    missing = out / "base" / "00001-000.png"
    before = pixels(missing)
    kept = out / "base" / "00000-000.png"
    mtime = kept.stat().st_mtime_ns
    missing.unlink()
    result = run_generate(cfg)
    assert result.generated == {"base": 1, "lora0": 0} and result.kept == {"base": 5, "lora0": 6}
    assert np.array_equal(pixels(missing), before)
    assert kept.stat().st_mtime_ns == mtime


def test_changed_settings_are_refused_unless_overwrite(tmp_path):
    cfg = config(tmp_path, prompts=["a dot"], images_per_prompt=1, steps=1, grid=False)
    run_generate(cfg)
    cfg.guidance_scale = 7.5
    with pytest.raises(GenerateError, match=r"guidance_scale: 5\.0 -> 7\.5.*overwrite"):
        run_generate(cfg)
    cfg.guidance_scale, cfg.prompts = 5.0, ["a line"]
    with pytest.raises(GenerateError, match="prompts changed"):
        run_generate(cfg)
    cfg.overwrite = True
    # A file the user put in the model folder is never deleted by overwrite: the replacement refuses.
    notes = tmp_path / "base" / "my-notes.txt"
    notes.write_text("keep me")
    with pytest.raises(GenerateError, match=r"would delete files spotune did not write.*my-notes\.txt"):
        run_generate(cfg)
    assert notes.read_text() == "keep me" and read_metadata(tmp_path / "base")[0]["prompt"] == "a dot"
    notes.unlink()
    assert run_generate(cfg).generated == {"base": 1}
    assert read_metadata(tmp_path / "base")[0]["prompt"] == "a line"


def test_bad_inputs(tmp_path):
    with pytest.raises(ConfigError, match="model"):
        GenerateConfig(prompts=["x"], output_dir="o").validate()
    with pytest.raises(ConfigError, match="exactly one"):
        config(tmp_path, prompt_file="p.txt").validate()
    with pytest.raises(ConfigError, match="eta"):
        config(tmp_path, eta=2.0).validate()
    with pytest.raises(ConfigError, match="width"):
        config(tmp_path, width=30).validate()
    with pytest.raises(ConfigError, match="compare_base"):
        config(tmp_path, compare_base=True).validate()
    with pytest.raises(GenerateError, match="does not exist"):
        run_generate(config(tmp_path / "x", loras=[str(tmp_path / "missing.safetensors:0.5")]))
    foreign = tmp_path / "foreign"
    (foreign / "base").mkdir(parents=True)
    (foreign / "base" / "notes.txt").write_text("mine")
    with pytest.raises(GenerateError, match="not a spotune generation folder"):
        run_generate(config(foreign))
    assert (foreign / "base" / "notes.txt").read_text() == "mine"
    from spotune.data.prompts import PromptFileError

    with pytest.raises(PromptFileError, match="does not exist"):
        run_generate(config(tmp_path / "y", prompts=[], prompt_file=str(tmp_path / "none.txt")))
    not_a_lora = tmp_path / "notes.safetensors"
    save_file({"weight": torch.zeros(2)}, str(not_a_lora))
    from spotune.export import LoraFormatError

    with pytest.raises(LoraFormatError, match="no LoRA weights"):
        run_generate(config(tmp_path / "z", loras=[str(not_a_lora)], max_prompts=1, images_per_prompt=1))


def test_seeds_and_initial_noise():
    seeds = {derive_seed(3, p, i) for p in range(20) for i in range(5)}
    assert len(seeds) == 100 and all(0 <= s < 2**32 for s in seeds)
    assert derive_seed(3, 4, 1) == derive_seed(3, 4, 1) != derive_seed(4, 4, 1)
    assert derive_seed(3, 4, 1) != derive_seed(3, 4, 1, purpose="sampler")
    batch = initial_latents([11, 22, 33], (4, 8, 8), "cpu", torch.float32)
    alone = initial_latents([22], (4, 8, 8), "cpu", torch.float32)
    expected = torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(22))
    assert torch.equal(batch[1], alone[0]) and torch.equal(alone[0], expected)
