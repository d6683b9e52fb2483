"""Model loading: SD1.5 and SDXL pipelines from folders, single files, hub ids or tiny built-ins."""

from spotune.models.loading import BUILTIN_TINY_SD15, BUILTIN_TINY_SDXL, ModelLoadError, load_pipeline

__all__ = ["BUILTIN_TINY_SD15", "BUILTIN_TINY_SDXL", "ModelLoadError", "load_pipeline"]
