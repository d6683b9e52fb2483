"""Image generation for evaluation: fixed per-image seeds, webui-style PNG parameters, resumable folders.

``run_generate(GenerateConfig(...))`` writes one folder per model (see :mod:`spotune.generation.layout`);
two models generated into the same output folder share prompts and starting noise image by image.
"""

from spotune.generation.config import GenerateConfig
from spotune.generation.runner import GenerateError, GenerationResult, ModelSpec, run_generate
from spotune.generation.seeds import derive_seed, initial_latents

__all__ = [
    "GenerateConfig",
    "GenerateError",
    "GenerationResult",
    "ModelSpec",
    "derive_seed",
    "initial_latents",
    "run_generate",
]
