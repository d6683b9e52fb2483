"""``spotune generate``: images of a base model (plus LoRAs) on fixed per-image seeds, resumable.

Reading order: :func:`run_generate` resolves the prompts and the models, then for each model
:func:`plan_model` decides what is already on disk, and :func:`generate_missing` makes the rest in
batches, writing each PNG (with its ``parameters`` chunk) and the updated ``metadata.jsonl`` as it
goes, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from spotune import __version__
from spotune.errors import SpotuneError
from spotune.generation.config import GenerateConfig
from spotune.generation.grid import comparison_grid
from spotune.generation.layout import (
    GENERATION_FILE,
    METADATA_FILE,
    GenerationLayoutError,
    image_filename,
    read_generation,
    read_metadata,
    safe_name,
    write_generation,
    write_metadata,
)
from spotune.generation.pnginfo import format_parameters, save_png
from spotune.generation.seeds import derive_seed, initial_latents, sampler_generators
from spotune.utils.io import remove_stale_temporaries
from spotune.utils.outputs import describe_entries
from spotune.utils.paths import resolve_user_path

logger = logging.getLogger(__name__)

CATEGORY_COLUMNS = ("category", "Category", "style")
_CHECKPOINT_RE = re.compile(r"^iter-\d+$")


class GenerateError(SpotuneError, ValueError):
    """Generation settings or an output folder that cannot be used as asked."""


@dataclass(frozen=True)
class PromptItem:
    """One prompt with its optional category and the other columns of its row."""

    prompt: str
    category: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LoraSpec:
    path: Path
    scale: float
    name: str


@dataclass(frozen=True)
class ModelSpec:
    """A model to generate with: a base and zero or more LoRAs, under a label."""

    name: str
    base: str
    loras: tuple[LoraSpec, ...] = ()


@dataclass
class GenerationResult:
    """What a run produced: model folders, counts of new and kept images, the grid."""

    output_dir: Path
    folders: dict[str, Path]
    generated: dict[str, int]
    kept: dict[str, int]
    grid: Path | None = None


# -- inputs ---------------------------------------------------------------------------------------


def parse_lora_spec(spec: str, default_scale: float) -> tuple[Path, float]:
    """``"runs/spo:0.8"`` -> (runs/spo, 0.8); without a ``:SCALE`` suffix, the default scale.

    A path that exists as written is taken whole (it may contain ``:``). Otherwise the text after the
    last ``:`` must be a finite number when the text before it names an existing LoRA.

    Raises:
        GenerateError: an empty path, or a scale that is not a finite number.
    """
    path, scale = spec, default_scale
    if ":" in spec and not Path(spec).expanduser().exists():
        head, tail = spec.rsplit(":", 1)
        try:
            scale = float(tail)
            path = head
        except ValueError:
            if head and Path(head).expanduser().exists():
                raise GenerateError(
                    f"LoRA entry {spec!r}: the scale {tail!r} after the last ':' is not a number; write PATH:SCALE "
                    f"with a number, e.g. {head}:0.8, or PATH alone for lora_scale={default_scale:g}"
                ) from None
        if path == head and not math.isfinite(scale):
            raise GenerateError(f"LoRA entry {spec!r}: the scale must be a finite number, got {tail!r}")
    if not path:
        raise GenerateError(f"LoRA entry {spec!r} has no path")
    return Path(path).expanduser(), scale


def lora_label(path: Path) -> str:
    """A short name for a LoRA: the file stem, the run folder, or ``run-iter-00000010`` for a checkpoint."""
    path = path.resolve()
    if path.is_file():
        return path.stem
    if _CHECKPOINT_RE.match(path.name) and path.parent.name == "checkpoints":
        return f"{path.parent.parent.name}-{path.name}"
    return path.name


def model_label(source: str) -> str:
    """How the base model is named in PNG parameters: folder name, file stem or hub id."""
    if source.startswith("builtin:"):
        return source.split(":", 1)[1]
    path = Path(source).expanduser()
    if path.exists():
        return path.stem if path.is_file() else path.resolve().name
    return source


def model_specs(config: GenerateConfig) -> list[ModelSpec]:
    """The models of this run: the base alone first (when asked), then base + LoRAs."""
    loras = []
    for entry in config.loras:
        path, scale = parse_lora_spec(entry, config.lora_scale)
        if not path.exists():
            raise GenerateError(
                f"LoRA {path} does not exist (expected a LoRA .safetensors file, a diffusers LoRA folder, or a "
                "spotune run/checkpoint folder)"
            )
        loras.append(LoraSpec(path.resolve(), scale, lora_label(path)))
    default = loras[0].name if loras else "base"
    name = safe_name(config.name or default)
    specs = []
    if config.compare_base:
        if name == "base":
            raise GenerateError("with compare_base the LoRA model cannot also be named 'base'; set name=...")
        specs.append(ModelSpec("base", config.model))
    specs.append(ModelSpec(name, config.model, tuple(loras)))
    return specs


def load_prompt_items(config: GenerateConfig) -> list[PromptItem]:
    """Prompts (inline or from the file / HPS v2 folder), cut to ``max_prompts``, with categories."""
    from spotune.data.prompts import load_prompt_set, refuse_nul

    if config.prompts:
        records: list[dict[str, Any]] = [{"prompt": p} for p in config.prompts]
        for i, r in enumerate(records):
            if not r["prompt"].strip():
                raise GenerateError(f"inline prompt {i} is empty")
            refuse_nul(r["prompt"], f"inline prompt {i}")
    else:
        records = load_prompt_set(config.prompt_file, config.prompt_column or None)
    if config.max_prompts:
        records = records[: config.max_prompts]
    column = config.category_column or next((c for c in CATEGORY_COLUMNS if records and c in records[0]), None)
    if config.category_column and records and column not in records[0]:
        raise GenerateError(
            f"{config.prompt_file or 'prompts'}: no column '{config.category_column}' for categories "
            f"(columns: {sorted(records[0])})"
        )
    items = []
    for record in records:
        category = record.get(column) if column else None
        extra = {k: v for k, v in record.items() if k != "prompt" and isinstance(v, (str, int, float, bool))}
        items.append(PromptItem(record["prompt"], str(category) if category not in (None, "") else None, extra))
    return items


# -- planning ------------------------------------------------------------------------------------


def identity(spec: ModelSpec, config: GenerateConfig) -> dict[str, Any]:
    """Everything that decides the pixels of a model's images; a resumed run must match it."""
    return {
        "name": spec.name,
        "model": config.model,
        "loras": [{"path": str(lora.path), "scale": lora.scale} for lora in spec.loras],
        "sampler": "DDIM",
        "steps": config.steps,
        "guidance_scale": config.guidance_scale,
        "eta": config.eta,
        "width": config.width,
        "height": config.height,
        "seed": config.seed,
        "negative_prompt": config.negative_prompt,
        "dtype": config.dtype,
        "vae": config.vae,
    }


# What an identity key was before it was recorded, so folders written then still match (vae= came later).
_IDENTITY_DEFAULTS = {"vae": ""}


@dataclass
class ModelPlan:
    folder: Path
    records: dict[tuple[int, int], dict[str, Any]]  # images already on disk
    pending: list[tuple[int, int]]  # (prompt index, image index) still to make


def plan_model(folder: Path, spec: ModelSpec, config: GenerateConfig, items: list[PromptItem]) -> ModelPlan:
    """Check ``folder`` against this run and list the images still missing.

    Raises:
        GenerateError: the folder holds other files, or images made with other settings or prompts
            (unless ``overwrite``, which deletes that model's earlier images first).
    """
    wanted = identity(spec, config)
    if folder.exists():
        previous = read_generation(folder)
        if previous is None:
            if any(folder.iterdir()):
                raise GenerateError(
                    f"{folder} exists and is not a spotune generation folder (no {GENERATION_FILE}); refusing to "
                    "write into it: choose another output_dir"
                )
        else:
            old = {k: previous.get(k, _IDENTITY_DEFAULTS.get(k)) for k in wanted}
            changed = sorted(k for k in wanted if old[k] != wanted[k])
            records = read_metadata(folder)
            moved = [
                r["file"] for r in records
                if 0 <= r.get("prompt_index", -1) < len(items) and r["prompt"] != items[r["prompt_index"]].prompt
            ]
            if changed or moved:
                reason = (
                    f"settings changed ({', '.join(f'{k}: {old[k]!r} -> {wanted[k]!r}' for k in changed)})"
                    if changed
                    else f"prompts changed (e.g. {moved[0]} was made for another prompt)"
                )
                if not config.overwrite:
                    raise GenerateError(
                        f"{folder} holds images of model '{spec.name}' made with other settings: {reason}. Use another "
                        "output_dir or name, or overwrite=true to replace them."
                    )
                # Only what spotune wrote there goes: its bookkeeping and the images it recorded. Anything a
                # user added to the folder makes the replacement refuse instead.
                remove_stale_temporaries(folder)  # what a killed generate left is spotune's, not the user's
                ours = {GENERATION_FILE, METADATA_FILE, *(r["file"] for r in records if "file" in r)}
                foreign = sorted(p.name for p in folder.iterdir() if p.name not in ours)
                if foreign:
                    raise GenerateError(
                        f"overwrite=true would delete files spotune did not write in {folder}: "
                        f"{describe_entries(folder, foreign)}; move them away or choose another output_dir"
                    )
                logger.warning("overwrite: removing %s (%s)", folder, reason)
                shutil.rmtree(folder)
    done: dict[tuple[int, int], dict[str, Any]] = {}
    if folder.exists():
        for record in read_metadata(folder):
            key = (record["prompt_index"], record["image_index"])
            if (folder / record["file"]).is_file():
                done[key] = record
    pending = [
        (p, i) for p in range(len(items)) for i in range(config.images_per_prompt) if (p, i) not in done
    ]
    return ModelPlan(folder, done, pending)


# -- generation ----------------------------------------------------------------------------------


def resolve_device_dtype(config: GenerateConfig) -> tuple[torch.device, torch.dtype]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto" else torch.device(config.device)
    if config.dtype == "auto":
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    else:
        dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[config.dtype]
    return device, dtype


def apply_loras(pipe, loras: tuple[LoraSpec, ...]) -> None:
    """Fuse each LoRA into the UNet at its scale (a fresh pipeline per model keeps the base intact)."""
    from spotune.export import apply_lora, load_lora_file

    for i, lora in enumerate(loras):
        weights = load_lora_file(lora.path)
        apply_lora(pipe.unet, weights, scale=lora.scale, fuse=True, adapter_name=f"lora{i}")


def image_size(pipe, config: GenerateConfig) -> tuple[int, int]:
    """(width, height): the configured size, or the model's native one (SD1.5 512, SDXL 1024), checked
    against the VAE factor.

    Raises:
        ResolutionError: naming ``width`` or ``height``.
    """
    from spotune.models.family import resolve_resolution

    return tuple(
        resolve_resolution(getattr(config, key), pipe.unet, pipe.vae, key=key, where="generate") for key in ("width", "height")
    )


@torch.no_grad()
def decode_images(pipe, latents: torch.Tensor) -> list:
    """[B, C, h, w] final latents -> B PIL images, with the VAE in its own dtype.

    The VAE may run in another dtype than the UNet (an SDXL VAE kept in fp32 under fp16), which the
    pipelines' own decoding does not handle, so the latents are decoded here, cast to the VAE's dtype.
    """
    from spotune.diffusion.sampler import decode_latents

    images = decode_latents(pipe.vae, latents, chunk_size=len(latents))  # [B, 3, H, W] in about [-1, 1]
    return pipe.image_processor.postprocess(images, output_type="pil", do_denormalize=[True] * len(images))


def generate_missing(
    pipe,
    spec: ModelSpec,
    plan: ModelPlan,
    items: list[PromptItem],
    config: GenerateConfig,
    size: tuple[int, int],
) -> int:
    """Make ``plan.pending`` images in batches; returns how many were written.

    The negative prompt "" is passed as no negative prompt: SD1.5's pipeline then encodes "", SDXL's uses
    zeros (``force_zeros_for_empty_prompt``), as the SPO authors' SDXL inference and spotune's training do.

    Args:
        size: (width, height) in pixels.
    """
    from tqdm.auto import tqdm

    from spotune.models.family import family_of, vae_scale_factor

    width, height = size
    device, dtype = pipe.unet.device, pipe.unet.dtype
    family = family_of(pipe)
    factor = vae_scale_factor(pipe.vae)
    latent_shape = (pipe.unet.config.in_channels, height // factor, width // factor)
    base_label = model_label(config.model)
    vae_label = {"VAE": model_label(config.vae)} if config.vae else {}
    lora_tags = [(lora.name, lora.scale) for lora in spec.loras]
    plan.folder.mkdir(parents=True, exist_ok=True)
    write_generation(plan.folder, {**identity(spec, config), "model_family": family.name, "spotune_version": __version__})
    made = 0
    with tqdm(total=len(plan.pending), desc=f"generate {spec.name}", unit="img") as bar:
        for start in range(0, len(plan.pending), config.batch_size):
            batch = plan.pending[start : start + config.batch_size]
            seeds = [derive_seed(config.seed, p, i) for p, i in batch]
            prompts = [items[p].prompt for p, _ in batch]
            result = pipe(
                prompt=prompts,
                negative_prompt=[config.negative_prompt] * len(batch) if config.negative_prompt else None,
                height=height,
                width=width,
                num_inference_steps=config.steps,
                guidance_scale=config.guidance_scale,
                eta=config.eta,
                latents=initial_latents(seeds, latent_shape, device, dtype),  # [B, 4, h/8, w/8]
                generator=sampler_generators([derive_seed(config.seed, p, i, "sampler") for p, i in batch]),
                output_type="latent",
            )
            for (p, i), seed, image in zip(batch, seeds, decode_images(pipe, result.images)):
                file = image_filename(p, i)
                settings = {
                    "Steps": config.steps,
                    "Sampler": "DDIM",
                    "CFG scale": config.guidance_scale,
                    "Seed": seed,
                    "Size": f"{width}x{height}",
                    "Model": base_label,
                    **vae_label,
                    "Model family": family.name,
                    "Eta DDIM": config.eta,
                    "Version": f"spotune {__version__}",
                }
                save_png(image, plan.folder / file, format_parameters(items[p].prompt, config.negative_prompt, settings, lora_tags))
                plan.records[(p, i)] = {
                    "file": file,
                    "model": spec.name,
                    "prompt_index": p,
                    "image_index": i,
                    "prompt": items[p].prompt,
                    "negative_prompt": config.negative_prompt,
                    "category": items[p].category,
                    "seed": seed,
                    "steps": config.steps,
                    "guidance_scale": config.guidance_scale,
                    "eta": config.eta,
                    "width": width,
                    "height": height,
                    "sampler": "DDIM",
                    "base_model": config.model,
                    "model_family": family.name,
                    "vae": config.vae,
                    "loras": [{"path": str(lora.path), "scale": lora.scale} for lora in spec.loras],
                    "prompt_fields": items[p].fields,
                }
                made += 1
            write_metadata(plan.folder, list(plan.records.values()))
            bar.update(len(batch))
    return made


def run_generate(config: GenerateConfig) -> GenerationResult:
    """Generate every missing image of every model of ``config`` and (optionally) the comparison grid."""
    from spotune.models.loading import load_pipeline

    config.validate()
    out = Path(config.output_dir).expanduser()
    resolve_user_path(out, "--out (output_dir=) FOLDER")  # a symbolic-link loop: one line now, not at the first write
    if out.exists() and not out.is_dir():
        raise GenerateError(f"output_dir {out} exists and is not a folder")
    items = load_prompt_items(config)
    specs = model_specs(config)
    device, dtype = resolve_device_dtype(config)
    result = GenerationResult(out, {}, {}, {})
    pipe, fused = None, False
    for spec in specs:
        plan = plan_model(out / spec.name, spec, config, items)
        result.folders[spec.name] = plan.folder
        result.kept[spec.name] = len(plan.records)
        result.generated[spec.name] = 0
        if not plan.pending:
            logger.info("%s: all %d images already exist", spec.name, len(plan.records))
            continue
        if pipe is None:
            pipe = load_pipeline(config.model, dtype=dtype, device=device, model_family=config.model_family, vae=config.vae or None)
            pipe.set_progress_bar_config(disable=True)
        if spec.loras and not fused:
            apply_loras(pipe, spec.loras)
            fused = True
        size = image_size(pipe, config)
        result.generated[spec.name] = generate_missing(pipe, spec, plan, items, config, size)
    if config.grid:
        try:
            result.grid = comparison_grid(out, columns=config.grid_columns)
        except GenerationLayoutError as exc:
            logger.warning("no comparison grid: %s", exc)
    return result
