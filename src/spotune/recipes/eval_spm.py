"""``spotune eval-spm`` / ``spotune eval-lrm``: a judge's pairwise accuracy per denoising timestep on
Pick-a-Pic-format pairs.

Measures any judge the SPO trainer can use (an official or home-trained SPM, plain PickScore, the tiny
judges) the way SPO evaluates its SPM: at t = 0 on the clean images, at t > 0 on the decoded
x0-predictions of the diffusion model, ties left out. Run it before SPO: the judge decides whether
SPO helps, and a step-aware judge should stay well above chance at the steps SPO judges.

``judge=lrm`` (``spotune eval-lrm``) measures LPO's latent reward model the way it is trained and the way
``train-spm model=lrm`` evaluates it: each image VAE-encoded and noised to t with its own noise
(:mod:`spotune.preference.latent_views`), judged as a latent; no decode, and t = 1 is the least noisy view.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from spotune.config import ConfigError, help_field
from spotune.errors import SpotuneError
from spotune.data.pickapic import PickAPicPairs, checked_batch, collate_pairs
from spotune.models.family import resolve_resolution
from spotune.models.loading import load_pipeline
from spotune.preference.factory import JUDGE_KINDS, build_judge_from_config
from spotune.preference.latent_views import LatentViewMaker
from spotune.preference.lrm import check_judges_family, lrm_base_model
from spotune.preference.noisy_views import NoisyViewMaker
from spotune.preference.relabel import DEFAULT_TIE_MARGIN, LabelCache, PickScoreRelabeller
from spotune.preference.spm_eval import (
    SPM_EVAL_TIMESTEPS,
    TimestepAccuracy,
    accuracy_csv,
    evaluate_pair_accuracy,
)
from spotune.recipes.common import MIXED_PRECISION_DTYPES, end_accelerator, seed_for
from spotune.utils.io import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

class OutputExistsError(SpotuneError, FileExistsError):
    """The output file exists and overwrite was not asked for."""


@dataclass
class EvalSPMConfig:
    judge: str = help_field("Judge kind: spm, pickscore, tiny-clip, tiny-spm, or lrm (LPO's latent reward model, judged "
                            "on noised latents; what spotune eval-lrm measures).", "spm")
    judge_clip_path: str | None = help_field("Local CLIPModel folder of the judge (PickScore_v1 for spm/pickscore).", None)
    judge_checkpoint: str | None = help_field(
        "Step-aware checkpoint (.bin official, .safetensors, or a train-spm run folder); spm / tiny-spm. judge=lrm: the "
        "LRM folder (the authors' layout), a train-spm model=lrm run or checkpoint, or builtin:tiny-lrm.", None)
    judge_processor_path: str | None = help_field("Folder with the judge's tokenizer and preprocessor_config.json.", None)
    pretrained_model: str = help_field(
        "Diffusion model making the x0-predictions (SD1.5 or SDXL): diffusers folder, single file, hub id, "
        "builtin:tiny-sd15 or builtin:tiny-sdxl. judge=lrm: the model whose VAE encodes the pairs (the LRM's base).",
        "builtin:tiny-sd15")
    model_family: Literal["auto", "sd15", "sdxl"] = help_field(
        "Family of pretrained_model: auto (read from the model), or sd15 / sdxl to refuse the other family.", "auto")
    vae: str | None = help_field(
        "A local diffusers VAE folder replacing the model's (SDXL: madebyollin/sdxl-vae-fp16-fix, which runs in fp16; "
        "without it the SDXL VAE runs in fp32).", None)
    data: str | None = help_field("Pick-a-Pic-format pairs: a .parquet/.arrow file, a folder of them, or a save_to_disk folder.", None)
    split: str | None = help_field("Split of a DatasetDict or hub-style parquet folder (e.g. validation_unique).", None)
    max_pairs: int | None = help_field("Evaluate on the first N labelled pairs only (unset: all).", None)
    resolution: int | None = help_field("Pairs are resized and centre-cropped to this size (a multiple of the VAE factor); the model's native size "
        "(SD1.5 512, SDXL 1024) when unset.", None)
    guidance_scale: float = help_field("Classifier-free guidance of the x0-prediction (SPO: 5.0).", 5.0)
    negative_prompt: str = help_field("Unconditional prompt of the guidance (SPO: empty).", "")
    timesteps: list[int] = help_field("Timesteps to measure at (SPO: 0, 251, 501, 701, 951).", list(SPM_EVAL_TIMESTEPS))
    batch_size: int = help_field("Pairs per batch.", 16)
    num_workers: int = help_field("DataLoader worker processes decoding images.", 4)
    seed: int = help_field(
        "Seed of the views' noise (the same seed repeats the measurement exactly; a train-spm run's seed, with its "
        "eval data and eval_batch_size as batch_size, draws the noise its own evaluation drew).", 0)
    mixed_precision: Literal["no", "fp16", "bf16"] = help_field("Precision of the diffusion model and the judge.", "no")
    relabel_with: Literal["none", "pickscore"] = help_field(
        "none: measure against the data's own labels. pickscore: against PickScore's verdict on the clean images "
        "(a tie within relabel_tie_margin), as SPO evaluates its SDXL SPM.", "none")
    relabel_tie_margin: float = help_field("relabel_with=pickscore: the tie margin on the softmax probabilities (SPO: 0.1).",
                                           DEFAULT_TIE_MARGIN)
    relabel_clip_path: str | None = help_field(
        "relabel_with=pickscore: the PickScore CLIPModel folder or builtin:tiny-clip; judge_clip_path when unset.", None)
    relabel_processor_path: str | None = help_field(
        "relabel_with=pickscore: its tokenizer and preprocessor_config.json folder; judge_processor_path when unset.", None)
    output: str | None = help_field("Write the table here: .csv or .json (unset: print only).", None)
    overwrite: bool = help_field("Replace an existing output file.", False)
    progress: bool = help_field("Show a progress bar.", True)

    def validate(self) -> None:
        checks = [
            (bool(self.data), "data must name the Pick-a-Pic-format pairs to evaluate on"),
            (self.judge in JUDGE_KINDS, f"judge must be one of {', '.join(JUDGE_KINDS)}, got {self.judge!r}"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (bool(self.timesteps) and all(0 <= t < 1000 for t in self.timesteps),
             "timesteps must be a non-empty list of timesteps in [0, 1000)"),
            (self.output is None or Path(self.output).suffix in (".csv", ".json"), "output must end in .csv or .json"),
            (self.max_pairs is None or self.max_pairs >= 1, "max_pairs must be >= 1"),
            (0.0 <= self.relabel_tie_margin < 1.0, f"relabel_tie_margin must be in [0, 1), got {self.relabel_tie_margin}"),
            (self.relabel_with == "none" or bool(self.relabel_clip_path or self.judge_clip_path),
             "relabel_with=pickscore needs relabel_clip_path=PATH (PickScore_v1, or builtin:tiny-clip)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"config: {message}")


# The timesteps the LPO authors report their LRM's accuracy at (t = 1: the least noisy DDPM view).
LRM_EVAL_TIMESTEPS = (1, 251, 501, 751, 951)


@dataclass
class EvalLRMConfig(EvalSPMConfig):
    """``spotune eval-lrm``: eval-spm's settings with an LRM's defaults."""

    judge: str = help_field("Judge kind: lrm (LPO's latent reward model); eval-spm measures the pixel judges.", "lrm")
    pretrained_model: str | None = help_field(
        "The model whose VAE encodes the pairs: the LRM's base. Unset: the base a train-spm model=lrm run names (or the "
        "tiny model of builtin:tiny-lrm); an LRM folder in the authors' layout names none, so give it.", None)
    timesteps: list[int] = help_field("Timesteps to measure at (the LPO authors: 1, 251, 501, 751, 951).",
                                      list(LRM_EVAL_TIMESTEPS))

    def validate(self) -> None:
        if self.judge != "lrm":
            raise ConfigError(f"config: eval-lrm measures a latent reward model (judge=lrm), got judge={self.judge}; "
                              "use spotune eval-spm for the pixel judges")
        super().validate()


def run_eval_spm(config: EvalSPMConfig) -> list[TimestepAccuracy]:
    """Measure the judge; print the table (main process) and write it to ``config.output`` if set."""
    from accelerate import Accelerator

    cfg = config
    if cfg.output and Path(cfg.output).exists() and not cfg.overwrite:
        raise OutputExistsError(f"{cfg.output} already exists; pass overwrite=true to replace it")
    # cpu=True without CUDA lets a multi-process launch form a gloo process group.
    acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.mixed_precision)
    try:
        return _measure(cfg, acc)
    finally:
        end_accelerator(acc)


def _measure(cfg: EvalSPMConfig, acc) -> list[TimestepAccuracy]:
    """Load the pairs, the judge and the diffusion model on ``acc``'s device; measure; write the table."""
    dtype = MIXED_PRECISION_DTYPES[cfg.mixed_precision]
    # Data and judge first: a bad path fails before the (slow) diffusion model loads.
    pairs = PickAPicPairs(cfg.data, cfg.split, cfg.resolution or 512, cfg.max_pairs)
    judge = build_judge_from_config(
        cfg.judge, cfg.judge_clip_path, cfg.judge_checkpoint, cfg.judge_processor_path, device=acc.device, dtype=dtype
    )
    relabeller = None
    if cfg.relabel_with == "pickscore":
        relabeller = PickScoreRelabeller.from_pretrained(
            cfg.relabel_clip_path or cfg.judge_clip_path, cfg.relabel_processor_path or cfg.judge_processor_path,
            cfg.relabel_tie_margin, device=acc.device,
        )
        pairs.clip_pixels = relabeller.pixels
    model = cfg.pretrained_model
    if model is None:  # eval-lrm: the LRM's own base
        model = lrm_base_model(cfg.judge_checkpoint) if cfg.judge_checkpoint else None
        if model is None:
            raise SpotuneError(f"judge_checkpoint={cfg.judge_checkpoint} does not name the model it was made from; pass "
                               "pretrained_model=PATH (the LRM's base, whose VAE encodes the pairs)")
        cfg = dataclasses.replace(cfg, pretrained_model=model)
    pipe = load_pipeline(model, dtype=dtype, device=acc.device, model_family=cfg.model_family, vae=cfg.vae)
    pairs.resolution = resolve_resolution(cfg.resolution, pipe.unet, pipe.vae)
    if cfg.judge == "lrm":
        views = _latent_views(cfg, pipe, judge)
    else:  # SDXL's time ids carry the views' resolution.
        views = NoisyViewMaker(pipe, cfg.guidance_scale, cfg.negative_prompt, resolution=pairs.resolution)
    loader = acc.prepare(torch.utils.data.DataLoader(
        pairs, batch_size=cfg.batch_size, shuffle=False, collate_fn=collate_pairs, num_workers=cfg.num_workers,
    ))
    batches = loader
    if relabeller is not None:
        cache = LabelCache(len(pairs))
        batches = (relabeller.relabel_batch(checked_batch(b), cache) for b in loader)
    # Seeded as train-spm seeds its evaluation: with that run's seed, data, eval_batch_size and process
    # count, the noisy views here are the ones its accuracy.csv was measured on.
    generator = torch.Generator(acc.device).manual_seed(seed_for(cfg.seed, -1, acc.process_index))
    with acc.autocast():
        rows = evaluate_pair_accuracy(
            judge, views, batches, cfg.timesteps, generator, gather=acc.gather_for_metrics,
            progress=cfg.progress and acc.is_local_main_process,
        )
    ties = rows[0].ties if relabeller is not None else pairs.num_ties  # PickScore's ties when relabelled
    if acc.is_main_process:
        logger.info("measured the %s judge on %d pairs (%d ties%s: left out of accuracy, 0.5 each in accuracy_with_ties)",
                    cfg.judge, len(pairs), ties, " by PickScore's labels" if relabeller is not None else "")
        if cfg.output:
            if cfg.output.endswith(".csv"):
                atomic_write_text(cfg.output, accuracy_csv([(None, r) for r in rows]))
            else:
                atomic_write_json(cfg.output, {
                    "judge": cfg.judge, "checkpoint": cfg.judge_checkpoint, "data": cfg.data, "split": cfg.split,
                    "pairs": len(pairs), "ties": ties, "seed": cfg.seed, "labels": cfg.relabel_with,
                    "rows": [{"timestep": r.timestep, "accuracy": None if math.isnan(r.accuracy) else r.accuracy,
                              "correct": r.correct, "total": r.total,
                              "accuracy_with_ties": None if math.isnan(r.accuracy_with_ties) else r.accuracy_with_ties,
                              "ties": r.ties, "ties_apart": r.ties_apart} for r in rows],
                })
    return rows


def _latent_views(cfg: EvalSPMConfig, pipe, lrm) -> LatentViewMaker:
    """The noised latents an LRM is judged on, by a VAE of the LRM's own family."""
    check_judges_family(lrm, getattr(pipe, "text_encoder_2", None) is not None, cfg.judge_checkpoint, cfg.pretrained_model)
    channels, expected = int(pipe.vae.config.latent_channels), int(lrm.unet.config.in_channels)
    if channels != expected:
        raise SpotuneError(f"pretrained_model={cfg.pretrained_model}: its VAE makes {channels}-channel latents, but the LRM "
                           f"{cfg.judge_checkpoint} takes {expected}; set pretrained_model to the LRM's base model")
    return LatentViewMaker(pipe)
