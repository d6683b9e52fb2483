"""The config of ``spotune train``: every knob of SPO training, with the SD1.5 paper recipe as defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from spotune.config import ConfigError, help_field
from spotune.models.lora import LORA_INITS, SD15_LORA_TARGETS


@dataclass
class TrainSPOConfig:
    # -- where things are ---------------------------------------------------------------------------
    output_dir: str = help_field("Run folder: config.yaml, checkpoints/, logs/ (metrics.jsonl, TensorBoard), samples/, trees/ and report.html are written here.", "runs/spo")
    pretrained_model: str = help_field(
        "The model to fine-tune (SD1.5 or SDXL): a diffusers folder, a single-file .safetensors, a hub id, "
        "or builtin:tiny-sd15 / builtin:tiny-sdxl.", "builtin:tiny-sd15")
    model_family: Literal["auto", "sd15", "sdxl"] = help_field(
        "Model family: auto (read from the model), or sd15 / sdxl to refuse a model of the other family.", "auto")
    vae: str | None = help_field(
        "A local diffusers VAE folder replacing the model's (SDXL: madebyollin/sdxl-vae-fp16-fix, which runs in fp16; "
        "without it the SDXL VAE runs in fp32).", None)
    prompts: str = help_field(
        "Training prompt file (.json list of {caption}, .txt, .csv/.tsv, .jsonl, .parquet); the SPO 4k list for "
        "the paper recipe.", "builtin:tiny-prompts")
    prompt_column: str | None = help_field("Column/field holding the prompt in csv/tsv/json/parquet files; guessed when unset.", None)
    validation_prompts: list[str] = help_field(
        "Prompts rendered after every epoch (same seeds each time) into samples/ and TensorBoard.",
        ["a photo of a cat", "a red circle on a blue background"])
    # -- the judge -----------------------------------------------------------------------------------
    judge: str = help_field(
        "Preference model kind: spm (step-aware, the paper's), pickscore (plain, timestep-blind), tiny-clip "
        "(random tiny CLIP built in code, for CPU runs), lrm (LPO's latent reward model: judge_checkpoint is its "
        "folder, or builtin:tiny-lrm / builtin:tiny-lrm-sdxl; algorithm=lpo only).", "tiny-clip")
    judge_clip_path: str | None = help_field("Local CLIPModel folder of the judge (PickScore_v1 for spm/pickscore).", None)
    judge_checkpoint: str | None = help_field(
        "Step-aware checkpoint (.bin official, .safetensors, or a train-spm run folder) for judge=spm; the LRM "
        "folder (unet/, text_encoder/, state_dict.pt as the LPO authors save it) for judge=lrm.", None)
    judge_processor_path: str | None = help_field("Folder with the judge's preprocessor_config.json; defaults to judge_clip_path.", None)
    judge_dtype: Literal["fp32", "bf16", "fp16"] = help_field(
        "Precision of the judge while sampling, whatever mixed_precision says: fp32 outside autocast as SPO's "
        "(default); bf16/fp16 are faster but flip some near-threshold pair decisions (docs/judges.md: the judge's precision).",
        "fp32")
    # -- SPO sampling --------------------------------------------------------------------------------
    num_inference_steps: int = help_field("DDIM steps per chain.", 20)
    eta: float = help_field("DDIM eta; must be > 0 since SPO needs the step's density.", 1.0)
    guidance_scale: float = help_field("Classifier-free guidance scale, used when sampling and in the training forward.", 5.0)
    negative_prompt: str = help_field("Negative prompt for guidance.", "")
    divert_start_step: int = help_field("Steps denoised normally before branching starts.", 4)
    num_samples_per_step: int = help_field("k: candidates drawn from each x_t.", 4)
    preference_threshold: float = help_field("A pair is kept when softmax(best, worst) differs by more than this.", 0.3)
    sample_batch_size: int = help_field("Prompts per sampling batch, per process.", 10)
    resolution: int | None = help_field("Image size in pixels, a multiple of the VAE factor (8); the model's native size (SD1.5 512, SDXL 1024) when unset.", None)
    decode_chunk_size: int = help_field(
        "Images decoded by the VAE at once while judging (memory bound); 0 sizes the chunks by free CUDA memory.", 8)
    sample_micro_batch_size: int | None = help_field(
        "UNet input rows per call while sampling (memory bound): classifier-free guidance runs 2 rows per latent, "
        "so the SD1.5 recipe's 40 candidates are 80 rows. Unset: all at once.", None)
    judge_batch_size: int | None = help_field(
        "Images scored by the judge at once (memory bound); unset scores all k x sample_batch_size candidates at once.", None)
    sampler: Literal["auto", "sd15", "sdxl"] = help_field(
        "Which of the authors' step-wise samplers: sd15 branches k candidates at every step from divert_start_step "
        "on and judges each branch at the next step; sdxl branches every num_inner_steps + 1 steps and labels "
        "every transition of a segment with the scores at its end (docs/training.md: the SDXL sampler). auto: the model "
        "family's own (SD1.5 models sd15, SDXL models sdxl). With algorithm=gradspo, GradSPO's sampler of that "
        "name: the two end the chain differently (docs/gradspo.md: GradSPO on SDXL).", "auto")
    num_inner_steps: int = help_field(
        "sampler=sdxl: single steps of each chain between two branchings (SPO SDXL: 3); 0 for sampler=sd15.", 0)
    pairing: Literal["step", "trajectory"] = help_field(
        "step: SPO's step-wise pairs from a shared x_t. trajectory: the Diffusion-DPO-style baseline SPO argues "
        "against (two chains per prompt, the final images' label applied to every step), for comparisons.", "step")
    # -- SPO loss ------------------------------------------------------------------------------------
    beta: float = help_field("Inverse temperature of the step-wise DPO loss.", 10.0)
    eps: float = help_field("Likelihood-ratio clip range: ratios are clamped to [1-eps, 1+eps].", 0.1)
    # -- what is trained -----------------------------------------------------------------------------
    finetune: Literal["lora", "full"] = help_field("Train a LoRA adapter (reference = adapter off) or the whole UNet.", "lora")
    lora_rank: int = help_field("LoRA rank.", 4)
    lora_alpha: float | None = help_field("LoRA alpha (update scale alpha/rank); equal to the rank when unset.", None)
    lora_init: str = help_field("peft init_lora_weights: gaussian (SPO) or true (kaiming; also written kaiming or default).", "gaussian")
    lora_targets: list[str] = help_field("UNet module-name suffixes that get LoRA.", list(SD15_LORA_TARGETS))
    # -- optimisation --------------------------------------------------------------------------------
    train_batch_size: int = help_field("Tuples per training batch, per process: the loss is the mean over these.", 10)
    train_micro_batch_size: int | None = help_field(
        "Tuples per forward/backward pass when smaller than train_batch_size (memory bound); the gradients are "
        "accumulated so the loss stays the mean over the whole training batch. Unset: one pass per batch.", None)
    gradient_accumulation_steps: int = help_field(
        "Micro-batches per optimizer step; a group runs on across sampling rounds, as in the authors' loop "
        "(one left open at the end of the run is not applied).", 1)
    num_inner_epochs: int = help_field("Passes over each sampling round's tuples.", 1)
    learning_rate: float = help_field("AdamW learning rate.", 6e-5)
    adam_beta1: float = help_field("AdamW beta1.", 0.9)
    adam_beta2: float = help_field("AdamW beta2.", 0.999)
    adam_weight_decay: float = help_field("AdamW weight decay.", 1e-4)
    adam_epsilon: float = help_field("AdamW epsilon.", 1e-8)
    max_grad_norm: float = help_field(
        "Gradient clipping norm (0 disables). The gradient norm before clipping is logged every optimizer step.", 1.0)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = help_field("Learning-rate schedule.", "constant")
    lr_warmup_steps: int = help_field("Warm-up optimizer steps.", 0)
    num_epochs: int = help_field("Passes over the prompt list.", 10)
    max_iterations: int | None = help_field(
        "Stop after this many SPO iterations (one sampling round + its training) in total; unset = num_epochs.", None)
    seed: int = help_field("Seed of everything: noise, prompt order, tuple shuffling.", 42)
    mixed_precision: Literal["no", "fp16", "bf16"] = help_field(
        "Mixed precision; frozen weights in this dtype, trained (LoRA) weights kept in fp32.", "fp16")
    gradient_checkpointing: bool = help_field("Trade compute for memory in the UNet's training forward.", False)
    allow_tf32: bool = help_field("Allow TF32 matmuls on Ampere+ GPUs.", True)
    compile: bool = help_field("torch.compile the UNet, the VAE decoder and the judge's image tower (same maths, faster after warm-up).", False)
    compile_backend: str = help_field("torch.compile backend when compile=true.", "inductor")
    offload_text_encoder: bool = help_field(
        "Encode every training prompt once at start-up, keep the embeddings on the CPU and move the text encoder "
        "off the accelerator (frees its memory for the UNet).", False)
    # -- run management ------------------------------------------------------------------------------
    checkpoint_every: int = help_field("Also checkpoint every N iterations (0: only at the end of each epoch and of training).", 0)
    keep_checkpoints: int | None = help_field("Keep only the newest N checkpoints (unset keeps all).", None)
    preempt_grace_s: float = help_field(
        "Seconds from a SIGTERM / SIGUSR1 (a scheduler's preemption) within which the run must finish its current "
        "iteration and write a checkpoint; past it the process ends with exit 143 and the previous checkpoint is kept "
        "(0: no limit). Size it inside the scheduler's warning (SLURM --signal=B:TERM@120).", 90.0)
    resume: str | None = help_field("Continue a run: 'latest' (newest checkpoint in output_dir) or a checkpoint folder.", None)
    overwrite: bool = help_field("Start afresh in an output_dir that already holds a run, deleting its checkpoints.", False)
    log_with: Literal["tensorboard", "wandb", "none"] = help_field("Experiment tracker.", "tensorboard")
    tracker_project: str = help_field("Project name for the tracker.", "spotune")
    validate_every_epochs: int = help_field("Render validation images every N epochs (0 disables).", 1)
    num_validation_images: int = help_field("Images per validation prompt.", 1)
    progress: bool = help_field("Show progress bars.", True)
    tree_every: int | None = help_field(
        "Record the sampling tree of one prompt (RUN/trees/iter-N.png and .json, TensorBoard 'sampling_tree': each "
        "step's candidates, scores, kept pair and continued candidate) every N iterations; unset: the first "
        "iteration, each iteration that ends with validation images, and the last; 0: never.", None)
    tree_prompt: int = help_field(
        "Which prompt of the sampling round the tree follows: its index, 0 .. sample_batch_size-1 (of the main "
        "process's prompts).", 0)
    # -- the algorithm -------------------------------------------------------------------------------
    algorithm: Literal["spo", "gradspo", "lpo"] = help_field(
        "spo: SPO's loss on step log-densities, sampling with the trained model. gradspo: GradSPO (its official "
        "code, JoshuaTTJ/GradSPO): sampling with an EMA copy of the trained model, and a loss on noise-prediction "
        "targets built from the pair's noise offset (see docs/gradspo.md). lpo: LPO (Kwai-Kolors/LPO): SPO's loss, "
        "with the candidates judged as noisy latents by a latent reward model (judge=lrm), no decoding, against a "
        "threshold that follows the step's noise (see docs/lpo.md).", "spo")
    ema_decay: float = help_field(
        "gradspo: decay of the EMA model (GradSPO: 0.9), updated after every gradient_accumulation_steps-th "
        "training batch of a sampling round, as GradSPO's code does (accumulation 1: after every optimizer step).", 0.9)
    grad_scale: float = help_field("gradspo: step s of the noise-prediction targets along the pair's noise offset (GradSPO: 0.5).", 0.5)
    lpo_threshold_min: float = help_field(
        "lpo: the pair threshold at the least noisy step (LPO SD1.5: 0.35, SDXL: 0.45); it rises with the step's DDIM "
        "standard deviation to lpo_threshold_max at the noisiest. preference_threshold is not used by lpo.", 0.35)
    lpo_threshold_max: float = help_field("lpo: the pair threshold at the noisiest step (LPO SD1.5: 0.5, SDXL: 0.6).", 0.5)
    lrm_timestep: Literal["authors", "own"] = help_field(
        "lpo: the timestep the LRM scores a candidate x_{t-1} at: authors, the t of the step that drew it (the LPO "
        "code's); own, the candidate's own noise level t-1 (0 after the last step).", "authors")

    def validate(self) -> None:
        """Cross-field checks, so a bad combination fails before any model is loaded."""
        checks = [
            (self.num_inference_steps >= 1, "num_inference_steps must be >= 1"),
            (0 <= self.divert_start_step < self.num_inference_steps,
             f"divert_start_step must be in [0, num_inference_steps={self.num_inference_steps})"),
            (self.num_samples_per_step >= 2, "num_samples_per_step must be >= 2 (a pair needs two candidates)"),
            (self.eta > 0, "eta must be > 0: SPO needs the density of each DDIM step"),
            (self.sample_batch_size >= 1 and self.train_batch_size >= 1, "batch sizes must be >= 1"),
            (self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be >= 1"),
            (self.train_micro_batch_size is None or self.train_micro_batch_size >= 1, "train_micro_batch_size must be >= 1 (or unset)"),
            (self.judge_batch_size is None or self.judge_batch_size >= 1, "judge_batch_size must be >= 1 (or unset)"),
            (self.sample_micro_batch_size is None or self.sample_micro_batch_size >= 1,
             f"sample_micro_batch_size must be >= 1 (or unset), got sample_micro_batch_size={self.sample_micro_batch_size}"),
            (self.decode_chunk_size >= 0,
             f"decode_chunk_size must be >= 0 (0: sized by free CUDA memory), got decode_chunk_size={self.decode_chunk_size}"),
            (self.lora_rank >= 1, "lora_rank must be >= 1"),
            (0 < self.eps < 1, f"eps must be in (0, 1), got eps={self.eps}"),
            (0 <= self.preference_threshold < 1,
             f"preference_threshold must be in [0, 1), got preference_threshold={self.preference_threshold} (a pair's "
             "softmax gap is below 1, so a threshold of 1 or more keeps no pair and nothing is trained)"),
            (self.learning_rate > 0, f"learning_rate must be > 0, got learning_rate={self.learning_rate}"),
            (self.beta > 0, f"beta must be > 0, got beta={self.beta}"),
            (self.checkpoint_every >= 0, f"checkpoint_every must be >= 0 (0: at epoch ends only), got checkpoint_every={self.checkpoint_every}"),
            (self.preempt_grace_s >= 0, f"preempt_grace_s must be >= 0 (0: no limit), got preempt_grace_s={self.preempt_grace_s}"),
            (self.keep_checkpoints is None or self.keep_checkpoints >= 1,
             f"keep_checkpoints must be >= 1 when set (unset keeps all), got keep_checkpoints={self.keep_checkpoints}"),
            (self.lora_init.lower() in LORA_INITS,
             f"lora_init must be one of {', '.join(LORA_INITS)}, got lora_init={self.lora_init}"),
            (bool(self.lora_targets), "lora_targets must name at least one UNet module-name suffix, e.g. lora_targets=[to_q,to_k,to_v,to_out.0]"),
            (self.num_epochs >= 1, "num_epochs must be >= 1"),
            (self.max_iterations is None or self.max_iterations >= 1, "max_iterations must be >= 1"),
            (not (self.resume and self.overwrite), "resume and overwrite=true contradict each other"),
            (self.judge in ("spm", "pickscore", "tiny-clip", "tiny-spm", "lrm"),
             f"judge must be spm, pickscore, tiny-clip, tiny-spm or lrm, got {self.judge!r}"),
            (self.max_grad_norm >= 0, f"max_grad_norm must be >= 0 (0 disables clipping), got {self.max_grad_norm}"),
            (self.tree_every is None or self.tree_every >= 0,
             f"tree_every must be >= 0 (0: no sampling trees) or unset, got tree_every={self.tree_every}"),
            (0 <= self.tree_prompt < self.sample_batch_size,
             f"tree_prompt must be in [0, sample_batch_size={self.sample_batch_size}), got tree_prompt={self.tree_prompt}"),
        ]
        checks += [
            (self.algorithm in ("spo", "gradspo", "lpo"), f"algorithm must be spo, gradspo or lpo, got {self.algorithm!r}"),
            (self.algorithm != "lpo" or self.judge == "lrm",
             f"algorithm=lpo judges noisy latents and needs judge=lrm (with judge_checkpoint=LRM_FOLDER, or "
             f"builtin:tiny-lrm for CPU runs), got judge={self.judge}"),
            (self.judge != "lrm" or self.algorithm == "lpo",
             f"judge=lrm scores latents, which only algorithm=lpo samples; set algorithm=lpo (got algorithm={self.algorithm})"),
            (0 <= self.lpo_threshold_min <= self.lpo_threshold_max < 1,
             f"lpo_threshold_min and lpo_threshold_max must satisfy 0 <= min <= max < 1, got lpo_threshold_min="
             f"{self.lpo_threshold_min} and lpo_threshold_max={self.lpo_threshold_max}"),
            (self.algorithm != "lpo" or self.pairing == "step", "algorithm=lpo needs pairing=step (it branches at every step)"),
            (self.algorithm != "lpo" or self.num_inner_steps == 0,
             f"algorithm=lpo branches at every step and has no inner steps; set num_inner_steps=0 (got {self.num_inner_steps})"),
            (0.0 <= self.ema_decay <= 1.0, f"ema_decay must be in [0, 1], got {self.ema_decay}"),
            (self.algorithm != "gradspo" or self.pairing == "step",
             "algorithm=gradspo needs pairing=step (its noise offset exists only for candidates of one x_t)"),
            (self.num_inner_steps >= 0, f"num_inner_steps must be >= 0, got num_inner_steps={self.num_inner_steps}"),
            (self.num_inner_steps == 0 or self.sampler != "sd15",
             f"num_inner_steps={self.num_inner_steps} needs sampler=sdxl (sampler=sd15 branches at every step); "
             "set sampler=sdxl, or num_inner_steps=0"),
            (self.num_inner_steps == 0 or self.algorithm != "gradspo",
             f"algorithm=gradspo needs num_inner_steps=0, got num_inner_steps={self.num_inner_steps} (GradSPO's "
             "loss needs win and lose to share x_t, which inner steps break; its SDXL recipe uses 0, and its SDXL "
             "code keeps one noise offset per segment, so it cannot train with more)"),
            (self.num_inner_steps == 0 or self.pairing == "step",
             f"pairing=trajectory ignores num_inner_steps; set num_inner_steps=0 (got {self.num_inner_steps})"),
        ]
        if self.sampler == "sdxl":
            checks.append(sdxl_sampler_check(self))
        if self.compile:
            import torch._dynamo

            backends = torch._dynamo.list_backends(exclude_tags=())
            checks.append((self.compile_backend in backends,
                           f"compile_backend must be a torch.compile backend of this torch ({', '.join(backends)}), "
                           f"got compile_backend={self.compile_backend}"))
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"config: {message}")


def sdxl_sampler_check(config: TrainSPOConfig) -> tuple[bool, str]:
    """The SDXL sampler needs a judged step after its first branch (``divert_start_step``)."""
    from spotune.diffusion.segment_sampler import judged_steps

    ok = bool(judged_steps(config.num_inference_steps, config.divert_start_step, config.num_inner_steps))
    return ok, (
        f"divert_start_step={config.divert_start_step} with num_inference_steps={config.num_inference_steps} and "
        f"num_inner_steps={config.num_inner_steps} leaves the SDXL sampler no evaluation step after its first "
        f"branch; set divert_start_step below {config.num_inference_steps - 1}"
    )
