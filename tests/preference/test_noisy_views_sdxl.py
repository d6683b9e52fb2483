"""Noisy x0-prediction views of an SDXL model, as SPO's SDXL step-aware model was trained on them;
and the judge's pre-processing of 1024 px images."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler

from spotune.models.loading import BUILTIN_TINY_SDXL, load_pipeline
from spotune.preference.clip_judge import CLIP_MEAN, CLIP_STD, preprocess_images, spm_training_pixels
from spotune.preference.noisy_views import NoisyViewMaker


@pytest.fixture(scope="module")
def sdxl():
    return load_pipeline(BUILTIN_TINY_SDXL)


def _unet_inputs(unet):
    """Record the keyword arguments of every UNet call."""
    seen: list[dict] = []
    handle = unet.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs), with_kwargs=True)
    return seen, handle


def test_views_are_spos_sdxl_x0_prediction(sdxl, make_images):
    """Against SPO's get_noised_imgs for SDXL written out with diffusers' own encode_prompt (empty negative
    prompt -> zeros), time ids (R, R, 0, 0, R, R) for both halves and DDIMScheduler.step after set_timesteps(1000)."""
    pipe, size = sdxl, 32
    maker = NoisyViewMaker(pipe, guidance_scale=5.0, negative_prompt="", resolution=size)
    p0, p1, captions, t = make_images(2, seed=1), make_images(2, seed=2), ["a red circle", "a blue square"], torch.tensor([120, 830])
    seen, handle = _unet_inputs(pipe.unet)
    try:
        views_0, views_1 = maker(p0, p1, captions, t, torch.Generator().manual_seed(7))
    finally:
        handle.remove()

    g = torch.Generator().manual_seed(7)  # the same draws, in the same order
    z = pipe.vae.encode(torch.cat([p0, p1])).latent_dist.sample(generator=g) * pipe.vae.config.scaling_factor
    noise = torch.randn((2, *z.shape[1:]), generator=g).repeat(2, 1, 1, 1)
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(1000)
    tt = t.repeat(2)
    x_t = scheduler.add_noise(z, noise, tt)
    with torch.no_grad():
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompt=captions * 2, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True
        )
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=embeds.dtype).repeat(2, 1)
        x0 = []
        for i in range(4):
            out = pipe.unet(
                torch.cat([x_t[i : i + 1]] * 2), torch.cat([tt[i : i + 1]] * 2),
                encoder_hidden_states=torch.cat([neg[i : i + 1], embeds[i : i + 1]]),
                added_cond_kwargs={"text_embeds": torch.cat([neg_pooled[i : i + 1], pooled[i : i + 1]]), "time_ids": time_ids},
            ).sample
            guided = out[:1] + 5.0 * (out[1:] - out[:1])
            x0.append(scheduler.step(guided, int(tt[i]), x_t[i : i + 1]).pred_original_sample)
        expected = pipe.vae.decode(torch.cat(x0) / pipe.vae.config.scaling_factor).sample
    torch.testing.assert_close(torch.cat([views_0, views_1]), expected, rtol=1e-4, atol=1e-4)

    # What the UNet was given: the negative half all zeros (embeddings and pooled), the time ids on every row.
    (call,) = seen
    added = call["added_cond_kwargs"]
    assert not neg.any() and not neg_pooled.any()
    assert not call["encoder_hidden_states"][:4].any() and call["encoder_hidden_states"][4:].abs().sum() > 0
    assert not added["text_embeds"][:4].any() and added["text_embeds"][4:].abs().sum() > 0
    assert added["time_ids"].tolist() == [[size, size, 0, 0, size, size]] * 8


def test_time_ids_follow_the_views_resolution(sdxl):
    # SPO's SDXL SPM: (1024, 1024, 0, 0, 1024, 1024); unset, the model's native size.
    maker = NoisyViewMaker(sdxl, resolution=1024)
    assert maker.conditioner.time_ids(1, torch.float32, "cpu").tolist() == [[1024, 1024, 0, 0, 1024, 1024]]
    native = NoisyViewMaker(sdxl).conditioner.time_ids(1, torch.float32, "cpu").tolist()
    assert native == [[32, 32, 0, 0, 32, 32]]


def test_a_1024_view_goes_to_224_by_bicubic_without_antialiasing():
    """SDXL's 1024 px images: the judge (sampling) and the SPM trainer both resize straight to 224 x 224,
    bicubic, no antialiasing, no crop; they differ only in when they clamp."""
    images = torch.rand(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0)) * 2.4 - 1.2
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    plain = lambda x: F.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False)  # noqa: E731
    sampling = ((plain(images) / 2 + 0.5).clamp(0, 1) - mean) / std
    training = (plain((images / 2 + 0.5).clamp(0, 1)).clamp(0, 1) - mean) / std
    torch.testing.assert_close(preprocess_images(images, 224, CLIP_MEAN, CLIP_STD), sampling)
    torch.testing.assert_close(spm_training_pixels(images, 224, CLIP_MEAN, CLIP_STD), training)
    smooth = F.interpolate(images, size=(224, 224), mode="bicubic", align_corners=False, antialias=True)
    assert not torch.allclose(sampling, ((smooth / 2 + 0.5).clamp(0, 1) - mean) / std, atol=1e-2)


def test_the_vae_runs_in_its_own_dtype_under_an_fp16_unet(make_images):
    """SDXL's own VAE stays fp32 under fp16 (it overflows in fp16); the UNet gets fp16 latents, the views are fp32."""
    pipe = load_pipeline(BUILTIN_TINY_SDXL, dtype=torch.float16)
    assert pipe.unet.dtype == torch.float16 and pipe.vae.dtype == torch.float32
    seen, handle = _unet_inputs(pipe.unet)
    dtypes = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: dtypes.append(args[0].dtype))
    try:
        images = make_images(2, seed=4)
        views_0, views_1 = NoisyViewMaker(pipe, resolution=32)(images, images, ["a", "b"], torch.tensor([10, 900]),
                                                                torch.Generator().manual_seed(0))
    finally:
        handle.remove()
        hook.remove()
    assert dtypes == [torch.float16] and seen[0]["added_cond_kwargs"]["time_ids"].dtype == torch.float16
    assert views_0.dtype == torch.float32 and torch.isfinite(torch.cat([views_0, views_1])).all()
