"""The model-family seam: detection, and each family's conditioning against diffusers' own pipelines."""

from __future__ import annotations

import pytest
import torch

from spotune.diffusion.sampler import guided_noise_pred
from spotune.models.conditioning import Conditioning
from spotune.models.family import SD15, SDXL, family_of
from spotune.models.loading import load_pipeline

PROMPTS = ["a red circle on a white background", "two blue squares", ""]


@pytest.fixture(scope="module")
def sdxl():
    return load_pipeline("builtin:tiny-sdxl")


@pytest.fixture(scope="module")
def sd15():
    return load_pipeline("builtin:tiny-sd15")


def test_family_is_read_from_the_unet(sd15, sdxl):
    assert family_of(sd15) is SD15 and family_of(sdxl) is SDXL


def test_sdxl_conditioning_equals_diffusers_encode_prompt(sdxl):
    embeds, neg, pooled, neg_pooled = sdxl.encode_prompt(
        PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True
    )
    conditioner = SDXL.conditioner(sdxl, 1024)
    cond = conditioner.encode(PROMPTS)
    assert cond.prompt_embeds.shape == (3, 77, 64)  # both encoders' penultimate states, 32 + 32 channels
    torch.testing.assert_close(cond.prompt_embeds, embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond.pooled, pooled, rtol=0, atol=0)
    assert cond.time_ids.tolist() == [[1024, 1024, 0, 0, 1024, 1024]] * 3
    # The negative prompt "" is zeros (force_zeros_for_empty_prompt), as diffusers gives with no negative.
    negative = conditioner.negative("")
    assert torch.count_nonzero(negative.prompt_embeds) == 0 and torch.count_nonzero(negative.pooled) == 0
    assert torch.equal(neg[:1], negative.prompt_embeds) and torch.equal(neg_pooled[:1], negative.pooled)
    # An encoded "" is not zero: the zeros come from the rule, not from the encoder.
    assert torch.count_nonzero(cond.select(2).prompt_embeds) > 0


def test_sdxl_time_ids_follow_the_resolution(sdxl):
    assert SDXL.conditioner(sdxl).encode(["x"]).time_ids.tolist() == [[32, 32, 0, 0, 32, 32]]  # native size
    assert SDXL.conditioner(sdxl, (768, 1024)).encode(["x"]).time_ids.tolist() == [[768, 1024, 0, 0, 768, 1024]]


def test_sd15_conditioning_equals_diffusers_encode_prompt(sd15):
    embeds, neg = sd15.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=[""] * len(PROMPTS))
    conditioner = SD15.conditioner(sd15)
    cond = conditioner.encode(PROMPTS)
    assert cond.pooled is None and cond.time_ids is None
    torch.testing.assert_close(cond.prompt_embeds, embeds, rtol=0, atol=0)
    torch.testing.assert_close(conditioner.negative("").prompt_embeds, neg[:1], rtol=0, atol=0)


def test_rows_move_together():
    cond = Conditioning(torch.arange(2.0)[:, None, None].expand(2, 3, 4), torch.tensor([[0.0], [1.0]]), torch.ones(2, 6))
    repeated = cond.repeat(3)  # block-major: row j*b + p is prompt p
    assert repeated.prompt_embeds[:, 0, 0].tolist() == [0, 1, 0, 1, 0, 1]
    assert repeated.pooled[:, 0].tolist() == [0, 1, 0, 1, 0, 1] and repeated.time_ids.shape == (6, 6)
    picked = repeated.select(torch.tensor([5, 0]))
    assert picked.prompt_embeds[:, 0, 0].tolist() == [1, 0] and picked.pooled[:, 0].tolist() == [1, 0]
    both = Conditioning.cat([cond.select(1), cond.select(0)])
    assert both.pooled[:, 0].tolist() == [1, 0] and len(both) == 2
    assert len(cond.select(1).expand(4)) == 4
    assert set(cond.unet_kwargs()) == {"encoder_hidden_states", "added_cond_kwargs"}
    assert set(Conditioning(cond.prompt_embeds).unet_kwargs()) == {"encoder_hidden_states"}


def test_guided_call_matches_the_sdxl_pipelines_own_arithmetic(sdxl):
    """guided_noise_pred on SDXL: the [uncond; cond] UNet call with added_cond_kwargs, as the SDXL pipeline makes it."""
    conditioner = SDXL.conditioner(sdxl)
    cond, negative = conditioner.encode(PROMPTS[:2]), conditioner.negative("")
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([901, 901])
    out = guided_noise_pred(sdxl.unet, x, t, cond, negative, 5.0)
    with torch.no_grad():
        raw = sdxl.unet(
            torch.cat([x, x]), torch.cat([t, t]),
            encoder_hidden_states=torch.cat([negative.prompt_embeds.expand(2, -1, -1), cond.prompt_embeds]),
            added_cond_kwargs={"text_embeds": torch.cat([negative.pooled.expand(2, -1), cond.pooled]),
                               "time_ids": torch.cat([negative.time_ids.expand(2, -1), cond.time_ids])},
        ).sample
    uncond, text = raw.chunk(2)
    torch.testing.assert_close(out, uncond + 5.0 * (text - uncond), rtol=1e-6, atol=1e-6)
