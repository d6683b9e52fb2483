"""ImageReward on transformers' BLIP modules against a plain-torch BLIP forward written here.

The reference follows ImageReward's published code path: BLIP's timm-style ViT (fused qkv, LayerNorm
eps 1e-6, final norm on every token), BLIP's ``med`` BERT in multimodal mode (bidirectional
self-attention with the -10000 padding mask, cross-attention to all image tokens in every layer,
post-LayerNorm residuals), the [CLS] state through the five linears, then (r - mean) / std.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from spotune.eval import get_scorer
from spotune.eval.scorers import MissingWeightError, WeightFormatError

V_WIDTH, V_HEADS, V_LAYERS, PATCH, IMAGE = 32, 4, 2, 8, 32
T_WIDTH, T_HEADS, T_LAYERS, T_INTER, T_POSITIONS = 24, 4, 2, 48, 40
HEAD = (T_WIDTH, 16, 8, 6, 4, 1)
MEAN, STD = 0.16717362830052426, 1.0333394966054072  # ImageReward's published standardisation
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "cat", "blue", "dog", "on", "the", "mat", "tree"]


@pytest.fixture(scope="module")
def bert_tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert-tokenizer")
    (folder / "vocab.txt").write_text("\n".join(WORDS + list("bcdefghijklmnopqrstuvwxyz")) + "\n")
    return folder


def imagereward_state_dict(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny random ImageReward.pt state dict (BLIP layout + ``mlp.layers``)."""
    gen = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=gen) * scale

    def ln(prefix, width):
        sd[prefix + ".weight"] = 1 + r(width, scale=0.1)
        sd[prefix + ".bias"] = r(width, scale=0.1)

    def linear(prefix, out, inp):
        sd[prefix + ".weight"] = r(out, inp)
        sd[prefix + ".bias"] = r(out, scale=0.1)

    grid = IMAGE // PATCH
    sd: dict[str, torch.Tensor] = {
        "blip.visual_encoder.cls_token": r(1, 1, V_WIDTH, scale=0.5),
        "blip.visual_encoder.pos_embed": r(1, grid * grid + 1, V_WIDTH, scale=0.1),
        "blip.visual_encoder.patch_embed.proj.weight": r(V_WIDTH, 3, PATCH, PATCH, scale=0.1),
        "blip.visual_encoder.patch_embed.proj.bias": r(V_WIDTH, scale=0.1),
        "blip.text_encoder.embeddings.word_embeddings.weight": r(vocab, T_WIDTH, scale=0.5),
        "blip.text_encoder.embeddings.position_embeddings.weight": r(T_POSITIONS, T_WIDTH, scale=0.1),
        "blip.text_encoder.embeddings.position_ids": torch.arange(T_POSITIONS)[None],
        "blip.vision_proj.weight": r(8, V_WIDTH),  # saved by BLIP_Pretrain, unused by the reward
    }
    for i in range(V_LAYERS):
        p = f"blip.visual_encoder.blocks.{i}"
        ln(p + ".norm1", V_WIDTH)
        linear(p + ".attn.qkv", 3 * V_WIDTH, V_WIDTH)
        linear(p + ".attn.proj", V_WIDTH, V_WIDTH)
        ln(p + ".norm2", V_WIDTH)
        linear(p + ".mlp.fc1", 4 * V_WIDTH, V_WIDTH)
        linear(p + ".mlp.fc2", V_WIDTH, 4 * V_WIDTH)
    ln("blip.visual_encoder.norm", V_WIDTH)
    ln("blip.text_encoder.embeddings.LayerNorm", T_WIDTH)
    for i in range(T_LAYERS):
        p = f"blip.text_encoder.encoder.layer.{i}"
        for part, kv_width in (("attention", T_WIDTH), ("crossattention", V_WIDTH)):
            linear(f"{p}.{part}.self.query", T_WIDTH, T_WIDTH)
            linear(f"{p}.{part}.self.key", T_WIDTH, kv_width)
            linear(f"{p}.{part}.self.value", T_WIDTH, kv_width)
            linear(f"{p}.{part}.output.dense", T_WIDTH, T_WIDTH)
            ln(f"{p}.{part}.output.LayerNorm", T_WIDTH)
        linear(f"{p}.intermediate.dense", T_INTER, T_WIDTH)
        linear(f"{p}.output.dense", T_WIDTH, T_INTER)
        ln(f"{p}.output.LayerNorm", T_WIDTH)
    for index, (inp, out) in zip((0, 2, 4, 6, 7), zip(HEAD[:-1], HEAD[1:])):
        linear(f"mlp.layers.{index}", out, inp)
    return sd


def med_config(vocab: int) -> dict:
    return {
        "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "hidden_size": T_WIDTH, "initializer_range": 0.02, "intermediate_size": T_INTER,
        "layer_norm_eps": 1e-12, "max_position_embeddings": T_POSITIONS, "model_type": "bert",
        "num_attention_heads": T_HEADS, "num_hidden_layers": T_LAYERS, "pad_token_id": 0, "type_vocab_size": 2,
        "vocab_size": vocab, "encoder_width": 768, "add_cross_attention": True,
    }


# -- the reference ---------------------------------------------------------------------------------


def _attention(q, k, v, heads, mask=None):
    b, n, c = q.shape
    d = c // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / d**0.5
    if mask is not None:
        scores = scores + mask
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)


def reference_vit(sd, pixels):
    p = "blip.visual_encoder."
    x = F.conv2d(pixels, sd[p + "patch_embed.proj.weight"], sd[p + "patch_embed.proj.bias"], stride=PATCH)
    x = torch.cat([sd[p + "cls_token"].expand(x.shape[0], -1, -1), x.flatten(2).transpose(1, 2)], 1) + sd[p + "pos_embed"]
    for i in range(V_LAYERS):
        b = f"{p}blocks.{i}."
        h = F.layer_norm(x, (V_WIDTH,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], eps=1e-6)
        qkv = F.linear(h, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"])
        q, k, v = qkv.split(V_WIDTH, dim=-1)
        x = x + F.linear(_attention(q, k, v, V_HEADS), sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        h = F.layer_norm(x, (V_WIDTH,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], eps=1e-6)
        h = F.linear(F.gelu(F.linear(h, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])), sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
        x = x + h
    return F.layer_norm(x, (V_WIDTH,), sd[p + "norm.weight"], sd[p + "norm.bias"], eps=1e-6)


def reference_reward(sd, pixels, ids, attention_mask):
    t = "blip.text_encoder."

    def lin(name, x):
        return F.linear(x, sd[t + name + ".weight"], sd[t + name + ".bias"])

    def norm(name, x):
        return F.layer_norm(x, (T_WIDTH,), sd[t + name + ".weight"], sd[t + name + ".bias"], eps=1e-12)

    image = reference_vit(sd, pixels)
    x = sd[t + "embeddings.word_embeddings.weight"][ids] + sd[t + "embeddings.position_embeddings.weight"][: ids.shape[1]]
    x = norm("embeddings.LayerNorm", x)
    pad_mask = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0
    for i in range(T_LAYERS):
        p = f"encoder.layer.{i}."
        a = _attention(lin(p + "attention.self.query", x), lin(p + "attention.self.key", x),
                       lin(p + "attention.self.value", x), T_HEADS, pad_mask)
        x = norm(p + "attention.output.LayerNorm", lin(p + "attention.output.dense", a) + x)
        c = _attention(lin(p + "crossattention.self.query", x), lin(p + "crossattention.self.key", image),
                       lin(p + "crossattention.self.value", image), T_HEADS)
        x = norm(p + "crossattention.output.LayerNorm", lin(p + "crossattention.output.dense", c) + x)
        h = lin(p + "output.dense", F.gelu(lin(p + "intermediate.dense", x)))
        x = norm(p + "output.LayerNorm", h + x)
    r = x[:, 0]
    for index in (0, 2, 4, 6, 7):
        r = F.linear(r, sd[f"mlp.layers.{index}.weight"], sd[f"mlp.layers.{index}.bias"])
    return ((r.squeeze(-1)) - MEAN) / STD


def reference_pixels(image: Image.Image) -> torch.Tensor:
    """torchvision's Resize(32, bicubic) + CenterCrop(32) + ToTensor + Normalize, written out."""
    w, h = image.size
    if w <= h:
        size = (IMAGE, int(IMAGE * h / w))
    else:
        size = (int(IMAGE * w / h), IMAGE)
    image = image.resize(size, Image.BICUBIC)
    top, left = int(round((size[1] - IMAGE) / 2.0)), int(round((size[0] - IMAGE) / 2.0))
    x = np.asarray(image, dtype=np.float32)[top : top + IMAGE, left : left + IMAGE] / 255.0
    mean = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
    std = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
    return torch.from_numpy((x - mean) / std).permute(2, 0, 1)


# -- tests -------------------------------------------------------------------------------------------


def _write_weights(tmp_path, vocab: int, seed: int = 0):
    sd = imagereward_state_dict(vocab, seed)
    ckpt, med = tmp_path / "ImageReward.pt", tmp_path / "med_config.json"
    torch.save(sd, ckpt)
    med.write_text(json.dumps(med_config(vocab)))
    return sd, ckpt, med


def test_imagereward_equals_reference(tmp_path, bert_tokenizer_dir, make_images):
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(str(bert_tokenizer_dir))
    vocab = len(tokenizer) + 2  # BLIP adds [DEC] and [ENC]
    sd, ckpt, med = _write_weights(tmp_path, vocab)
    scorer = get_scorer(
        "imagereward", checkpoint_path=ckpt, med_config_path=med, tokenizer_path=bert_tokenizer_dir,
        vision_heads=V_HEADS, device="cpu", batch_size=2,
    )
    images = make_images([(45, 32), (32, 51), (40, 40)], seed=5)  # odd margins exercise the crop rounding
    prompts = ["a red cat on the mat", "a blue dog", "tree"]
    rewards = scorer(images, prompts)

    tokens = tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert tokens.attention_mask[2].sum() < tokens.attention_mask[0].sum()  # padding is really masked
    pixels = torch.stack([reference_pixels(im) for im in images])
    with torch.no_grad():
        expected = reference_reward(sd, pixels, tokens.input_ids, tokens.attention_mask)
    assert rewards.shape == (3,)
    assert torch.allclose(rewards, expected, atol=1e-4)
    assert len(set(rewards.tolist())) == 3


def test_imagereward_bad_files(tmp_path, bert_tokenizer_dir):
    with pytest.raises(MissingWeightError, match=r"ImageReward\.pt.*THUDM/ImageReward"):
        get_scorer("imagereward", med_config_path=tmp_path / "m.json", tokenizer_path=bert_tokenizer_dir)
    from transformers import BertTokenizer

    vocab = len(BertTokenizer.from_pretrained(str(bert_tokenizer_dir))) + 2
    sd, ckpt, med = _write_weights(tmp_path, vocab)
    kwargs = dict(checkpoint_path=ckpt, med_config_path=med, tokenizer_path=bert_tokenizer_dir, vision_heads=V_HEADS)
    med.write_text(json.dumps({**med_config(vocab), "vocab_size": vocab + 5}))
    with pytest.raises(WeightFormatError, match="word_embeddings"):
        get_scorer("imagereward", **kwargs)
    med.write_text(json.dumps({**med_config(vocab), "add_cross_attention": False}))
    with pytest.raises(WeightFormatError, match="add_cross_attention"):
        get_scorer("imagereward", **kwargs)
    med.write_text("{not json")
    with pytest.raises(WeightFormatError, match="not valid JSON"):
        get_scorer("imagereward", **kwargs)
    med.write_text(json.dumps(med_config(vocab)))
    del sd["mlp.layers.7.bias"]
    torch.save(sd, ckpt)
    with pytest.raises(WeightFormatError, match=r"mlp\.layers\.7\.bias"):
        get_scorer("imagereward", **kwargs)
