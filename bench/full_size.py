"""Full-size SPO benchmark pieces: SD1.5, SDXL and the ViT-H/14 judge with random weights, a per-phase clock
with FLOP counting, the authors' cost structure as an emulation, and the per-image FLOP table.

Used by ``bench/bench_spo.py --size full``; nothing here is imported by the package.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense tensor-core peaks (TFLOP/s) from the vendors' data sheets, by a substring of the device name.
# fp16/bf16 with fp32 accumulation; tf32; plain fp32 (CUDA cores).
CHIP_PEAKS = {
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "4090": {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6},
}


# -- FLOP counting -----------------------------------------------------------------------------------
def flop_counter() -> FlopCounterMode:
    """torch's FlopCounterMode with spotune's formulas (the CPU flash-attention kernels its registry lacks).

    Without them attention would count as zero FLOPs on a CPU (the CUDA kernels are registered).
    """
    from spotune.plan.recorder import cpu_attention_flop_formulas

    return FlopCounterMode(display=False, custom_mapping=cpu_attention_flop_formulas())


# -- models (the planner's builders, with random weights on a real device) --------------------------------
def build_sd15_random(dtype: torch.dtype, device: torch.device | str):
    """SD1.5's pipeline (UNet, VAE, text encoder, DDIM) from the configs spotune ships, random weights."""
    from spotune.plan.architectures import architecture_source, build_pipeline

    torch.manual_seed(0)
    with torch.device(device):  # initialise where the weights will live (fast on a GPU)
        return build_pipeline(architecture_source("sd15", "sd15"), dtype)


def build_sdxl_random(dtype: torch.dtype, device: torch.device | str):
    """SDXL base 1.0's pipeline from the configs spotune ships, random weights, DDIM.

    The VAE is kept in ``dtype`` as the fp16-fix VAE is (the authors' setup); SDXL's own VAE would stay fp32.
    """
    from spotune.plan.architectures import architecture_source, build_pipeline

    torch.manual_seed(0)
    with torch.device(device):
        return build_pipeline(architecture_source("sdxl", "sdxl"), dtype, vae="fp16-fix")


def build_vit_h_judge(dtype: torch.dtype, device: torch.device | str):
    """The step-aware preference model over a ViT-H/14 CLIP (PickScore's architecture), random weights."""
    from spotune.plan.architectures import VIT_H_14, build_clip_judge

    torch.manual_seed(1)
    with torch.device(device):
        judge = build_clip_judge("spm", copy.deepcopy(VIT_H_14), torch.float32)
    return judge.to(device=device, dtype=dtype)


def build_lrm_random(family: str, dtype: torch.dtype, device: torch.device | str):
    """LPO's latent reward model over SD1.5's (or SDXL base 1.0's) UNet and text encoders, random weights:
    the planner's builder (an LRM is made from its base model's architecture)."""
    from spotune.plan.architectures import architecture_source, build_lrm_judge

    torch.manual_seed(2)
    with torch.device(device):
        return build_lrm_judge(architecture_source(family, family), dtype)


# -- the per-phase clock -------------------------------------------------------------------------------
class PhaseClock:
    """Wall time and counted FLOPs per phase of an SPO iteration.

    Phases are entered from wrappers and hooks around the models; on CUDA each phase boundary
    synchronises so a phase's time is its own (the benchmark alone pays those syncs, not the recipe).
    FLOPs are counted only while ``counting`` is set (FlopCounterMode slows the kernels' dispatch).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.counting = False
        self.stage = "other"  # "sampling" or "training", set by the benchmark loop
        self.seconds: dict[str, float] = defaultdict(float)
        self.flops: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)
        self._active: str | None = None
        self._open: list[Any] = []

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset(self) -> None:
        self.seconds.clear()
        self.flops.clear()
        self.calls.clear()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self._active is not None:  # nested call (e.g. a model inside a timed wrapper): the outer one owns it
            yield
            return
        self.sync()
        self._active = name
        counter = flop_counter() if self.counting else nullcontext()
        start = time.perf_counter()
        try:
            with counter:
                yield
            self.sync()
        finally:
            self.seconds[name] += time.perf_counter() - start
            self.calls[name] += 1
            if self.counting:
                self.flops[name] += counter.get_total_flops()
            self._active = None

    def wrap(self, fn: Callable, name: str | Callable[[], str]) -> Callable:
        def timed(*args, **kwargs):
            with self.phase(name() if callable(name) else name):
                return fn(*args, **kwargs)

        return timed

    def hook_unet(self, unet: torch.nn.Module, reference: bool = False) -> None:
        """Time every call of ``unet`` (hooks sit outside a compiled forward, so compile keeps working)."""

        def name() -> str:
            if self.stage == "sampling":
                return "unet_sampling"
            return "train_forward" if torch.is_grad_enabled() and not reference else "train_reference"

        def pre(module, args, kwargs):
            context = self.phase(name())
            context.__enter__()
            self._open.append(context)

        def post(module, args, kwargs, output):
            self._open.pop().__exit__(None, None, None)

        unet.register_forward_pre_hook(pre, with_kwargs=True)
        unet.register_forward_hook(post, with_kwargs=True)


# -- the authors' cost structure -----------------------------------------------------------------------
def emulate_reference_training(trainer, clock: PhaseClock) -> None:
    """Give ``trainer`` the authors' training cost structure (same loss, same maths, more work).

    * a deep copy of the UNet as the reference (the authors' ``copy.deepcopy(unet)``), adapters off,
      instead of the same UNet with its LoRA switched off;
    * four guided passes per tuple: policy and reference once for the winner and once for the
      loser, although both start from the same x_t, t and prompt (spotune runs each once);
    * the judge in float32 outside autocast (the caller sets judge_dtype=fp32; the judge itself turns
      autocast off, as spotune's does by default).
    """
    from spotune.diffusion.ddim import ddim_step_with_logprob
    from spotune.diffusion.sampler import guided_noise_pred
    from spotune.losses import spo_loss
    from spotune.models.lora import adapter_disabled

    acc, cfg = trainer.accelerator, trainer.config
    reference = copy.deepcopy(acc.unwrap_model(trainer.unet)).requires_grad_(False).eval()
    clock.hook_unet(reference, reference=True)
    trainer.emulated_reference_unet = reference

    def pair_loss(batch):
        t, cond = batch.timesteps, batch.cond  # [n], n rows
        # The loser's step starts from its own x_t where it has one (the SDXL sampler's inner transitions).
        starts = {"win": batch.latents, "lose": batch.latents if batch.latents_lose is None else batch.latents_lose}
        outs = {}
        with acc.autocast():
            for side, x_t in starts.items():
                outs[side] = guided_noise_pred(trainer.unet, x_t, t, cond, trainer.negative, cfg.guidance_scale)
                with torch.no_grad(), adapter_disabled(reference):
                    outs[side + "_ref"] = guided_noise_pred(reference, x_t, t, cond, trainer.negative, cfg.guidance_scale)
        logps = {}
        for key, out in outs.items():
            side = "win" if key.startswith("win") else "lose"
            target = batch.win if side == "win" else batch.lose
            _, logps[key] = ddim_step_with_logprob(trainer.scheduler, out, t, starts[side], cfg.eta, prev_sample=target)
        return spo_loss(logps["win"], logps["win_ref"], logps["lose"], logps["lose_ref"], cfg.beta, cfg.eps)

    trainer._pair_loss = pair_loss


# -- the FLOP table at the paper's resolution (meta device: shapes only, no arithmetic) ------------------
def count_unit_flops(resolution: int = 512) -> dict[str, float]:
    """TFLOP of one UNet image-forward, one VAE decode, one judge image, and one training tuple.

    Counted with FlopCounterMode on meta tensors (no memory, no arithmetic), so the paper's 512 px
    figures can be checked on any machine. The training tuple is spotune's: one guided policy pass with
    backward (LoRA rank 4 on the attention projections) and one guided reference pass.
    """
    from spotune.models.lora import add_lora

    meta = torch.device("meta")
    parts = build_sd15_random(torch.float32, meta)
    unet, vae = parts.unet, parts.vae
    judge = build_vit_h_judge(torch.float32, meta)
    latent = resolution // 8
    x = torch.randn(1, 4, latent, latent, device=meta)
    emb = torch.randn(1, 77, 768, device=meta)
    t = torch.tensor([500], device=meta)
    out: dict[str, float] = {}
    with torch.no_grad():
        with flop_counter() as c:
            unet(x, t, encoder_hidden_states=emb)
        out["unet_forward_per_image"] = c.get_total_flops() / 1e12
        with flop_counter() as c:
            vae.decode(torch.randn(1, 4, latent, latent, device=meta))
        out["vae_decode_per_image"] = c.get_total_flops() / 1e12
        pixels = torch.randn(1, 3, 224, 224, device=meta)
        with flop_counter() as c:
            judge.image_features(pixels, torch.zeros(1, device=meta))
        out["judge_image_tower_per_image"] = c.get_total_flops() / 1e12
    add_lora(unet, 4, 4.0, ["to_q", "to_k", "to_v", "to_out.0"], "gaussian")
    x2, t2, emb2 = x.repeat(2, 1, 1, 1), t.repeat(2), emb.repeat(2, 1, 1)  # CFG: [uncond; cond]
    with flop_counter() as c:
        unet(x2, t2, encoder_hidden_states=emb2).sample.float().mean().backward()
    out["train_policy_fwd_bwd_per_tuple"] = c.get_total_flops() / 1e12
    with torch.no_grad(), flop_counter() as c:
        unet(x2, t2, encoder_hidden_states=emb2)
    out["train_reference_per_tuple"] = c.get_total_flops() / 1e12
    # LPO's judge: the LRM on one noisy latent (its prompt's and the empty prompt's pass, text encoder included).
    lrm = build_lrm_random("sd15", torch.float32, meta)
    with torch.no_grad(), flop_counter() as c:
        lrm.score(x, ["a photograph"], t)
    out["lrm_per_latent"] = c.get_total_flops() / 1e12
    return out


def iteration_flops(unit: dict[str, float], prompts: int = 10, k: int = 4, steps: int = 20, divert: int = 4,
                    tuples: int | None = None) -> dict[str, float]:
    """The paper's iteration composed from per-unit TFLOP (CFG doubles every UNet image-forward).

    Sampling: a guided pass on the b chains at each of the ``divert`` plain steps and at the first
    branching step (later branching steps reuse the chosen candidate's pass), a guided pass on the k*b
    candidates at every branching step but the last; decode + judge k*b images per branching step;
    up to ``(steps - divert) * b`` tuples trained on.
    """
    branching = steps - divert
    unet_images = 2 * ((divert + 1) * prompts + (branching - 1) * k * prompts)
    judged = branching * k * prompts
    tuples = branching * prompts if tuples is None else tuples
    rows = {
        "unet_sampling": unet_images * unit["unet_forward_per_image"],
        "vae_decode": judged * unit["vae_decode_per_image"],
        "judge": judged * unit["judge_image_tower_per_image"],
        "train_spotune": tuples * (unit["train_policy_fwd_bwd_per_tuple"] + unit["train_reference_per_tuple"]),
        "train_authors_4_passes": 2 * tuples * (unit["train_policy_fwd_bwd_per_tuple"] + unit["train_reference_per_tuple"]),
    }
    rows["total_spotune"] = rows["unet_sampling"] + rows["vae_decode"] + rows["judge"] + rows["train_spotune"]
    rows["total_authors"] = rows["total_spotune"] - rows["train_spotune"] + rows["train_authors_4_passes"]
    rows["unet_image_forwards"] = unet_images
    rows["judged_images"] = judged
    rows["tuples"] = tuples
    return rows


def lpo_iteration_flops(unit: dict[str, float], prompts: int = 10, k: int = 4, steps: int = 20,
                        tuples: int | None = None) -> dict[str, float]:
    """LPO's iteration composed from the same units: a guided pass on the b chains at every step (no pass
    on the candidates), the LRM on the k*b noisy candidates of every step (no decode), up to ``steps * b``
    tuples trained on as SPO's are (LPO branches from step 0 and judges the last step too)."""
    unet_images = 2 * steps * prompts
    judged = steps * k * prompts
    tuples = steps * prompts if tuples is None else tuples
    rows = {
        "unet_sampling": unet_images * unit["unet_forward_per_image"],
        "vae_decode": 0.0,
        "judge": judged * unit["lrm_per_latent"],
        "train_spotune": tuples * (unit["train_policy_fwd_bwd_per_tuple"] + unit["train_reference_per_tuple"]),
    }
    rows["total_spotune"] = rows["unet_sampling"] + rows["vae_decode"] + rows["judge"] + rows["train_spotune"]
    rows["unet_image_forwards"] = unet_images
    rows["judged_latents"] = judged
    rows["tuples"] = tuples
    return rows


def chip_peaks(device: torch.device, override_tflops: float | None) -> dict[str, float] | None:
    """The chip's dense peaks by precision (TFLOP/s), from the table, or ``override`` for all of them."""
    if override_tflops:
        return {key: override_tflops for key in ("bf16", "fp16", "tf32", "fp32")}
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peaks for key, peaks in CHIP_PEAKS.items() if key in name), None)


def write_json(path: str | Path, payload: dict) -> None:
    """Write ``payload`` as JSON through the package's atomic writer."""
    from spotune.utils.io import atomic_write_json

    atomic_write_json(Path(path), payload)


def finite_or_none(value: float) -> float | None:
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


__all__ = [
    "CHIP_PEAKS", "PhaseClock", "build_sd15_random", "build_vit_h_judge", "chip_peaks",
    "count_unit_flops", "emulate_reference_training", "flop_counter", "iteration_flops", "json", "write_json",
]
