"""PickScore, CLIPScore, the aesthetic predictor and the SPM scorer on a tiny CLIP, against computations
written here with transformers' own CLIP image processor (what PickScore's reference code uses)."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

from spotune.eval import get_scorer
from spotune.eval.preprocess import resize_longest_pad, resize_shortest_center_crop
from spotune.eval.scorers import MissingWeightError, ScorerError, WeightFormatError

PROMPTS = ["a red cat", "a blue dog on grass", "a green tree", "an empty room"]


def _features(output) -> torch.Tensor:
    """``get_*_features`` returns a tensor in transformers 4 and an output object in 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def reference_clip(folder, images, prompts):
    """PickScore's published recipe: processor -> get_*_features -> normalise -> cosine."""
    model = CLIPModel.from_pretrained(str(folder)).eval()
    processor = CLIPImageProcessorPil.from_pretrained(str(folder))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    pixels = processor(images=images, return_tensors="pt").pixel_values
    text = tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        image_embs = F.normalize(_features(model.get_image_features(pixel_values=pixels)), dim=-1)
        text_embs = F.normalize(_features(model.get_text_features(**text)), dim=-1)
    return model, (image_embs * text_embs).sum(-1)


def test_preprocessing_matches_transformers_processor(tiny_clip_dir, make_images):
    processor = CLIPImageProcessorPil.from_pretrained(str(tiny_clip_dir))
    images = make_images([(45, 37), (37, 60), (33, 33), (200, 31)], seed=1)  # odd margins on both axes
    for image in images:
        ours = np.asarray(resize_shortest_center_crop(image, 32, offset_rounding="transformers"), dtype=np.float32)
        theirs = processor(images=[image], return_tensors="pt", do_normalize=False, do_rescale=False).pixel_values[0]
        assert np.abs(ours - theirs.permute(1, 2, 0).numpy()).max() <= 1.0  # uint8 rounding at most


def test_resize_longest_pad_geometry(make_images):
    (wide,) = make_images([(64, 20)], seed=2)
    padded = np.asarray(resize_longest_pad(wide, 32))
    assert padded.shape == (32, 32, 3)
    # 20 * 32 / 64 = 10 rows of image, 22 of padding: 11 above, 11 below, black.
    assert padded[:11].max() == 0 and padded[21:].max() == 0 and padded[11:21].max() > 0
    with pytest.raises(ValueError, match="offset_rounding"):
        resize_shortest_center_crop(wide, 32, offset_rounding="nearest")


def test_pickscore_equals_reference(tiny_clip_dir, make_images):
    images = make_images([(48, 40), (40, 56), (32, 32), (64, 33)], seed=3)
    scorer = get_scorer("pickscore", model_path=tiny_clip_dir, processor_path=tiny_clip_dir, device="cpu", batch_size=3)
    scores = scorer(images, PROMPTS)
    model, cosine = reference_clip(tiny_clip_dir, images, PROMPTS)
    expected = model.logit_scale.exp() * cosine
    assert scores.shape == (4,) and torch.allclose(scores, expected, atol=1e-3)
    # The score follows the prompt: a shuffled prompt list changes the scores.
    assert not torch.allclose(scorer(images, PROMPTS[::-1]), scores)


def test_clipscore_equals_reference(tiny_clip_dir, make_images):
    images = make_images([(48, 40), (40, 56), (32, 32), (64, 33)], seed=4)
    scores = get_scorer("clipscore", model_path=tiny_clip_dir, device="cpu")(images, PROMPTS)
    _, cosine = reference_clip(tiny_clip_dir, images, PROMPTS)
    assert torch.allclose(scores, 100.0 * cosine.clamp(min=0.0), atol=1e-3)
    assert (scores >= 0).all()


def test_aesthetic_equals_reference(tmp_path, tiny_clip_dir, make_images):
    gen = torch.Generator().manual_seed(0)
    widths = (16, 12, 8, 6, 4, 1)  # the tiny CLIP projects to 16 dims; the real head is 768-1024-128-64-16-1
    head = {}
    for index, (inp, out) in zip((0, 2, 4, 6, 7), zip(widths[:-1], widths[1:])):
        head[f"layers.{index}.weight"] = torch.randn(out, inp, generator=gen)
        head[f"layers.{index}.bias"] = torch.randn(out, generator=gen)
    head_file = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(head, head_file)
    # Even margins: torchvision's and transformers' crop offsets agree, so the processor is a fair reference.
    images = make_images([(48, 40), (40, 48), (32, 32)], seed=5)
    scores = get_scorer("aesthetic", head_path=head_file, clip_path=tiny_clip_dir, device="cpu")(images, ["", "", ""])

    model = CLIPModel.from_pretrained(str(tiny_clip_dir)).eval()
    pixels = CLIPImageProcessorPil.from_pretrained(str(tiny_clip_dir))(images=images, return_tensors="pt").pixel_values
    with torch.no_grad():
        emb = _features(model.get_image_features(pixel_values=pixels)).numpy().astype(np.float64)
    x = emb / np.linalg.norm(emb, axis=-1, keepdims=True)  # the predictor's numpy normalisation
    for index in (0, 2, 4, 6, 7):  # no activations between the linears, as published
        x = x @ head[f"layers.{index}.weight"].double().numpy().T + head[f"layers.{index}.bias"].double().numpy()
    assert np.allclose(scores.numpy(), x[:, 0], atol=1e-4)


def test_aesthetic_bad_head(tmp_path, tiny_clip_dir):
    bad = tmp_path / "head.pth"
    torch.save({"layers.0.weight": torch.zeros(4, 16)}, bad)
    with pytest.raises(WeightFormatError, match="layers.0.bias"):
        get_scorer("aesthetic", head_path=bad, clip_path=tiny_clip_dir)
    widths = (768, 1024, 128, 64, 16, 1)
    head = {}
    for index, (inp, out) in zip((0, 2, 4, 6, 7), zip(widths[:-1], widths[1:])):
        head[f"layers.{index}.weight"], head[f"layers.{index}.bias"] = torch.zeros(out, inp), torch.zeros(out)
    torch.save(head, bad)
    with pytest.raises(WeightFormatError, match="768"):  # the published head on a CLIP that is not ViT-L/14
        get_scorer("aesthetic", head_path=bad, clip_path=tiny_clip_dir)
    with pytest.raises(MissingWeightError, match=r"sac\+logos\+ava1-l14-linearMSE\.pth.*improved-aesthetic-predictor"):
        get_scorer("aesthetic", clip_path=tiny_clip_dir)


def test_spm_scores_at_timestep_zero(tmp_path, make_images):
    from spotune.preference.step_aware import StepAwarePreferenceModel

    spm = StepAwarePreferenceModel.from_pretrained("builtin:tiny-clip")
    with torch.no_grad():  # move the identity-initialised time conditioning away from the identity
        for name, param in spm.named_parameters():
            if "adaLN" in name or "t_embedder" in name:
                param.add_(torch.randn_like(param) * 0.3)
    ckpt = spm.save(tmp_path / "spm.safetensors")
    images = make_images([(32, 32), (40, 48)], seed=6)
    prompts = PROMPTS[:2]
    scores = get_scorer("spm", clip_path="builtin:tiny-clip", checkpoint_path=ckpt, device="cpu")(images, prompts)

    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pixels = processor(images=images, return_tensors="pt").pixel_values
    ids = spm.tokenize(prompts)
    with torch.no_grad():
        def expected(t: int) -> torch.Tensor:
            img = F.normalize(spm.image_features(pixels, torch.full((2,), t)), dim=-1)
            txt = F.normalize(spm.text_features(ids), dim=-1)
            return spm.logit_scale().exp() * (img * txt).sum(-1)

        assert torch.allclose(scores, expected(0), atol=1e-3)
        assert not torch.allclose(expected(0), expected(600), atol=1e-3)  # the timestep matters to this SPM
    with pytest.raises(MissingWeightError, match="train-spm"):
        get_scorer("spm", clip_path="builtin:tiny-clip")


def test_get_scorer_errors_and_input_checks(tmp_path, tiny_clip_dir, make_images):
    with pytest.raises(ScorerError, match="unknown scorer 'pickscor'.*pickscore"):
        get_scorer("pickscor")
    with pytest.raises(ScorerError, match="checkpoint"):
        get_scorer("pickscore", checkpoint=tiny_clip_dir)
    with pytest.raises(MissingWeightError, match="PickScore_v1"):
        get_scorer("pickscore")
    with pytest.raises(MissingWeightError, match="processor"):  # a model folder without processor files
        empty = tmp_path / "model-only"
        empty.mkdir()
        get_scorer("pickscore", model_path=empty)
    pickled = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    # Old training checkpoints pickle their argparse settings: weights_only=True refuses to run that.
    torch.save({"state_dict": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=1.0)}, pickled)
    with pytest.raises(WeightFormatError, match="weights_only"):
        get_scorer("aesthetic", head_path=pickled, clip_path=tiny_clip_dir)
    scorer = get_scorer("clipscore", model_path=tiny_clip_dir, device="cpu")
    images = make_images([(32, 32)], seed=0)
    with pytest.raises(ScorerError, match="1 images but 2 prompts"):
        scorer(images, ["a", "b"])
    with pytest.raises(ScorerError, match="PIL image"):
        scorer([np.zeros((32, 32, 3))], ["a"])
    assert scorer([], []).shape == (0,)
