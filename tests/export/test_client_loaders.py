"""Every exported key read the way ComfyUI, AUTOMATIC1111 webui, kohya sd-scripts and diffusers read it.

The rules are in ``client_rules.py`` (restated from the clients' public code). Each test runs one
client's rule over every key of an exported file, applies the update it would apply to the base
UNet, and checks the UNet's output against the trained adapter's.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from client_rules import (
    comfy_load_lora,
    comfy_lora_key_map,
    comfy_patch,
    comfy_unet_config,
    comfy_unet_to_diffusers,
    diffusers_delta,
    diffusers_scales_before_034,
    diffusers_scales_from_034,
    kohya_dims_and_alphas,
    kohya_unet_module_names,
    webui_layer_names,
    webui_load,
    webui_updown,
)
from export_helpers import LORA_ALPHA, LORA_RANK
from spotune.export import LoraWeights, export_checkpoint, load_lora_file
from spotune.export.lora_files import diffusers_lora_file


@pytest.fixture(scope="module")
def base_unet(base_dir) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(base_dir / "unet").eval()


@pytest.fixture(scope="module")
def webui_file(lora_run, tmp_path_factory):
    out = export_checkpoint(lora_run.run, "webui", tmp_path_factory.mktemp("clients") / "spo.safetensors", dtype="fp32")
    return load_file(str(out))


def _ldm_to_diffusers(config) -> dict[str, str]:
    """ComfyUI's LDM weight key (``diffusion_model.`` prefixed) -> diffusers weight key."""
    return {"diffusion_model." + ldm: d for d, ldm in comfy_unet_to_diffusers(comfy_unet_config(config)).items()}


def _output_with(unet: UNet2DConditionModel, new_weights: dict[str, torch.Tensor], probe) -> torch.Tensor:
    """The probe output of ``unet`` with some weights replaced (the UNet itself is left as it was)."""
    state = unet.state_dict()
    patched = UNet2DConditionModel.from_config(unet.config)
    patched.load_state_dict({**state, **new_weights})
    return probe(patched)


def test_comfyui_loads_every_key_and_patches_base_plus_scaled_update(webui_file, base_unet, lora_run, probe):
    patches, not_loaded = comfy_load_lora(webui_file, comfy_lora_key_map(base_unet.config))
    assert not_loaded == []  # ComfyUI warns "lora key not loaded" for each of these
    assert len(patches) == len(webui_file) // 3
    to_diffusers = _ldm_to_diffusers(base_unet.config)
    state, reference = base_unet.state_dict(), load_lora_file(lora_run.run)
    new = {}
    for weight_key, (up, down, alpha) in patches.items():
        assert alpha == LORA_ALPHA and down.shape[0] == LORA_RANK
        key = to_diffusers[weight_key]
        new[key] = comfy_patch(state[key], up, down, alpha)
        assert torch.equal(new[key], state[key] + reference.delta(key.removesuffix(".weight"))), key
    assert (_output_with(base_unet, new, probe) - lora_run.expected).abs().max() < 1e-4


def test_webui_matches_every_key_to_a_layer_and_scales_by_alpha_over_dim(webui_file, base_unet, lora_run, probe):
    to_diffusers = _ldm_to_diffusers(base_unet.config)
    layers = {k.removesuffix(".weight").replace(".", "_"): v for k, v in to_diffusers.items()}
    matched, failed = webui_load(webui_file, webui_layer_names(list(to_diffusers)))
    assert failed == []
    assert len(matched) == len(webui_file) // 3
    state, reference = base_unet.state_dict(), load_lora_file(lora_run.run)
    new = {}
    for layer, parts in matched.items():
        assert set(parts) == {"lora_up.weight", "lora_down.weight", "alpha"}  # ModuleTypeLora takes it
        key = layers[layer]
        # webui and ComfyUI resolve the file's module to the same UNet weight.
        module = key.removesuffix(".weight")
        assert f"lora_unet_{module.replace('.', '_')}.alpha" in webui_file
        new[key] = state[key] + webui_updown(parts, state[key].shape)
        assert torch.allclose(new[key] - state[key], reference.delta(module), atol=1e-7), key
    assert (_output_with(base_unet, new, probe) - lora_run.expected).abs().max() < 1e-4


def test_kohya_builds_a_module_for_every_name_with_the_file_dim_and_alpha(webui_file, base_unet):
    dims, alphas = kohya_dims_and_alphas(webui_file)
    kohya_names = kohya_unet_module_names(base_unet)
    assert set(dims) <= kohya_names
    targets = {n for n in kohya_names if n.endswith(("_to_q", "_to_k", "_to_v", "_to_out_0"))}
    assert set(dims) == targets  # every projection the recipe adapts, nothing else
    assert set(dims.values()) == {LORA_RANK} and set(alphas.values()) == {LORA_ALPHA}
    # load_state_dict of the built network: each key is <name>.lora_down.weight / .lora_up.weight / .alpha.
    expected = {f"{n}.{part}" for n in dims for part in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert set(webui_file) == expected


def _diffusers_output(base_unet, tensors, scales, probe) -> torch.Tensor:
    state = base_unet.state_dict()
    new = {f"{m}.weight": state[f"{m}.weight"] + diffusers_delta(tensors, m, s) for m, s in scales.items()}
    return _output_with(base_unet, new, probe)


def test_diffusers_file_is_applied_alike_before_and_from_diffusers_034(lora_run, base_unet, probe, tmp_path):
    out = export_checkpoint(lora_run.run, "diffusers", tmp_path / "d.safetensors", dtype="fp32")
    tensors = load_file(str(out))
    with safe_open(str(out), "pt") as handle:
        metadata = handle.metadata()
    old, new = diffusers_scales_before_034(tensors), diffusers_scales_from_034(tensors, metadata)
    assert old == new
    for scales in (old, new):
        assert (_diffusers_output(base_unet, tensors, scales, probe) - lora_run.expected).abs().max() < 1e-4
    # The unfolded weights (what the file held before) would be off under the old rule: the check can fail.
    raw = {f"unet.{k}": v for k, v in lora_run.lora.items()}
    wrong = _diffusers_output(base_unet, raw, diffusers_scales_before_034(raw), probe)
    assert (wrong - lora_run.expected).abs().max() > 1e-2


def test_installed_diffusers_without_the_header_applies_it_as_old_versions_do(lora_run, base_dir, probe, tmp_path):
    """Without ``lora_adapter_metadata`` diffusers falls back to the rule of every version before 0.34."""
    from spotune.models.loading import load_pipeline

    out = export_checkpoint(lora_run.run, "diffusers", tmp_path / "d.safetensors", dtype="fp32")
    stripped = tmp_path / "no-header.safetensors"
    save_file(load_file(str(out)), str(stripped), metadata={"format": "pt"})
    pipe = load_pipeline(str(base_dir))
    pipe.load_lora_weights(str(stripped))
    assert (probe(pipe.unet) - lora_run.expected).abs().max() < 1e-4


def test_mixed_ranks_and_alphas_give_the_same_update_in_every_diffusers_version(tmp_path):
    g = torch.Generator().manual_seed(3)
    shapes = {"a.to_q": (2, 1.0, 6, 5), "b.to_k": (4, 8.0, 6, 5), "c.to_v": (4, 4.0, 3, 6)}  # rank, alpha, out, in
    state, alphas = {}, {}
    for module, (rank, alpha, out_dim, in_dim) in shapes.items():
        state[f"{module}.lora_A.weight"] = torch.randn(rank, in_dim, generator=g)
        state[f"{module}.lora_B.weight"] = torch.randn(out_dim, rank, generator=g)
        alphas[module] = alpha
    weights = LoraWeights(state, rank=4, alpha=4.0, source_format="spotune", source=tmp_path, alphas=alphas)
    tensors, metadata = diffusers_lora_file(weights, torch.float32)
    # The lower-rank module is zero-padded, so its first key cannot hand old versions a wrong alpha.
    assert {v.shape[1] for k, v in tensors.items() if ".lora_B." in k} == {4}
    for scales in (diffusers_scales_before_034(tensors), diffusers_scales_from_034(tensors, metadata)):
        for module in shapes:
            assert torch.allclose(diffusers_delta(tensors, module, scales[module]), weights.delta(module), atol=1e-6)
