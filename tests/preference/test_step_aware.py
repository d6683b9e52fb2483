"""The step-aware preference model on a tiny CLIP: identity start, official key layout, checkpoints."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from transformers import CLIPModel

from spotune.errors import SpotuneError
from spotune.models.tiny import build_tiny_clip
from spotune.preference import JudgeLoadError, PickScoreJudge, StepAwarePreferenceModel
from spotune.preference.clip_judge import preprocess_images
from spotune.preference.step_aware import timestep_frequencies

PROMPTS = ["a red circle", "a blue square", "a green circle", "a red circle"]


def official_keys(clip: CLIPModel) -> set[str]:
    """The key set of the published SPM files, written out from the issue's description."""
    keys = {f"model.{k}" for k in clip.state_dict()}
    for i in range(clip.config.vision_config.num_hidden_layers):
        keys |= {f"model.vision_model.encoder.layers.{i}.adaLN_modulation.1.{p}" for p in ("weight", "bias")}
    keys |= {f"model.vision_model.adaLN_modulation.1.{p}" for p in ("weight", "bias")}
    keys |= {f"model.t_embedder.mlp.{j}.{p}" for j in (0, 2) for p in ("weight", "bias")}
    return keys


def official_state_dict(seed: int = 1, hidden: int = 32, layers: int = 2) -> dict[str, torch.Tensor]:
    """A state dict in the official layout built by hand: CLIP weights of ``seed``, random adaLN/t_embedder."""
    clip, _ = build_tiny_clip(seed=seed)
    g = torch.Generator().manual_seed(seed)
    state = {f"model.{k}": v.clone() for k, v in clip.state_dict().items()}
    for i in range(layers):
        state[f"model.vision_model.encoder.layers.{i}.adaLN_modulation.1.weight"] = 0.05 * torch.randn(6 * hidden, hidden, generator=g)
        state[f"model.vision_model.encoder.layers.{i}.adaLN_modulation.1.bias"] = 0.1 * torch.randn(6 * hidden, generator=g)
    state["model.vision_model.adaLN_modulation.1.weight"] = 0.05 * torch.randn(2 * hidden, hidden, generator=g)
    state["model.vision_model.adaLN_modulation.1.bias"] = 0.1 * torch.randn(2 * hidden, generator=g)
    state["model.t_embedder.mlp.0.weight"] = 0.5 * torch.randn(hidden, 256, generator=g)
    state["model.t_embedder.mlp.0.bias"] = 0.1 * torch.randn(hidden, generator=g)
    state["model.t_embedder.mlp.2.weight"] = 0.5 * torch.randn(hidden, hidden, generator=g)
    state["model.t_embedder.mlp.2.bias"] = 0.1 * torch.randn(hidden, generator=g)
    return state


def plain_clip_scores(clip: CLIPModel, tokenizer, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """logit_scale.exp() * cos for each (image, prompt), straight from CLIPModel.forward."""
    ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    pixels = preprocess_images(images, clip.config.vision_config.image_size, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    with torch.no_grad():
        out = clip(input_ids=ids, pixel_values=pixels)
    return out.logits_per_image.diagonal()


def test_timestep_frequencies_are_cos_then_sin():
    t = torch.tensor([0, 1, 500])
    f = timestep_frequencies(t)
    assert f.shape == (3, 256) and f.dtype == torch.float32
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(128) / 128)
    torch.testing.assert_close(f[2, :128], torch.cos(500 * freqs))
    torch.testing.assert_close(f[2, 128:], torch.sin(500 * freqs))
    assert torch.equal(f[0], torch.cat([torch.ones(128), torch.zeros(128)]))


def test_untrained_spm_scores_exactly_as_plain_clip_for_any_t(make_images):
    clip, tokenizer = build_tiny_clip()
    images = make_images(4)
    expected = plain_clip_scores(clip, tokenizer, images, PROMPTS)
    plain = PickScoreJudge(clip, tokenizer).score(images, PROMPTS)
    torch.testing.assert_close(plain, expected, rtol=1e-6, atol=0)  # the judge formula is CLIP's
    spm = StepAwarePreferenceModel(build_tiny_clip()[0], tokenizer).eval()
    for t in ([0] * 4, [1] * 4, [251] * 4, [999] * 4, [0, 300, 600, 999]):
        got = spm.score(images, PROMPTS, torch.tensor(t))
        assert torch.equal(got, plain), t  # bit for bit: the identity modulation adds exact zeros and ones
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


def test_state_dict_has_exactly_the_official_keys():
    clip, tokenizer = build_tiny_clip()
    keys = official_keys(clip)
    spm = StepAwarePreferenceModel(clip, tokenizer)
    assert set(spm.state_dict()) == keys
    layer = spm.model.vision_model.encoder.layers[0]
    bias = layer.adaLN_modulation[1].bias.view(6, -1)
    assert torch.equal(bias[[2, 5]], torch.ones(2, 32)) and torch.equal(bias[[0, 1, 3, 4]], torch.zeros(4, 32))
    assert not layer.adaLN_modulation[1].weight.any()
    assert not spm.model.vision_model.adaLN_modulation[1].weight.any()


def test_official_layout_checkpoint_loads_and_makes_scores_depend_on_t(clip_dir, tmp_path, make_images):
    state = official_state_dict(seed=1)
    file = tmp_path / "sd-v1-5_step-aware_preference_model.bin"
    torch.save(state, file)
    spm = StepAwarePreferenceModel.from_pretrained(clip_dir, checkpoint=file)
    for key, value in spm.state_dict().items():
        assert torch.equal(value, state[key]), key
    images = make_images(4, seed=3)
    s0 = spm.score(images, PROMPTS, torch.zeros(4))
    s500 = spm.score(images, PROMPTS, torch.full((4,), 500))
    s999 = spm.score(images, PROMPTS, torch.full((4,), 999))
    assert (s0 - s500).abs().min() > 1e-4 and (s500 - s999).abs().min() > 1e-4
    # The text features are cached per prompt and reused along a chain.
    assert set(spm._text_cache) == set(PROMPTS)


def test_save_load_round_trip_is_exact(clip_dir, tmp_path, make_images):
    spm = StepAwarePreferenceModel.from_pretrained(clip_dir)
    spm.load_checked_state_dict(official_state_dict(seed=2))
    file = spm.save(tmp_path / "spm.safetensors")
    from safetensors.torch import load_file

    on_disk = load_file(str(file))
    assert set(on_disk) == official_keys(build_tiny_clip()[0])
    again = StepAwarePreferenceModel.from_pretrained(clip_dir, checkpoint=file)
    for key, value in spm.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    images, t = make_images(4, seed=5), torch.tensor([0, 200, 600, 900])
    assert torch.equal(spm.score(images, PROMPTS, t), again.score(images, PROMPTS, t))
    with pytest.raises(FileExistsError):
        spm.save(file)
    spm.save(file, overwrite=True)


def test_bin_checkpoints_are_read_with_weights_only(clip_dir, tmp_path, monkeypatch):
    file = tmp_path / "spm.bin"
    torch.save(official_state_dict(seed=1), file)
    seen = []
    real_load = torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    StepAwarePreferenceModel.from_pretrained(clip_dir, checkpoint=file)
    assert seen == [True]


class _RunsCodeWhenUnpickled:
    """A pickle payload that would append to a list if its code were executed."""

    ran: list[int] = []

    def __reduce__(self):
        return (_RunsCodeWhenUnpickled.ran.append, (1,))


def test_pickled_code_is_refused_not_run(clip_dir, tmp_path):
    file = tmp_path / "evil.bin"
    file.write_bytes(pickle.dumps({"model.logit_scale": _RunsCodeWhenUnpickled()}, protocol=2))
    from spotune.utils.pickles import UnsafePickleError

    with pytest.raises(UnsafePickleError, match="evil.bin holds more than tensors .* loads only weights-only pickles"):
        StepAwarePreferenceModel.from_pretrained(clip_dir, checkpoint=file)
    assert _RunsCodeWhenUnpickled.ran == []


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_corrupt_checkpoint_names_the_file(clip_dir, tmp_path, suffix):
    file = tmp_path / f"broken{suffix}"
    file.write_bytes(b"\x00garbage" * 64)
    with pytest.raises(JudgeLoadError, match=f"broken{suffix}"):
        StepAwarePreferenceModel.from_pretrained(clip_dir, checkpoint=file)


def test_checkpoint_for_another_clip_size_names_the_key(clip_dir, tmp_path):
    # The same layout for a CLIP whose projection is 24 wide instead of 16.
    state = official_state_dict(seed=1)
    state["model.visual_projection.weight"] = torch.zeros(24, 32)
    file = tmp_path / "other.bin"
    torch.save(state, file)
    with pytest.raises(JudgeLoadError, match=r"visual_projection\.weight.*\(24, 32\).*\(16, 32\)"):
        StepAwarePreferenceModel.from_pretrained(clip_dir, checkpoint=file)


def test_missing_and_unexpected_keys_are_named(clip_dir, tmp_path):
    state = official_state_dict(seed=1)
    del state["model.t_embedder.mlp.2.bias"]
    torch.save(state, tmp_path / "missing.bin")
    with pytest.raises(JudgeLoadError, match=r"missing key\(s\) model\.t_embedder\.mlp\.2\.bias"):
        StepAwarePreferenceModel.from_pretrained(clip_dir, checkpoint=tmp_path / "missing.bin")
    state = official_state_dict(seed=1)
    state["model.extra_head.weight"] = torch.zeros(2)
    torch.save(state, tmp_path / "extra.bin")
    with pytest.raises(JudgeLoadError, match=r"unexpected key\(s\) model\.extra_head\.weight"):
        StepAwarePreferenceModel.from_pretrained(clip_dir, checkpoint=tmp_path / "extra.bin")


def test_position_ids_saved_by_older_transformers_are_accepted_when_equal(clip_dir, tmp_path):
    state = official_state_dict(seed=1)
    state["model.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    state["model.vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    torch.save(state, tmp_path / "old.bin")
    StepAwarePreferenceModel.from_pretrained(clip_dir, checkpoint=tmp_path / "old.bin")
    state["model.text_model.embeddings.position_ids"] = torch.zeros(1, 77, dtype=torch.long)
    torch.save(state, tmp_path / "old_bad.bin")
    with pytest.raises(JudgeLoadError, match="position_ids"):
        StepAwarePreferenceModel.from_pretrained(clip_dir, checkpoint=tmp_path / "old_bad.bin")


def test_bad_clip_folders_are_named(clip_dir, tmp_path):
    with pytest.raises(JudgeLoadError, match="does not exist"):
        StepAwarePreferenceModel.from_pretrained(tmp_path / "nowhere")
    empty = tmp_path / "no-weights"
    empty.mkdir()
    (empty / "config.json").write_text((clip_dir / "config.json").read_text())
    with pytest.raises(JudgeLoadError, match="no-weights holds no weights"):
        StepAwarePreferenceModel.from_pretrained(empty)
    with pytest.raises(JudgeLoadError, match="no-weights holds no weights"):
        PickScoreJudge.from_pretrained(str(empty))
    # Weights but no tokenizer (PickScore_v1 alone): the error points at processor_path.
    weights_only = tmp_path / "weights-only"
    weights_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        (weights_only / name).write_bytes((clip_dir / name).read_bytes())
    with pytest.raises(JudgeLoadError, match="processor_path"):
        StepAwarePreferenceModel.from_pretrained(weights_only)
    StepAwarePreferenceModel.from_pretrained(weights_only, processor_path=clip_dir)
    with pytest.raises(JudgeLoadError, match="does not exist"):
        StepAwarePreferenceModel.from_pretrained(clip_dir, checkpoint=tmp_path / "no.bin")
    assert issubclass(JudgeLoadError, SpotuneError)


def test_processor_config_sets_size_mean_and_std(clip_dir, tmp_path):
    proc = tmp_path / "processor"
    proc.mkdir()
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    (proc / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}, "image_mean": mean, "image_std": std}
    ))
    judge = PickScoreJudge.from_pretrained(str(clip_dir), processor_path=str(proc))
    assert (judge.image_size, list(judge.image_mean), list(judge.image_std)) == (32, mean, std)
    (proc / "preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 40}, "crop_size": 32}))
    with pytest.raises(JudgeLoadError, match="crop_size 32"):
        StepAwarePreferenceModel.from_pretrained(clip_dir, processor_path=proc)


def test_gradients_reach_the_modulation_through_gradient_checkpointing(make_images):
    clip, tokenizer = build_tiny_clip()
    spm = StepAwarePreferenceModel(clip, tokenizer).train().requires_grad_(True)
    spm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pixels = preprocess_images(make_images(2), 32, spm.image_mean, spm.image_std)
    text, image, scale = spm(pixels, torch.tensor([10, 900]), spm.tokenize(PROMPTS[:2]))
    (scale.exp() * torch.nn.functional.cosine_similarity(text, image)).sum().backward()
    layer = spm.model.vision_model.encoder.layers[0]
    assert layer.gradient_checkpointing
    assert layer.adaLN_modulation[1].weight.grad.abs().sum() > 0
    assert spm.model.t_embedder.mlp[0].weight.grad is not None
