"""Settings of ``spotune eval``: one flat dataclass, read from YAML and ``key=value`` overrides."""

from __future__ import annotations

from dataclasses import dataclass, field

from spotune.config import ConfigError

PAPER_SCORERS = ["pickscore", "hpsv2", "imagereward", "aesthetic"]

# Scorer argument -> config key, per scorer.
SCORER_PATH_KEYS: dict[str, dict[str, str]] = {
    "pickscore": {"model_path": "pickscore_model", "processor_path": "pickscore_processor"},
    "hpsv2": {"checkpoint_path": "hps_checkpoint", "tokenizer_path": "hps_tokenizer"},
    "hpsv21": {"checkpoint_path": "hps21_checkpoint", "tokenizer_path": "hps_tokenizer"},
    "aesthetic": {"head_path": "aesthetic_head", "clip_path": "aesthetic_clip"},
    "clipscore": {"model_path": "clipscore_model"},
    "imagereward": {
        "checkpoint_path": "imagereward_checkpoint",
        "med_config_path": "imagereward_med_config",
        "tokenizer_path": "imagereward_tokenizer",
    },
    "spm": {"clip_path": "spm_clip", "checkpoint_path": "spm_checkpoint", "processor_path": "spm_processor"},
}


@dataclass
class EvalConfig:
    """Score image folders (or generate them first) and write tables, plots and an HTML report."""

    images: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Image folders: `spotune generate` output (one model per sub-folder), single model folders, "
            "or folders of PNGs with webui 'parameters' chunks."
        },
    )
    generate_config: str = field(
        default="",
        metadata={"help": "A `spotune generate` YAML to run first (resumable); its output_dir is evaluated too."},
    )
    scorers: list[str] = field(
        default_factory=lambda: list(PAPER_SCORERS),
        metadata={
            "help": "Scorers: pickscore, hpsv2, hpsv21, imagereward, aesthetic, clipscore, spm (default: the "
            "paper's four)."
        },
    )
    pickscore_model: str = field(default="", metadata={"help": "PickScore_v1 model folder."})
    pickscore_processor: str = field(
        default="", metadata={"help": "PickScore's processor folder (CLIP-ViT-H-14-laion2B-s32B-b79K)."}
    )
    hps_checkpoint: str = field(default="", metadata={"help": "HPS_v2_compressed.pt (for hpsv2)."})
    hps21_checkpoint: str = field(default="", metadata={"help": "HPS_v2.1_compressed.pt (for hpsv21)."})
    hps_tokenizer: str = field(
        default="", metadata={"help": "CLIP BPE tokenizer folder for HPS (default: pickscore_processor)."}
    )
    aesthetic_head: str = field(default="", metadata={"help": "sac+logos+ava1-l14-linearMSE.pth."})
    aesthetic_clip: str = field(default="", metadata={"help": "CLIP ViT-L/14 model folder (clip-vit-large-patch14)."})
    clipscore_model: str = field(default="", metadata={"help": "CLIP model folder for clipscore."})
    imagereward_checkpoint: str = field(default="", metadata={"help": "ImageReward.pt."})
    imagereward_med_config: str = field(default="", metadata={"help": "ImageReward's med_config.json."})
    imagereward_tokenizer: str = field(default="", metadata={"help": "bert-base-uncased tokenizer folder."})
    spm_clip: str = field(default="", metadata={"help": "CLIP folder the SPM extends (default: pickscore_model)."})
    spm_checkpoint: str = field(default="", metadata={"help": "SPM checkpoint: file, or train-spm run/checkpoint folder."})
    spm_processor: str = field(default="", metadata={"help": "SPM processor folder (default: pickscore_processor)."})
    output_dir: str = field(default="", metadata={"help": "Folder for the report (scores.csv, report.html, plots/)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing output_dir."})
    baseline: str = field(
        default="",
        metadata={"help": "Model the others' win rates are measured against (default: every pair of models)."},
    )
    batch_size: int = field(default=16, metadata={"help": "Images per scorer forward pass."})
    device: str = field(default="auto", metadata={"help": "Where scorers run (auto: cuda when present)."})
    dtype: str = field(default="float32", metadata={"help": "Scorer precision: float32, float16 or bfloat16."})
    report_images: int = field(default=12, metadata={"help": "Rows of the side-by-side image grid in the HTML report."})
    title: str = field(default="spotune evaluation", metadata={"help": "Title of the report."})

    def validate(self) -> None:
        from spotune.eval.scorers import SCORER_NAMES

        if not self.output_dir:
            raise ConfigError("eval: 'output_dir' is required")
        if not self.images and not self.generate_config:
            raise ConfigError("eval: give image folders in 'images', or a 'generate_config' to generate them first")
        if not self.scorers:
            raise ConfigError("eval: 'scorers' is empty; name at least one")
        unknown = [s for s in self.scorers if s not in SCORER_NAMES]
        if unknown:
            raise ConfigError(f"eval: unknown scorer(s) {unknown}; available: {', '.join(SCORER_NAMES)}")
        if len(set(self.scorers)) != len(self.scorers):
            raise ConfigError(f"eval: a scorer is listed twice in {self.scorers}")
        if self.batch_size < 1:
            raise ConfigError(f"eval: 'batch_size' must be at least 1, got {self.batch_size}")
        if self.report_images < 0:
            raise ConfigError(f"eval: 'report_images' must be non-negative, got {self.report_images}")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ConfigError(f"eval: 'dtype' must be float32, float16 or bfloat16, got {self.dtype!r}")

    def scorer_kwargs(self, name: str) -> dict[str, str]:
        """Keyword arguments of ``get_scorer(name, ...)`` taken from this config (defaults filled in)."""
        defaults = {
            "hps_tokenizer": self.pickscore_processor,
            "spm_clip": self.pickscore_model,
            "spm_processor": self.pickscore_processor,
        }
        kwargs = {}
        for param, key in SCORER_PATH_KEYS[name].items():
            value = getattr(self, key) or defaults.get(key, "")
            if value:
                kwargs[param] = value
        return kwargs
