"""``export_checkpoint``: turn a spotune run or checkpoint into files other tools load.

Formats:

* ``diffusers``   ``pytorch_lora_weights.safetensors`` (in a folder, or as the file itself when the
                  output ends in ``.safetensors``) for ``pipe.load_lora_weights``;
* ``webui``       one kohya-named ``.safetensors`` with ``ss_*`` / ``modelspec.*`` metadata for
                  A1111 / Forge / ComfyUI;
* ``merged``      a full diffusers pipeline folder with the LoRA fused into the base model (or the
                  fully fine-tuned UNet in place);
* ``single-file`` one original-layout ``.safetensors`` of the merged model (webui checkpoints): SD1.5's
                  CompVis layout, or SDXL's sgm layout with both text encoders.

Each format is written for the base model's family (SD1.5 or SDXL): the webui names and metadata kohya
writes for it, the single-file layout its clients load. A LoRA of the other family is refused.

Every output is staged beside its final path and renamed into place, so a crash leaves either the
old content or the new, never half of it; an existing output is replaced only with ``overwrite``, and
only when spotune wrote it (a safetensors file, a diffusers LoRA folder, a folder with its output marker).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import torch

from spotune.export.apply import check_lora_family
from spotune.export.base_config import base_unet_config
from spotune.export.lora_files import (
    DIFFUSERS_LORA_FILE,
    LoraFormatError,
    LoraWeights,
    diffusers_lora_file,
    webui_lora_file,
)
from spotune.export.lora_layout import lora_family, sdxl_base_unet_config, to_diffusers_layout, to_original_layout
from spotune.export.metadata import model_name, single_file_metadata
from spotune.export.pipeline_folder import make_folder_loadable_everywhere
from spotune.export.source import ExportError, ExportSource, read_export_source
from spotune.models.family import SD15, SDXL, ModelFamily, family_of, family_of_unet_config
from spotune.utils.io import (
    apply_umask_modes,
    aside_name,
    disk_full_from,
    make_temp_dir,
    make_temp_file,
    remove_stale_temporaries,
)
from spotune.utils.preemption import signals_held
from spotune.utils.outputs import describe_entries, foreign_entries, is_safetensors_file, write_output_marker
from spotune.utils.paths import resolve_user_path

EXPORT_FORMATS = ("diffusers", "webui", "merged", "single-file")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_LORA_ONLY = ("diffusers", "webui")
# What a diffusers LoRA folder holds; any other folder is replaced only when its marker vouches for it.
_DIFFUSERS_FOLDER_LAYOUT = frozenset({DIFFUSERS_LORA_FILE})


@dataclass
class ExportConfig:
    """Settings of ``spotune export``."""

    source: str = field(default="", metadata={"help": "A spotune run folder (its latest checkpoint), a checkpoint folder, or a LoRA file to convert."})
    format: Literal["diffusers", "webui", "merged", "single-file"] | None = field(
        default=None,
        metadata={"help": "diffusers: LoRA for load_lora_weights; webui: kohya LoRA file for A1111/ComfyUI; merged: diffusers pipeline folder with the LoRA fused in; single-file: original-layout SD1.5 or SDXL checkpoint."},
    )
    output: str = field(default="", metadata={"help": "Where to write: a .safetensors file (webui, single-file, diffusers) or a folder (diffusers, merged)."})
    base_model: str | None = field(
        default=None,
        metadata={"help": "Base model to merge into, and whose family (SD1.5 or SDXL) and UNet layout the LoRA is written for; "
                          "the one recorded in the checkpoint when unset."},
    )
    dtype: Literal["fp16", "bf16", "fp32"] = field(default="fp16", metadata={"help": "Floating-point type of the written weights."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing output instead of refusing."})
    weights: Literal["trained", "ema"] = field(
        default="trained",
        metadata={"help": "trained: the optimised weights (what GradSPO's official code releases). ema: the EMA "
                          "model a GradSPO run samples with (algorithm=gradspo runs only)."},
    )


# -- output staging -------------------------------------------------------------------------------


def _fsync_tree(path: Path) -> None:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        with open(file, "rb+") as handle:
            os.fsync(handle.fileno())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def check_replaceable(output: Path, folder: bool) -> None:
    """Refuse to replace ``output`` unless spotune wrote it: a safetensors file where a file goes, a
    diffusers LoRA folder or a folder with spotune's output marker where a folder goes.

    Raises:
        ExportError: naming what would be deleted.
    """
    if output.is_symlink() or not output.exists():
        return  # replacing a link deletes nothing it points to
    if not folder:
        if output.is_dir():
            names = foreign_entries(output)
            raise ExportError(
                f"output {output} is a folder, and this format writes one file: refusing to delete the folder "
                f"({describe_entries(output, names) or 'empty'}); choose another output"
            )
        if not is_safetensors_file(output):
            raise ExportError(f"output {output} is not a safetensors file, so not an earlier export: refusing to delete it")
        return
    if not output.is_dir():
        raise ExportError(f"output {output} is a file, and this format writes a folder: refusing to delete the file")
    names = foreign_entries(output, _DIFFUSERS_FOLDER_LAYOUT)
    if names:
        raise ExportError(
            f"output {output} holds files spotune did not write there; --overwrite would delete "
            f"{describe_entries(output, names)}. Move them or choose another output"
        )


def check_output(output: Path, overwrite: bool, protected: list[tuple[Path, str]], folder: bool | None = None) -> None:
    """Refuse an existing output without ``overwrite``, one that is not spotune's with it (``folder``:
    whether the output is a folder, when known), and any output that would replace a ``protected`` path
    (given as (path, how the user gives it), for the message when the path is a symbolic-link loop)."""
    resolved = resolve_user_path(output, "--output")
    for keep, key in protected:
        keep = resolve_user_path(keep, key)
        if resolved == keep or resolved in keep.parents:
            raise ExportError(f"output {output} would replace {keep}, which the export reads; choose another path")
    if (output.exists() or output.is_symlink()) and not overwrite:
        raise ExportError(f"output {output} already exists; refusing to overwrite it (pass --overwrite to replace it)")
    if folder is not None:
        check_replaceable(output, folder)


@contextlib.contextmanager
def staged_output(output: Path, overwrite: bool, folder: bool) -> Iterator[Path]:
    """Yield a temporary file or folder beside ``output``; on success it takes ``output``'s place.

    Unlike :func:`spotune.utils.io.atomic_directory` this may replace an existing output (only with
    ``overwrite``): the old one is renamed aside, the new one renamed in, then the old one deleted.
    On failure the temporary is removed and ``output`` is untouched.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(output) if folder else make_temp_file(output)
    try:
        yield tmp
        apply_umask_modes(tmp)  # readable by a webui or ComfyUI running as another user
        _fsync_tree(tmp)
        if output.exists() or output.is_symlink():
            if not overwrite:
                raise ExportError(f"output {output} appeared while exporting; refusing to overwrite it")
            check_replaceable(output, folder)  # again: it may have changed while the export ran
            old = aside_name(output)
            with signals_held():  # a Ctrl-C or SIGTERM between the renames would leave neither in place
                os.replace(output, old)
                os.replace(tmp, output)
            _remove(old)
        else:
            os.replace(tmp, output)
        with contextlib.suppress(OSError):
            fd = os.open(output.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    except BaseException as exc:
        _remove(tmp)
        full = disk_full_from(exc, output, tmp if folder else None)  # one line naming the output, not a traceback
        if full is not None:
            raise full from exc
        raise


def _save_safetensors(tensors: dict[str, torch.Tensor], file: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(file), metadata=metadata)


# -- the formats ----------------------------------------------------------------------------------


def _require_lora(source: ExportSource, fmt: str):
    if source.kind != "lora" or source.lora is None:
        raise ExportError(
            f"{source.path} is a full fine-tune (the whole UNet), not a LoRA; format '{fmt}' writes LoRAs. "
            "Use --format merged or single-file"
        )
    return source.lora


def _single_file_metadata(source: ExportSource, base: str | None, family: ModelFamily) -> dict[str, str]:
    return single_file_metadata(
        source.title, source.description, source.resolution, base, family.modelspec_checkpoint_architecture
    )


def lora_target(lora: LoraWeights, base: str | None) -> tuple[ModelFamily, dict | None, bool]:
    """The family a LoRA is exported for, the UNet config its names are read against, and whether that
    config stands in for an unknown base model (SDXL base 1.0's, for a bare SDXL LoRA file).

    With a known base model: its family and UNet config (a LoRA of the other family is refused). Without
    one (a bare LoRA file): the family the LoRA's names and shapes show, SDXL's with SDXL base 1.0's config.
    The original-layout block numbers depend only on the layers per block (input block = 1 + level * (L + 1)
    + layer, output block = up block * (L + 1) + layer), and every SDXL-family model has L = 2, so SDXL base's
    config names the modules of any of them; a module it has no block for is an error asking for --base-model.

    Raises:
        FamilyError: the LoRA and the base model are of different families, naming both.
    """
    found = lora_family(lora)[0]
    config = base_unet_config(base)
    if config is not None:
        family = family_of_unet_config(config)
        fix = f"pass --base-model with {found.title if found else 'a model of its family'} (base_model: in an export --config file)"
        check_lora_family(lora, family, f"base model {model_name(base)}", fix)
        return family, config, False
    family = found or SD15
    return family, (sdxl_base_unet_config() if family is SDXL else None), family is SDXL


def export_checkpoint(
    source: str | Path,
    format: str,
    output: str | Path,
    *,
    base_model: str | None = None,
    dtype: str = "fp16",
    overwrite: bool = False,
    weights: str = "trained",
) -> Path:
    """Export a spotune run/checkpoint (or convert a LoRA file) to ``format`` at ``output``.

    Args:
        source: a run folder (latest checkpoint), a checkpoint folder, or a LoRA file/folder.
        format: "diffusers", "webui", "merged" or "single-file".
        output: the file or folder to write (see the module docstring for which is which).
        base_model: the model to merge into; defaults to ``base_model`` in the checkpoint's state.json.
        dtype: "fp16", "bf16" or "fp32" for the written weights.
        overwrite: replace an existing ``output``; without it an existing output is an error.
        weights: "trained" or "ema" (the EMA weights of an ``algorithm=gradspo`` run).
    Returns:
        The path written.
    Raises:
        ExportError, LoraFormatError, CheckpointError, ModelLoadError: naming the path at fault.
    """
    if not str(source) or not str(output):
        raise ExportError("export needs a source (run folder, checkpoint folder or LoRA file) and an output path")
    if format not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format '{format}'; expected one of {', '.join(EXPORT_FORMATS)}")
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype '{dtype}'; expected one of {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    output = Path(output).expanduser()
    wants_file = format in ("webui", "single-file") or (format == "diffusers" and output.suffix == ".safetensors")
    if format in ("webui", "single-file") and output.suffix != ".safetensors":
        raise ExportError(f"format '{format}' writes one file: give an output name ending in .safetensors (got {output})")
    if format == "merged" and output.suffix in (".safetensors", ".ckpt"):
        raise ExportError(f"format 'merged' writes a pipeline folder, not {output.name} (use single-file for one file)")

    protected = [(Path(source).expanduser(), "SOURCE (the run, checkpoint or LoRA to export)")]
    if base_model and Path(base_model).expanduser().exists():
        protected.append((Path(base_model).expanduser(), "--base-model"))
    check_output(output, overwrite, protected, folder=not wants_file)
    remove_stale_temporaries(output.parent)  # what an export killed mid-write left beside its output
    src = read_export_source(source, weights)
    recorded_base = base_model or src.base_model
    if recorded_base and Path(recorded_base).expanduser().exists():
        check_output(output, overwrite, [(Path(recorded_base).expanduser(), "--base-model")])

    if src.kind == "lora" and src.lora is not None:
        # Refuses a base of the other family, for every format.
        family, unet_config, assumed_config = lora_target(src.lora, recorded_base)
    if format in _LORA_ONLY:
        lora = _require_lora(src, format)
        try:
            if format == "diffusers":
                named = to_diffusers_layout(lora, unet_config)
            else:
                named = to_original_layout(lora, unet_config) if family.kohya_unet_layout == "original" else lora
        except LoraFormatError as exc:
            if not assumed_config:
                raise
            raise ExportError(
                f"{exc}; without a base model its names are read against SDXL base 1.0's UNet: pass --base-model "
                "with the model it was trained on"
            ) from exc
        if format == "diffusers":
            tensors, metadata = diffusers_lora_file(named, torch_dtype)
        else:
            tensors, metadata = webui_lora_file(
                named, torch_dtype, src.title, src.description, src.resolution, recorded_base, family
            )
        with staged_output(output, overwrite, folder=not wants_file) as tmp:
            _save_safetensors(tensors, tmp if wants_file else tmp / DIFFUSERS_LORA_FILE, metadata)
        return output

    from spotune.export.merge import merged_pipeline

    pipe = merged_pipeline(src, base_model)
    if format == "merged":
        pipe.to(dtype=torch_dtype)
        with staged_output(output, overwrite, folder=True) as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
            make_folder_loadable_everywhere(tmp)
            write_output_marker(tmp, "export-merged")  # lets a later --overwrite know this folder is ours
        return output

    family = family_of(pipe)
    tensors = family.single_file_state(pipe, dtype=torch_dtype)
    with staged_output(output, overwrite, folder=False) as tmp:
        _save_safetensors(tensors, tmp, _single_file_metadata(src, recorded_base, family))
    return output
