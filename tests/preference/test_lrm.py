"""The latent reward model against a restatement of the authors' forward, and their checkpoint layout.

The restatement runs the *whole* diffusers UNet forward (up blocks included) and reads the down blocks'
outputs and the mid block's through hooks, so the LRM's own partial forward is checked against the
library's; the text side and the score are then computed as the authors' code does (pooled EOS output
through text_projection for SD1.5, text_encoder_2's text_embeds for SDXL; both features L2-normalised;
exp(logit_scale) * cosine; the mid feature guided at 7.5 against the empty prompt; the down-block features
of the prompt's pass only).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from spotune.models.tiny import build_tiny_sd15_pipeline, build_tiny_sdxl_pipeline
from spotune.preference.lrm import LRMLoadError, LatentRewardModel, feature_taps, load_lrm
from spotune.utils.pickles import UnsafePickleError

PROMPTS = ["a red circle on a blue background", "a green square"]


def _lrm_and_parts(sdxl: bool):
    """(LRM, an untouched full copy of its UNet, the pipeline) from a tiny pipeline."""
    pipe = build_tiny_sdxl_pipeline(3) if sdxl else build_tiny_sd15_pipeline(3)
    full = copy.deepcopy(pipe.unet)
    taps = feature_taps(pipe.unet)
    features = sum(pipe.unet.down_blocks[i].resnets[-1].out_channels for i in range(len(taps))) + pipe.unet.config.block_out_channels[-1]
    torch.manual_seed(0)
    if sdxl:
        width = pipe.text_encoder_2.config.projection_dim
        lrm = LatentRewardModel(pipe.unet, [pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer, pipe.tokenizer_2],
                                nn.Linear(features, width, bias=False), None, 2.3, image_size=32)
    else:
        width = pipe.text_encoder.config.hidden_size
        lrm = LatentRewardModel(pipe.unet, [pipe.text_encoder], [pipe.tokenizer], nn.Linear(features, width, bias=False),
                                nn.Linear(width, width, bias=False), 2.3)
    return lrm.eval(), full.eval(), pipe


def _ids(tokenizer, prompts):
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd15", "sdxl"])
@torch.no_grad()
def test_scores_follow_the_authors_forward_through_the_full_unet(sdxl):
    lrm, full, pipe = _lrm_and_parts(sdxl)
    n = len(PROMPTS)
    latents, t = torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([951, 1])
    # Text, as the authors' code computes it: [prompts; empty prompt] in one batch, no attention mask.
    if sdxl:
        ids = torch.cat([_ids(pipe.tokenizer, PROMPTS), _ids(pipe.tokenizer, [""] * n)])
        ids2 = torch.cat([_ids(pipe.tokenizer_2, PROMPTS), _ids(pipe.tokenizer_2, [""] * n)])
        first = pipe.text_encoder(ids, output_hidden_states=True)
        second = pipe.text_encoder_2(ids2, output_hidden_states=True)
        states = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        time_ids = torch.tensor([[32, 32, 0, 0, 32, 32]] * (2 * n), dtype=torch.float32)
        added = {"text_embeds": second.text_embeds, "time_ids": time_ids}
        text = second.text_embeds[:n]
    else:
        ids = torch.cat([_ids(pipe.tokenizer, PROMPTS), _ids(pipe.tokenizer, [""] * n)])
        out = pipe.text_encoder(ids)
        states, added, text = out[0], None, lrm.text_projection(out[1][:n])
    # The image side: the library's whole forward, its down and mid outputs read by hooks.
    seen = {"res": [], "mid": None}
    hooks = [full.conv_in.register_forward_hook(lambda m, i, o: seen["res"].append(o))]
    hooks += [block.register_forward_hook(lambda m, i, o: seen["res"].extend(o[1])) for block in full.down_blocks]
    hooks.append(full.mid_block.register_forward_hook(lambda m, i, o: seen.__setitem__("mid", o)))
    full(torch.cat([latents, latents]), torch.cat([t, t]), encoder_hidden_states=states, added_cond_kwargs=added)
    for hook in hooks:
        hook.remove()
    expected_taps = [2, 5] if sdxl else [1, 3]  # each down block's last layer before its downsampler
    assert lrm.taps == expected_taps
    pooled = [seen["res"][i].mean(dim=(2, 3))[:n] for i in expected_taps]  # the prompt's pass only
    mid = seen["mid"].mean(dim=(2, 3))
    guided = mid[n:] + 7.5 * (mid[:n] - mid[n:])
    image = lrm.visual_projection(torch.cat(pooled + [guided], dim=-1))
    expected = torch.exp(torch.tensor(2.3)) * torch.nn.functional.cosine_similarity(image, text, dim=-1)
    torch.testing.assert_close(lrm.score(latents, PROMPTS, t), expected, rtol=1e-4, atol=1e-5)
    # The up path is gone from the LRM: it holds the down and mid weights only.
    assert len(lrm.unet.up_blocks) == 0 and lrm.unet.conv_out is None


def test_taps_and_widths_of_the_real_architectures():
    """SD1.5's and SDXL's UNets, built on the meta device from the configs spotune ships."""
    from diffusers import UNet2DConditionModel

    from spotune.preference import lrm as lrm_module

    resources = lrm_module._resources()
    for family, taps, width in (("sd15", [2, 5, 8, 11], 4800), ("sdxl", [2, 5, 8], 3520)):
        config = json.loads((resources / family / "unet" / "config.json").read_text())
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(config)
        assert feature_taps(unet) == taps, family
        channels = sum(unet.down_blocks[i].resnets[-1].out_channels for i in range(len(taps))) + config["block_out_channels"][-1]
        assert channels == width, family


def _authors_folder(tmp_path, logit_scale):
    """An LRM folder written as the authors' trainer writes it: the full UNet, the text encoder, and
    state_dict.pt with the projections' weights and logit_scale as a Python float."""
    pipe = build_tiny_sd15_pipeline(5)
    folder = tmp_path / "lrm"
    pipe.unet.save_pretrained(folder / "unet")
    pipe.text_encoder.save_pretrained(folder / "text_encoder")
    pipe.tokenizer.save_pretrained(folder / "tokenizer")  # the tiny model's own vocabulary
    torch.manual_seed(4)
    visual, text = torch.randn(32, 32 + 64 + 64) * 0.02, torch.randn(32, 32)
    torch.save({"visual_projection": {"weight": visual}, "text_projection": {"weight": text}, "logit_scale": logit_scale},
               folder / "state_dict.pt")
    return folder, pipe, visual, text


def test_loads_the_authors_layout(tmp_path):
    folder, pipe, visual, text = _authors_folder(tmp_path, 2.0)
    loaded = load_lrm(folder)
    assert not loaded.is_sdxl and not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    built = LatentRewardModel(pipe.unet, [pipe.text_encoder], [pipe.tokenizer], nn.Linear(160, 32, bias=False),
                              nn.Linear(32, 32, bias=False), 2.0).eval()
    built.visual_projection.weight.data.copy_(visual)
    built.text_projection.weight.data.copy_(text)
    latents, t = torch.randn(2, 4, 8, 8), torch.tensor([501, 1])
    assert torch.equal(loaded.score(latents, PROMPTS, t), built.score(latents, PROMPTS, t))
    # In fp16, as the authors run it: the scores come back in the model's dtype.
    half = load_lrm(folder, dtype=torch.bfloat16)
    assert half.score(latents, PROMPTS, t).dtype == torch.bfloat16


class Payload:
    """Not a tensor: a weights-only load refuses to rebuild it."""


def test_refuses_what_is_not_an_lrm_or_not_weights_only(tmp_path):
    folder, *_ = _authors_folder(tmp_path, 2.0)
    torch.save({"visual_projection": {"weight": torch.zeros(1)}, "logit_scale": Payload()}, folder / "state_dict.pt")
    with pytest.raises(UnsafePickleError, match="holds more than tensors"):
        load_lrm(folder)
    with pytest.raises(LRMLoadError, match="unet/config.json is missing"):
        load_lrm(tmp_path)
    with pytest.raises(LRMLoadError, match="no such LRM folder"):
        load_lrm(tmp_path / "nothing")
