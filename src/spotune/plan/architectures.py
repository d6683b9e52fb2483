"""The recipe's models built from their configs alone: no weight file is read.

Called inside ``FakeTensorMode`` by the planner (every parameter is a fake tensor: shapes and dtypes, no
memory) and on any device by the full-size benchmark (random weights). The architecture comes from the
model folder's configs when ``pretrained_model`` is a local diffusers folder, else from the configs spotune
ships for the family (SD1.5, SDXL base 1.0), so a plan needs no download.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# PickScore_v1 / CLIP-ViT-H-14-laion2B (the CLIP under SPO's step-aware judge): its published config.
VIT_H_14: dict[str, Any] = {
    "projection_dim": 1024,
    "logit_scale_init_value": 2.6592,
    "text_config": {
        "vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
        "num_attention_heads": 16, "max_position_embeddings": 77, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
        "projection_dim": 1024, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1,
    },
    "vision_config": {
        "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 16,
        "image_size": 224, "patch_size": 14, "hidden_act": "gelu", "layer_norm_eps": 1e-5, "projection_dim": 1024,
    },
}


@dataclass
class ArchitectureSource:
    """Where a plan's architecture comes from, in words for the report."""

    family: str  # "sd15" or "sdxl"
    folder: Path  # the diffusers-layout folder whose configs are read
    described: str


def _read(folder: Path, name: str, file: str = "config.json") -> dict:
    return json.loads((folder / name / file).read_text(encoding="utf-8-sig"))


def architecture_source(pretrained_model: str, model_family: str) -> ArchitectureSource:
    """The config folder for ``pretrained_model``: its own when it is a local diffusers folder, else spotune's.

    Builtin tiny models are not handled here (they are built in code by :func:`spotune.models.loading.load_pipeline`).
    """
    from spotune.models.family import SDXL
    from spotune.models.loading import folder_family, single_file_family
    from spotune.models.single_file import sd15_resources
    from spotune.models.single_file_sdxl import sdxl_resources

    path = Path(os.path.expanduser(pretrained_model))
    if path.is_dir() and (path / "model_index.json").is_file():
        family = "sdxl" if folder_family(path) is SDXL else "sd15"
        return ArchitectureSource(family, path, f"the configs in {path}")
    if model_family in ("sd15", "sdxl"):
        family, why = model_family, f"model_family={model_family}"
    elif path.is_file():
        found = single_file_family(path)
        family, why = ("sdxl" if found is SDXL else "sd15"), f"the keys of {path.name}"
    else:
        family = "sdxl" if "xl" in pretrained_model.lower() else "sd15"
        why = f"the name {pretrained_model!r}; set model_family= to choose"
    folder = sdxl_resources() if family == "sdxl" else sd15_resources()
    title = "SDXL base 1.0" if family == "sdxl" else "SD1.5"
    return ArchitectureSource(family, folder, f"{title}'s configs shipped with spotune (family from {why})")


def build_pipeline(source: ArchitectureSource, dtype: torch.dtype, vae: str | None = None):
    """The family's diffusers pipeline from ``source``'s configs, initialised in ``dtype`` (random or fake).

    The VAE runs in the dtype the loader would give it (:func:`spotune.models.loading.vae_dtype`): fp32 for
    SDXL's own VAE, whose config sets ``force_upcast``, and ``dtype`` when ``vae`` names a replacement (the
    fp16-fix VAE, which keeps SDXL's architecture: its config is read when ``vae`` is a local folder).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from spotune.models.family import family_named
    from spotune.models.loading import vae_dtype
    from spotune.models.single_file import build_sd15_tokenizer

    folder = source.folder
    vae_config = _read(folder, "vae")
    if vae:
        replacement = Path(os.path.expanduser(vae))
        vae_config = json.loads((replacement / "config.json").read_text(encoding="utf-8-sig")) if (replacement / "config.json").is_file() \
            else {**vae_config, "force_upcast": False}
    unet = UNet2DConditionModel.from_config(_read(folder, "unet")).to(dtype)
    vae_model = AutoencoderKL.from_config(vae_config)
    vae_model.to(vae_dtype(vae_model, family_named(source.family), dtype))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(_read(folder, "text_encoder"))).to(dtype)
    scheduler = DDIMScheduler.from_config(_read(folder, "scheduler", "scheduler_config.json"))

    def tokenizer(name: str):
        if (folder / name / "vocab.json").is_file():
            return CLIPTokenizer.from_pretrained(str(folder / name), local_files_only=True)
        return build_sd15_tokenizer()

    if source.family == "sdxl":
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(_read(folder, "text_encoder_2"))).to(dtype)
        pipe = StableDiffusionXLPipeline(
            vae=vae_model, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer("tokenizer"),
            tokenizer_2=tokenizer("tokenizer_2"), unet=unet, scheduler=scheduler,
            force_zeros_for_empty_prompt=True, add_watermarker=False,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=vae_model, text_encoder=text_encoder, tokenizer=tokenizer("tokenizer"), unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def clip_config(clip_path: str | None) -> tuple[dict[str, Any], str]:
    """The judge CLIP's config: ``clip_path``'s config.json when it is a local folder, else ViT-H/14's."""
    if clip_path:
        file = Path(os.path.expanduser(clip_path)) / "config.json"
        if file.is_file():
            data = json.loads(file.read_text(encoding="utf-8-sig"))
            return data, f"the config in {file.parent}"
    return copy.deepcopy(VIT_H_14), "PickScore_v1's ViT-H/14 config"


def build_clip_judge(kind: str, config: dict[str, Any], dtype: torch.dtype):
    """The ``spm`` (step-aware) or ``pickscore`` judge over a CLIP built from ``config``."""
    from transformers import CLIPConfig, CLIPModel

    from spotune.models.single_file import build_sd15_tokenizer
    from spotune.preference.clip_judge import PickScoreJudge
    from spotune.preference.step_aware import StepAwarePreferenceModel

    model = CLIPModel(CLIPConfig(**config))
    image_size = model.config.vision_config.image_size
    # PickScore's tokenizer is CLIP's BPE vocabulary, the one SD1.5's tokenizer is built from.
    judge_class = StepAwarePreferenceModel if kind == "spm" else PickScoreJudge
    judge = judge_class(model, build_sd15_tokenizer(), image_size)
    return judge.to(dtype=dtype).eval().requires_grad_(False)


def build_lrm_judge(source: ArchitectureSource, dtype: torch.dtype):
    """LPO's latent reward model over the diffusion model's own UNet and text encoder configs (an LRM is made
    from its base model), with the authors' projection widths: SD1.5 the text encoder's width, SDXL
    ``text_encoder_2``'s projection."""
    from spotune.preference.lrm import lrm_from_pipeline

    model = lrm_from_pipeline(build_pipeline(source, dtype))
    return model.to(dtype=dtype).eval().requires_grad_(False)


__all__ = ["VIT_H_14", "ArchitectureSource", "architecture_source", "build_clip_judge", "build_lrm_judge", "build_pipeline",
           "clip_config"]
