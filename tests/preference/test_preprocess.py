"""Judge pre-processing equals SPO's: bicubic resize of the shortest side, centre crop, [0, 1], normalise."""

import torch
import torch.nn.functional as F

from spotune.preference.clip_judge import CLIP_MEAN, CLIP_STD, preprocess_images


def _spo_reference(images, size):
    """SPO's get_preference_score pre-processing, written out independently."""
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    new = (int(h * scale + 0.5), int(w * scale + 0.5))
    x = F.interpolate(images, size=new, mode="bicubic", align_corners=False)
    top = int(round((new[0] - size) / 2.0))
    left = int(round((new[1] - size) / 2.0))
    x = x[..., top : top + size, left : left + size]
    x = (x / 2 + 0.5).clamp(0, 1)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def test_matches_spo_for_square_wide_and_small_images():
    g = torch.Generator().manual_seed(0)
    for shape, size in (((2, 3, 64, 64), 224), ((1, 3, 48, 80), 224), ((1, 3, 512, 512), 224), ((1, 3, 33, 47), 16)):
        images = torch.rand(shape, generator=g) * 2.2 - 1.1  # VAE output overshoots [-1, 1]
        torch.testing.assert_close(preprocess_images(images, size, CLIP_MEAN, CLIP_STD), _spo_reference(images, size))


def test_no_antialiasing_when_downscaling():
    """A one-pixel checkerboard downscaled 2x keeps aliasing structure (antialiasing would flatten it)."""
    board = (torch.arange(64).view(8, 8) + torch.arange(64).view(8, 8).T) % 2 * 2.0 - 1.0
    images = board.expand(1, 3, 8, 8).clone()
    out = preprocess_images(images, 4, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    flattened = F.interpolate(images, size=(4, 4), mode="bicubic", antialias=True, align_corners=False) / 2 + 0.5
    assert not torch.allclose(out, flattened.clamp(0, 1), atol=1e-3)
