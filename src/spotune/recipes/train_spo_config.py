"""The config of ``spotune train``: every knob of SPO training, with the SD1.5 paper recipe as defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from spotune.config import ConfigError
from spotune.models.lora import SD15_LORA_TARGETS


def _help(text: str, default):
    return field(default=default, metadata={"help": text})


def _help_list(text: str, default: list):
    return field(default_factory=lambda: list(default), metadata={"help": text})


@dataclass
class TrainSPOConfig:
    # -- where things are ---------------------------------------------------------------------------
    output_dir: str = _help("Run folder: config.yaml, checkpoints/, logs/ and samples/ are written here.", "runs/spo")
    pretrained_model: str = _help(
        "The model to fine-tune: a diffusers folder, a single-file SD1.5 .safetensors, a hub id (online), "
        "or builtin:tiny-sd15.", "builtin:tiny-sd15")
    prompts: str = _help(
        "Training prompt file (.json list of {caption}, .txt, .csv/.tsv, .jsonl, .parquet); the SPO 4k list for "
        "the paper recipe.", "builtin:tiny-prompts")
    prompt_column: str | None = _help("Column/field holding the prompt in csv/tsv/json/parquet files; guessed when unset.", None)
    validation_prompts: list[str] = _help_list(
        "Prompts rendered after every epoch (same seeds each time) into samples/ and TensorBoard.",
        ["a photo of a cat", "a red circle on a blue background"])
    # -- the judge -----------------------------------------------------------------------------------
    judge: str = _help(
        "Preference model kind: spm (step-aware, the paper's), pickscore (plain, timestep-blind), tiny-clip "
        "(random tiny CLIP built in code, for CPU runs).", "tiny-clip")
    judge_clip_path: str | None = _help("Local CLIPModel folder of the judge (PickScore_v1 for spm/pickscore).", None)
    judge_checkpoint: str | None = _help(
        "Step-aware checkpoint (.bin official, .safetensors, or a train-spm run folder); judge=spm only.", None)
    judge_processor_path: str | None = _help("Folder with the judge's preprocessor_config.json; defaults to judge_clip_path.", None)
    # -- SPO sampling --------------------------------------------------------------------------------
    num_inference_steps: int = _help("DDIM steps per chain.", 20)
    eta: float = _help("DDIM eta; must be > 0 since SPO needs the step's density.", 1.0)
    guidance_scale: float = _help("Classifier-free guidance scale, used when sampling and in the training forward.", 5.0)
    negative_prompt: str = _help("Negative prompt for guidance.", "")
    divert_start_step: int = _help("Steps denoised normally before branching starts.", 4)
    num_samples_per_step: int = _help("k: candidates drawn from each x_t.", 4)
    preference_threshold: float = _help("A pair is kept when softmax(best, worst) differs by more than this.", 0.3)
    sample_batch_size: int = _help("Prompts per sampling batch, per process.", 10)
    resolution: int | None = _help("Image size in pixels; the model's own default (512 for SD1.5) when unset.", None)
    decode_chunk_size: int = _help("Images decoded by the VAE at once while judging (memory bound).", 8)
    pairing: Literal["step", "trajectory"] = _help(
        "step: SPO's step-wise pairs from a shared x_t. trajectory: the Diffusion-DPO-style baseline SPO argues "
        "against (two chains per prompt, the final images' label applied to every step), for comparisons.", "step")
    # -- SPO loss ------------------------------------------------------------------------------------
    beta: float = _help("Inverse temperature of the step-wise DPO loss.", 10.0)
    eps: float = _help("Likelihood-ratio clip range: ratios are clamped to [1-eps, 1+eps].", 0.1)
    # -- what is trained -----------------------------------------------------------------------------
    finetune: Literal["lora", "full"] = _help("Train a LoRA adapter (reference = adapter off) or the whole UNet.", "lora")
    lora_rank: int = _help("LoRA rank.", 4)
    lora_alpha: float | None = _help("LoRA alpha (update scale alpha/rank); equal to the rank when unset.", None)
    lora_init: str = _help("peft init_lora_weights: gaussian (SPO) or true (kaiming).", "gaussian")
    lora_targets: list[str] = _help_list("UNet module-name suffixes that get LoRA.", list(SD15_LORA_TARGETS))
    # -- optimisation --------------------------------------------------------------------------------
    train_batch_size: int = _help("Tuples per training micro-batch, per process.", 10)
    gradient_accumulation_steps: int = _help("Micro-batches per optimizer step (an iteration's last step may be shorter).", 1)
    num_inner_epochs: int = _help("Passes over each sampling round's tuples.", 1)
    learning_rate: float = _help("AdamW learning rate.", 6e-5)
    adam_beta1: float = _help("AdamW beta1.", 0.9)
    adam_beta2: float = _help("AdamW beta2.", 0.999)
    adam_weight_decay: float = _help("AdamW weight decay.", 1e-4)
    adam_epsilon: float = _help("AdamW epsilon.", 1e-8)
    max_grad_norm: float = _help("Gradient clipping norm (0 disables).", 1.0)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = _help("Learning-rate schedule.", "constant")
    lr_warmup_steps: int = _help("Warm-up optimizer steps.", 0)
    num_epochs: int = _help("Passes over the prompt list.", 10)
    max_iterations: int | None = _help(
        "Stop after this many SPO iterations (one sampling round + its training) in total; unset = num_epochs.", None)
    seed: int = _help("Seed of everything: noise, prompt order, tuple shuffling.", 42)
    mixed_precision: Literal["no", "fp16", "bf16"] = _help(
        "Mixed precision; frozen weights in this dtype, trained (LoRA) weights kept in fp32.", "fp16")
    gradient_checkpointing: bool = _help("Trade compute for memory in the UNet's training forward.", False)
    allow_tf32: bool = _help("Allow TF32 matmuls on Ampere+ GPUs.", True)
    # -- run management ------------------------------------------------------------------------------
    checkpoint_every: int = _help("Also checkpoint every N iterations (0: only at the end of each epoch and of training).", 0)
    keep_checkpoints: int | None = _help("Keep only the newest N checkpoints (unset keeps all).", None)
    resume: str | None = _help("Continue a run: 'latest' (newest checkpoint in output_dir) or a checkpoint folder.", None)
    overwrite: bool = _help("Start afresh in an output_dir that already holds a run, deleting its checkpoints.", False)
    log_with: Literal["tensorboard", "wandb", "none"] = _help("Experiment tracker.", "tensorboard")
    tracker_project: str = _help("Project name for the tracker.", "spotune")
    validate_every_epochs: int = _help("Render validation images every N epochs (0 disables).", 1)
    num_validation_images: int = _help("Images per validation prompt.", 1)
    progress: bool = _help("Show progress bars.", True)

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
            (self.lora_rank >= 1, "lora_rank must be >= 1"),
            (0 < self.eps < 1, "eps must be in (0, 1)"),
            (self.num_epochs >= 1, "num_epochs must be >= 1"),
            (self.max_iterations is None or self.max_iterations >= 1, "max_iterations must be >= 1"),
            (not (self.resume and self.overwrite), "resume and overwrite=true contradict each other"),
            (self.judge in ("spm", "pickscore", "tiny-clip", "tiny-spm"), f"judge must be spm, pickscore, tiny-clip or tiny-spm, got {self.judge!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"config: {message}")
