"""SPO training, written out: setup, then iterations of #### SAMPLING #### and #### TRAINING ####.

One *iteration* = one sampling round over ``sample_batch_size`` prompts per process (which yields up to
``(num_inference_steps - divert_start_step) * sample_batch_size`` win/lose tuples), followed by
training on the kept tuples, shuffled across processes. Checkpoints are taken between iterations,
so a resumed run continues exactly where the stopped one would have gone: every random draw of
iteration i comes from generators seeded by (seed, i, process), not from a global stream.

Runs on one process or many through ``accelerate launch`` (DDP); nothing project-specific to set up.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from spotune.checkpoint import (
    ACCUMULATION_FILE,
    CHECKPOINT_FORMAT,
    SCALER_FILE,
    checkpoint_name,
    list_checkpoints,
    load_checkpoint_json,
    load_checkpoint_tensors,
    load_weights,
    optimizer_to_files,
    read_state,
    restore_training_state,
    rng_state_to_files,
)
from spotune.config import config_to_dict, config_to_yaml
from spotune.data.prompts import load_prompts
from spotune.diffusion.ddim import ddim_step_with_logprob
from spotune.diffusion.segment_sampler import segment_spo_sample
from spotune.diffusion.sampler import (
    StepPairs,
    ddim_sample,
    decode_latents,
    guided_noise_pred,
    sampling_unet,
    spo_sample,
    trajectory_sample,
)
from spotune.errors import SpotuneError
from spotune.losses import spo_loss
from spotune.models.loading import load_pipeline
from spotune.models.lora import adapter_disabled, add_lora, load_lora_state_dict, lora_parameters, lora_state_dict
from spotune.models.conditioning import Conditioning
from spotune.models.family import family_of, resolve_resolution, vae_scale_factor
from spotune.recipes.common import (
    MIXED_PRECISION_DTYPES,
    NoTrainingError,
    NonFiniteLossError,
    end_accelerator,
    open_run_folder,
    planned_iterations,
    release_run_folder,
    seed_for,
    stop_for_preemption,
)
from spotune.recipes.resume import check_nothing_lost, check_resume_config, override_learning_rate, write_run_config
from spotune.recipes.run_log import log_iteration, log_resume
from spotune.recipes.step_stats import StepStatistics, tracker_scalars
from spotune.recipes.train_spo_config import TrainSPOConfig, sdxl_sampler_check
from spotune.utils.io import atomic_directory, atomic_save_safetensors, atomic_write_json
from spotune.utils.preemption import NoPreemption, PreemptionWatch
from spotune.utils.images import save_image_grid

logger = logging.getLogger(__name__)

# What a resume may change (recipes/resume.py): how long the run goes, checkpoints, logging, validation
# images, the learning rate, and the memory and speed knobs that leave the maths alone (up to
# floating-point summation order), so a run moved to a smaller card can continue. Anything else is refused.
RESUMABLE_KEYS = frozenset({
    "max_iterations", "num_epochs", "checkpoint_every", "keep_checkpoints", "preempt_grace_s", "log_with", "tracker_project",
    "validate_every_epochs", "num_validation_images", "validation_prompts", "progress", "learning_rate",
    "gradient_checkpointing", "train_micro_batch_size", "decode_chunk_size", "judge_batch_size",
    "sample_micro_batch_size", "offload_text_encoder", "compile", "compile_backend", "allow_tf32",
    "tree_every", "tree_prompt",
})

# How logs and progress bars name each algorithm.
ALGORITHM_NAMES = {"spo": "SPO", "gradspo": "GradSPO", "lpo": "LPO"}


class _AdapterOff:
    """A LoRA UNet called with its adapter switched off (the base model), for the base validation grid."""

    def __init__(self, unet) -> None:
        self.unet = unet

    def __getattr__(self, name: str):
        return getattr(self.unet, name)

    def __call__(self, *args, **kwargs):
        with adapter_disabled(self.unet):
            return self.unet(*args, **kwargs)


class SPOTrainer:
    """The SPO recipe: ``setup()``, ``train()``, ``save_checkpoint()``, ``cleanup()``.

    Args:
        config: a validated :class:`TrainSPOConfig`.
    """

    def __init__(self, config: TrainSPOConfig) -> None:
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.iteration = 0  # completed SPO iterations
        self.optimizer_step = 0
        # The open accumulation group (train_on_pairs): micro-batches whose gradients are summed in .grad
        # but not applied yet, and their [n] losses, checked for NaN/inf before the group is applied.
        # Checkpoints save both, so a resume continues the group.
        self.open_group_size = 0
        self.open_group_losses: list[torch.Tensor] = []
        self.saved_at: int | None = None  # the iteration of the newest checkpoint this run wrote or resumed from
        # SIGTERM / SIGUSR1 handling of the loop; run_recipe installs a PreemptionWatch around train().
        self.preemption: PreemptionWatch | NoPreemption = NoPreemption()
        # Where offload_text_encoder parks the text encoders and the cached prompt conditioning: host memory.
        # ``spotune plan`` points it at the meta device, so what a GPU run would move off the GPU leaves
        # the memory it counts.
        self.offload_device = torch.device("cpu")
        # The iteration's per-step statistics, filled by sampling and train_on_pairs (None outside train()).
        self.step_statistics: StepStatistics | None = None

    # ============================================================================================
    # setup
    # ============================================================================================
    def setup(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        cfg = self.config
        log_with = None if cfg.log_with == "none" else cfg.log_with
        if log_with:
            import importlib.util

            module = {"tensorboard": "tensorboard", "wandb": "wandb"}[log_with]
            if importlib.util.find_spec(module) is None:
                raise SpotuneError(f"config: log_with={log_with} needs the '{module}' package (pip install {module}), or set log_with=none")
        self.run_lock, resume_from = open_run_folder(self.output_dir, cfg.resume, cfg.overwrite, "spotune train")
        resume_changes = check_resume_config(resume_from, cfg, RESUMABLE_KEYS) if resume_from is not None else {}
        self.accelerator = Accelerator(
            # Without CUDA, cpu=True lets a multi-process launch (accelerate launch --multi_gpu,
            # torchrun) form a gloo process group instead of N unaware copies of one run.
            cpu=not torch.cuda.is_available(),
            mixed_precision=cfg.mixed_precision,
            log_with=log_with,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")),
        )
        acc = self.accelerator
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched != acc.num_processes:
            raise SpotuneError(
                f"the launcher started {launched} processes but the accelerator sees {acc.num_processes}: "
                "the process group did not form, and the copies would overwrite each other's run folder"
            )
        if acc.device.type == "cuda" and cfg.allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
        self.weight_dtype = MIXED_PRECISION_DTYPES[cfg.mixed_precision]

        # -- prompts: every process reads the file; the order per epoch is seeded and shared --------
        self.prompts = load_prompts(cfg.prompts, cfg.prompt_column)
        per_round = cfg.sample_batch_size * acc.num_processes
        self.iterations_per_epoch = len(self.prompts) // per_round
        if self.iterations_per_epoch == 0:
            raise SpotuneError(
                f"{cfg.prompts}: {len(self.prompts)} prompts are fewer than one sampling round "
                f"(sample_batch_size {cfg.sample_batch_size} x {acc.num_processes} processes)"
            )
        self.total_iterations = planned_iterations(cfg.num_epochs, self.iterations_per_epoch, cfg.max_iterations)

        # -- models ------------------------------------------------------------------------------
        pipe = load_pipeline(cfg.pretrained_model, dtype=self.weight_dtype, model_family=cfg.model_family, vae=cfg.vae)
        self.family = family_of(pipe)
        self.sampler_kind = self._resolve_sampler()
        self.scheduler = pipe.scheduler
        self.vae = pipe.vae.to(acc.device).requires_grad_(False).eval()
        for name in self.family.text_encoder_names:
            getattr(pipe, name).to(acc.device).requires_grad_(False).eval()
        unet = pipe.unet.to(acc.device)
        if cfg.finetune == "lora":
            torch.manual_seed(cfg.seed)  # the adapter's initial weights are part of the run's seed
            add_lora(unet, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_init)
            # Trained weights stay in fp32 under mixed precision; the frozen base keeps weight_dtype.
            for p in lora_parameters(unet):
                p.data = p.data.float()
            self.reference_unet = None  # the adapter switched off is the reference
        else:
            self.reference_unet = copy.deepcopy(unet).requires_grad_(False).eval()
            unet = unet.float().requires_grad_(True)
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        params = [p for p in unet.parameters() if p.requires_grad]
        if not params:
            raise SpotuneError(f"nothing to train: no UNet module matches lora_targets {cfg.lora_targets}")
        self.trainable = params

        vae_scale = vae_scale_factor(self.vae)
        resolution = resolve_resolution(cfg.resolution, unet, self.vae)
        self.latent_shape = (unet.config.in_channels, resolution // vae_scale, resolution // vae_scale)
        self.conditioner = self.family.conditioner(pipe, resolution)

        from spotune.preference.factory import JUDGE_DTYPES, build_judge_from_config

        # The judge's precision is its own (judge_dtype, fp32 as SPO's), not the training dtype; it
        # scores with autocast off (ClipStyleJudge.score), so the sampling autocast does not reach it.
        self.judge = build_judge_from_config(
            cfg.judge,
            clip_path=cfg.judge_clip_path,
            checkpoint=cfg.judge_checkpoint,
            processor_path=cfg.judge_processor_path,
            device=acc.device,
            dtype=JUDGE_DTYPES[cfg.judge_dtype],
        )

        # -- optimizer and schedule --------------------------------------------------------------
        optimizer = torch.optim.AdamW(
            params,
            lr=cfg.learning_rate,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            weight_decay=cfg.adam_weight_decay,
            eps=cfg.adam_epsilon,
        )
        from diffusers.optimization import get_scheduler

        # The lr schedule is stepped once per optimizer step; this is its horizon, an upper bound since only
        # decisive tuples are trained on: either sampler yields at most one tuple per prompt and step from
        # divert_start_step on, a process trains on at most that many per round, in batches of
        # train_batch_size, and accumulation groups run on across rounds, so the steps are the run's
        # micro-batches divided by gradient_accumulation_steps, rounded down.
        max_tuples = (cfg.num_inference_steps - cfg.divert_start_step) * cfg.sample_batch_size
        micro_per_iteration = cfg.num_inner_epochs * math.ceil(max_tuples / cfg.train_batch_size)
        self.lr_scheduler = get_scheduler(
            cfg.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=cfg.lr_warmup_steps,
            num_training_steps=max(1, self.total_iterations * micro_per_iteration // cfg.gradient_accumulation_steps),
        )
        self.unet, self.optimizer = acc.prepare(unet, optimizer)
        self.negative = self.conditioner.negative(cfg.negative_prompt, acc.device)  # 1 row
        self._cond_cache: dict[str, Conditioning] = {}
        if cfg.offload_text_encoder:
            self._cache_prompt_conditioning([*self.prompts, *cfg.validation_prompts])
        if cfg.compile:
            from spotune.models.compiled import compile_models

            compile_models(acc.unwrap_model(self.unet), self.vae, self.judge, cfg.compile_backend)

        if resume_from is not None:
            self._load_checkpoint(resume_from)
            check_nothing_lost(resume_from, self.iteration, self.total_iterations, "max_iterations (or num_epochs)")
            if "learning_rate" in resume_changes:
                override_learning_rate(self.optimizer, self.lr_scheduler, cfg.learning_rate)
        if acc.is_main_process:
            write_run_config(self.output_dir, config_to_yaml(cfg), self.iteration if resume_from is not None else None)
            if resume_from is not None:
                log_resume(self.output_dir, self.iteration)
        if log_with:
            tracker_cfg = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in config_to_dict(cfg).items()}
            acc.init_trackers(cfg.tracker_project, config=tracker_cfg)
        if acc.is_main_process:
            logger.info(
                "%s: %d prompts, %d iterations/epoch, %d iterations in total, %d trainable parameters, %d process(es)",
                ALGORITHM_NAMES[cfg.algorithm], len(self.prompts), self.iterations_per_epoch, self.total_iterations,
                sum(p.numel() for p in params), acc.num_processes,
            )

    # ============================================================================================
    # the loop
    # ============================================================================================
    def train(self) -> dict[str, float]:
        """Run iterations until ``total_iterations``; return the last iteration's metrics."""
        cfg, acc = self.config, self.accelerator
        bar = tqdm(
            total=self.total_iterations, initial=self.iteration, desc=f"{ALGORITHM_NAMES[cfg.algorithm]} iterations",
            disable=not (cfg.progress and acc.is_local_main_process), dynamic_ncols=True,
        )
        metrics: dict[str, float] = {}
        pairs_kept = 0  # decisive pairs of this process in this invocation, for the no-step diagnosis
        while self.iteration < self.total_iterations:
            epoch, index_in_epoch = divmod(self.iteration, self.iterations_per_epoch)
            prompts = self._prompts_for(epoch, index_in_epoch)

            t0 = time.perf_counter()
            tree_row = cfg.tree_prompt if acc.is_main_process and self._records_tree(self.iteration + 1) else None
            result = self.sample(prompts, tree_row=tree_row)
            t1 = time.perf_counter()
            if self.preemption.stop_here(acc):
                # Sampling changed nothing a checkpoint holds (its noise is seeded by the iteration), so the
                # iteration is given up here: the checkpoint of the state before it resumes bit-exactly.
                bar.close()
                stop_for_preemption(self, abandoned=True)
            self.step_statistics = StepStatistics(cfg.num_inference_steps, cfg.divert_start_step, acc.device)
            self.step_statistics.add_sampling(result.pairs.step_index, result.judged_steps, result.scores, len(prompts),
                                              result.thresholds)
            train_stats = self.train_on_pairs(result.pairs)
            t2 = time.perf_counter()
            pairs_kept += len(result.pairs)

            self.iteration += 1
            metrics = self._iteration_metrics(result, train_stats, t1 - t0, t2 - t1)
            per_step = self.step_statistics.finish(acc)
            self.step_statistics = None
            acc.log({**metrics, **tracker_scalars(per_step)}, step=self.iteration)
            if acc.is_main_process:
                log_iteration(self.output_dir, self.iteration, metrics, per_step)
                if result.tree is not None:
                    self._write_tree(result.tree, prompts[result.tree.prompt_row])
            bar.update(1)
            bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}", pairs=int(metrics["pairs"]))

            epoch_done = self.iteration % self.iterations_per_epoch == 0
            run_done = self.iteration == self.total_iterations
            every = cfg.checkpoint_every and self.iteration % cfg.checkpoint_every == 0
            if epoch_done or run_done or every:
                self.save_checkpoint()
            epochs_done = self.iteration // self.iterations_per_epoch
            if epoch_done and cfg.validate_every_epochs and epochs_done % cfg.validate_every_epochs == 0:
                if self.validate(epochs_done) is not None:
                    self._write_run_page()  # with the new grid (the checkpoint's page came before it)
            if not run_done and self.preemption.stop_here(acc):
                bar.close()
                stop_for_preemption(self)
        bar.close()
        if cfg.validate_every_epochs and self.iteration < self.iterations_per_epoch and metrics:
            # The run ended before its first epoch did: one grid of where it got to, so every run shows its images.
            if self.validate(0, name=f"iter-{self.iteration:08d}") is not None:
                self._write_run_page()
        if self.open_group_size and acc.is_main_process:
            logger.info(
                "the last accumulation group (%d of %d micro-batches) is left unapplied, as in the authors' loop; "
                "the last checkpoint keeps it for a longer resumed run", self.open_group_size, cfg.gradient_accumulation_steps,
            )
        if self.optimizer_step == 0 and (pairs_kept or self.open_group_size):
            raise NoTrainingError(
                f"no optimizer step was taken in {self.iteration} iteration(s): the {pairs_kept} decisive pair(s) kept "
                f"made {self.open_group_size} micro-batch(es) of train_batch_size={cfg.train_batch_size}, fewer than one "
                f"accumulation group (gradient_accumulation_steps={cfg.gradient_accumulation_steps}, which runs on "
                "across sampling rounds); train for more iterations (max_iterations) or lower gradient_accumulation_steps"
            )
        if self.optimizer_step == 0:
            threshold = (f"lpo_threshold_min={cfg.lpo_threshold_min} to lpo_threshold_max={cfg.lpo_threshold_max}",
                         "lpo_threshold_min and lpo_threshold_max") if cfg.algorithm == "lpo" else (
                f"preference_threshold={cfg.preference_threshold}", "preference_threshold")
            raise NoTrainingError(
                f"no optimizer step was taken in {self.iteration} iteration(s): {pairs_kept} decisive pair(s) were "
                f"kept at {threshold[0]} (a pair needs the judge's softmax gap between its best and worst candidate to "
                f"exceed it); lower {threshold[1]}, or check the judge"
            )
        return metrics

    def _records_tree(self, iteration: int) -> bool:
        """Whether the sampling round of ``iteration`` (1-based) records a tree (config ``tree_every``)."""
        cfg = self.config
        every = cfg.tree_every
        if every == 0 or cfg.pairing != "step":  # trajectory pairs have no branching to show
            return False
        if iteration == 1 or iteration == self.total_iterations:
            return True
        if every is not None:
            return iteration % every == 0
        epochs, rest = divmod(iteration, self.iterations_per_epoch)
        return rest == 0 and bool(cfg.validate_every_epochs) and epochs % cfg.validate_every_epochs == 0

    def _write_tree(self, tree, prompt: str) -> None:
        """RUN/trees/iter-XXXXXXXX.png and .json, and the picture to TensorBoard (main process)."""
        from spotune.recipes.trees import write_tree

        _, picture = write_tree(self.output_dir, tree, prompt, self.iteration)
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                import numpy as np

                tracker.writer.add_image("sampling_tree", np.asarray(picture), self.iteration, dataformats="HWC")

    def _resolve_sampler(self) -> str:
        """``sd15`` or ``sdxl``: the config's ``sampler``, or the model family's for ``auto`` (checked here,
        where the family is known)."""
        cfg = self.config
        kind = self.family.spo_sampler if cfg.sampler == "auto" else cfg.sampler
        if cfg.pairing != "step":
            return kind  # trajectory pairs sample with a sampler of their own
        # GradSPO samples with its own sampler of the same kind (gradspo_sampler's ending), whose sdxl
        # one has the same need of a judged step after the first branch; its num_inner_steps is 0 (config).
        if kind == "sd15" and cfg.num_inner_steps:
            raise SpotuneError(
                f"config: num_inner_steps={cfg.num_inner_steps} needs the SDXL sampler, but {cfg.pretrained_model} is "
                f"{self.family.title}, whose sampler (sampler=auto: sd15) branches at every step; set sampler=sdxl, "
                "or num_inner_steps=0"
            )
        if kind == "sdxl":
            ok, message = sdxl_sampler_check(cfg)
            if not ok:
                raise SpotuneError(f"config: {message}")
        return kind

    def _prompts_for(self, epoch: int, index_in_epoch: int) -> list[str]:
        """This process's prompts for one iteration: a seeded per-epoch permutation, split by rank."""
        acc, bs = self.accelerator, self.config.sample_batch_size
        order = torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(seed_for(self.config.seed, epoch)))
        start = (index_in_epoch * acc.num_processes + acc.process_index) * bs
        return [self.prompts[i] for i in order[start : start + bs].tolist()]

    def _cache_prompt_conditioning(self, prompts: list[str]) -> None:
        """Encode every distinct prompt once, keep its conditioning on the CPU, move the text encoders there.

        The UNet attends to the same embeddings whether they come from here or are encoded per iteration
        (up to floating-point order of the batched encoder), and the text encoders' memory is freed.
        """
        cfg, acc = self.config, self.accelerator
        distinct = list(dict.fromkeys(prompts))
        for start in range(0, len(distinct), cfg.sample_batch_size):
            chunk = distinct[start : start + cfg.sample_batch_size]
            cond = self.conditioner.encode(chunk, acc.device).to(self.offload_device)
            self._cond_cache.update((prompt, cond.select(i)) for i, prompt in enumerate(chunk))
        for encoder in self.conditioner.text_encoders:
            encoder.to(self.offload_device)
        if acc.device.type == "cuda":
            torch.cuda.empty_cache()

    def _prompt_conditioning(self, prompts: list[str]) -> Conditioning:
        """[b] captions -> b rows of conditioning on the accelerator: from the start-up cache when it holds them all."""
        acc = self.accelerator
        if self._cond_cache and all(p in self._cond_cache for p in prompts):
            return Conditioning.cat([self._cond_cache[p] for p in prompts]).to(acc.device)
        return self.conditioner.encode(prompts).to(acc.device)

    # ============================================================================================
    #### SAMPLING ####
    # ============================================================================================
    @torch.no_grad()
    def sample(self, prompts: list[str], tree_row: int | None = None):
        """Step-wise sampling with the current model; returns a :class:`SamplingResult` (with the sampling tree
        of prompt ``tree_row`` when given; trajectory pairs record none)."""
        cfg, acc = self.config, self.accelerator
        unet = acc.unwrap_model(self.unet)
        unet.eval()
        unet = sampling_unet(unet, cfg.sample_micro_batch_size)
        generator, cond, latents = self._round_inputs(prompts, chains_per_prompt=2 if cfg.pairing == "trajectory" else 1)
        with acc.autocast():
            if cfg.pairing == "trajectory":
                return trajectory_sample(
                    unet, self.vae, self.scheduler, self.judge, prompts, cond, self.negative, latents,
                    num_inference_steps=cfg.num_inference_steps, eta=cfg.eta, guidance_scale=cfg.guidance_scale,
                    divert_start_step=cfg.divert_start_step, threshold=cfg.preference_threshold,
                    generator=generator, decode_chunk_size=cfg.decode_chunk_size,
                )
            common = dict(
                num_inference_steps=cfg.num_inference_steps, eta=cfg.eta, guidance_scale=cfg.guidance_scale,
                divert_start_step=cfg.divert_start_step, num_candidates=cfg.num_samples_per_step,
                threshold=cfg.preference_threshold, generator=generator, decode_chunk_size=cfg.decode_chunk_size,
                judge_batch_size=cfg.judge_batch_size, tree_row=tree_row,
            )
            if self.sampler_kind == "sdxl":
                return segment_spo_sample(unet, self.vae, self.scheduler, self.judge, prompts, cond, self.negative,
                                          latents, num_inner_steps=cfg.num_inner_steps, **common)
            return spo_sample(unet, self.vae, self.scheduler, self.judge, prompts, cond, self.negative, latents, **common)

    def _round_inputs(self, prompts: list[str], chains_per_prompt: int = 1) -> tuple[torch.Generator, Conditioning, torch.Tensor]:
        """What a sampling round of ``iteration`` starts from: its generator (seeded by seed, iteration and
        process), the b prompts' conditioning, and x_T [chains_per_prompt * b, C, h, w] scaled by
        ``init_noise_sigma`` (drawn first from that generator, as every sampler expects)."""
        cfg, acc = self.config, self.accelerator
        generator = torch.Generator(acc.device).manual_seed(seed_for(cfg.seed, self.iteration, acc.process_index, 1))
        cond = self._prompt_conditioning(prompts)  # b rows
        chains = chains_per_prompt * len(prompts)
        latents = torch.randn((chains, *self.latent_shape), generator=generator, device=acc.device, dtype=self.weight_dtype)
        return generator, cond, latents * self.scheduler.init_noise_sigma

    # ============================================================================================
    #### TRAINING ####
    # ============================================================================================
    def _gather_and_shuffle(self, pairs: StepPairs) -> StepPairs:
        """All processes' tuples, shuffled with a shared seed; this process's equal share of them.

        Processes keep different numbers of decisive pairs, so counts are gathered first, tuples are
        padded to the largest count for the collective, and the total is cut to a multiple of the
        number of processes so every process runs the same number of micro-batches (DDP needs that).
        """
        acc = self.accelerator
        if acc.num_processes > 1:
            from accelerate.utils import gather, pad_across_processes

            counts = gather(torch.tensor([len(pairs)], device=acc.device)).tolist()
            padded = {k: pad_across_processes(v.contiguous(), dim=0) for k, v in pairs.tensors().items()}
            gathered = {k: gather(v) for k, v in padded.items()}
            width = max(counts)
            keep = torch.cat([torch.arange(r * width, r * width + c) for r, c in enumerate(counts)]).to(acc.device)
            pairs = StepPairs.from_tensors({k: v[keep] for k, v in gathered.items()})
        total = len(pairs) - len(pairs) % acc.num_processes
        generator = torch.Generator().manual_seed(seed_for(self.config.seed, self.iteration, 2))
        order = torch.randperm(len(pairs), generator=generator)[:total].to(pairs.latents.device)
        return pairs.select(order[acc.process_index :: acc.num_processes])

    def train_on_pairs(self, pairs: StepPairs) -> dict[str, float]:
        """One pass (per inner epoch) over the kept tuples with the SPO loss; returns mean statistics.

        Accumulation groups run across sampling rounds, as in the authors' loop (accelerate's
        ``accumulate`` with ``end_of_dataloader`` held False): an optimizer step is taken after every
        ``gradient_accumulation_steps`` micro-batches (training batches), and a group the round's tuples
        leave unfinished stays open, its gradients summed in ``.grad``, until the next rounds' first
        micro-batches complete it. Each micro-batch's mean loss is divided by ``gradient_accumulation_steps``
        (accelerate's scaling), so every step applies the mean over a full group. A group still open when
        the run ends is not applied (nor in the authors' loop); the last checkpoint keeps it, so a resumed,
        longer run completes it.
        """
        cfg, acc = self.config, self.accelerator
        share = self._gather_and_shuffle(pairs)
        if len(share) == 0:
            return {}
        # The step size t -> t_prev of the log-densities comes from the scheduler's schedule; set it here
        # rather than rely on whatever last used the scheduler.
        self.scheduler.set_timesteps(cfg.num_inference_steps, device=acc.device)
        self.unet.train()
        # Statistics stay on the device (float64, as Python floats would sum them) and are read once at
        # the end, so the loop never waits for the device for them.
        sums: dict[str, torch.Tensor] = {}
        norms: list[float] = []  # gradient norm before clipping, per optimizer step
        micro = 0
        group_size = cfg.gradient_accumulation_steps
        batches = [share.select(idx) for idx in torch.arange(len(share), device=share.latents.device).split(cfg.train_batch_size)]
        micro_size = cfg.train_micro_batch_size or cfg.train_batch_size
        for _ in range(cfg.num_inner_epochs):
            for batch in batches:
                closes = self.open_group_size + 1 == group_size
                parts = [batch] if len(batch) <= micro_size else [
                    batch.select(idx) for idx in torch.arange(len(batch), device=batch.latents.device).split(micro_size)
                ]
                for m, part in enumerate(parts):
                    # A part's mean loss weighted by its share of the batch: the parts' gradients add up
                    # to the gradient of the mean over the whole batch, whatever the split.
                    weight = len(part) / len(batch)
                    # Gradients are synchronised across processes only on the group's last pass.
                    with nullcontext() if closes and m == len(parts) - 1 else acc.no_sync(self.unet):
                        loss, stats = self._pair_loss(part)
                        acc.backward(loss * weight / group_size)
                    if self.step_statistics is not None:
                        self.step_statistics.add_training(part.step_index, stats["log_ratio_win"], stats["log_ratio_lose"])
                    self.open_group_losses.append(loss.detach().reshape(-1))
                    for key, value in {"loss": loss.detach(), **stats}.items():
                        term = value.detach().float().mean().double() * weight
                        sums[key] = sums[key] + term if key in sums else term
                micro += 1
                self.open_group_size += 1
                if closes:
                    norms.append(self._apply_group())
                self._after_training_batch(micro)
        means = {k: float(v) / micro for k, v in sums.items()}
        if norms:  # the same on every process: gradients are synchronised before they are measured
            means["grad_norm"], means["grad_norm_max"] = sum(norms) / len(norms), max(norms)
        means["optimizer_steps"] = float(len(norms))
        if acc.num_processes > 1:  # every process ran the same number of micro-batches: average the means
            keys = sorted(means)
            reduced = acc.reduce(torch.tensor([means[k] for k in keys], device=acc.device), reduction="mean")
            means = dict(zip(keys, reduced.tolist()))
        return means

    def _apply_group(self) -> float:
        """Check, clip and apply the completed accumulation group; return the gradient norm before clipping."""
        # One check per optimizer step, before it is applied: a non-finite loss anywhere in the group
        # stops training with the weights as they were.
        self._check_finite(torch.cat(self.open_group_losses))
        grad_norm = self._grad_norm_and_clip()
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer_step += 1
        self.open_group_size, self.open_group_losses = 0, []
        self._log_grad_norm(grad_norm)
        return grad_norm

    def _grad_norm_and_clip(self) -> float:
        """The L2 norm of the trainable parameters' gradient before clipping; clips when max_grad_norm > 0.

        The gradient is unscaled first (fp16's loss scaling), so the norm is the true one.
        """
        cfg, acc = self.config, self.accelerator
        if cfg.max_grad_norm > 0:
            return float(acc.clip_grad_norm_(self.trainable, cfg.max_grad_norm))
        acc.unscale_gradients()
        grads = [p.grad for p in self.trainable if p.grad is not None]
        if not grads:
            return 0.0
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))

    def _log_grad_norm(self, grad_norm: float) -> None:
        """TensorBoard's ``grad_norm_per_optimizer_step``, on the optimizer-step axis, so a run shows what a clip
        would have done. Written to TensorBoard's writer directly: the iteration metrics use the iteration
        axis, and trackers such as wandb need one increasing step (they get the per-iteration mean and max)."""
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_scalar("grad_norm_per_optimizer_step", grad_norm, self.optimizer_step)

    def _pair_loss(self, batch: StepPairs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """SPO loss of a micro-batch: guided passes of the policy and of the reference on every state.

        A tuple whose win and lose share x_t (the SD1.5 sampler's, the SDXL sampler's branching
        transitions) needs one state, so the same guided output gives both log-probs: 2 passes. A tuple
        whose two steps start from different states (the SDXL sampler's inner and last transitions,
        trajectory pairs) needs both states: 4 passes, as the authors' SDXL trainer runs. Both kinds mix
        in one micro-batch; each model runs once on the rows [every tuple's x_t; the two-state tuples'
        losing x_t].
        """
        cfg, acc = self.config, self.accelerator
        x_t, t, cond = batch.latents, batch.timesteps, batch.cond  # [n,4,h,w], [n], n rows
        n = len(batch)
        two = batch.two_state()  # [n] bool, or None when every tuple shares x_t
        lose_rows: torch.Tensor | slice = slice(0, n)
        if two is not None:
            extra = two.nonzero().squeeze(1)  # tuples whose losing step has its own x_t
            x_t = torch.cat([batch.latents, batch.latents_lose[extra]])
            t, cond = torch.cat([t, t[extra]]), Conditioning.cat([cond, cond.select(extra)])
            # Row of each tuple's losing state: its own row when shared, else its place after the n rows.
            lose_rows = torch.arange(n, device=x_t.device)
            lose_rows[extra] = n + torch.arange(len(extra), device=x_t.device)
        with acc.autocast():
            out = guided_noise_pred(self.unet, x_t, t, cond, self.negative, cfg.guidance_scale)
            with torch.no_grad():
                if self.reference_unet is None:
                    base = acc.unwrap_model(self.unet)
                    with adapter_disabled(base):
                        out_ref = guided_noise_pred(base, x_t, t, cond, self.negative, cfg.guidance_scale)
                else:
                    out_ref = guided_noise_pred(self.reference_unet, x_t, t, cond, self.negative, cfg.guidance_scale)
        logps = {}
        for name, model_out in (("", out), ("_ref", out_ref)):
            for side, target, rows in (("win", batch.win, slice(0, n)), ("lose", batch.lose, lose_rows)):
                _, logps[f"{side}{name}"] = ddim_step_with_logprob(
                    self.scheduler, model_out[rows], t[rows], x_t[rows], cfg.eta, prev_sample=target
                )
        loss, stats = spo_loss(logps["win"], logps["win_ref"], logps["lose"], logps["lose_ref"], cfg.beta, cfg.eps)
        return loss, stats

    def _check_finite(self, losses: torch.Tensor) -> None:
        """Stop training if any of ``losses`` ([n] or scalar, this process's and any other's) is NaN/inf."""
        bad = (~torch.isfinite(losses)).any().float()
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        if bad.item() > 0:
            last = list_checkpoints(self.output_dir)
            values = losses.flatten().tolist()
            loss = next((v for v in values if not math.isfinite(v)), values[0])
            raise NonFiniteLossError(
                f"loss is {loss} at iteration {self.iteration + 1} (optimizer step {self.optimizer_step + 1}); "
                f"training stopped before applying it. Last good checkpoint: {last[-1] if last else 'none yet'}"
            )

    def _iteration_metrics(self, result, train_stats: dict[str, float], t_sample: float, t_train: float) -> dict[str, float]:
        final_scores = result.scores[-1].float()  # [k, b] candidates' scores at t = 0
        metrics = {
            "pairs": float(len(result.pairs)),
            "valid_fraction": float(result.valid.float().mean()),
            "score_mean": float(final_scores.mean()),
            "score_std": float(final_scores.std()) if final_scores.numel() > 1 else 0.0,
            "lr": float(self.lr_scheduler.get_last_lr()[0]),
            "epoch": self.iteration / self.iterations_per_epoch,
            "optimizer_step": float(self.optimizer_step),
            "seconds_sampling": t_sample,
            "seconds_training": t_train,
        }
        metrics.update(train_stats)
        return metrics

    # ============================================================================================
    # checkpoints
    # ============================================================================================
    def save_checkpoint(self) -> Path:
        """Write a complete checkpoint atomically: a temporary folder renamed when everything is on disk."""
        cfg, acc = self.config, self.accelerator
        final = self.output_dir / "checkpoints" / checkpoint_name(self.iteration)
        acc.wait_for_everyone()
        rng_tensors, rng_meta = rng_state_to_files()
        open_grads = self._open_group_gradients()
        # Each process's RNG state travels to the main process, which alone writes the folder.
        all_rng = [(rng_tensors, rng_meta)]
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            all_rng = gather_object([(rng_tensors, rng_meta)])
        if acc.is_main_process:
            if final.exists():  # a re-run of the same iteration (e.g. after a failed later save)
                shutil.rmtree(final)
            unet = acc.unwrap_model(self.unet)
            with atomic_directory(final) as tmp:
                if cfg.finetune == "lora":
                    atomic_save_safetensors({k: v.float() for k, v in lora_state_dict(unet).items()}, tmp / "lora.safetensors")
                else:
                    atomic_save_safetensors(unet.state_dict(), tmp / "unet.safetensors")
                opt_tensors, opt_meta = optimizer_to_files(self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer)
                atomic_save_safetensors(opt_tensors, tmp / "optimizer.safetensors")
                atomic_write_json(tmp / "optimizer.json", opt_meta)
                atomic_write_json(tmp / "scheduler.json", self.lr_scheduler.state_dict())
                if acc.scaler is not None:  # fp16 loss scaling: the scale the open group's gradients carry
                    atomic_write_json(tmp / SCALER_FILE, acc.scaler.state_dict())
                if open_grads is not None:
                    atomic_save_safetensors(open_grads, tmp / ACCUMULATION_FILE)
                for rank, (tensors, meta) in enumerate(all_rng):
                    atomic_save_safetensors(tensors, tmp / f"rng_rank{rank}.safetensors")
                    atomic_write_json(tmp / f"rng_rank{rank}.json", meta)
                self._save_extra_weights(tmp)
                # state.json last: its presence marks the folder complete.
                atomic_write_json(tmp / "state.json", self._state_dict())
            self._prune_checkpoints()
            logger.info("saved checkpoint %s", final)
            self._write_run_page()
        acc.wait_for_everyone()
        self.saved_at = self.iteration
        return final

    def _write_run_page(self) -> None:
        """RUN/report.html (spotune.view.run_page), refreshed at each checkpoint. A page that cannot be written
        is logged, never a reason to stop training."""
        from spotune.view.run_page import write_run_page

        try:
            write_run_page(self.output_dir, going=True)
        except Exception as exc:  # noqa: BLE001 - the page is a view; training goes on
            logger.warning("run page not written (%s); `spotune view %s` writes it later", exc, self.output_dir)

    def _state_dict(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "format": CHECKPOINT_FORMAT,
            "iteration": self.iteration,
            "optimizer_step": self.optimizer_step,
            "epoch": self.iteration / self.iterations_per_epoch,
            "finetune": cfg.finetune,
            "lora": None if cfg.finetune != "lora" else {
                "rank": cfg.lora_rank,
                "alpha": cfg.lora_alpha if cfg.lora_alpha is not None else float(cfg.lora_rank),
                "targets": list(cfg.lora_targets),
                "init": cfg.lora_init,
            },
            "base_model": cfg.pretrained_model,
            "num_processes": self.accelerator.num_processes,
            # The open accumulation group (its summed gradients and losses are in accumulation.safetensors).
            "open_group_micro_batches": self.open_group_size,
            "config": config_to_dict(cfg),
        }

    def _trainable_names(self) -> list[str]:
        """Names of the trained parameters, in the order of ``self.trainable``."""
        unet = self.accelerator.unwrap_model(self.unet)
        return [name for name, p in unet.named_parameters() if p.requires_grad]

    def _open_group_gradients(self) -> dict[str, torch.Tensor] | None:
        """What a checkpoint must hold of an open accumulation group: the summed gradients and the losses.

        Called on every process. Under DDP the group's passes so far ran without synchronisation, so each
        process holds its own partial sum; they are averaged here first, on every process, which leaves
        the step that closes the group unchanged (DDP averages the processes' sums, and averaging is
        linear) and lets one file restore every process.
        """
        if not self.open_group_size:
            return None
        acc = self.accelerator
        grads = {}
        for name, p in zip(self._trainable_names(), self.trainable):
            if p.grad is None:
                continue
            if acc.num_processes > 1:
                p.grad.copy_(acc.reduce(p.grad.contiguous(), reduction="mean"))
            grads[f"grad.{name}"] = p.grad.detach().float().cpu().clone()  # a copy: .grad goes on accumulating
        losses = torch.cat(self.open_group_losses)
        if acc.num_processes > 1:  # a non-finite loss on any process must still stop the step
            losses = acc.gather(losses.contiguous())
        grads["losses"] = losses.float().cpu()
        return grads

    def _load_open_group(self, checkpoint: Path, state: dict[str, Any]) -> None:
        """Restore the open accumulation group (and fp16's loss scale) a checkpoint holds."""
        acc = self.accelerator
        if acc.scaler is not None and (checkpoint / SCALER_FILE).is_file():
            acc.scaler.load_state_dict(load_checkpoint_json(checkpoint, SCALER_FILE))
        self.open_group_size = int(state.get("open_group_micro_batches", 0))
        self.open_group_losses = []
        if not self.open_group_size:
            return
        tensors = load_checkpoint_tensors(checkpoint, ACCUMULATION_FILE, device=str(acc.device))
        for name, p in zip(self._trainable_names(), self.trainable):
            grad = tensors.get(f"grad.{name}")
            p.grad = None if grad is None else grad.to(p.dtype)
        self.open_group_losses = [tensors["losses"]]

    def _prune_checkpoints(self) -> None:
        keep = self.config.keep_checkpoints
        if keep:
            for old in list_checkpoints(self.output_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)

    def _load_checkpoint(self, checkpoint: Path) -> None:
        """Restore weights, optimizer, lr schedule, counters and RNG from a checkpoint folder."""
        acc = self.accelerator
        state = read_state(checkpoint)
        if state["finetune"] != self.config.finetune:
            raise SpotuneError(f"{checkpoint}: checkpoint is finetune={state['finetune']}, config says {self.config.finetune}")
        trained_with = (state.get("config") or {}).get("algorithm", "spo")
        if trained_with != self.config.algorithm:
            raise SpotuneError(f"{checkpoint}: checkpoint was trained with algorithm={trained_with}, config says "
                               f"algorithm={self.config.algorithm}; set algorithm={trained_with} to resume it")
        kind, weights = load_weights(checkpoint)
        unet = acc.unwrap_model(self.unet)
        if kind == "lora":
            load_lora_state_dict(unet, weights, source=str(checkpoint / "lora.safetensors"))
            for p in lora_parameters(unet):
                p.data = p.data.float()
        else:
            unet.load_state_dict(weights)
        restore_training_state(checkpoint, self.optimizer, self.lr_scheduler, acc.process_index, str(acc.device))
        self._load_open_group(checkpoint, state)
        self.iteration = int(state["iteration"])
        self.optimizer_step = int(state["optimizer_step"])
        self.saved_at = self.iteration
        logger.info("resumed from %s (iteration %d, optimizer step %d)", checkpoint, self.iteration, self.optimizer_step)

    # ============================================================================================
    # validation images
    # ============================================================================================
    @torch.no_grad()
    def validate(self, epoch: int, name: str | None = None) -> Path | None:
        """Render the validation prompts with fixed seeds into ``samples/epoch-XXXX.png`` (main process).

        ``name`` replaces ``epoch-XXXX`` as the file name (e.g. ``iter-00000003`` for a run shorter than an epoch).
        """
        cfg, acc = self.config, self.accelerator
        if not cfg.validation_prompts or not acc.is_main_process:
            acc.wait_for_everyone()
            return None
        columns = cfg.num_validation_images * min(4, len(cfg.validation_prompts))
        base_path = self.output_dir / "samples" / "base.png"
        if not base_path.exists():
            # The base model's grid, same prompts and seeds, once per run: the run page shows each grid beside it.
            save_image_grid(self._validation_images(self._base_unet()), base_path, columns=columns)
        path = self.output_dir / "samples" / f"{name or f'epoch-{epoch:04d}'}.png"
        grid = save_image_grid(self._validation_images(self._sampling_unet()), path, columns=columns)
        for tracker in acc.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image("validation", grid, self.iteration, dataformats="HWC")
        acc.wait_for_everyone()
        return path

    def _validation_images(self, unet) -> torch.Tensor:
        """[P*n, 3, H, W] images of the validation prompts (n each), seeded by ``seed`` alone, from ``unet``."""
        cfg, acc = self.config, self.accelerator
        unet.eval()
        prompts = [p for p in cfg.validation_prompts for _ in range(cfg.num_validation_images)]
        generator = torch.Generator(acc.device).manual_seed(cfg.seed)
        latents = torch.randn((len(prompts), *self.latent_shape), generator=generator, device=acc.device, dtype=self.weight_dtype)
        cond = self._prompt_conditioning(prompts)
        with acc.autocast():
            x0 = ddim_sample(unet, self.scheduler, cond, self.negative, latents * self.scheduler.init_noise_sigma,
                             num_inference_steps=cfg.num_inference_steps, eta=0.0, guidance_scale=cfg.guidance_scale)
            return decode_latents(self.vae, x0, cfg.decode_chunk_size)

    def _base_unet(self):
        """The model before fine-tuning: the reference copy (full fine-tuning) or the UNet with its adapter off."""
        if self.reference_unet is not None:
            return self.reference_unet
        return _AdapterOff(self.accelerator.unwrap_model(self.unet))

    def cleanup(self) -> None:
        try:
            end_accelerator(self.accelerator)
        finally:
            release_run_folder(self)

    # ============================================================================================
    # what a variant of the recipe (recipes/train_gradspo.py) adds; nothing for SPO
    # ============================================================================================
    def _sampling_unet(self):
        """The model that samples (validation images too): SPO samples with the model being trained."""
        return self.accelerator.unwrap_model(self.unet)

    def _after_training_batch(self, index: int) -> None:
        """Called after each training batch (and the optimizer step it closes, if any); ``index`` counts the
        round's training batches from 1, over all inner epochs."""

    def _save_extra_weights(self, folder: Path) -> None:
        """Write further weights into a checkpoint's temporary folder (main process, before state.json)."""
