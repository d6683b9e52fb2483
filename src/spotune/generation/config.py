"""Settings of ``spotune generate``: one flat dataclass, read from YAML and ``key=value`` overrides."""

from __future__ import annotations

from dataclasses import dataclass, field

from spotune.config import ConfigError


@dataclass
class GenerateConfig:
    """Generate images of one model (base + LoRAs) on fixed per-image seeds; defaults follow the SPO paper."""

    model: str = field(
        default="",
        metadata={
            "help": "Base model (SD1.5 or SDXL): a diffusers folder, a single-file checkpoint, a hub id, or "
            "builtin:tiny-sd15 / builtin:tiny-sdxl."
        },
    )
    model_family: str = field(
        default="auto",
        metadata={"help": "Model family: auto (read from the model), or sd15 / sdxl to refuse a model of the other family."},
    )
    vae: str = field(
        default="",
        metadata={
            "help": "A local diffusers VAE folder replacing the model's (SDXL: madebyollin/sdxl-vae-fp16-fix, which "
            "runs in fp16; without it the SDXL VAE runs in fp32). Empty: the model's own."
        },
    )
    loras: list[str] = field(
        default_factory=list,
        metadata={
            "help": "LoRAs to add: diffusers or webui/kohya .safetensors files, or spotune run/checkpoint folders; "
            "each may end in :SCALE (e.g. runs/spo:0.8)."
        },
    )
    lora_scale: float = field(default=1.0, metadata={"help": "Scale of every LoRA given without its own :SCALE."})
    name: str = field(
        default="",
        metadata={
            "help": "Label of this model: its sub-folder of output_dir and its name in reports. Default: 'base' "
            "without LoRAs, else the first LoRA's name."
        },
    )
    compare_base: bool = field(
        default=False,
        metadata={"help": "With LoRAs: also generate the base model alone, as 'base', on the same seeds."},
    )
    prompts: list[str] = field(default_factory=list, metadata={"help": "Prompts given inline (instead of prompt_file)."})
    prompt_file: str = field(
        default="",
        metadata={
            "help": "Prompt file (.txt, .json, .jsonl, .csv, .tsv, .parquet; PartiPrompts' TSV works as is), or a "
            "folder in the HPS v2 benchmark layout (one <style>.json list per style)."
        },
    )
    prompt_column: str = field(default="", metadata={"help": "Column or field holding the prompt (guessed when empty)."})
    category_column: str = field(
        default="",
        metadata={"help": "Column holding a category for per-category plots (default: Category, category or style)."},
    )
    max_prompts: int = field(default=0, metadata={"help": "Use only the first N prompts (0: all)."})
    images_per_prompt: int = field(default=1, metadata={"help": "Images per prompt, each with its own seed."})
    seed: int = field(
        default=0,
        metadata={"help": "Base seed; each image's seed is derived from (seed, prompt index, image index)."},
    )
    steps: int = field(default=20, metadata={"help": "DDIM steps (the SPO paper evaluates with 20)."})
    guidance_scale: float = field(default=5.0, metadata={"help": "Classifier-free guidance scale (paper: 5.0)."})
    eta: float = field(default=0.0, metadata={"help": "DDIM eta: 0 is deterministic; 1 adds fresh noise each step."})
    width: int = field(default=0, metadata={"help": "Image width in pixels (0: the model's native size, SD1.5 512, SDXL 1024)."})
    height: int = field(default=0, metadata={"help": "Image height in pixels (0: the model's own size)."})
    negative_prompt: str = field(default="", metadata={"help": "Negative prompt for every image."})
    batch_size: int = field(default=4, metadata={"help": "Images per forward pass."})
    output_dir: str = field(default="", metadata={"help": "Folder of the output; each model gets a sub-folder."})
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "Replace a model's earlier images when its settings changed (otherwise that is refused; with "
            "unchanged settings existing images are kept and only missing ones are made)."
        },
    )
    grid: bool = field(
        default=True, metadata={"help": "Write output_dir/grid.png: rows = models, columns = seeds."}
    )
    grid_columns: int = field(default=8, metadata={"help": "Images per row of the grid."})
    device: str = field(default="auto", metadata={"help": "cuda, cpu, ... (auto: cuda when present)."})
    dtype: str = field(
        default="auto", metadata={"help": "float32, float16 or bfloat16 (auto: float16 on GPU, float32 on CPU)."}
    )

    def validate(self) -> None:
        """Refuse settings that cannot produce images, naming the key."""
        if not self.model:
            raise ConfigError("generate: 'model' is required (a diffusers folder, a .safetensors file, a hub id, or builtin:tiny-sd15)")
        if not self.output_dir:
            raise ConfigError("generate: 'output_dir' is required")
        if bool(self.prompts) == bool(self.prompt_file):
            raise ConfigError("generate: give exactly one of 'prompts' (inline) and 'prompt_file'")
        for key in ("images_per_prompt", "steps", "batch_size", "grid_columns"):
            if getattr(self, key) < 1:
                raise ConfigError(f"generate: '{key}' must be at least 1, got {getattr(self, key)}")
        if self.max_prompts < 0:
            raise ConfigError(f"generate: 'max_prompts' must be 0 (all) or positive, got {self.max_prompts}")
        if not 0.0 <= self.eta <= 1.0:
            raise ConfigError(f"generate: 'eta' must lie in [0, 1], got {self.eta}")
        if self.guidance_scale < 0:
            raise ConfigError(f"generate: 'guidance_scale' must be non-negative, got {self.guidance_scale}")
        for key in ("width", "height"):
            value = getattr(self, key)
            if value < 0 or value % 8:
                raise ConfigError(f"generate: '{key}' must be 0 (model default) or a positive multiple of 8, got {value}")
        if self.model_family not in ("auto", "sd15", "sdxl"):
            raise ConfigError(f"generate: 'model_family' must be auto, sd15 or sdxl, got {self.model_family!r}")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ConfigError(f"generate: 'dtype' must be auto, float32, float16 or bfloat16, got {self.dtype!r}")
        if self.compare_base and not self.loras:
            raise ConfigError("generate: 'compare_base' needs at least one LoRA (the base alone is what you generate)")
