"""Files out: a trained run as a diffusers LoRA, a kohya/webui LoRA, a merged pipeline, or a single file.

Also the way back in: :func:`load_lora_file` reads any of those LoRA formats (or a run folder) and
:func:`apply_lora` puts the result on a diffusers UNet, checking that it fits.
"""

from spotune.export.api import DTYPES, EXPORT_FORMATS, ExportConfig, export_checkpoint
from spotune.export.apply import apply_lora, fuse_lora_weights, resolve_modules
from spotune.export.lora_files import LoraFormatError, LoraWeights, load_lora_file
from spotune.export.source import ExportError

__all__ = [
    "DTYPES",
    "EXPORT_FORMATS",
    "ExportConfig",
    "ExportError",
    "LoraFormatError",
    "LoraWeights",
    "apply_lora",
    "export_checkpoint",
    "fuse_lora_weights",
    "load_lora_file",
    "resolve_modules",
]
