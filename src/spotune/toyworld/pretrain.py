"""Pre-training the miniature world's base model and CLIP, stage by stage, resumable.

Run it as ``python -m spotune.toyworld.pretrain [configs/toyworld_pretrain.yaml] [key=value ...]``.
The stages, each checkpointed in ``work_dir`` and skipped once finished:

1. **data**: render ``num_images`` scenes of every prompt of the world (scene distribution of
   :func:`spotune.toyworld.render.sample_scene`: each aesthetic attribute degraded in half of them);
2. **vae**: ``AutoencoderKL`` on the renders (L1 + MSE + a small KL); its ``scaling_factor`` is set to
   1 / the standard deviation of the latents, as Stable Diffusion's 0.18215 was;
3. **latents**: the posterior (mean, log-variance) of every render, cached, so the UNet stage never runs
   the encoder; the VAE reconstructions of part of the pool are cached for the CLIP stage;
4. **unet**: ``UNet2DConditionModel`` and ``CLIPTextModel`` trained together from scratch on the cached
   latents (epsilon prediction, SD1.5's noise schedule, min-SNR weighting, 10% empty captions for
   classifier-free guidance, an exponential moving average of the weights, which is what ships);
5. **clip**: the world's ``CLIPModel`` trained contrastively on the VAE reconstructions against all
   captions of the world (the generic CLIP that the step-aware preference model later extends);
6. **export**: a diffusers pipeline folder (fp16 safetensors) and a CLIPModel folder in ``output_dir``.

Progress goes to ``work_dir/pretrain.log`` (and the console); sample grids of the UNet stage to
``work_dir/samples/``. Use ``threads=1`` on a shared machine.
"""

from __future__ import annotations

import json
import logging
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from spotune.checkpoint import optimizer_from_files, optimizer_to_files
from spotune.config import ConfigError, load_config
from spotune.errors import SpotuneError
from spotune.toyworld import components as C
from spotune.toyworld.metrics import score_images
from spotune.toyworld.render import render, sample_scene, to_tensor, to_uint8
from spotune.toyworld.sampling import generate
from spotune.toyworld.world import all_prompts
from spotune.utils.io import atomic_directory, atomic_save_safetensors, atomic_write_json, atomic_write_text

logger = logging.getLogger("spotune.toyworld.pretrain")

BASE_FOLDER = "base"
CLIP_FOLDER = "clip"


def _help(text: str, default):
    return field(default=default, metadata={"help": text})


@dataclass
class PretrainConfig:
    work_dir: str = _help("Folder for the rendered data, stage checkpoints, samples and the log.", "runs/toyworld-pretrain")
    output_dir: str = _help("Where the finished base/ (diffusers pipeline) and clip/ (CLIPModel) folders go.", "runs/toyworld-pretrain/export")
    overwrite: bool = _help("Replace existing base/ and clip/ folders in output_dir.", False)
    seed: int = _help("Seed of the renders, the initial weights and every batch.", 0)
    threads: int = _help("torch CPU threads (1 on a shared machine).", 1)
    num_images: int = _help("Rendered scenes in the pre-training pool.", 40000)
    # -- VAE --
    vae_steps: int = _help("VAE optimizer steps.", 1500)
    vae_batch_size: int = _help("VAE batch size.", 64)
    vae_lr: float = _help("VAE peak learning rate (cosine decay to 10%).", 1e-3)
    vae_kl_weight: float = _help("Weight of the mean KL term against the mean reconstruction error.", 1e-5)
    vae_from: str = _help(
        "Take the VAE stage from this AutoencoderKL folder (e.g. a base model's vae/) instead of training it: its "
        "weights (as float32) and scaling_factor become the stage's result, measured as a trained one is. The VAE "
        "does not depend on the noise schedule, so worlds that differ only in the UNet stage can share one. "
        "Empty: train it.", "")
    # -- UNet + text encoder --
    unet_steps: int = _help("UNet (+ text encoder) optimizer steps.", 3000)
    unet_batch_size: int = _help("UNet batch size.", 128)
    unet_lr: float = _help("UNet and text-encoder peak learning rate (warm-up, then cosine to 10%).", 3e-4)
    unet_warmup: int = _help("Warm-up steps of the UNet stage.", 200)
    caption_dropout: float = _help("Share of empty captions (teaches the unconditional branch of guidance).", 0.1)
    min_snr_gamma: float = _help("Min-SNR loss weighting gamma (0 disables).", 5.0)
    snr_shift: float = _help(
        "Multiply the SD1.5 schedule's SNR by this at every timestep (1: SD1.5's schedule, version 2 of the "
        "world; 64: the shipped version 3, configs/toyworld_pretrain.yaml: the resolution shift that gives the "
        "8x8 latent SD1.5's 64x64 certainty; see components.ddim_scheduler).", 1.0)
    zero_terminal_snr: bool = _help(
        "Rescale the (shifted) schedule to zero SNR at t = 999, so that sampling from pure noise matches training "
        "(false: version 2 of the world; true: the shipped version 3; see components.ddim_scheduler).", False)
    timestep_density: str = _help(
        "How the UNet stage draws training timesteps. uniform: t uniform in 0..999, so the schedule decides how "
        "much training each SNR gets (version 2 of the world); sd15_snr (the shipped version 3): t drawn so "
        "that the SNR has the distribution uniform t gives under SD1.5's schedule, so a shifted schedule moves "
        "where the sampler looks, not what the denoiser is trained on (see timestep_lookup).", "uniform")
    ema_decay: float = _help("Decay of the weights' moving average (the shipped weights).", 0.999)
    # -- CLIP --
    clip_steps: int = _help("CLIP optimizer steps.", 1500)
    clip_batch_size: int = _help("CLIP batch size.", 128)
    clip_lr: float = _help("CLIP peak learning rate (cosine decay to 10%).", 5e-4)
    clip_images: int = _help("Pool images whose VAE reconstructions train the CLIP.", 16000)
    # -- run management --
    checkpoint_every: int = _help("Checkpoint a stage every N steps.", 200)
    sample_every: int = _help("Render and measure a sample grid every N UNet steps (0: only at the end).", 500)
    sample_count: int = _help("Images of each sample check.", 64)
    log_every: int = _help("Log the loss every N steps.", 25)

    def validate(self) -> None:
        for name in ("num_images", "vae_steps", "unet_steps", "clip_steps", "threads", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config: {name} must be >= 1")
        if not 0 <= self.caption_dropout < 1:
            raise ConfigError("config: caption_dropout must be in [0, 1)")
        if self.min_snr_gamma < 0:
            raise ConfigError(f"config: min_snr_gamma must be >= 0 (0 disables the weighting), got {self.min_snr_gamma}")
        if not self.snr_shift > 0:
            raise ConfigError(f"config: snr_shift must be > 0, got {self.snr_shift} (snr_shift=1 is SD1.5's schedule)")
        if self.timestep_density not in TIMESTEP_DENSITIES:
            raise ConfigError(f"config: timestep_density must be one of {', '.join(TIMESTEP_DENSITIES)}, "
                              f"got {self.timestep_density!r} (sd15_snr is the shipped world's, uniform version 2's)")


TIMESTEP_DENSITIES = ("uniform", "sd15_snr")
# A UNet stage resumed under another of these would follow a different run's batches or learning rate.
UNET_RECIPE_KEYS = ("seed", "unet_steps", "unet_batch_size", "unet_lr", "unet_warmup", "caption_dropout", "ema_decay")


def _log_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    a = alphas_cumprod.double()
    return torch.log(a) - torch.log1p(-a)


def timestep_lookup(alphas_cumprod: torch.Tensor, density: str) -> torch.Tensor | None:
    """The training timestep to use for each uniformly drawn index 0..999; None for ``uniform``.

    ``sd15_snr`` maps index u to the timestep whose log-SNR under ``alphas_cumprod`` is nearest SD1.5's
    log-SNR at u. Drawing u uniformly then trains on SD1.5's distribution of SNR, and because the min-SNR
    weight is a function of SNR, with SD1.5's weight at each SNR too: the denoiser's objective is the
    one version 2 of the world trained on (SD1.5's schedule, uniform t), relabelled in t, and the
    schedule only changes which SNRs the sampler visits and the SPM is shown. Every SD1.5 SNR lies
    inside a shifted schedule's range, so nothing is clipped.

    Args:
        alphas_cumprod: [T] strictly decreasing schedule of the model being trained.
        density: one of :data:`TIMESTEP_DENSITIES`.
    Returns:
        [1000] int64 timesteps in [0, T), or None when t is drawn uniformly.
    """
    if density == "uniform":
        return None
    target = _log_snr(C.sd15_ddim_scheduler().alphas_cumprod)  # [1000]
    own = _log_snr(alphas_cumprod)  # [T]
    return (target[:, None] - own[None, :]).abs().argmin(dim=1)


def _recorded_values(found: object, legacy: dict[str, float | bool | str]) -> dict[str, float | bool | str] | None:
    """The record's values with ``legacy`` for missing keys, typed as ``legacy``'s; None if any has the wrong type."""
    if not isinstance(found, dict):
        return None
    values = {key: found.get(key, default) for key, default in legacy.items()}
    for key, value in values.items():
        if isinstance(legacy[key], str):
            if not isinstance(value, str):
                return None
            continue
        wants_bool = isinstance(legacy[key], bool)
        if isinstance(value, bool) != wants_bool or not isinstance(value, (bool, int, float)):
            return None
    return {key: type(legacy[key])(value) for key, value in values.items()}


def _cosine_lr(step: int, total: int, peak: float, warmup: int = 0, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class _Stage:
    """Checkpoint files of one stage: ``work_dir/<name>/checkpoint.safetensors`` (+ ``.json``) and ``done.json``."""

    def __init__(self, work_dir: Path, name: str) -> None:
        self.folder = work_dir / name
        self.folder.mkdir(parents=True, exist_ok=True)
        self.name = name

    @property
    def done(self) -> bool:
        return (self.folder / "done.json").is_file()

    def save(self, step: int, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer, extra: dict | None = None) -> None:
        tensors = {f"{k}.{n}": v for k, m in modules.items() for n, v in m.state_dict().items()}
        opt_tensors, opt_meta = optimizer_to_files(optimizer)
        tensors.update({f"optimizer.{n}": v for n, v in opt_tensors.items()})
        atomic_save_safetensors(tensors, self.folder / "checkpoint.safetensors")
        atomic_write_json(self.folder / "checkpoint.json", {"step": step, "optimizer": opt_meta, **(extra or {})})

    def load(self, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer) -> tuple[int, dict]:
        """Restore the latest checkpoint into ``modules`` and ``optimizer``; return (step, its json), (0, {}) if none."""
        meta_file = self.folder / "checkpoint.json"
        if not meta_file.is_file():
            return 0, {}
        meta = json.loads(meta_file.read_text())
        tensors = load_file(str(self.folder / "checkpoint.safetensors"))
        for key, module in modules.items():
            module.load_state_dict({n[len(key) + 1 :]: v for n, v in tensors.items() if n.startswith(key + ".")})
        opt = {n[len("optimizer.") :]: v for n, v in tensors.items() if n.startswith("optimizer.")}
        optimizer.load_state_dict(optimizer_from_files(opt, meta["optimizer"]))
        return int(meta["step"]), meta

    def finish(self, modules: dict[str, torch.nn.Module], info: dict) -> None:
        tensors = {f"{k}.{n}": v for k, m in modules.items() for n, v in m.state_dict().items()}
        atomic_save_safetensors(tensors, self.folder / "final.safetensors")
        atomic_write_json(self.folder / "done.json", info)

    def load_final(self, modules: dict[str, torch.nn.Module]) -> dict:
        tensors = load_file(str(self.folder / "final.safetensors"))
        for key, module in modules.items():
            module.load_state_dict({n[len(key) + 1 :]: v for n, v in tensors.items() if n.startswith(key + ".")})
        return json.loads((self.folder / "done.json").read_text())


class Pretrainer:
    """The stages of the module docstring, in order, each resumable."""

    def __init__(self, config: PretrainConfig) -> None:
        self.cfg = config
        self.work = Path(config.work_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.prompts = all_prompts()
        self.captions = [p.caption for p in self.prompts]
        self.tokenizer = C.build_tokenizer(self.work / "tokenizer")
        # [P + 1, L] ids of every caption, the last row the empty caption (unconditional branch).
        self.caption_ids = self.tokenizer(
            self.captions + [""], padding="max_length", max_length=C.MAX_LENGTH, truncation=True, return_tensors="pt"
        ).input_ids
        self.timings: dict[str, float] = {}

    # -- data ------------------------------------------------------------------------------------
    def data(self) -> None:
        folder = self.work / "data"
        if (folder / "pool.safetensors").is_file():
            pool = load_file(str(folder / "pool.safetensors"))
            self.images, self.prompt_index = pool["images"], pool["prompt_index"]
            return
        t0 = time.perf_counter()
        rng = random.Random(self.cfg.seed)
        index = [i % len(self.prompts) for i in range(self.cfg.num_images)]
        rng.shuffle(index)
        images = np.stack([render(sample_scene(self.prompts[i], rng)) for i in index])  # [N, 32, 32, 3] uint8
        self.images, self.prompt_index = torch.from_numpy(images), torch.tensor(index)
        atomic_save_safetensors({"images": self.images, "prompt_index": self.prompt_index}, folder / "pool.safetensors")
        self.timings["data"] = time.perf_counter() - t0
        logger.info("data: rendered %d scenes in %.0f s", len(index), self.timings["data"])

    def _batch_index(self, stage: int, step: int, batch: int, high: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + stage * 100_003 + step)
        return torch.randint(0, high, (batch,), generator=generator)

    def _run_loop(self, stage: _Stage, modules: dict[str, torch.nn.Module], optimizer, steps: int,
                  step_fn: Callable[[int], torch.Tensor], after_step: Callable[[int], None] | None = None,
                  every: Callable[[int], None] | None = None, every_n: int = 0) -> None:
        start, _ = stage.load(modules, optimizer)
        if start:
            logger.info("%s: resumed at step %d", stage.name, start)
        t0, losses = time.perf_counter(), []
        for step in range(start, steps):
            loss = step_fn(step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
            optimizer.step()
            if after_step:
                after_step(step)
            losses.append(loss.item())
            done = step + 1
            if done % self.cfg.log_every == 0 or done == steps:
                rate = (time.perf_counter() - t0) / (done - start)
                logger.info("%s: step %d/%d loss %.5f (%.2f s/step, %.0f min left)", stage.name, done, steps,
                            sum(losses) / len(losses), rate, rate * (steps - done) / 60)
                losses = []
            if done % self.cfg.checkpoint_every == 0 and done < steps:
                stage.save(done, modules, optimizer)
            if every and every_n and done % every_n == 0 and done < steps:
                every(done)
        self.timings[stage.name] = self.timings.get(stage.name, 0.0) + time.perf_counter() - t0

    # -- VAE ---------------------------------------------------------------------------------------
    def vae_stage(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        self.vae = C.build_vae()
        stage = _Stage(self.work, "vae")
        if stage.done:
            info = stage.load_final({"vae": self.vae})
            self.vae.register_to_config(scaling_factor=info["scaling_factor"])
            return
        if cfg.vae_from:
            self._import_vae(stage, Path(cfg.vae_from))
            return
        opt = torch.optim.AdamW(self.vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)

        def step_fn(step: int) -> torch.Tensor:
            for group in opt.param_groups:
                group["lr"] = _cosine_lr(step, cfg.vae_steps, cfg.vae_lr)
            idx = self._batch_index(1, step, cfg.vae_batch_size, len(self.images))
            x = to_tensor(self.images[idx].numpy())  # [B, 3, 32, 32]
            posterior = self.vae.encode(x).latent_dist
            recon = self.vae.decode(posterior.sample()).sample
            kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent element
            return F.l1_loss(recon, x) + F.mse_loss(recon, x) + cfg.vae_kl_weight * kl

        self.vae.train()
        self._run_loop(stage, {"vae": self.vae}, opt, cfg.vae_steps, step_fn)
        self.vae.eval()
        with torch.no_grad():
            sample = to_tensor(self.images[:2048].numpy())
            means = torch.cat([self.vae.encode(c).latent_dist.mean for c in sample.split(256)])
            scaling = float(1.0 / means.std())
        self.vae.register_to_config(scaling_factor=scaling)
        info = self._vae_report()
        stage.finish({"vae": self.vae}, info)
        logger.info("vae: done %s", info)

    def _import_vae(self, stage: _Stage, folder: Path) -> None:
        """Finish the VAE stage with the weights and scaling factor of the AutoencoderKL in ``folder``."""
        from diffusers import AutoencoderKL

        if not (folder / "config.json").is_file():
            raise ConfigError(f"{folder}: no AutoencoderKL folder here (config.json missing); vae_from= takes a "
                              f"VAE folder such as <base model>/vae, or empty to train the VAE")
        source = AutoencoderKL.from_pretrained(folder).float()
        mine, theirs = self.vae.state_dict(), source.state_dict()
        if {k: tuple(v.shape) for k, v in mine.items()} != {k: tuple(v.shape) for k, v in theirs.items()}:
            raise ConfigError(f"{folder}: this VAE's layers are not the world's (components.build_vae); vae_from= "
                              f"takes a miniature-world VAE, e.g. src/spotune/resources/toyworld/base/vae")
        self.vae.load_state_dict(theirs)
        self.vae.register_to_config(scaling_factor=float(source.config.scaling_factor))
        self.vae.eval()
        info = {**self._vae_report(), "source": f"{folder} (weights as float32; not trained in this work_dir)"}
        stage.finish({"vae": self.vae}, info)
        logger.info("vae: taken from %s %s", folder, info)

    @torch.no_grad()
    def _vae_report(self) -> dict[str, float]:
        """The VAE's scaling factor and how well its reconstructions of 512 renders keep alignment and aesthetics."""
        sample = to_tensor(self.images[:512].numpy())  # [512, 3, 32, 32]
        recon = torch.cat([self.vae.decode(self.vae.encode(c).latent_dist.mean).sample for c in sample.split(256)])
        truth = score_images(self.images[:512].numpy(), [self.captions[i] for i in self.prompt_index[:512].tolist()])
        rec = score_images(to_uint8(recon), [self.captions[i] for i in self.prompt_index[:512].tolist()])
        info = {
            "scaling_factor": float(self.vae.config.scaling_factor),
            "recon_alignment": float(rec.aligned.mean()),
            **{f"recon_{name}_corr": float(np.corrcoef(getattr(truth, name), getattr(rec, name))[0, 1])
               for name in ("aesthetic", "lighting", "vividness", "cleanliness")},
            "recon_mse": float(F.mse_loss(recon, sample)),
        }
        return info

    # -- latents ------------------------------------------------------------------------------------
    @torch.no_grad()
    def latents_stage(self) -> None:
        file = self.work / "data" / "latents.safetensors"
        if file.is_file():
            cached = load_file(str(file))
            self.latent_mean, self.latent_std, self.recon = cached["mean"], cached["std"], cached["recon"]
            return
        t0 = time.perf_counter()
        self.vae.eval()
        means, stds, recons = [], [], []
        for start in range(0, len(self.images), 512):
            x = to_tensor(self.images[start : start + 512].numpy())
            dist = self.vae.encode(x).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
            if start < self.cfg.clip_images:
                recons.append(torch.from_numpy(to_uint8(self.vae.decode(dist.mean).sample)))
        self.latent_mean, self.latent_std = torch.cat(means), torch.cat(stds)
        self.recon = torch.cat(recons)[: self.cfg.clip_images]
        atomic_save_safetensors({"mean": self.latent_mean, "std": self.latent_std, "recon": self.recon}, file)
        self.timings["latents"] = time.perf_counter() - t0
        logger.info("latents: cached %d posteriors in %.0f s", len(self.latent_mean), self.timings["latents"])

    # -- UNet + text encoder ----------------------------------------------------------------------------
    def unet_stage(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed + 1)
        self.unet, self.text_encoder = C.build_unet(), C.build_text_encoder(self.tokenizer)
        self.ema_unet, self.ema_text = C.build_unet(), C.build_text_encoder(self.tokenizer)
        stage = _Stage(self.work, "unet")
        self._check_schedule(stage)
        modules = {"unet": self.unet, "text_encoder": self.text_encoder, "ema_unet": self.ema_unet, "ema_text": self.ema_text}
        if stage.done:
            stage.load_final(modules)
            return
        self.ema_unet.load_state_dict(self.unet.state_dict())
        self.ema_text.load_state_dict(self.text_encoder.state_dict())
        for m in (self.ema_unet, self.ema_text):
            m.requires_grad_(False).eval()
        params = list(self.unet.parameters()) + list(self.text_encoder.parameters())
        opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
        scheduler = C.ddim_scheduler(cfg.snr_shift, cfg.zero_terminal_snr)
        alphas = scheduler.alphas_cumprod  # [1000]
        snr = alphas / (1 - alphas)
        lookup = timestep_lookup(alphas, cfg.timestep_density)
        sf = self.vae.config.scaling_factor
        n_prompts = len(self.prompts)

        def step_fn(step: int) -> torch.Tensor:
            for group in opt.param_groups:
                group["lr"] = _cosine_lr(step, cfg.unet_steps, cfg.unet_lr, cfg.unet_warmup)
            g = torch.Generator().manual_seed(cfg.seed * 7919 + step)
            idx = self._batch_index(2, step, cfg.unet_batch_size, len(self.latent_mean))
            z = (self.latent_mean[idx] + self.latent_std[idx] * torch.randn(self.latent_mean[idx].shape, generator=g)) * sf
            prompt_rows = self.prompt_index[idx].clone()
            drop = torch.rand(len(idx), generator=g) < cfg.caption_dropout
            prompt_rows[drop] = n_prompts  # the empty caption
            embeds = self.text_encoder(self.caption_ids[prompt_rows])[0]  # [B, L, 64]
            t = torch.randint(0, 1000, (len(idx),), generator=g)
            if lookup is not None:
                t = lookup[t]
            noise = torch.randn(z.shape, generator=g)
            x_t = scheduler.add_noise(z, noise, t)
            pred = self.unet(x_t, t, encoder_hidden_states=embeds).sample
            per_sample = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
            if cfg.min_snr_gamma > 0:
                per_sample = per_sample * torch.clamp(snr[t], max=cfg.min_snr_gamma) / snr[t]
            return per_sample.mean()

        @torch.no_grad()
        def ema_update(step: int) -> None:
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            for ema, live in ((self.ema_unet, self.unet), (self.ema_text, self.text_encoder)):
                for pe, pl in zip(ema.parameters(), live.parameters()):
                    pe.mul_(decay).add_(pl.detach(), alpha=1 - decay)

        self.unet.train()
        self.text_encoder.train()
        self._run_loop(stage, modules, opt, cfg.unet_steps, step_fn, after_step=ema_update,
                       every=self.sample_check, every_n=cfg.sample_every)
        report = self.sample_check(cfg.unet_steps)
        stage.finish(modules, {"samples": report})

    def _check_schedule(self, stage: _Stage) -> None:
        """Record the UNet stage's noise schedule, loss weight and recipe; refuse to resume it under others.

        A UNet half-trained on one schedule and finished on another would match neither; the min-SNR
        weight is recorded with it because, being a function of SNR, it decides what each timestep
        weighs (and a shifted schedule moves it).
        """
        record = stage.folder / "schedule.json"
        wanted = {"snr_shift": float(self.cfg.snr_shift), "zero_terminal_snr": bool(self.cfg.zero_terminal_snr),
                  "min_snr_gamma": float(self.cfg.min_snr_gamma), "timestep_density": str(self.cfg.timestep_density)}
        # What records and work from before a key was recorded were trained with.
        legacy = {"snr_shift": 1.0, "zero_terminal_snr": False, "min_snr_gamma": 5.0, "timestep_density": "uniform"}
        if record.is_file():
            try:
                found = json.loads(record.read_text())
            except (OSError, ValueError) as err:
                raise ConfigError(f"{record}: not readable JSON ({err}); pass another work_dir=") from None
            recorded = _recorded_values(found, legacy)
            if recorded is None:
                raise ConfigError(f"{record}: expected an object with numbers snr_shift and min_snr_gamma, a "
                                  f"true/false zero_terminal_snr and a string timestep_density; pass another work_dir=")
        elif stage.done or (stage.folder / "checkpoint.json").is_file():
            recorded = dict(legacy)  # progress from before the schedule was recorded
        else:
            recorded = wanted
        found_recipe = found if record.is_file() else {}
        started = stage.done or (stage.folder / "checkpoint.json").is_file()
        # The optimisation recipe is checked where a record holds it. A stage with progress under a record
        # from before the recipe was recorded keeps it unknown: this run's values may not be what it used.
        for key in UNET_RECIPE_KEYS:
            if key not in found_recipe and started:
                continue
            wanted[key] = getattr(self.cfg, key)
            value = found_recipe.get(key, wanted[key])
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{record}: {key} should be a number, found {json.dumps(value)}; pass another work_dir=")
            recorded[key] = value
        for key, value in recorded.items():
            if value != wanted[key]:
                why = " (the cosine learning rate is laid out over unet_steps)" if key == "unet_steps" else ""
                raise ConfigError(
                    f"{record.parent}: this work_dir's UNet stage was trained with {key}={json.dumps(value)}, the config "
                    f"asks for {key}={json.dumps(wanted[key])}{why}; pass {key}={json.dumps(value)} or another work_dir=")
        if not record.is_file() or any(key not in found_recipe for key in wanted):
            atomic_write_json(record, {**found_recipe, **wanted})

    @torch.no_grad()
    def sample_check(self, step: int) -> dict[str, float]:
        """Generate ``sample_count`` images with the EMA weights; log alignment and aesthetics; save a grid."""
        from spotune.utils.images import save_image_grid

        t0 = time.perf_counter()
        rng = random.Random(step)
        prompts = [rng.choice(self.prompts) for _ in range(self.cfg.sample_count)]
        captions = [p.caption for p in prompts]
        seeds = list(range(len(captions)))
        self.ema_unet.eval()
        self.ema_text.eval()
        images = generate(self.ema_unet, self.vae, self.ema_text, self.tokenizer, C.ddim_scheduler(self.cfg.snr_shift, self.cfg.zero_terminal_snr), captions, seeds)
        scores = score_images(to_uint8(images), captions)
        save_image_grid(images, self.work / "samples" / f"step-{step:06d}.png", columns=8)
        report = {
            "alignment": float(scores.aligned.mean()),
            "shape": float(scores.shape_ok.mean()),
            "colour": float(scores.colour_ok.mean()),
            "background": float(scores.background_ok.mean()),
            **{name: float(getattr(scores, name).mean()) for name in ("aesthetic", "lighting", "vividness", "cleanliness")},
        }
        logger.info("samples at step %d (%.0f s): %s", step, time.perf_counter() - t0, report)
        return report

    # -- CLIP ---------------------------------------------------------------------------------------
    def clip_stage(self) -> None:
        from spotune.preference.clip_judge import CLIP_MEAN, CLIP_STD, preprocess_images

        cfg = self.cfg
        torch.manual_seed(cfg.seed + 2)
        self.clip = C.build_clip(self.tokenizer)
        stage = _Stage(self.work, "clip")
        if stage.done:
            stage.load_final({"clip": self.clip})
            return
        opt = torch.optim.AdamW(self.clip.parameters(), lr=cfg.clip_lr, weight_decay=1e-2)
        n_recon = len(self.recon)
        caption_ids = self.caption_ids[:-1]  # [P, L]

        def logits_for(idx: torch.Tensor) -> torch.Tensor:
            pixels = preprocess_images(to_tensor(self.recon[idx].numpy()), C.IMAGE_SIZE, CLIP_MEAN, CLIP_STD)
            # The judge's own formula (PickScoreJudge.image_features): vision pooler -> visual projection.
            image = self.clip.visual_projection(self.clip.vision_model(pixel_values=pixels).pooler_output)
            image = F.normalize(image, dim=-1)
            text = F.normalize(self._clip_text(caption_ids), dim=-1)
            return self.clip.logit_scale.exp() * image @ text.T  # [B, P]

        def step_fn(step: int) -> torch.Tensor:
            for group in opt.param_groups:
                group["lr"] = _cosine_lr(step, cfg.clip_steps, cfg.clip_lr)
            idx = self._batch_index(3, step, cfg.clip_batch_size, n_recon)
            return F.cross_entropy(logits_for(idx), self.prompt_index[idx])

        def clamp_scale(step: int) -> None:
            with torch.no_grad():
                self.clip.logit_scale.clamp_(0, math.log(100))

        self.clip.train()
        self._run_loop(stage, {"clip": self.clip}, opt, cfg.clip_steps, step_fn, after_step=clamp_scale)
        self.clip.eval()
        with torch.no_grad():
            idx = torch.arange(max(0, n_recon - 1024), n_recon)
            accuracy = float((logits_for(idx).argmax(-1) == self.prompt_index[idx]).float().mean())
        stage.finish({"clip": self.clip}, {"caption_accuracy": accuracy})
        logger.info("clip: caption accuracy %.3f (last 1024 reconstructions, 1 of %d captions)", accuracy, len(self.prompts))

    def _clip_text(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.clip.text_model(input_ids=ids)
        return self.clip.text_projection(out.pooler_output)

    # -- export ---------------------------------------------------------------------------------------
    def export(self) -> Path:
        from diffusers import StableDiffusionPipeline

        out = Path(self.cfg.output_dir)
        for name in (BASE_FOLDER, CLIP_FOLDER):
            target = out / name
            if target.exists():
                if not self.cfg.overwrite:
                    raise SpotuneError(f"{target} already exists; pass overwrite=true to replace it")
                import shutil

                shutil.rmtree(target)
        pipe = StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.ema_text, tokenizer=self.tokenizer, unet=self.ema_unet,
            scheduler=C.ddim_scheduler(self.cfg.snr_shift, self.cfg.zero_terminal_snr), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.to(torch.float16)
        with atomic_directory(out / BASE_FOLDER) as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
        with atomic_directory(out / CLIP_FOLDER) as tmp:
            self.clip.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
            from spotune.preference.clip_judge import CLIP_MEAN, CLIP_STD

            atomic_write_json(tmp / "preprocessor_config.json", {
                "size": C.IMAGE_SIZE, "crop_size": C.IMAGE_SIZE, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
            })
        info = {k: json.loads((self.work / k / "done.json").read_text()) for k in ("vae", "unet", "clip")}
        info["config"] = {k: v for k, v in vars(self.cfg).items()}
        info["seconds"] = self.timings
        atomic_write_json(out / "pretraining.json", info)
        logger.info("exported %s and %s", out / BASE_FOLDER, out / CLIP_FOLDER)
        return out

    def run(self) -> Path:
        torch.set_num_threads(self.cfg.threads)
        self.data()
        self.vae_stage()
        self.latents_stage()
        self.unet_stage()
        self.clip_stage()
        return self.export()


def main(argv: list[str] | None = None) -> int:
    """``python -m spotune.toyworld.pretrain [CONFIG] key=value ... [--debug]``; bad input is one line, exit 1."""
    from spotune.cli import run_tool

    return run_tool("python -m spotune.toyworld.pretrain", _pretrain, argv)


def _pretrain(args: list[str]) -> int:
    path = args.pop(0) if args and "=" not in args[0] else None
    config = load_config(PretrainConfig, path, args)
    work = Path(config.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    handlers = [logging.StreamHandler(), logging.FileHandler(work / "pretrain.log")]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", handlers=handlers)
    atomic_write_text(work / "config.json", json.dumps(vars(config), indent=2))
    Pretrainer(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
