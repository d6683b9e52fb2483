"""One iteration of the configured recipe, run on fake tensors: predicted memory and FLOPs per phase.

:func:`predict_iteration` sets the recipe up exactly as ``spotune train`` does (the same trainer class, the
same ``setup()``: family, LoRA or full fine-tune, judge, every memory knob), with three substitutions:

* the models are built from their configs inside ``FakeTensorMode`` (no weights are read, no memory is
  used: :mod:`spotune.plan.architectures`);
* everything runs on fake CPU tensors with CUDA's autocast rules (:mod:`spotune.plan.cuda_autocast`), and
  fp16 mixed precision is run as bf16, whose values take the same two bytes;
* what ``offload_text_encoder`` moves to host memory goes to the meta device, which is not counted; the
  start-up prompt cache encodes only the rounds the prediction samples (the rest would also live in
  host memory).

Then it samples one round and trains on it, with :class:`~spotune.plan.recorder.ExecutionRecorder`
counting live storages, FLOPs and bytes per phase. Every pair is kept (the recorder's ``nonzero``
stand-in), so the prediction is the most an iteration can allocate and compute.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator
from unittest import mock

import torch
from torch.utils._python_dispatch import _disable_current_modes

from spotune.plan.recorder import ExecutionRecorder, PhaseRecord

# The phases of an iteration, in the order a report lists them.
PHASES = ("text_encoding", "unet_sampling", "vae_decode", "judge", "train_forward", "train_reference", "train_ema",
          "train_backward", "optimizer", "ema_update", "other")
PHASE_TITLES = {
    "setup": "weights (after setup)", "text_encoding": "text encoding", "unet_sampling": "sampling UNet",
    "vae_decode": "VAE decode", "judge": "judge", "train_forward": "training forward", "train_reference": "reference forward",
    "train_ema": "EMA forward", "train_backward": "backward", "optimizer": "optimizer step", "ema_update": "EMA update",
    "other": "other (DDIM steps, loss, pairs)",
}


@dataclass
class Prediction:
    """A predicted iteration: per-phase records, the overall peak, and what the run's length is.

    Bytes are allocator bytes (storages rounded to 512), as ``torch.cuda.max_memory_allocated`` counts them.
    """

    config: object  # the TrainSPOConfig predicted (the user's, before the planner's substitutions)
    family: str
    sampler: str
    architecture: str
    judge_architecture: str
    phases: dict[str, PhaseRecord]
    peak: int
    after_setup: int
    weights: dict[str, int]
    trainable_parameters: int
    tuples: int
    prompt_count: int  # the run's length follows from it (spotune.plan.report, for any number of processes)
    sdpa_kernels: list[str]
    seconds_to_predict: float
    notes: list[str] = field(default_factory=list)

    @property
    def peak_phase(self) -> str:
        return max(self.phases.values(), key=lambda p: p.peak).name


def _planning_config(config):
    """The config the fake run uses: the user's, but writing nowhere of theirs and with nothing to log."""
    changes = dict(output_dir=tempfile.mkdtemp(prefix="spotune-plan-"), resume=None, overwrite=False,
                   log_with="none", progress=False, compile=False)
    if config.mixed_precision == "fp16":
        changes["mixed_precision"] = "bf16"  # same bytes; CPU autocast's lower precision is bf16
    return dataclasses.replace(config, **changes)


@contextmanager
def _models_from_configs(notes: dict[str, str]) -> Iterator[None]:
    """Make the recipe's setup build its models from configs (builtin tiny models: as the loader does)."""
    from spotune.models import loading
    from spotune.plan import architectures
    from spotune.preference import factory

    real_load, real_judge = loading.load_pipeline, factory.build_judge
    model_source = []  # the diffusion model's architecture, which an LRM shares

    def load_pipeline(source, dtype=torch.float32, device=None, *, model_family="auto", vae=None):
        if source.startswith("builtin:"):
            notes["architecture"] = f"{source} (built in code)"
            return real_load(source, dtype, device, model_family=model_family, vae=vae)
        where = architectures.architecture_source(source, model_family)
        notes["architecture"] = where.described
        model_source.append(where)
        return architectures.build_pipeline(where, dtype, vae=vae)

    def build_judge(kind, clip_path=None, checkpoint=None, processor_path=None, device=None, dtype=None):
        if kind == "lrm" and model_source and not str(checkpoint or "").startswith("builtin:"):
            notes["judge"] = "lrm over the model's own UNet and text encoder configs"
            return architectures.build_lrm_judge(model_source[-1], dtype or torch.float32)
        if kind in ("spm", "pickscore"):
            config, described = architectures.clip_config(clip_path)
            notes["judge"] = f"{kind} over {described}"
            return architectures.build_clip_judge(kind, config, dtype or torch.float32)
        notes["judge"] = f"{kind} (built in code)"
        return real_judge(kind, clip_path, checkpoint, processor_path, device=device, dtype=dtype)

    with mock.patch("spotune.recipes.train_spo.load_pipeline", load_pipeline), \
            mock.patch("spotune.preference.factory.build_judge", build_judge):
        yield


def _hook_phases(trainer, recorder: ExecutionRecorder, stage: list[str]) -> None:
    """Attribute the models' calls to phases; ``stage[0]`` is "sampling" or "training" as the loop goes."""
    acc = trainer.accelerator

    def unet_phase(role: str) -> Callable[[], str]:
        def name() -> str:
            if stage[0] == "sampling":
                return "unet_sampling"
            if role == "ema":
                return "train_ema"
            return "train_forward" if torch.is_grad_enabled() and role == "policy" else "train_reference"

        return name

    recorder.hook_module(acc.unwrap_model(trainer.unet), unet_phase("policy"))
    if trainer.reference_unet is not None:
        recorder.hook_module(trainer.reference_unet, unet_phase("reference"))
    if getattr(trainer, "ema_unet", None) is not None:
        recorder.hook_module(trainer.ema_unet, unet_phase("ema"))
        trainer._after_training_batch = recorder.wrap(trainer._after_training_batch, "ema_update")
    for encoder in trainer.conditioner.text_encoders:
        recorder.hook_module(encoder, lambda: "text_encoding")
    trainer.vae.decode = recorder.wrap(trainer.vae.decode, "vae_decode")
    trainer.judge.score = recorder.wrap(trainer.judge.score, "judge")
    acc.backward = recorder.wrap(acc.backward, "train_backward")
    trainer._apply_group = recorder.wrap(trainer._apply_group, "optimizer")


def _weights(trainer, recorder: ExecutionRecorder) -> dict[str, int]:
    """Bytes held on the device by each model after setup (what every phase starts from)."""
    acc = trainer.accelerator
    unet = acc.unwrap_model(trainer.unet)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    frozen = [p for p in unet.parameters() if not p.requires_grad]
    out = {"UNet (frozen)": recorder.live_bytes_of([*frozen, *unet.buffers()]),
           "UNet (trained)": recorder.live_bytes_of(trainable)}
    if trainer.reference_unet is not None:
        out["reference UNet"] = recorder.live_bytes_of(trainer.reference_unet.parameters())
    if getattr(trainer, "ema_unet", None) is not None:
        ema = trainer.ema_unet
        out["EMA UNet"] = recorder.live_bytes_of([*ema.parameters(), *ema.buffers()])
    out["VAE"] = recorder.live_bytes_of(trainer.vae.parameters())
    out["text encoders"] = recorder.live_bytes_of(p for e in trainer.conditioner.text_encoders for p in e.parameters())
    out["judge"] = recorder.live_bytes_of(trainer.judge.parameters())
    return out


def _cache_only_first_round(trainer) -> None:
    """The start-up prompt cache (offload_text_encoder) encodes the round predicted, not the whole prompt file.

    The cache lives in host memory either way, so the GPU's peak is the same; encoding 4,000 prompts on fake
    tensors would only cost the prediction minutes.
    """
    original = trainer._cache_prompt_conditioning

    def cache(prompts: list[str]) -> None:
        with _disable_current_modes():
            first = trainer._prompts_for(0, 0)
        original([*first, *trainer.config.validation_prompts])

    trainer._cache_prompt_conditioning = cache


@contextmanager
def _quiet_recipe_logs() -> Iterator[None]:
    """The trainer's start-up summary and the loaders' notes describe a run; a plan is not one."""
    import logging

    from diffusers.utils import logging as diffusers_logging

    loggers = [logging.getLogger(name) for name in ("spotune.recipes", "spotune.models")]
    levels = [logger.level for logger in loggers]
    verbosity = diffusers_logging.get_verbosity()
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    diffusers_logging.set_verbosity_error()  # "modules that should be kept in float32: []" on every .to(dtype)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        diffusers_logging.set_verbosity(verbosity)


def _progress(message: str, stream) -> None:
    if stream is not None:
        print(f"plan: {message}", file=stream, flush=True)


def predict_iteration(config, *, card_memory_bytes: int | None = None, progress=sys.stderr) -> Prediction:
    """Predict one iteration of ``config`` (a TrainSPOConfig): peak memory and FLOPs per phase.

    Args:
        card_memory_bytes: the GPU's memory, for ``decode_chunk_size: 0`` (chunks sized by free CUDA
            memory): the free memory is this less what is live. ``None``: the whole batch at once.
        progress: where progress lines go (``None``: nowhere).
    Raises:
        SpotuneError: what ``spotune train`` would refuse in this config, with the same message.
    """
    from spotune.diffusion import sampler as sampler_module
    from spotune.plan.fake_world import fake_world

    recorder = ExecutionRecorder(stand_ins=True)

    def free_device_memory(device: torch.device) -> int | None:
        """The planned card's free memory: its size less what is live (None: no card, the whole batch)."""
        return None if card_memory_bytes is None else max(0, card_memory_bytes - recorder.current)

    notes: dict[str, str] = {}
    with ExitStack() as stack:
        stack.enter_context(_models_from_configs(notes))
        stack.enter_context(mock.patch.object(sampler_module, "free_device_memory", free_device_memory))
        stack.enter_context(fake_world())
        return _record_iteration(config, _planning_config(config), recorder, notes, progress, fake=True)


def measure_iteration(config, *, progress=None) -> Prediction:
    """The same iteration as :func:`predict_iteration`, run for real on this machine's CPU and measured.

    The models are loaded as ``spotune train`` loads them (use the builtin tiny models), the tensors are
    real, and the recorder counts the same storages, so a prediction can be checked against it.
    """
    planning = dataclasses.replace(_planning_config(config), mixed_precision=config.mixed_precision)
    return _record_iteration(config, planning, ExecutionRecorder(stand_ins=False), {}, progress, fake=False)


def _record_iteration(config, planning, recorder: ExecutionRecorder, notes: dict[str, str], progress, *, fake: bool) -> Prediction:
    """Set the recipe up and run one iteration under ``recorder``; the shared body of predict and measure."""
    import shutil

    from spotune.recipes.trainers import trainer_class

    started = time.perf_counter()
    trainer = trainer_class(planning)(planning)
    stage = ["setup"]
    if fake:
        trainer.offload_device = torch.device("meta")
    _cache_only_first_round(trainer)
    with ExitStack() as stack:
        stack.enter_context(_quiet_recipe_logs())
        stack.enter_context(recorder)
        try:
            _progress("building the models on fake tensors (no weights, no GPU) ..." if fake else "loading the models ...", progress)
            with recorder.phase("setup"):
                trainer.setup()
            after_setup = recorder.current
            weights = _weights(trainer, recorder)
            _hook_phases(trainer, recorder, stage)
            with _disable_current_modes():
                prompts = trainer._prompts_for(0, 0)
            cfg = trainer.config
            _progress(f"sampling one round: {len(prompts)} prompts, k={cfg.num_samples_per_step}, "
                      f"{cfg.num_inference_steps} steps ...", progress)
            stage[0] = "sampling"
            result = trainer.sample(prompts)
            stage[0] = "training"
            _progress(f"training on {len(result.pairs)} tuples{' (every pair kept)' if fake else ''} ...", progress)
            trainer.train_on_pairs(result.pairs)
            tuples = len(result.pairs)
            trainable = sum(p.numel() for p in trainer.trainable)
        finally:
            with _disable_current_modes():
                trainer.cleanup()
                shutil.rmtree(planning.output_dir, ignore_errors=True)
    phases = {name: recorder.phases[name] for name in ("setup", *PHASES) if name in recorder.phases}
    elapsed = time.perf_counter() - started
    _progress(f"{'predicted' if fake else 'measured'} in {elapsed:.0f} s", progress)
    extra = []
    if fake and config.mixed_precision == "fp16":
        extra.append("fp16 predicted as bf16 (2 bytes per value either way); the loss scaler's scalars are not counted")
    if config.compile:
        extra.append("compile=true is predicted as eager (torch.compile's memory and speed are not modelled)")
    return Prediction(
        config=config, family=trainer.family.name, sampler=trainer.sampler_kind,
        architecture=notes.get("architecture", config.pretrained_model), judge_architecture=notes.get("judge", config.judge),
        phases=phases, peak=recorder.peak, after_setup=after_setup, weights=weights, trainable_parameters=trainable,
        tuples=tuples, prompt_count=len(trainer.prompts), sdpa_kernels=sorted(recorder.sdpa_kernels), seconds_to_predict=elapsed,
        notes=extra,
    )


__all__ = ["PHASES", "PHASE_TITLES", "Prediction", "measure_iteration", "predict_iteration"]
