"""Prompt encoding for SD1.5-family text encoders."""

from __future__ import annotations

import torch


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str], device: torch.device | str | None = None) -> torch.Tensor:
    """[b] captions -> [b, L, D] last hidden states of the CLIP text encoder (what the UNet attends to).

    Captions are padded/truncated to the tokenizer's ``model_max_length`` (77 for SD1.5), as the
    diffusers pipeline does.
    """
    device = device or text_encoder.device
    ids = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)
    return text_encoder(ids)[0]
