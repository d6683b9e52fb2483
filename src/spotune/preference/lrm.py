"""The Latent Reward Model (LRM) of LPO: a judge of noisy latents made from the diffusion model's own UNet.

LPO (Zhang et al., arXiv 2502.01051; code Kwai-Kolors/LPO) scores the candidates x_{t-1} of a step as
latents, with no VAE decode and no pixel judge. The LRM is the base model's UNet run only through its
time embedding, ``conv_in``, the down blocks and the mid block (no up blocks), with the text through
cross-attention as in the diffusion model. Per latent [B, 4, h, w] at timestep t and its prompt:

1. the latent runs twice, with the prompt's and with the empty prompt's text states (the authors' batch
   order: [prompt rows; empty-prompt rows]); no attention mask, as in the authors' code;
2. *multi-scale features*: the output of the last layer of each down block before its downsampler
   (SD1.5: 320 ch at 64x64, 640 at 32x32, 1280 at 16x16, 1280 at 8x8, indices 2, 5, 8, 11 of diffusers'
   ``down_block_res_samples``; SDXL: 320, 640, 1280, indices 2, 5, 8) and the mid block's output, each
   global-average-pooled; the down-block features of the prompt's pass only, the mid feature guided,
   ``u + 7.5 (c - u)`` (the released models' ``multi_scale_cfg=False``);
3. concatenated in that order (SD1.5 4,800; SDXL 3,520) and projected by ``visual_projection`` (no bias) to
   the image feature F;
4. the text feature T: SD1.5, the text encoder's pooled (EOS) output through ``text_projection`` (no bias);
   SDXL, ``text_encoder_2``'s projected ``text_embeds`` (no ``text_projection``);
5. ``score = exp(logit_scale) * cos(F, T)``.

SDXL's text states are both encoders' penultimate hidden states, concatenated; its added conditions are
``text_encoder_2``'s ``text_embeds`` (the empty prompt's own for its rows) and the time ids (S, S, 0, 0, S, S)
with S the model's image size (1024). The latent enters as the sampler holds it (already scaled by the
VAE's factor); the LRM was trained on ``vae.encode(image).sample() * scaling_factor`` noised by DDPM.

Prompts are tokenised with the LRM's own tokenizer(s), padded to the maximum length. The authors' LPO code
tokenises the prompts with the laion CLIP-ViT-H-14 tokenizer instead; that tokenizer shares SD1.5's
vocabulary and, as published, pads with <|endoftext|> (49407) as SD1.5's does, so the ids agree.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from spotune.errors import SpotuneError

# The guidance the authors apply to the mid-block feature ("VFE" in the paper; guidance_scale in their code).
LRM_GUIDANCE_SCALE = 7.5
# ln(1 / 0.07), CLIP's initial temperature, which the authors' LRM starts from.
INITIAL_LOGIT_SCALE = 2.6592
BUILTIN_TINY_LRM = "builtin:tiny-lrm"
# What ``spotune train-spm model=lrm`` writes into each checkpoint: every weight of the LRM (the UNet's down
# and mid path, the text encoder(s), the projections, logit_scale), beside the run's config naming its base.
LRM_WEIGHTS_NAME = "lrm.safetensors"
BUILTIN_TINY_LRM_SDXL = "builtin:tiny-lrm-sdxl"


class LRMLoadError(SpotuneError, ValueError):
    """An LRM path that is missing or does not hold the layout the authors' code writes."""


def feature_taps(unet) -> list[int]:
    """Indices into diffusers' ``down_block_res_samples`` of each down block's last layer before its downsampler.

    ``down_block_res_samples`` holds ``conv_in``'s output, then per block one entry per layer and one for the
    downsampler when there is one: SD1.5 [2, 5, 8, 11], SDXL [2, 5, 8].
    """
    taps, index = [], 0
    for block in unet.down_blocks:
        index += len(block.resnets)
        taps.append(index)
        if getattr(block, "downsamplers", None) is not None:
            index += 1
    return taps


def _strip_up_path(unet) -> None:
    """Drop what the LRM never runs (up blocks, the output convolution): half the UNet's weights."""
    unet.up_blocks = nn.ModuleList()
    unet.conv_norm_out = None
    unet.conv_act = None
    unet.conv_out = None


class LatentRewardModel(nn.Module):
    """LPO's latent judge (see the module docstring); build it with :func:`load_lrm`.

    Args:
        unet: the diffusion model's UNet (its up path is removed here).
        text_encoders: SD1.5: [CLIPTextModel]; SDXL: [CLIPTextModel, CLIPTextModelWithProjection].
        tokenizers: one per text encoder.
        visual_projection: Linear(sum of tapped channels + mid channels -> D), no bias.
        text_projection: SD1.5's Linear(text hidden -> D), no bias; ``None`` for SDXL.
        logit_scale: the log of the score's temperature (a scalar).
        image_size: SDXL's time ids' size (1024 for SDXL); unused for SD1.5.
        guidance_scale: the mid feature's guidance (the authors': 7.5).
    """

    judges_latents = True  # the samplers hand it latents, not decoded images

    def __init__(self, unet, text_encoders: list, tokenizers: list, visual_projection: nn.Linear,
                 text_projection: nn.Linear | None, logit_scale: float | torch.Tensor, image_size: int = 1024,
                 guidance_scale: float = LRM_GUIDANCE_SCALE) -> None:
        super().__init__()
        if len(text_encoders) not in (1, 2) or len(tokenizers) != len(text_encoders):
            raise ValueError("an LRM has one text encoder and tokenizer (SD1.5) or two (SDXL)")
        _strip_up_path(unet)
        self.unet = unet
        self.text_encoders = nn.ModuleList(text_encoders)
        self.tokenizers = list(tokenizers)
        self.visual_projection = visual_projection
        self.text_projection = text_projection
        self.logit_scale = nn.Parameter(torch.as_tensor(logit_scale, dtype=torch.float32).reshape(()).clone())
        self.image_size = image_size
        self.guidance_scale = guidance_scale
        self.taps = feature_taps(unet)
        tapped = sum(unet.down_blocks[i].resnets[-1].out_channels for i in range(len(self.taps)))
        expected = tapped + unet.config.block_out_channels[-1]
        if visual_projection.in_features != expected:
            raise ValueError(f"visual_projection takes {visual_projection.in_features} features; this UNet's taps give {expected}")
        if self.is_sdxl == (text_projection is not None):
            raise ValueError("SD1.5's LRM has a text_projection and SDXL's has none")

    @property
    def is_sdxl(self) -> bool:
        return len(self.text_encoders) == 2

    @property
    def dtype(self) -> torch.dtype:
        return self.visual_projection.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.visual_projection.weight.device

    # -- text -------------------------------------------------------------------------------------
    def _ids(self, prompts: list[str]) -> list[torch.Tensor]:
        """Per tokenizer, [N, L] ids of ``prompts``, padded to the tokenizer's maximum length."""
        return [tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(self.device) for tok in self.tokenizers]

    def encode_text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, dict | None]:
        """The text side for N prompts.

        Returns:
            states: [2N, L, C] cross-attention states, rows [prompts; empty prompt x N];
            text_features: [N, D] the prompts' text features (before normalisation);
            added: SDXL's ``added_cond_kwargs`` for the 2N rows (``text_embeds``, ``time_ids``); ``None`` for SD1.5.
        """
        n = len(prompts)
        both = [torch.cat([ids, empty.expand(n, -1)]) for ids, empty in zip(self._ids(prompts), self._ids([""]))]
        if not self.is_sdxl:
            out = self.text_encoders[0](both[0])
            return out[0], self.text_projection(out[1][:n]), None
        first = self.text_encoders[0](both[0], output_hidden_states=True)
        second = self.text_encoders[1](both[1], output_hidden_states=True)
        states = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        text_embeds = second.text_embeds  # [2N, D]
        size = self.image_size
        time_ids = torch.tensor([size, size, 0, 0, size, size], device=self.device, dtype=text_embeds.dtype)
        added = {"text_embeds": text_embeds, "time_ids": time_ids.expand(2 * n, -1)}
        return states, text_embeds[:n], added

    # -- latents ----------------------------------------------------------------------------------
    def pooled_features(self, latents: torch.Tensor, timesteps: torch.Tensor, states: torch.Tensor,
                        added: dict | None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The UNet's down and mid path on [latents; latents] ([2N] rows against ``states``).

        Returns:
            taps: per tapped down block, [2N, C_i] global-average-pooled features;
            mid: [2N, C_mid] the pooled mid-block output.
        """
        unet = self.unet
        x = torch.cat([latents, latents]).to(unet.dtype)
        t = torch.cat([timesteps, timesteps]).to(latents.device)
        emb = unet.time_embedding(unet.get_time_embed(sample=x, timestep=t), None)
        aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=states, added_cond_kwargs=added or {})
        emb = emb if aug is None else emb + aug
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        states = unet.process_encoder_hidden_states(encoder_hidden_states=states, added_cond_kwargs=added or {})
        h = unet.conv_in(x)
        residuals = [h]
        for block in unet.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, res = block(hidden_states=h, temb=emb, encoder_hidden_states=states)
            else:
                h, res = block(hidden_states=h, temb=emb)
            residuals.extend(res)
        if getattr(unet.mid_block, "has_cross_attention", False):
            mid = unet.mid_block(h, emb, encoder_hidden_states=states)
        else:
            mid = unet.mid_block(h, emb)
        return [residuals[i].mean(dim=(2, 3)) for i in self.taps], mid.mean(dim=(2, 3))

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, prompts: list[str]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The features the score (and the training loss) are made of, with gradients when enabled.

        Args:
            latents: [N, 4, h, w] latents as the sampler holds them (scaled by the VAE's factor).
            timesteps: [N] (or scalar) integer timesteps.
            prompts: N captions, one per latent.
        Returns:
            text: [N, D] text features; image: [N, D] image features (neither normalised); logit_scale: scalar.
        """
        n = latents.shape[0]
        if len(prompts) != n:
            raise ValueError(f"{n} latents but {len(prompts)} prompts")
        t = torch.as_tensor(timesteps, device=latents.device).long().reshape(-1).expand(n)
        states, text, added = self.encode_text(list(prompts))
        taps, mid = self.pooled_features(latents, t, states, added)
        cond_mid, uncond_mid = mid[:n], mid[n:]
        guided_mid = uncond_mid + self.guidance_scale * (cond_mid - uncond_mid)
        image = self.visual_projection(torch.cat([tap[:n] for tap in taps] + [guided_mid], dim=-1))
        return text, image, self.logit_scale

    @torch.no_grad()
    def score(self, latents: torch.Tensor, prompts: list[str], timesteps: torch.Tensor) -> torch.Tensor:
        """Score noisy latents for their prompts at their timesteps.

        Args:
            latents: [B, 4, h, w] latents as the sampler holds them (scaled by the VAE's factor).
            prompts: B captions.
            timesteps: [B] (or scalar) integer timesteps the latents are judged at.
        Returns:
            [B] scores in the model's dtype, higher preferred.
        """
        text, image, logit_scale = self.forward(latents, timesteps, prompts)
        image = image / image.norm(dim=-1, keepdim=True)
        text = text / text.norm(dim=-1, keepdim=True)
        return logit_scale.exp() * (image * text).sum(dim=-1)

    # -- weights ----------------------------------------------------------------------------------
    weights_name = LRM_WEIGHTS_NAME

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write every weight as safetensors (atomically); refuses to replace a file unless ``overwrite``."""
        from spotune.utils.io import atomic_save_safetensors

        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        atomic_save_safetensors({k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}, path)
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        """Load every weight from :meth:`save`'s file, strictly (a missing or unexpected key is named)."""
        from safetensors.torch import load_file

        if not Path(path).is_file():
            raise LRMLoadError(f"{path}: no such file; expected the lrm.safetensors a train-spm model=lrm checkpoint holds")
        try:
            state = load_file(str(path))
        except Exception as exc:  # safetensors' own errors say little about which file
            raise LRMLoadError(f"{path}: not a safetensors file ({exc})") from None
        missing, unexpected = self.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise LRMLoadError(f"{path}: not this LRM's weights (missing {sorted(missing)[:3]}, unexpected "
                               f"{sorted(unexpected)[:3]})")


def check_judges_family(lrm, model_is_sdxl: bool, checkpoint: str | None, model: str) -> None:
    """Refuse an LRM of the other family than the diffusion model whose latents it is to judge (an SDXL LRM
    runs on SD1.5 latents, and scores them meaninglessly). ``checkpoint`` and ``model`` name both in the message."""
    lrm_sdxl = bool(getattr(lrm, "is_sdxl", False))
    if lrm_sdxl != model_is_sdxl:
        which = {True: "SDXL", False: "SD1.5"}
        raise LRMLoadError(
            f"judge_checkpoint={checkpoint}: an {which[lrm_sdxl]} latent reward model cannot judge the latents of "
            f"{model}, an {which[model_is_sdxl]} model; give the LRM made from an {which[model_is_sdxl]} model"
        )


# ================================================================================================
# loading
# ================================================================================================
def _resources() -> Path:
    return Path(__file__).resolve().parents[1] / "resources"


def _tokenizers(folder: Path, sdxl: bool) -> list:
    """The LRM folder's tokenizer(s) when it has them, else those of SD1.5 / SDXL that spotune ships."""
    from transformers import CLIPTokenizer

    base = folder if (folder / "tokenizer").is_dir() else _resources() / ("sdxl" if sdxl else "sd15")
    names = ["tokenizer", "tokenizer_2"] if sdxl else ["tokenizer"]
    return [CLIPTokenizer.from_pretrained(str(base / name)) for name in names]


def _projection(weight: torch.Tensor, source: str) -> nn.Linear:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise LRMLoadError(f"{source}: expected a 2-D weight tensor")
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight.data.copy_(weight.float())
    return layer


def load_lrm(path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> LatentRewardModel:
    """An LRM from the folder the authors' code writes, a ``spotune train-spm model=lrm`` run or checkpoint
    (its latest checkpoint; the base model its config names), or ``builtin:tiny-lrm`` / ``builtin:tiny-lrm-sdxl``.

    The folder holds ``unet/`` (a diffusers UNet; its up blocks are dropped), ``text_encoder/`` (and for SDXL
    ``text_encoder_2/``), and ``state_dict.pt`` with ``visual_projection`` (and for SD1.5 ``text_projection``)
    ``{"weight": tensor}`` and ``logit_scale`` (a float or a tensor). ``state_dict.pt`` is read weights-only:
    a pickle that holds more than tensors is refused. Tokenizers come from ``tokenizer/`` (``tokenizer_2/``)
    when the folder has them, else from SD1.5's (SDXL's) that spotune ships, which the authors' LRMs were
    trained with.

    Raises:
        LRMLoadError: a missing path or part, or weights that do not fit (each named).
    """
    trained = None if str(path).startswith("builtin:") else _trained_checkpoint(Path(path))
    if str(path) in (BUILTIN_TINY_LRM, BUILTIN_TINY_LRM_SDXL):
        model = build_tiny_lrm(sdxl=str(path) == BUILTIN_TINY_LRM_SDXL)
    elif trained is not None:
        model = _load_trained(trained)
    else:
        model = _load_folder(Path(path))
    model.requires_grad_(False).eval()
    return model.to(device=device, dtype=dtype)


def _load_folder(folder: Path) -> LatentRewardModel:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from spotune.utils.pickles import load_weights_only

    if not folder.is_dir():
        raise LRMLoadError(f"{folder}: no such LRM folder (it holds unet/, text_encoder/ and state_dict.pt)")
    for part in ("unet", "text_encoder"):
        if not (folder / part / "config.json").is_file():
            raise LRMLoadError(f"{folder}: not an LRM folder: {part}/config.json is missing (it holds unet/, "
                               "text_encoder/ and state_dict.pt, as the LPO authors' code saves it)")
    state_file = folder / "state_dict.pt"
    if not state_file.is_file():
        raise LRMLoadError(f"{folder}: not an LRM folder: state_dict.pt (visual_projection, logit_scale) is missing")
    unet = UNet2DConditionModel.from_pretrained(str(folder / "unet"))
    sdxl = (folder / "text_encoder_2").is_dir() or unet.config.addition_embed_type == "text_time"
    encoders = [CLIPTextModel.from_pretrained(str(folder / "text_encoder"))]
    if sdxl:
        if not (folder / "text_encoder_2" / "config.json").is_file():
            raise LRMLoadError(f"{folder}: an SDXL LRM (its UNet takes text_time conditions) needs text_encoder_2/")
        encoders.append(CLIPTextModelWithProjection.from_pretrained(str(folder / "text_encoder_2")))
    state = load_weights_only(state_file)
    if not isinstance(state, dict) or "visual_projection" not in state or "logit_scale" not in state:
        raise LRMLoadError(f"{state_file}: expected a dict with visual_projection and logit_scale")
    visual = _projection(state["visual_projection"].get("weight") if isinstance(state["visual_projection"], dict) else None,
                         f"{state_file} visual_projection")
    text = None
    if not sdxl:
        entry = state.get("text_projection")
        text = _projection(entry.get("weight") if isinstance(entry, dict) else None, f"{state_file} text_projection")
    sample = unet.config.sample_size
    try:
        return LatentRewardModel(unet, encoders, _tokenizers(folder, sdxl), visual, text, state["logit_scale"],
                                 image_size=int(sample * 8))
    except ValueError as exc:
        raise LRMLoadError(f"{folder}: {exc}") from None


def lrm_from_pipeline(pipe, seed: int = 0, image_size: int | None = None) -> LatentRewardModel:
    """A new LRM made from a diffusion pipeline's own UNet and text encoder(s) (taken, not copied), as the
    authors build one before training: ``visual_projection`` drawn from N(0, 0.02), SD1.5's
    ``text_projection`` too (the authors copy CLIP ViT-L/14's: :func:`init_text_projection` does that when given
    the CLIP, which spotune does not ship), ``logit_scale``
    ln(1 / 0.07). ``image_size``: SDXL's time ids (the model's native size when unset)."""
    unet = pipe.unet
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    taps = feature_taps(unet)
    features = sum(unet.down_blocks[i].resnets[-1].out_channels for i in range(len(taps))) + unet.config.block_out_channels[-1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 7)
        if sdxl:
            width = pipe.text_encoder_2.config.projection_dim
            visual, text = nn.Linear(features, width, bias=False), None
            encoders, tokenizers = [pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer, pipe.tokenizer_2]
        else:
            width = pipe.text_encoder.config.hidden_size
            visual, text = nn.Linear(features, width, bias=False), nn.Linear(width, width, bias=False)
            encoders, tokenizers = [pipe.text_encoder], [pipe.tokenizer]
            nn.init.normal_(text.weight, std=0.02)
        nn.init.normal_(visual.weight, std=0.02)
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return LatentRewardModel(unet, encoders, tokenizers, visual, text, INITIAL_LOGIT_SCALE,
                             image_size=image_size or unet.config.sample_size * factor)


def init_text_projection(lrm: LatentRewardModel, path: str | Path) -> None:
    """Start an SD1.5 LRM's ``text_projection`` from a CLIP's, as the authors do with CLIP ViT-L/14's
    (``clip_ckpt_path``: they copy its ``text_projection.weight`` [768, 768]).

    Args:
        path: a CLIPModel folder (its ``model.safetensors`` or ``pytorch_model.bin``) or one such file; a pickle is
            read weights-only.
    Raises:
        LRMLoadError: an SDXL LRM (it has no text projection), a missing file or key, or a weight of another shape.
    """
    from safetensors import safe_open

    from spotune.utils.pickles import load_weights_only

    key = "text_projection.weight"
    if lrm.text_projection is None:
        raise LRMLoadError(f"text_projection_from={path}: an SDXL LRM has no text_projection (its text feature is "
                           "text_encoder_2's own projection); leave text_projection_from unset")
    file = Path(path)
    if file.is_dir():
        found = [file / name for name in ("model.safetensors", "pytorch_model.bin") if (file / name).is_file()]
        if not found:
            raise LRMLoadError(f"text_projection_from={path}: the folder holds neither model.safetensors nor pytorch_model.bin")
        file = found[0]
    if not file.is_file():
        raise LRMLoadError(f"text_projection_from={path}: no such file or folder (a CLIP checkpoint, e.g. "
                           "openai/clip-vit-large-patch14's pytorch_model.bin)")
    if file.suffix == ".safetensors":
        with safe_open(str(file), framework="pt") as handle:
            weight = handle.get_tensor(key) if key in handle.keys() else None
    else:
        state = load_weights_only(file)
        weight = state.get(key) if isinstance(state, dict) else None
    expected = tuple(lrm.text_projection.weight.shape)
    if weight is None:
        raise LRMLoadError(f"text_projection_from={file}: no {key} in it (expected a CLIPModel checkpoint)")
    if tuple(weight.shape) != expected:
        raise LRMLoadError(f"text_projection_from={file}: {key} is {list(weight.shape)}, but this LRM's text projection "
                           f"is {list(expected)} (its text encoder's width); give the CLIP of the base model's text encoder")
    with torch.no_grad():
        lrm.text_projection.weight.copy_(weight.to(lrm.text_projection.weight.dtype))


def build_tiny_lrm(seed: int = 0, sdxl: bool = False) -> LatentRewardModel:
    """An untrained LRM made from spotune's tiny SD1.5 (or SDXL) pipeline, for tests and CPU runs."""
    from spotune.models.tiny import build_tiny_sd15_pipeline, build_tiny_sdxl_pipeline

    return lrm_from_pipeline(build_tiny_sdxl_pipeline(seed) if sdxl else build_tiny_sd15_pipeline(seed), seed)


def _trained_checkpoint(path: Path) -> Path | None:
    """The checkpoint holding ``lrm.safetensors``: ``path`` itself, or a run folder's latest; else ``None``."""
    if (path / LRM_WEIGHTS_NAME).is_file():
        return path
    if (path / "checkpoints").is_dir():
        from spotune.checkpoint import list_checkpoints

        found = [c for c in list_checkpoints(path) if (c / LRM_WEIGHTS_NAME).is_file()]
        return found[-1] if found else None
    return None


def _base_model_of(checkpoint: Path, config: dict) -> str:
    """The base model a train-spm ``model=lrm`` checkpoint's config names; a shipped LRM names it relative to its
    own folder (the package can live anywhere)."""
    base = config.get("pretrained_model")
    if not base:
        raise LRMLoadError(f"{checkpoint}: its state.json names no pretrained_model to build the LRM from")
    beside = Path(checkpoint) / str(base)
    if not Path(str(base)).is_absolute() and not Path(str(base)).exists() and beside.exists():
        return str(beside.resolve())
    return str(base)


def lrm_base_model(path: str | Path) -> str | None:
    """The diffusion model an LRM was made from, where the LRM says it: a train-spm ``model=lrm`` run or
    checkpoint (its config), or a built-in tiny LRM (the tiny model it is made from). ``None`` for the authors'
    folders, which do not name it."""
    from spotune.checkpoint import read_state

    if str(path) in (BUILTIN_TINY_LRM, BUILTIN_TINY_LRM_SDXL):
        return "builtin:tiny-sdxl" if str(path) == BUILTIN_TINY_LRM_SDXL else "builtin:tiny-sd15"
    trained = _trained_checkpoint(Path(path))
    if trained is None:
        return None
    return _base_model_of(trained, read_state(trained).get("config") or {})


def _load_trained(checkpoint: Path) -> LatentRewardModel:
    """A train-spm ``model=lrm`` checkpoint: the base model its config names, then its weights."""
    from spotune.checkpoint import read_state
    from spotune.models.loading import load_pipeline

    config = read_state(checkpoint).get("config") or {}
    base = _base_model_of(checkpoint, config)
    pipe = load_pipeline(base, dtype=torch.float32, model_family=config.get("model_family", "auto"))
    model = lrm_from_pipeline(pipe, image_size=config.get("resolution"))
    model.load_checkpoint(checkpoint / LRM_WEIGHTS_NAME)
    return model
