"""Model families (SD1.5, SDXL): the one place that knows how the two architectures differ.

Why the seam sits here: the samplers, recipes, generation and export all need the same three things
from a model, namely how prompts become UNet conditioning, how the guided UNet is called with it and
how large its images are, and everything else about SD1.5 versus SDXL (loading, the single-file key
layout, the webui LoRA names) hangs off the same question "which family is this?". So a family object
answers it once, from the model itself (:func:`family_of_unet`), and callers ask the family instead of
testing for SDXL. The conditioning travels as one :class:`~spotune.models.conditioning.Conditioning`
value, so the sampler's rows, a training tuple's prompt and the guided call handle both families alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from spotune.errors import SpotuneError
from spotune.models.conditioning import Conditioning


class FamilyError(SpotuneError, ValueError):
    """A model, LoRA or setting that belongs to another family than the one in use."""


class PromptConditioner(Protocol):
    """Turns captions into :class:`Conditioning` for one family's UNet."""

    text_encoders: list[torch.nn.Module]

    def encode(self, prompts: list[str], device: torch.device | str | None = None) -> Conditioning:
        """[b] captions -> b rows of conditioning on ``device``."""
        ...

    def negative(self, prompt: str, device: torch.device | str | None = None) -> Conditioning:
        """The negative prompt's conditioning, one row (broadcast by the guided call)."""
        ...


def _token_ids(tokenizer, prompts: list[str], device) -> torch.Tensor:
    """[b, 77] ids padded/truncated to the tokenizer's ``model_max_length``, as diffusers' pipelines do."""
    return tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)


@dataclass
class SD15Conditioner:
    """SD1.5: the last hidden states of one CLIP text encoder, [b, 77, 768]."""

    tokenizer: object
    text_encoder: torch.nn.Module

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.text_encoder]

    @torch.no_grad()
    def encode(self, prompts: list[str], device: torch.device | str | None = None) -> Conditioning:
        device = device or self.text_encoder.device
        ids = _token_ids(self.tokenizer, prompts, self.text_encoder.device)
        return Conditioning(self.text_encoder(ids)[0].to(device))

    def negative(self, prompt: str, device: torch.device | str | None = None) -> Conditioning:
        return self.encode([prompt], device)


@dataclass
class SDXLConditioner:
    """SDXL, as diffusers' ``StableDiffusionXLPipeline.encode_prompt`` and the SPO authors do it.

    Both encoders run with ``output_hidden_states=True``; their penultimate hidden states are concatenated
    ([b, 77, 768 + 1280]); the pooled embedding is text_encoder_2's projected output [b, 1280]; the time ids
    are (H, W, 0, 0, H, W) at the training resolution for every row. An empty negative prompt is all zeros
    when the model sets ``force_zeros_for_empty_prompt`` (SDXL base does), as in diffusers.
    """

    tokenizer: object
    tokenizer_2: object
    text_encoder: torch.nn.Module
    text_encoder_2: torch.nn.Module
    resolution: tuple[int, int]
    force_zeros_for_empty_prompt: bool = True

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.text_encoder, self.text_encoder_2]

    def time_ids(self, batch: int, dtype: torch.dtype, device) -> torch.Tensor:
        """[batch, 6] (orig_h, orig_w, crop_top, crop_left, target_h, target_w)."""
        h, w = self.resolution
        return torch.tensor([[h, w, 0, 0, h, w]], dtype=dtype, device=device).repeat(batch, 1)

    @torch.no_grad()
    def encode(self, prompts: list[str], device: torch.device | str | None = None) -> Conditioning:
        device = device or self.text_encoder_2.device
        hidden, pooled = [], None
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            out = encoder(_token_ids(tokenizer, prompts, encoder.device), output_hidden_states=True)
            pooled = out[0]  # text_encoder_2 (CLIPTextModelWithProjection): text_embeds [b, 1280]
            hidden.append(out.hidden_states[-2].to(device))
        embeds = torch.cat(hidden, dim=-1)
        pooled = pooled.to(device=device, dtype=embeds.dtype)
        return Conditioning(embeds, pooled, self.time_ids(len(prompts), embeds.dtype, device))

    def negative(self, prompt: str, device: torch.device | str | None = None) -> Conditioning:
        cond = self.encode([prompt], device)
        if prompt == "" and self.force_zeros_for_empty_prompt:
            return Conditioning(torch.zeros_like(cond.prompt_embeds), torch.zeros_like(cond.pooled), cond.time_ids)
        return cond


@dataclass(frozen=True)
class ModelFamily:
    """One architecture family.

    Attributes:
        name: ``sd15`` or ``sdxl`` (the ``model_family=`` value).
        title: how messages name it.
        text_encoder_names: pipeline attributes of its text encoders, in order.
        tokenizer_names: pipeline attributes of its tokenizers, in order.
        ss_base_model_version: kohya's ``ss_base_model_version`` for LoRAs of this family.
        modelspec_architecture: ``modelspec.architecture`` of a LoRA of this family.
        pipeline_class_name: the diffusers pipeline class that runs it.
        vae_scaling_factor: its VAE's latent scale (SD1.5 0.18215, SDXL 0.13025), which tells the VAEs apart.
        vae_honours_force_upcast: whether a VAE whose config sets ``force_upcast`` is kept in fp32 under a
            reduced dtype. SDXL's VAE overflows in fp16 (diffusers' SDXL pipeline upcasts it, the SPO authors
            keep it in fp32 unless given the fp16-fix VAE); SD1.5's pipeline ignores the flag, and so do we.
        spo_sampler: the authors' SPO sampler for this family (``sampler=auto``): ``sd15`` branches at every
            step (:mod:`spotune.diffusion.sampler`), ``sdxl`` in segments (:mod:`spotune.diffusion.segment_sampler`).
            For ``algorithm=gradspo`` the same name picks GradSPO's sampler for the family, which ends the
            chain its own way (:func:`spotune.diffusion.gradspo_sampler.gradspo_sample`, ``ending``).
        modelspec_lora_implementation: ``modelspec.implementation`` kohya writes for a LoRA of this family
            (``diffusers`` for SD1.5, whose LoRAs it names by diffusers modules; Stability's repository for SDXL).
        modelspec_checkpoint_architecture: ``modelspec.architecture`` of a whole single-file checkpoint.
        kohya_unet_layout: which module names kohya's webui LoRA files use for the UNet: ``diffusers``
            (SD1.5: ``lora_unet_down_blocks_0_attentions_0_...``) or ``original`` (SDXL, whose kohya UNet is
            the sgm one: ``lora_unet_input_blocks_4_1_...``).
        native_resolution: the image size of the family's base model (its LoRAs' resolution when nothing else is known).
    """

    name: str
    title: str
    text_encoder_names: tuple[str, ...]
    tokenizer_names: tuple[str, ...]
    ss_base_model_version: str
    modelspec_architecture: str
    spo_sampler: str
    pipeline_class_name: str
    vae_scaling_factor: float
    vae_honours_force_upcast: bool
    modelspec_lora_implementation: str
    modelspec_checkpoint_architecture: str
    kohya_unet_layout: str
    native_resolution: int

    @property
    def components(self) -> tuple[str, ...]:
        """The sub-folders a diffusers pipeline folder of this family must have for spotune."""
        return ("unet", "vae", *self.text_encoder_names, *self.tokenizer_names, "scheduler")

    def pipeline_class(self):
        """The diffusers pipeline class (imported on use: diffusers is slow to import)."""
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    def conditioner(self, pipe, resolution: int | tuple[int, int] | None = None) -> PromptConditioner:
        """The prompt conditioner of ``pipe``'s text encoders (``resolution``: SDXL's time ids; default native)."""
        if self.name == "sd15":
            return SD15Conditioner(pipe.tokenizer, pipe.text_encoder)
        size = resolution or default_resolution(pipe.unet, pipe.vae)
        size = (size, size) if isinstance(size, int) else tuple(size)
        force = bool(getattr(pipe.config, "force_zeros_for_empty_prompt", True))
        return SDXLConditioner(pipe.tokenizer, pipe.tokenizer_2, pipe.text_encoder, pipe.text_encoder_2, size, force)

    def single_file_state(self, pipe, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The pipeline's models in this family's original single-file layout (what webui/ComfyUI load)."""
        if self.name == "sdxl":
            from spotune.export.original_layout_sdxl import to_original_sdxl

            return to_original_sdxl(pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, dtype=dtype)
        from spotune.export.original_layout import to_original

        return to_original(pipe.unet, pipe.vae, pipe.text_encoder, dtype=dtype)

    def check_unet(self, unet, what: str) -> None:
        """Refuse a UNet of the other family, naming both."""
        found = family_of_unet(unet)
        if found is not self:
            raise FamilyError(f"{what} is {found.title} but {self.title} was asked for (model_family={self.name})")


SD15 = ModelFamily(
    name="sd15",
    title="an SD1.5-family model",
    text_encoder_names=("text_encoder",),
    tokenizer_names=("tokenizer",),
    ss_base_model_version="sd_v1",
    modelspec_architecture="stable-diffusion-v1/lora",
    pipeline_class_name="StableDiffusionPipeline",
    vae_scaling_factor=0.18215,
    vae_honours_force_upcast=False,
    spo_sampler="sd15",
    modelspec_lora_implementation="diffusers",
    modelspec_checkpoint_architecture="stable-diffusion-v1",
    kohya_unet_layout="diffusers",
    native_resolution=512,
)
SDXL = ModelFamily(
    name="sdxl",
    title="an SDXL model",
    text_encoder_names=("text_encoder", "text_encoder_2"),
    tokenizer_names=("tokenizer", "tokenizer_2"),
    ss_base_model_version="sdxl_base_v1-0",
    modelspec_architecture="stable-diffusion-xl-v1-base/lora",
    pipeline_class_name="StableDiffusionXLPipeline",
    vae_scaling_factor=0.13025,
    vae_honours_force_upcast=True,
    spo_sampler="sdxl",
    modelspec_lora_implementation="https://github.com/Stability-AI/generative-models",
    modelspec_checkpoint_architecture="stable-diffusion-xl-v1-base",
    kohya_unet_layout="original",
    native_resolution=1024,
)
FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (SD15, SDXL)}


def family_named(name: str) -> ModelFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise FamilyError(f"model_family must be one of {', '.join(FAMILIES)} (or auto), got {name!r}") from None


def family_of_unet(unet) -> ModelFamily:
    """SDXL when the UNet takes the pooled text embedding and time ids (``addition_embed_type='text_time'``)."""
    return family_of_unet_config(unet.config)


def family_of_unet_config(config) -> ModelFamily:
    """:func:`family_of_unet` for a UNet config (a diffusers ``FrozenDict`` or a plain dict from config.json)."""
    value = config.get("addition_embed_type") if hasattr(config, "get") else getattr(config, "addition_embed_type", None)
    return SDXL if value == "text_time" else SD15


def family_of(pipe) -> ModelFamily:
    """The family of a loaded pipeline, read from its UNet."""
    return family_of_unet(pipe.unet)


def family_of_vae_scale(scaling_factor: float) -> ModelFamily | None:
    """The family whose VAEs have this latent scale, or ``None`` for another VAE (e.g. one trained in code)."""
    return next((f for f in FAMILIES.values() if abs(f.vae_scaling_factor - float(scaling_factor)) < 1e-6), None)


class ResolutionError(SpotuneError, ValueError):
    """An image size the model's VAE cannot map to whole latents."""


def vae_scale_factor(vae) -> int:
    """Pixels per latent cell: 2 per VAE down block after the first (SD1.5 and SDXL: 8)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def default_resolution(unet, vae) -> int:
    """The model's native image size: ``unet.sample_size * vae_scale_factor`` (SD1.5 512, SDXL 1024)."""
    return int(unet.config.sample_size) * vae_scale_factor(vae)


def resolve_resolution(requested: int | None, unet, vae, key: str = "resolution", where: str = "config") -> int:
    """``requested`` pixels, or the model's native size when unset (0 or ``None``), checked against the VAE.

    Raises:
        ResolutionError: a size that is not a positive multiple of the VAE factor, naming ``key`` (the message
            starts with ``where``: the config, or the command).
    """
    factor = vae_scale_factor(vae)
    size = int(requested) if requested else default_resolution(unet, vae)
    if size <= 0 or size % factor:
        native = default_resolution(unet, vae)
        raise ResolutionError(
            f"{where}: {key}={size} is not a positive multiple of the VAE's factor {factor} (this model's latents are "
            f"1/{factor} of the image); use a multiple of {factor}, e.g. {key}={native} (the model's native size), or leave it unset"
        )
    return size
