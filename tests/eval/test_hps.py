"""HPS v2: open_clip -> transformers conversion against a plain-torch open_clip forward, and the scorer.

The reference below re-implements open_clip's CLIP (ViT image tower, causal text tower, argmax
pooling, projections used as ``x @ P``) with ``nn.MultiheadAttention`` on the fused in_proj weights,
as open_clip itself does; it shares no code with the converter.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spotune.eval import get_scorer
from spotune.eval.scorers import MissingWeightError, WeightFormatError
from spotune.eval.scorers.clip_common import clip_image_embeds, clip_text_embeds
from spotune.eval.scorers.open_clip_convert import load_open_clip_as_transformers

V_WIDTH, V_HEADS, V_LAYERS, PATCH, IMAGE = 32, 4, 2, 8, 32
T_WIDTH, T_HEADS, T_LAYERS, CONTEXT, EMBED = 24, 4, 2, 77, 16
OPENAI_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
OPENAI_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)


def _block(sd, prefix, width, gen):
    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=gen) * scale

    sd[prefix + "ln_1.weight"] = 1 + r(width, scale=0.1)
    sd[prefix + "ln_1.bias"] = r(width, scale=0.1)
    sd[prefix + "attn.in_proj_weight"] = r(3 * width, width)
    sd[prefix + "attn.in_proj_bias"] = r(3 * width, scale=0.1)
    sd[prefix + "attn.out_proj.weight"] = r(width, width)
    sd[prefix + "attn.out_proj.bias"] = r(width, scale=0.1)
    sd[prefix + "ln_2.weight"] = 1 + r(width, scale=0.1)
    sd[prefix + "ln_2.bias"] = r(width, scale=0.1)
    sd[prefix + "mlp.c_fc.weight"] = r(4 * width, width)
    sd[prefix + "mlp.c_fc.bias"] = r(4 * width, scale=0.1)
    sd[prefix + "mlp.c_proj.weight"] = r(width, 4 * width)
    sd[prefix + "mlp.c_proj.bias"] = r(width, scale=0.1)


def open_clip_state_dict(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny random state dict in open_clip's layout (the layout of HPS_v2_compressed.pt)."""
    gen = torch.Generator().manual_seed(seed)
    grid = IMAGE // PATCH
    sd = {
        "visual.conv1.weight": torch.randn(V_WIDTH, 3, PATCH, PATCH, generator=gen) * 0.1,
        "visual.class_embedding": torch.randn(V_WIDTH, generator=gen) * 0.5,
        "visual.positional_embedding": torch.randn(grid * grid + 1, V_WIDTH, generator=gen) * 0.1,
        "visual.ln_pre.weight": 1 + torch.randn(V_WIDTH, generator=gen) * 0.1,
        "visual.ln_pre.bias": torch.randn(V_WIDTH, generator=gen) * 0.1,
        "visual.ln_post.weight": 1 + torch.randn(V_WIDTH, generator=gen) * 0.1,
        "visual.ln_post.bias": torch.randn(V_WIDTH, generator=gen) * 0.1,
        "visual.proj": torch.randn(V_WIDTH, EMBED, generator=gen) * 0.2,
        "token_embedding.weight": torch.randn(vocab, T_WIDTH, generator=gen) * 0.5,
        "positional_embedding": torch.randn(CONTEXT, T_WIDTH, generator=gen) * 0.1,
        "ln_final.weight": 1 + torch.randn(T_WIDTH, generator=gen) * 0.1,
        "ln_final.bias": torch.randn(T_WIDTH, generator=gen) * 0.1,
        "text_projection": torch.randn(T_WIDTH, EMBED, generator=gen) * 0.2,
        "logit_scale": torch.tensor(4.6052),
    }
    for i in range(V_LAYERS):
        _block(sd, f"visual.transformer.resblocks.{i}.", V_WIDTH, gen)
    for i in range(T_LAYERS):
        _block(sd, f"transformer.resblocks.{i}.", T_WIDTH, gen)
    return sd


# -- the reference: open_clip's forward in plain torch ---------------------------------------------


def _resblock(x, sd, prefix, heads, attn_mask=None):
    width = x.shape[-1]
    attn = nn.MultiheadAttention(width, heads, batch_first=True)
    attn.in_proj_weight.data = sd[prefix + "attn.in_proj_weight"]
    attn.in_proj_bias.data = sd[prefix + "attn.in_proj_bias"]
    attn.out_proj.weight.data = sd[prefix + "attn.out_proj.weight"]
    attn.out_proj.bias.data = sd[prefix + "attn.out_proj.bias"]
    h = F.layer_norm(x, (width,), sd[prefix + "ln_1.weight"], sd[prefix + "ln_1.bias"], eps=1e-5)
    x = x + attn(h, h, h, need_weights=False, attn_mask=attn_mask)[0]
    h = F.layer_norm(x, (width,), sd[prefix + "ln_2.weight"], sd[prefix + "ln_2.bias"], eps=1e-5)
    h = F.linear(F.gelu(F.linear(h, sd[prefix + "mlp.c_fc.weight"], sd[prefix + "mlp.c_fc.bias"])),
                 sd[prefix + "mlp.c_proj.weight"], sd[prefix + "mlp.c_proj.bias"])
    return x + h


def reference_image_features(sd, pixels):
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=PATCH)  # [B, W, g, g]
    x = x.flatten(2).transpose(1, 2)  # [B, g*g, W]
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + sd["visual.positional_embedding"]
    x = F.layer_norm(x, (V_WIDTH,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"], eps=1e-5)
    for i in range(V_LAYERS):
        x = _resblock(x, sd, f"visual.transformer.resblocks.{i}.", V_HEADS)
    pooled = F.layer_norm(x[:, 0], (V_WIDTH,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"], eps=1e-5)
    return pooled @ sd["visual.proj"]


def reference_text_features(sd, ids):
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"][: ids.shape[1]]
    causal = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)
    for i in range(T_LAYERS):
        x = _resblock(x, sd, f"transformer.resblocks.{i}.", T_HEADS, attn_mask=causal)
    x = F.layer_norm(x, (T_WIDTH,), sd["ln_final.weight"], sd["ln_final.bias"], eps=1e-5)
    pooled = x[torch.arange(ids.shape[0]), ids.argmax(dim=-1)]  # open_clip pools at the largest id (EOT)
    return pooled @ sd["text_projection"]


def reference_hps_pixels(image) -> torch.Tensor:
    """open_clip's ResizeMaxSize(32, fill=0) + ToTensor + Normalize, with the padding done in tensor space."""
    import numpy as np
    from PIL import Image

    w, h = image.size
    scale = IMAGE / max(w, h)
    if scale != 1.0:
        new_h, new_w = round(h * scale), round(w * scale)
        image = image.resize((new_w, new_h), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    pad_h, pad_w = IMAGE - x.shape[1], IMAGE - x.shape[2]
    x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
    return (x - OPENAI_MEAN) / OPENAI_STD


# -- tests -------------------------------------------------------------------------------------------


def test_converted_model_equals_open_clip_forward():
    torch.manual_seed(0)
    sd = open_clip_state_dict(vocab=64)
    model = load_open_clip_as_transformers(sd, vision_heads=V_HEADS, text_heads=T_HEADS)
    pixels = torch.randn(3, 3, IMAGE, IMAGE)
    ids = torch.randint(1, 62, (3, CONTEXT))
    ids[:, 0] = 62  # start of text
    ids[0, 5], ids[1, 9], ids[2, 76] = 63, 63, 63  # end of text (the largest id) at different places
    ids[0, 6:], ids[1, 10:] = 0, 0  # zero padding after it, as open_clip pads
    with torch.no_grad():
        assert torch.allclose(clip_image_embeds(model, pixels), reference_image_features(sd, pixels), atol=1e-5)
        assert torch.allclose(clip_text_embeds(model, ids), reference_text_features(sd, ids), atol=1e-5)
    assert model.logit_scale.item() == pytest.approx(4.6052)


def test_hps_scorer_equals_reference(tmp_path, tiny_clip_dir, make_images):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_clip_dir))
    sd = open_clip_state_dict(vocab=len(tokenizer), seed=1)
    ckpt = tmp_path / "HPS_v2_compressed.pt"
    torch.save({"state_dict": {k: v.half() for k, v in sd.items()}}, ckpt)  # the published files are fp16
    sd = {k: v.half().float() for k, v in sd.items()}
    scorer = get_scorer(
        "hpsv2", checkpoint_path=ckpt, tokenizer_path=tiny_clip_dir, vision_heads=V_HEADS, text_heads=T_HEADS,
        device="cpu", batch_size=2,
    )
    images = make_images([(48, 20), (20, 40), (32, 32)], seed=3)  # wide, tall, and already 32: no resize
    prompts = ["a red cat on a mat", "a blue dog", "a tree"]
    scores = scorer(images, prompts)

    pixels = torch.stack([reference_hps_pixels(im) for im in images])
    ids = tokenizer(prompts, padding="max_length", truncation=True, max_length=CONTEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        img = F.normalize(reference_image_features(sd, pixels), dim=-1)
        txt = F.normalize(reference_text_features(sd, ids), dim=-1)
    expected = 100.0 * (img * txt).sum(-1)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    assert torch.allclose(scores, expected, atol=1e-3)
    assert len(set(scores.tolist())) == 3


def test_hps_missing_and_malformed_weights(tmp_path, tiny_clip_dir):
    with pytest.raises(MissingWeightError, match=r"HPS_v2\.1_compressed\.pt.*xswu/HPSv2"):
        get_scorer("hpsv21", tokenizer_path=tiny_clip_dir)
    with pytest.raises(MissingWeightError, match="does not exist"):
        get_scorer("hpsv2", checkpoint_path=tmp_path / "nope.pt", tokenizer_path=tiny_clip_dir)
    sd = open_clip_state_dict(vocab=64)
    sd["visual.transformer.resblocks.0.ls_1.gamma"] = torch.ones(V_WIDTH)  # a layer-scale variant
    with pytest.raises(WeightFormatError, match="ls_1"):
        load_open_clip_as_transformers(sd, V_HEADS, T_HEADS)
    del sd["visual.transformer.resblocks.0.ls_1.gamma"], sd["ln_final.bias"]
    with pytest.raises(WeightFormatError, match="ln_final|final_layer_norm"):
        load_open_clip_as_transformers(sd, V_HEADS, T_HEADS)
    with pytest.raises(WeightFormatError, match="divisible"):
        load_open_clip_as_transformers(open_clip_state_dict(vocab=64), vision_heads=5, text_heads=T_HEADS)


def test_hps_refuses_a_tokenizer_that_does_not_fit(tmp_path, tiny_clip_dir):
    ckpt = tmp_path / "HPS_v2_compressed.pt"
    torch.save({"state_dict": open_clip_state_dict(vocab=64)}, ckpt)  # vocabulary of 64, tokenizer of 514
    with pytest.raises(WeightFormatError, match="tokenizer"):
        get_scorer("hpsv2", checkpoint_path=ckpt, tokenizer_path=tiny_clip_dir, vision_heads=V_HEADS, text_heads=T_HEADS)
