"""What a UNet is conditioned on for one batch of prompts, for every model family.

SD1.5 attends to one text encoder's last hidden states. SDXL attends to the concatenated penultimate
hidden states of two encoders and also takes, through ``added_cond_kwargs``, the second encoder's
projected (pooled) embedding and six micro-conditioning "time ids" (original size, crop corner, target
size). :class:`Conditioning` carries all of it as one value, so samplers, training tuples and the guided
UNet call handle both families with the same code: rows are selected, repeated and concatenated together.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch


@dataclass(frozen=True)
class Conditioning:
    """Per-row UNet conditioning for b prompts.

    Attributes:
        prompt_embeds: [b, L, D] what cross-attention attends to (SD1.5: [b, 77, 768]; SDXL: [b, 77, 2048]).
        pooled: [b, P] SDXL's pooled text embedding (text_encoder_2's projection, P = 1280); ``None`` for SD1.5.
        time_ids: [b, 6] SDXL's (orig_h, orig_w, crop_top, crop_left, target_h, target_w); ``None`` for SD1.5.
    """

    prompt_embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The fields that are set, by name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def _map(self, fn) -> "Conditioning":
        return Conditioning(**{name: fn(value) for name, value in self.tensors().items()})

    def select(self, index: torch.Tensor | slice | int) -> "Conditioning":
        """Rows ``index`` (a tensor of indices, a mask or a slice); an int keeps the batch dimension."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return self._map(lambda v: v[index])

    def repeat(self, k: int) -> "Conditioning":
        """[b] -> [k*b] rows, block-major like ``tensor.repeat(k, ...)``: row j*b + p is prompt p."""
        return self._map(lambda v: v.repeat(k, *([1] * (v.dim() - 1))))

    def expand(self, batch: int) -> "Conditioning":
        """A 1-row conditioning (a negative prompt) broadcast to ``batch`` rows without copying."""
        return self._map(lambda v: v.expand(batch, *v.shape[1:]))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Conditioning":
        return self._map(lambda v: v.to(device=device, dtype=dtype))

    @property
    def dtype(self) -> torch.dtype:
        return self.prompt_embeds.dtype

    @property
    def device(self) -> torch.device:
        return self.prompt_embeds.device

    @staticmethod
    def cat(parts: list["Conditioning"]) -> "Conditioning":
        names = parts[0].tensors().keys()
        return Conditioning(**{name: torch.cat([p.tensors()[name] for p in parts]) for name in names})

    def unet_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``UNet2DConditionModel.forward`` for these rows."""
        kwargs: dict[str, Any] = {"encoder_hidden_states": self.prompt_embeds}
        if self.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return kwargs
