"""Training a step-aware preference model (SPM), written out: setup, then #### NOISY VIEWS #### and
#### TRAINING #### per micro-batch, with #### EVALUATION #### (pairwise accuracy per timestep) and
checkpoints every few optimizer steps.

``model=lrm`` trains LPO's latent reward model instead (:mod:`spotune.preference.lrm`), made from
``pretrained_model``'s own UNet and text encoder, on noised latents (:mod:`spotune.preference.latent_views`):
the same loop, loss, evaluation, checkpoints and resume; only the model and what it sees differ, as the
LPO authors' LRM trainer changes only those in SPO's.

Per micro-batch of B Pick-a-Pic pairs (caption, image 0, image 1, labels):

1. draw t ~ U{0, ..., 999} per pair and one noise per pair;
2. both images -> VAE -> noised to t -> guided UNet -> x0-prediction -> VAE decode (frozen diffusion model);
3. the SPM scores both decoded views, knowing t; the loss is the two-way cross-entropy against the
   labels (:func:`spotune.preference.spm_loss.spm_pair_loss`).

Every random draw of micro-batch i comes from a generator seeded by (seed, i, process), so a resumed
run repeats exactly what the uninterrupted one would have done. Runs on one process or many through
``accelerate launch`` (DDP).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import shutil
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import DDIMScheduler
from safetensors.torch import load_file
from tqdm.auto import tqdm

from spotune.checkpoint import (
    CHECKPOINT_FORMAT,
    checkpoint_name,
    list_checkpoints,
    optimizer_to_files,
    read_state,
    restore_training_state,
    rng_state_to_files,
)
from spotune.config import ConfigError, config_to_dict, config_to_yaml, help_field
from spotune.data.pair_filter import PairFilterError, mpcf_keep
from spotune.data.pickapic import BlockShuffleSampler, PairBatch, PickAPicPairs, checked_batch, collate_pairs
from spotune.errors import SpotuneError
from spotune.models.family import resolve_resolution
from spotune.models.loading import load_pipeline
from spotune.preference.clip_judge import spm_training_pixels
from spotune.preference.loading import BUILTIN_TINY_CLIP, load_clip
from spotune.preference.noisy_views import NoisyViewMaker
from spotune.preference.relabel import DEFAULT_TIE_MARGIN, LabelCache, PickScoreRelabeller
from spotune.preference.spm_eval import (
    SPM_EVAL_TIMESTEPS,
    TimestepAccuracy,
    accuracy_csv,
    evaluate_pair_accuracy,
    format_accuracy_table,
)
from spotune.preference.spm_loss import spm_pair_loss
from spotune.preference.latent_views import LatentViewMaker
from spotune.preference.lrm import LRM_WEIGHTS_NAME, init_text_projection, lrm_from_pipeline
from spotune.preference.step_aware import SPM_WEIGHTS_NAME, StepAwarePreferenceModel
from spotune.recipes.common import (
    MIXED_PRECISION_DTYPES,
    NonFiniteLossError,
    end_accelerator,
    open_run_folder,
    release_run_folder,
    run_recipe,
    seed_for,
    stop_for_preemption,
)
from spotune.recipes.resume import check_nothing_lost, check_resume_config, override_learning_rate, write_run_config
from spotune.utils.io import (
    apply_umask_modes,
    aside_name,
    atomic_directory,
    atomic_save_safetensors,
    atomic_write_json,
    atomic_write_text,
    make_temp_dir,
)
from spotune.utils.lr_schedules import build_lr_scheduler
from spotune.utils.preemption import NoPreemption, PreemptionWatch, data_worker_options, signals_held

logger = logging.getLogger(__name__)

# What a resume may change (recipes/resume.py): the run's length, checkpoints, logging, how often (not
# on what) it evaluates, the learning rate, and knobs that leave the maths alone. Anything else is refused.
RESUMABLE_KEYS = frozenset({
    "max_steps", "eval_every", "eval_at_start", "checkpoint_every", "keep_checkpoints", "keep_best_at", "preempt_grace_s", "log_with",
    "tracker_project", "progress", "learning_rate", "num_workers", "eval_batch_size", "gradient_checkpointing",
})

@dataclass
class TrainSPMConfig:
    # -- where things are ---------------------------------------------------------------------------
    output_dir: str = help_field("Run folder: config.yaml, checkpoints/, logs/ and eval/ are written here.", "runs/spm")
    pretrained_model: str = help_field(
        "The diffusion model whose x0-predictions the SPM learns to judge: a diffusers folder, a single-file "
        ".safetensors, a hub id (online), or builtin:tiny-sd15 / builtin:tiny-sdxl.", "builtin:tiny-sd15")
    model_family: Literal["auto", "sd15", "sdxl"] = help_field(
        "Family of pretrained_model: auto (read from the model), or sd15 / sdxl to refuse the other family.", "auto")
    vae: str | None = help_field(
        "A local diffusers VAE folder replacing the model's (SDXL: madebyollin/sdxl-vae-fp16-fix, which runs in fp16; "
        "without it the SDXL VAE runs in fp32).", None)
    model: Literal["spm", "lrm"] = help_field(
        "What is trained: spm, SPO's step-aware model over a CLIP (clip_path), judged on decoded x0-prediction views; "
        "lrm, LPO's latent reward model made from pretrained_model's own UNet (down and mid blocks) and text encoder, "
        "judged on noised latents (its checkpoints load as judge=lrm judge_checkpoint=RUN).", "spm")
    timestep_grid: int = help_field(
        "Training timesteps: 0 draws t uniformly from 0..999 (SPO's SPM); N draws it from the N-step DDIM schedule "
        "(the LPO authors' LRM: 20, i.e. 1, 51, ..., 951).", 0)
    clip_path: str | None = help_field(
        "The CLIP the SPM extends: a local CLIPModel folder (PickScore_v1), or builtin:tiny-clip.", BUILTIN_TINY_CLIP)
    processor_path: str | None = help_field(
        "Folder with the CLIP tokenizer and preprocessor_config.json (laion/CLIP-ViT-H-14-laion2B-s32B-b79K for "
        "PickScore); defaults to clip_path.", None)
    init_checkpoint: str | None = help_field(
        "Start from these SPM weights (official .bin, .safetensors, or a train-spm run) instead of the identity "
        "extension of clip_path; model=lrm: an lrm.safetensors a model=lrm run wrote.", None)
    text_projection_from: str | None = help_field(
        "model=lrm, SD1.5: start the LRM's text_projection from this CLIP's (a CLIPModel folder or its model file), as the "
        "LPO authors start it from openai/clip-vit-large-patch14's; unset: drawn from N(0, 0.02).", None)
    train_data: str | None = help_field(
        "Pick-a-Pic-format pairs: a .parquet/.arrow file, a folder of them, or a datasets save_to_disk folder.", None)
    train_split: str | None = help_field("Split to read from a DatasetDict or hub-style parquet folder (train when unset).", None)
    eval_data: str | None = help_field("Pairs for the per-timestep accuracy evaluation (unset: no evaluation).", None)
    eval_split: str | None = help_field("Split of eval_data (e.g. validation_unique).", None)
    max_eval_pairs: int | None = help_field("Evaluate on the first N labelled pairs only (unset: all).", None)
    train_keep_unlabelled: bool = help_field(
        "Keep training rows whose has_label is false, as SPO's trainer does (it filters only the evaluation "
        "splits); they add no gradient and count in the per-batch weight normalisation (with relabel_with=pickscore "
        "they get PickScore's labels, as in SPO's SDXL run). Evaluation always drops them.",
        True)
    pair_filter_csv: str | None = help_field(
        "LPO's label filter (MPCF): a CSV with one row per row of train_data, in order, and the columns different_flag, "
        "aesthetic_gap, clipscore_gap, vqascore_gap (the authors' pseudo-preference file); only the pairs its rule keeps "
        "are trained on (see spotune.data.pair_filter). Unset: every pair.", None)
    pair_filter_strategy: int = help_field(
        "pair_filter_csv's rule, the authors' filter_strategy: a decisive pair is kept when its aesthetic gap is above 0 "
        "(1), -0.5 (2, the released LRMs') or -1 (3), and its CLIP and VQA gaps above 0.", 2)
    # -- labels --------------------------------------------------------------------------------------
    relabel_with: Literal["none", "pickscore"] = help_field(
        "none: train and evaluate on the data's own (human) labels. pickscore: replace every pair's labels, in "
        "training and evaluation, by PickScore's verdict on the two clean images, as SPO trained its SDXL SPM "
        "(softmax of the two scores; a tie when they differ by at most relabel_tie_margin).", "none")
    relabel_tie_margin: float = help_field(
        "relabel_with=pickscore: a pair whose two PickScore softmax probabilities differ by at most this is a tie "
        "(0.5/0.5) (SPO: 0.1).", DEFAULT_TIE_MARGIN)
    relabel_clip_path: str | None = help_field(
        "relabel_with=pickscore: the PickScore CLIPModel folder (PickScore_v1) or builtin:tiny-clip; clip_path when unset.",
        None)
    relabel_processor_path: str | None = help_field(
        "relabel_with=pickscore: its tokenizer and preprocessor_config.json folder (CLIP-ViT-H-14-laion2B-s32B-b79K); "
        "processor_path when unset.", None)
    # -- noisy views ---------------------------------------------------------------------------------
    resolution: int | None = help_field(
        "Pairs are resized and centre-cropped to this size before the VAE (a multiple of the VAE factor); the model's "
        "native size (SD1.5 512, SDXL 1024) when unset.", None)
    guidance_scale: float = help_field("Classifier-free guidance of the x0-prediction the SPM sees (SPO: 5.0).", 5.0)
    negative_prompt: str = help_field("Unconditional prompt of the guidance (SPO: empty).", "")
    eval_timesteps: list[int] = help_field("Timesteps of the accuracy evaluation (SPO: 0, 251, 501, 701, 951).", list(SPM_EVAL_TIMESTEPS))
    decode_chunk_size: int = help_field("Latents decoded by the VAE at once (memory bound).", 16)
    views_dtype: Literal["fp16", "bf16", "fp32"] | None = help_field(
        "Precision of the frozen diffusion model that makes the noisy views, run without autocast (SPO: fp16). "
        "Unset: mixed_precision's dtype under its autocast.", None)
    # -- optimisation --------------------------------------------------------------------------------
    train_batch_size: int = help_field("Pairs per micro-batch, per process.", 16)
    eval_batch_size: int = help_field("Pairs per evaluation batch, per process.", 16)
    gradient_accumulation_steps: int = help_field("Micro-batches per optimizer step.", 1)
    learning_rate: float = help_field("AdamW learning rate (every SPM weight is trained, CLIP included).", 3e-6)
    adam_beta1: float = help_field("AdamW beta1.", 0.9)
    adam_beta2: float = help_field("AdamW beta2.", 0.999)
    adam_weight_decay: float = help_field("AdamW weight decay.", 0.01)
    adam_epsilon: float = help_field("AdamW epsilon.", 1e-8)
    max_grad_norm: float = help_field("Gradient clipping norm (0 disables).", 1.0)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "warmup_decay"] = help_field(
        "Learning-rate schedule; warmup_decay is DeepSpeed's WarmupDecayLR (SPO's): warm-up, then linear decay to 0 "
        "at max_steps.", "constant_with_warmup")
    lr_warmup_steps: int = help_field("Warm-up optimizer steps.", 500)
    lr_warmup_type: Literal["log", "linear"] = help_field(
        "Warm-up shape of warmup_decay: log (DeepSpeed's default, SPO's) or linear.", "log")
    max_steps: int = help_field("Optimizer steps in total.", 4000)
    seed: int = help_field("Seed of the data order, the timesteps and the noise.", 42)
    mixed_precision: Literal["no", "fp16", "bf16"] = help_field(
        "Mixed precision: the frozen diffusion model runs in this dtype, the SPM trains in fp32 under autocast.", "bf16")
    gradient_checkpointing: bool = help_field("Recompute the CLIP towers' activations in backward to save memory.", False)
    allow_tf32: bool = help_field("Allow TF32 matmuls on Ampere+ GPUs.", True)
    num_workers: int = help_field("DataLoader worker processes decoding images.", 4)
    # -- run management ------------------------------------------------------------------------------
    eval_every: int = help_field("Evaluate every N optimizer steps (0: only at the end).", 500)
    eval_at_start: bool = help_field("Evaluate once before training (the untrained SPM scores as its CLIP does).", True)
    checkpoint_every: int = help_field("Checkpoint every N optimizer steps (0: only at the end).", 500)
    keep_checkpoints: int | None = help_field("Keep only the newest N checkpoints (unset keeps all).", None)
    keep_best_at: int | None = help_field(
        "Keep a copy of the weights with the best pair accuracy at this timestep of eval_timesteps in RUN/best/ (the "
        "LPO authors keep their LRM's best at t = 1); judge_checkpoint=RUN/best loads it. Unset: no copy.", None)
    preempt_grace_s: float = help_field(
        "Seconds from a SIGTERM / SIGUSR1 (a scheduler's preemption) within which the run must finish its current "
        "optimizer step and write a checkpoint; past it the process ends with exit 143 and the previous checkpoint is kept "
        "(0: no limit). Size it inside the scheduler's warning (SLURM --signal=B:TERM@120).", 90.0)
    resume: str | None = help_field("Continue a run: 'latest' (newest checkpoint in output_dir) or a checkpoint folder.", None)
    overwrite: bool = help_field("Start afresh in an output_dir that already holds a run, deleting its checkpoints.", False)
    log_with: Literal["tensorboard", "wandb", "none"] = help_field("Experiment tracker.", "tensorboard")
    tracker_project: str = help_field("Project name for the tracker.", "spotune-spm")
    progress: bool = help_field("Show progress bars.", True)

    def validate(self) -> None:
        """Cross-field checks, so a bad combination fails before any model is loaded."""
        checks = [
            (bool(self.train_data), "train_data must name the Pick-a-Pic-format training pairs"),
            (bool(self.clip_path), "clip_path must name a local CLIPModel folder (PickScore_v1) or builtin:tiny-clip"),
            (self.train_batch_size >= 1 and self.eval_batch_size >= 1, "batch sizes must be >= 1"),
            (self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be >= 1"),
            (self.max_steps >= 1, "max_steps must be >= 1"),
            (self.learning_rate > 0, f"learning_rate must be > 0, got learning_rate={self.learning_rate}"),
            (self.eval_every >= 0, f"eval_every must be >= 0 (0: at the end only), got eval_every={self.eval_every}"),
            (self.checkpoint_every >= 0, f"checkpoint_every must be >= 0 (0: at the end only), got checkpoint_every={self.checkpoint_every}"),
            (self.preempt_grace_s >= 0, f"preempt_grace_s must be >= 0 (0: no limit), got preempt_grace_s={self.preempt_grace_s}"),
            (self.keep_checkpoints is None or self.keep_checkpoints >= 1,
             f"keep_checkpoints must be >= 1 when set (unset keeps all), got keep_checkpoints={self.keep_checkpoints}"),
            (self.decode_chunk_size >= 1, f"decode_chunk_size must be >= 1, got decode_chunk_size={self.decode_chunk_size}"),
            (self.resolution is None or self.resolution >= 8, "resolution must be >= 8"),
            (self.num_workers >= 0, "num_workers must be >= 0"),
            (self.max_eval_pairs is None or self.max_eval_pairs >= 1, "max_eval_pairs must be >= 1"),
            (bool(self.eval_timesteps) and all(0 <= t < 1000 for t in self.eval_timesteps),
             "eval_timesteps must be a non-empty list of timesteps in [0, 1000)"),
            (not (self.resume and self.overwrite), "resume and overwrite=true contradict each other"),
            (self.pair_filter_strategy in (1, 2, 3),
             f"pair_filter_strategy must be 1, 2 or 3 (the LPO authors' filter_strategy), got {self.pair_filter_strategy}"),
            (self.keep_best_at is None or self.keep_best_at in self.eval_timesteps,
             f"keep_best_at={self.keep_best_at} must be one of eval_timesteps {self.eval_timesteps} (the best weights are "
             "chosen by their accuracy there)"),
            (0 <= self.timestep_grid <= 1000,
             f"timestep_grid must be in [0, 1000] (0: every timestep; N: the N-step DDIM grid), got timestep_grid={self.timestep_grid}"),
            (0.0 <= self.relabel_tie_margin < 1.0,
             f"relabel_tie_margin must be in [0, 1) (a gap of softmax probabilities), got relabel_tie_margin={self.relabel_tie_margin}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"config: {message}")


RELABEL_FILE = "relabel_labels.safetensors"


class SPMTrainer:
    """The SPM recipe: ``setup()``, ``train()``, ``evaluate()``, ``save_checkpoint()``, ``cleanup()``.

    Args:
        config: a validated :class:`TrainSPMConfig`.
    """

    def __init__(self, config: TrainSPMConfig) -> None:
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.global_step = 0  # optimizer steps taken
        self.micro_step = 0  # micro-batches consumed (seeds each one's random draws)
        self.epoch = 0
        self.batch_in_epoch = 0  # micro-batches of the current epoch already consumed
        self.eval_history: list[tuple[int, TimestepAccuracy]] = []
        self.relabeller: PickScoreRelabeller | None = None  # relabel_with=pickscore
        self.train_labels: LabelCache | None = None  # PickScore's labels of the training pairs seen so far
        self.eval_labels: LabelCache | None = None
        self.saved_at: int | None = None  # the optimizer step of the newest checkpoint written or resumed from
        # SIGTERM / SIGUSR1 handling of the loop; run_recipe installs a PreemptionWatch around train().
        self.preemption: PreemptionWatch | NoPreemption = NoPreemption()

    # ============================================================================================
    # setup
    # ============================================================================================
    def setup(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        cfg = self.config
        log_with = None if cfg.log_with == "none" else cfg.log_with
        if log_with and importlib.util.find_spec(log_with) is None:
            raise SpotuneError(f"config: log_with={log_with} needs the '{log_with}' package (pip install {log_with}), or set log_with=none")
        self.run_lock, resume_from = open_run_folder(self.output_dir, cfg.resume, cfg.overwrite, "spotune train-spm")
        resume_changes = check_resume_config(resume_from, cfg, RESUMABLE_KEYS) if resume_from is not None else {}
        self.accelerator = acc = Accelerator(
            # Without CUDA, cpu=True lets a multi-process launch form a gloo process group.
            cpu=not torch.cuda.is_available(),
            mixed_precision=cfg.mixed_precision,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            log_with=log_with,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")),
        )
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched != acc.num_processes:
            raise SpotuneError(
                f"the launcher started {launched} processes but the accelerator sees {acc.num_processes}: the "
                "process group did not form, and the copies would overwrite each other's run folder"
            )
        if acc.device.type == "cuda" and cfg.allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
        self.weight_dtype = MIXED_PRECISION_DTYPES[cfg.mixed_precision]

        # -- data (read first: a bad path, column or label fails before any model loads) -----------
        train_set = PickAPicPairs(cfg.train_data, cfg.train_split, cfg.resolution or 512,
                                  keep_unlabelled=cfg.train_keep_unlabelled)
        if cfg.pair_filter_csv:
            self._filter_pairs(train_set)
        if cfg.keep_best_at is not None and not cfg.eval_data:
            logger.warning("keep_best_at=%d: no eval_data, so no accuracy to choose the best weights by; RUN/best is not "
                           "written", cfg.keep_best_at)
        if len(train_set) < cfg.train_batch_size * acc.num_processes:
            raise SpotuneError(
                f"{cfg.train_data}: {len(train_set)} labelled pairs are fewer than one batch "
                f"(train_batch_size {cfg.train_batch_size} x {acc.num_processes} processes)"
            )
        eval_set = None
        if cfg.eval_data:
            eval_set = PickAPicPairs(cfg.eval_data, cfg.eval_split, cfg.resolution or 512, cfg.max_eval_pairs)
            # Every evaluation image is decoded now: a bad one found at the first evaluation, hours in,
            # would stop the run there.
            eval_set.check_images()

        # -- the SPM: the CLIP with identity-initialised time conditioning, all weights trained ----
        if cfg.model == "spm":
            model, tokenizer, processing = load_clip(cfg.clip_path, cfg.processor_path)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)  # the timestep embedder's initial weights are part of the run's seed
                spm = StepAwarePreferenceModel(model, tokenizer, processing.size, processing.mean, processing.std)
            if cfg.init_checkpoint:
                spm.load_checkpoint(cfg.init_checkpoint)
            spm = spm.float().train().requires_grad_(True)
            if cfg.gradient_checkpointing:
                spm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

        # -- PickScore's labels instead of the data's (SPO's SDXL SPM), before the slow diffusion model
        if cfg.relabel_with == "pickscore":
            self.relabeller = PickScoreRelabeller.from_pretrained(
                cfg.relabel_clip_path or cfg.clip_path, cfg.relabel_processor_path or cfg.processor_path,
                cfg.relabel_tie_margin, device=acc.device,
            )
            # The workers hand over both original images through PickScore's processor, beside the views' pixels.
            for pairs in (train_set, eval_set):
                if pairs is not None:
                    pairs.clip_pixels = self.relabeller.pixels
            self.train_labels = LabelCache(len(train_set))
            self.eval_labels = LabelCache(len(eval_set)) if eval_set is not None else None

        # -- the frozen diffusion model and the views it makes ------------------------------------
        self.views_dtype = MIXED_PRECISION_DTYPES[cfg.views_dtype] if cfg.views_dtype else self.weight_dtype
        # The LRM trains the pipeline's own UNet and text encoder(s): loaded in fp32 (trained weights stay fp32
        # under mixed precision), the frozen VAE with them.
        pipe = load_pipeline(cfg.pretrained_model, dtype=self.views_dtype if cfg.model == "spm" else torch.float32,
                             device=acc.device, model_family=cfg.model_family, vae=cfg.vae)
        self.resolution = resolve_resolution(cfg.resolution, pipe.unet, pipe.vae)
        if cfg.model == "lrm":
            self.views = LatentViewMaker(pipe)
            pipe.vae.requires_grad_(False).eval()
            spm = lrm_from_pipeline(pipe, cfg.seed, image_size=self.resolution)  # the trained model (named spm below)
            if cfg.text_projection_from:
                init_text_projection(spm, cfg.text_projection_from)
            if cfg.init_checkpoint:
                spm.load_checkpoint(cfg.init_checkpoint)
            spm = spm.float().train().requires_grad_(True)
            if cfg.gradient_checkpointing:
                spm.unet.enable_gradient_checkpointing()
        else:
            # SDXL's time ids carry the views' resolution (SPO's SDXL SPM: 1024 x 1024).
            self.views = NoisyViewMaker(pipe, cfg.guidance_scale, cfg.negative_prompt, cfg.decode_chunk_size, self.resolution)
            for module in (pipe.vae, pipe.unet, *self.views.conditioner.text_encoders):
                module.requires_grad_(False).eval()
        self.timestep_grid = None  # [N] the timesteps training draws from (timestep_grid=N), else any t
        if cfg.timestep_grid:
            grid = DDIMScheduler.from_config(pipe.scheduler.config)
            grid.set_timesteps(cfg.timestep_grid)
            self.timestep_grid = grid.timesteps.to(acc.device).long()
        for pairs in (train_set, eval_set):
            if pairs is not None:
                pairs.resolution = self.resolution  # the model's own size, now that it is known

        # Shuffled row group by row group (parquet); the order of epoch e is fixed by (seed, e).
        loader = torch.utils.data.DataLoader(
            train_set, batch_size=cfg.train_batch_size, sampler=BlockShuffleSampler(train_set.blocks, cfg.seed),
            collate_fn=collate_pairs,
            num_workers=cfg.num_workers, drop_last=True, pin_memory=acc.device.type == "cuda",
            **data_worker_options(cfg.num_workers),  # a signal to the process group is the main process's to handle
        )
        self.eval_loader = None
        if eval_set is not None:
            self.eval_loader = torch.utils.data.DataLoader(
                eval_set, batch_size=cfg.eval_batch_size, shuffle=False, collate_fn=collate_pairs,
                num_workers=cfg.num_workers, **data_worker_options(cfg.num_workers),
            )

        # -- optimizer and schedule ---------------------------------------------------------------
        optimizer = torch.optim.AdamW(
            spm.parameters(), lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
            weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon,
        )
        # Stepped once per optimizer step by this loop (not handed to accelerate, which would step
        # it once per process).
        self.lr_scheduler = build_lr_scheduler(
            cfg.lr_scheduler, optimizer, cfg.lr_warmup_steps, cfg.max_steps, cfg.lr_warmup_type
        )
        self.spm, self.optimizer, self.train_loader = acc.prepare(spm, optimizer, loader)
        if self.eval_loader is not None:
            self.eval_loader = acc.prepare(self.eval_loader)
        self.train_set = train_set

        if resume_from is not None:
            self._load_checkpoint(resume_from)
            check_nothing_lost(resume_from, self.global_step, cfg.max_steps, "max_steps")
            if "learning_rate" in resume_changes:
                override_learning_rate(self.optimizer, self.lr_scheduler, cfg.learning_rate)
        if acc.is_main_process:
            write_run_config(self.output_dir, config_to_yaml(cfg), self.global_step if resume_from is not None else None)
        if log_with:
            tracker_cfg = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in config_to_dict(cfg).items()}
            acc.init_trackers(cfg.tracker_project, config=tracker_cfg)
        logger.info(
            "%s: %d training pairs (%d ties, %d unlabelled 0/0), %d eval pairs, %d micro-batches/epoch, "
            "%d optimizer steps, %d parameters, %d process(es)",
            cfg.model.upper(), len(train_set), train_set.num_ties, train_set.num_without_preference,
            len(self.eval_loader.dataset) if self.eval_loader else 0,
            len(self.train_loader), cfg.max_steps, sum(p.numel() for p in spm.parameters()), acc.num_processes,
        )
        if self.relabeller is not None:
            logger.info(
                "labels: PickScore's on the clean images (%s), a tie within %.3g of softmax probability; the data's "
                "own labels are not used", cfg.relabel_clip_path or cfg.clip_path, cfg.relabel_tie_margin,
            )

    @property
    def _weights_name(self) -> str:
        """The checkpoint's weights file: ``spm.safetensors`` (the official SPM key layout) or ``lrm.safetensors``."""
        return LRM_WEIGHTS_NAME if self.config.model == "lrm" else SPM_WEIGHTS_NAME

    @property
    def unwrapped(self) -> StepAwarePreferenceModel:
        return self.accelerator.unwrap_model(self.spm)

    # ============================================================================================
    # the loop
    # ============================================================================================
    def train(self) -> dict[str, float]:
        """Optimizer steps until ``max_steps``; returns the last step's metrics (and the last evaluation's)."""
        cfg, acc = self.config, self.accelerator
        if self.global_step == 0 and cfg.eval_at_start:
            self.evaluate()
        bar = tqdm(
            total=cfg.max_steps, initial=self.global_step, desc=f"{cfg.model.upper()} steps",
            disable=not (cfg.progress and acc.is_local_main_process), dynamic_ncols=True,
        )
        metrics: dict[str, float] = {}
        sums: dict[str, list[float]] = {}  # statistic -> [sum, count] over the step's micro-batches
        while self.global_step < cfg.max_steps:
            # The loader's own epoch counter drives the sampler (accelerate sets it on every __iter__),
            # and skip_first_batches copies it: set it, not the sampler's, so a resume sees the same order.
            self.train_loader.set_epoch(self.epoch)
            batches = acc.skip_first_batches(self.train_loader, self.batch_in_epoch) if self.batch_in_epoch else self.train_loader
            for batch in batches:
                batch = checked_batch(batch)
                self.spm.train()
                with acc.accumulate(self.spm):
                    loss, stats = self.training_loss(batch, self.micro_step)
                    self._check_finite(loss)
                    acc.backward(loss)
                    if acc.sync_gradients and cfg.max_grad_norm > 0:
                        stats["grad_norm"] = acc.clip_grad_norm_(self.spm.parameters(), cfg.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                self.micro_step += 1
                self.batch_in_epoch += 1
                for key, value in {"loss": loss.detach(), **stats}.items():
                    value = float(value)
                    if math.isfinite(value):  # accuracy is nan for a batch of ties only
                        total = sums.setdefault(key, [0.0, 0])
                        total[0], total[1] = total[0] + value, total[1] + 1
                if not acc.sync_gradients:
                    continue

                # -- one optimizer step done ------------------------------------------------------
                self.lr_scheduler.step()
                self.global_step += 1
                metrics = self._mean_over_processes(sums)
                metrics["train/lr"] = float(self.lr_scheduler.get_last_lr()[0])
                metrics["train/epoch"] = self.epoch + self.batch_in_epoch / len(self.train_loader)
                sums = {}
                acc.log(metrics, step=self.global_step)
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['train/loss']:.4f}")
                done = self.global_step >= cfg.max_steps
                # Checkpoint first: an evaluation that fails must not take the steps since the last one with it.
                saved = None
                if (cfg.checkpoint_every and self.global_step % cfg.checkpoint_every == 0) or done:
                    saved = self.save_checkpoint()
                if (cfg.eval_every and self.global_step % cfg.eval_every == 0) or done:
                    metrics.update(self.evaluate())
                    if saved is not None:
                        self._record_evaluation(saved)
                if done:
                    break
                if self.preemption.stop_here(acc):
                    bar.close()
                    stop_for_preemption(self)
            else:
                self.epoch += 1
                self.batch_in_epoch = 0
        bar.close()
        return metrics

    TRAIN_STATS = ("loss", "accuracy", "prob_preferred", "grad_norm")

    def _mean_over_processes(self, sums: dict[str, list[float]]) -> dict[str, float]:
        """``train/<stat>`` averaged over this step's micro-batches and over all processes (nan-aware:
        a process whose micro-batches held only ties has no accuracy)."""
        local = torch.tensor(
            [sums[k][0] / sums[k][1] if k in sums else math.nan for k in self.TRAIN_STATS],
            device=self.accelerator.device, dtype=torch.float64,
        )
        every = self.accelerator.gather(local[None]) if self.accelerator.num_processes > 1 else local[None]  # [P, K]
        means = torch.nanmean(every, dim=0).tolist()
        return {f"train/{k}": v for k, v in zip(self.TRAIN_STATS, means) if not math.isnan(v)}

    # ============================================================================================
    #### NOISY VIEWS #### and #### TRAINING ####
    # ============================================================================================
    def training_loss(
        self, batch: PairBatch, micro_step: int, timesteps: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of one micro-batch (the SPM's, or the LRM's with ``model=lrm``); every random draw is seeded
        by (seed, micro_step, process).

        Args:
            batch: B pairs on the accelerator's device.
            micro_step: index of this micro-batch in the run.
            timesteps: [B] timesteps to judge the pairs at; drawn uniformly from [0, 1000) when ``None``
                (training). Fixed ones measure the loss at given noise levels.
        """
        cfg, acc = self.config, self.accelerator
        batch = self._relabelled(batch, self.train_labels)
        b = len(batch)
        generator = torch.Generator(acc.device).manual_seed(seed_for(cfg.seed, micro_step, acc.process_index))
        if self.timestep_grid is not None:  # one of the grid's timesteps per pair
            t = self.timestep_grid[torch.randint(0, len(self.timestep_grid), (b,), generator=generator, device=acc.device)]
        else:
            t = torch.randint(0, self.views.num_train_timesteps, (b,), generator=generator, device=acc.device)  # [B]
        if timesteps is not None:
            t = timesteps.to(acc.device).long()
        if cfg.model == "lrm":
            with torch.no_grad():
                latents_0, latents_1 = self.views(batch.pixel_values_0, batch.pixel_values_1, batch.captions, t, generator)
            # [2B] rows: both images of each pair with its caption (the authors' order: [image 0; image 1]).
            text, image, logit_scale = self.spm(torch.cat([latents_0, latents_1]), torch.cat([t, t]), list(batch.captions) * 2)
            text = text[:b]
        else:
            text, image, logit_scale = self._spm_features(batch, t, generator)
        image_0, image_1 = image.chunk(2)
        weight_total = None
        if acc.num_processes > 1:
            # Normalise over the global batch: DDP averages the processes' gradients.
            weight_total = acc.reduce((1.0 / batch.num_pairs).sum(), reduction="mean")
        return spm_pair_loss(text, image_0, image_1, logit_scale, batch.label_0, batch.label_1, batch.num_pairs, weight_total)

    def _spm_features(self, batch: PairBatch, t: torch.Tensor, generator: torch.Generator
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The SPM's (text [B, D], image [2B, D], logit_scale) on the pair's decoded x0-prediction views at ``t``."""
        acc, spm = self.accelerator, self.unwrapped
        with torch.no_grad():
            # views_dtype set: the views in that dtype with autocast off, as SPO builds them (fp16).
            with acc.autocast() if self.config.views_dtype is None else nullcontext():
                views_0, views_1 = self.views(batch.pixel_values_0, batch.pixel_values_1, batch.captions, t, generator)
            # [2B, 3, S, S]: the views in SPO's training order (clamp, resize to S x S, clamp, normalise).
            pixels = spm_training_pixels(torch.cat([views_0, views_1]), spm.image_size, spm.image_mean, spm.image_std)
            input_ids = spm.tokenize(batch.captions)  # [B, 77]
        return self.spm(pixels, torch.cat([t, t]), input_ids)  # [B, D], [2B, D], scalar

    def _relabelled(self, batch: PairBatch, cache: LabelCache | None) -> PairBatch:
        """The batch with PickScore's labels (relabel_with=pickscore), each pair's computed once; else unchanged."""
        if self.relabeller is None or cache is None:
            return batch
        return self.relabeller.relabel_batch(batch, cache)

    def _check_finite(self, loss: torch.Tensor) -> None:
        bad = torch.tensor(0.0 if torch.isfinite(loss) else 1.0, device=loss.device)
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        if bad.item() > 0:
            last = list_checkpoints(self.output_dir)
            raise NonFiniteLossError(
                f"loss is {loss.item()} at optimizer step {self.global_step + 1}; training stopped before applying "
                f"it. Last good checkpoint: {last[-1] if last else 'none yet'}"
            )

    # ============================================================================================
    #### EVALUATION ####
    # ============================================================================================
    def evaluate(self) -> dict[str, float]:
        """Pairwise accuracy per timestep on ``eval_data``: logged, appended to ``eval/accuracy.csv``."""
        cfg, acc = self.config, self.accelerator
        if self.eval_loader is None:
            return {}
        spm = self.unwrapped
        spm.eval()
        if hasattr(spm, "clear_text_cache"):
            spm.clear_text_cache()  # the weights changed since the cache was filled
        generator = torch.Generator(acc.device).manual_seed(seed_for(cfg.seed, -1, acc.process_index))
        # The global RNGs come out as they went in (the loader draws its base seed from them): a
        # checkpoint saved just before an evaluation then resumes exactly as the run goes on after it.
        rng = torch.random.fork_rng(devices=[acc.device] if acc.device.type == "cuda" else [])
        batches = self.eval_loader
        if self.relabeller is not None:
            # SPO relabels its evaluation pairs too and scores accuracy on PickScore's decisive pairs.
            batches = (self._relabelled(checked_batch(b), self.eval_labels) for b in self.eval_loader)
        with rng, acc.autocast() if cfg.views_dtype is None else nullcontext():  # the views as in training
            rows = evaluate_pair_accuracy(
                spm, self.views, batches, cfg.eval_timesteps, generator,
                gather=acc.gather_for_metrics, progress=cfg.progress and acc.is_local_main_process,
            )
        if hasattr(spm, "clear_text_cache"):
            spm.clear_text_cache()
        self.eval_history = [(s, r) for s, r in self.eval_history if s != self.global_step]
        self.eval_history += [(self.global_step, r) for r in rows]
        metrics = {f"eval/accuracy_t{r.timestep}": r.accuracy for r in rows}
        # SPO's own figure: ties count 0.5 (see spotune.preference.spm_eval).
        metrics.update({f"eval/accuracy_with_ties_t{r.timestep}": r.accuracy_with_ties for r in rows})
        for name, values in (("accuracy_mean", [r.accuracy for r in rows]),
                             ("accuracy_with_ties_mean", [r.accuracy_with_ties for r in rows])):
            finite = [v for v in values if not math.isnan(v)]
            if finite:
                metrics[f"eval/{name}"] = sum(finite) / len(finite)
        if acc.is_main_process:
            atomic_write_text(self.output_dir / "eval" / "accuracy.csv", accuracy_csv(self.eval_history))
            logger.info("%s pairwise accuracy at step %d:\n%s", cfg.model.upper(), self.global_step, format_accuracy_table(rows))
            if cfg.keep_best_at is not None:
                self._keep_if_best(cfg.keep_best_at)
        acc.log(metrics, step=self.global_step)
        return metrics

    def _filter_pairs(self, train_set: PickAPicPairs) -> None:
        """Apply ``pair_filter_csv`` (LPO's MPCF) to the training pairs; its rows must match train_data's."""
        cfg = self.config
        keep = mpcf_keep(cfg.pair_filter_csv, cfg.pair_filter_strategy)
        if len(keep) != train_set.num_file_rows:
            raise PairFilterError(
                f"pair_filter_csv={cfg.pair_filter_csv}: {len(keep)} rows, but train_data {cfg.train_data} has "
                f"{train_set.num_file_rows}; the CSV needs one row per row of the training data, in order")
        before = len(train_set)
        if train_set.keep_file_rows(keep) == 0:
            raise PairFilterError(f"pair_filter_csv={cfg.pair_filter_csv}: strategy {cfg.pair_filter_strategy} keeps none "
                                  f"of the {before} training pairs")
        logger.info("pair filter (%s, strategy %d): kept %d of %d training pairs", cfg.pair_filter_csv,
                    cfg.pair_filter_strategy, len(train_set), before)

    def _keep_if_best(self, timestep: int) -> None:
        """Copy the weights to ``RUN/best/`` when this evaluation's accuracy at ``timestep`` beats every earlier one.

        The history survives a resume (it is in each checkpoint), so "earlier" spans the whole run. The folder is
        replaced whole: the new copy is written beside it, then swapped in, so a failure keeps the previous best.
        """
        def accuracy(step_filter) -> list[float]:
            return [r.accuracy for s, r in self.eval_history if step_filter(s) and r.timestep == timestep
                    and not math.isnan(r.accuracy)]

        now = accuracy(lambda s: s == self.global_step)
        before = accuracy(lambda s: s != self.global_step)
        if not now or (before and now[0] <= max(before)):
            return
        best = self.output_dir / "best"
        staging = make_temp_dir(best)
        try:
            self.unwrapped.save(staging / self._weights_name)
            atomic_write_json(staging / "state.json", self._state_dict())  # loads as a checkpoint (no optimizer)
            atomic_write_json(staging / "best.json", {"step": self.global_step, "timestep": timestep, "accuracy": now[0],
                                                      "earlier_best": max(before) if before else None})
            apply_umask_modes(staging)
            if best.exists():
                old = aside_name(best)
                with signals_held():  # a stop between the renames would leave neither in place
                    os.replace(best, old)
                    os.replace(staging, best)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(staging, best)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        logger.info("best accuracy at t = %d so far (%.4f, step %d): weights copied to %s", timestep, now[0],
                    self.global_step, best)

    # ============================================================================================
    # checkpoints
    # ============================================================================================
    def save_checkpoint(self) -> Path:
        """Write a complete checkpoint atomically; ``spm.safetensors`` has the official key layout."""
        acc = self.accelerator
        final = self.output_dir / "checkpoints" / checkpoint_name(self.global_step)
        acc.wait_for_everyone()
        rng_tensors, rng_meta = rng_state_to_files()
        all_rng = [(rng_tensors, rng_meta)]
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            all_rng = gather_object([(rng_tensors, rng_meta)])
        relabelled = self._gathered_train_labels()
        if acc.is_main_process:
            if final.exists():  # a re-run of the same step (e.g. after a failed later save)
                shutil.rmtree(final)
            with atomic_directory(final) as tmp:
                self.unwrapped.save(tmp / self._weights_name)
                inner = self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer
                opt_tensors, opt_meta = optimizer_to_files(inner)
                atomic_save_safetensors(opt_tensors, tmp / "optimizer.safetensors")
                atomic_write_json(tmp / "optimizer.json", opt_meta)
                atomic_write_json(tmp / "scheduler.json", self.lr_scheduler.state_dict())
                if relabelled is not None:
                    atomic_save_safetensors({"labels": relabelled}, tmp / RELABEL_FILE)
                for rank, (tensors, meta) in enumerate(all_rng):
                    atomic_save_safetensors(tensors, tmp / f"rng_rank{rank}.safetensors")
                    atomic_write_json(tmp / f"rng_rank{rank}.json", meta)
                atomic_write_json(tmp / "state.json", self._state_dict())  # last: marks the folder complete
            keep = self.config.keep_checkpoints
            if keep:
                for old in list_checkpoints(self.output_dir)[:-keep]:
                    shutil.rmtree(old, ignore_errors=True)
            logger.info("saved checkpoint %s", final)
        acc.wait_for_everyone()
        self.saved_at = self.global_step
        return final

    def _gathered_train_labels(self) -> torch.Tensor | None:
        """[N, 2] PickScore's labels of the training pairs any process has seen (NaN elsewhere), or ``None``.

        Each process relabels the pairs of its own batches; the labels are a function of the pair alone,
        so the processes' caches merge into one, which a resume (with any process count) starts from.
        """
        if self.train_labels is None:
            return None
        labels = self.train_labels.labels
        if self.accelerator.num_processes > 1:
            every = self.accelerator.gather(labels.to(self.accelerator.device)[None]).cpu()  # [P, N, 2]
            merged = LabelCache(labels.shape[0])
            for part in every:
                merged.merge(part)
            labels = merged.labels
        return labels.contiguous()

    def _record_evaluation(self, checkpoint: Path) -> None:
        """Add the evaluation just made to the checkpoint saved before it (``state.json`` only, atomically)."""
        if self.accelerator.is_main_process:
            state = read_state(checkpoint)
            state["eval"] = self._state_dict()["eval"]
            atomic_write_json(checkpoint / "state.json", state)
        self.accelerator.wait_for_everyone()

    def _state_dict(self) -> dict[str, Any]:
        cfg, spm = self.config, self.unwrapped
        return {
            "format": CHECKPOINT_FORMAT,
            "kind": cfg.model,
            "iteration": self.global_step,
            "optimizer_step": self.global_step,
            "micro_step": self.micro_step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "clip_path": cfg.clip_path,
            "processor_path": cfg.processor_path,
            "image_size": getattr(spm, "image_size", None),  # the SPM's judge pixels; None for an LRM
            "num_processes": self.accelerator.num_processes,
            "eval": [{"step": s, "timestep": r.timestep, "correct": r.correct, "total": r.total, "ties": r.ties,
                      "ties_apart": r.ties_apart} for s, r in self.eval_history],
            "config": config_to_dict(cfg),
        }

    def _load_checkpoint(self, checkpoint: Path) -> None:
        """Restore weights, optimizer, lr schedule, counters, evaluation history and RNG."""
        acc = self.accelerator
        state = read_state(checkpoint)
        if state.get("kind") != self.config.model:
            raise SpotuneError(f"{checkpoint}: not a train-spm model={self.config.model} checkpoint (kind={state.get('kind')!r}); "
                               f"set model={state.get('kind')} to resume it")
        if state.get("num_processes") != acc.num_processes:
            logger.warning(
                "%s was written by %s process(es), resuming with %d: the data order will differ from an "
                "uninterrupted run", checkpoint, state.get("num_processes"), acc.num_processes,
            )
        self.unwrapped.load_checkpoint(checkpoint / self._weights_name)
        if self.train_labels is not None and (checkpoint / RELABEL_FILE).is_file():
            # The labels computed before the interruption, so a pair seen again is judged as it was then.
            saved = load_file(str(checkpoint / RELABEL_FILE))["labels"]
            if saved.shape != self.train_labels.labels.shape:
                raise SpotuneError(
                    f"{checkpoint / RELABEL_FILE}: labels of {saved.shape[0]} pairs, but train_data holds "
                    f"{self.train_labels.labels.shape[0]}: the training data changed since the checkpoint"
                )
            self.train_labels.merge(saved)
        restore_training_state(checkpoint, self.optimizer, self.lr_scheduler, acc.process_index, str(acc.device))
        self.global_step = int(state["optimizer_step"])
        self.micro_step = int(state["micro_step"])
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.eval_history = [
            (int(e["step"]), TimestepAccuracy(int(e["timestep"]), int(e["correct"]), int(e["total"]),
                                              int(e.get("ties", 0)), int(e.get("ties_apart", 0))))
            for e in state.get("eval", [])
        ]
        self.saved_at = self.global_step
        logger.info("resumed from %s (optimizer step %d, epoch %d)", checkpoint, self.global_step, self.epoch)

    def cleanup(self) -> None:
        try:
            end_accelerator(self.accelerator)
        finally:
            release_run_folder(self)


def run_train_spm(config: TrainSPMConfig) -> dict[str, float]:
    """Set up, train and clean up; returns the final step's metrics (training and evaluation)."""
    return run_recipe(SPMTrainer(config))
