"""``spotune demo``: the whole SPO story in the miniature world, end to end, on a CPU.

Stages, each cached under ``$SPOTUNE_CACHE/toyworld/<stage>-<key>/`` (default ``~/.cache/spotune``), where
the key hashes the stage's settings and the keys of the stages it builds on, so a changed setting
rebuilds exactly what depends on it:

1. **base**: the shipped, pre-trained base model (``spotune/resources/toyworld/base``, a diffusers folder
   in the SD1.5 architecture family; made by :mod:`spotune.toyworld.pretrain`);
2. **spm**: the step-aware preference model. By default the shipped one (``resources/toyworld/spm``, on
   the world's PickScore ``resources/toyworld/pickscore``), trained once with ``spotune train-spm``'s
   recipe on generic preference data of this base model, with its per-timestep accuracy recorded when it
   was made (:mod:`spotune.toyworld.shipping`). With ``spm=train`` the demo makes both itself, in three
   stages: **pairs**, generic preference data (pairs of base-model samples on the *training* prompts,
   labelled by a simulated rater who blends aesthetics, layout and alignment, with noise;
   :mod:`spotune.toyworld.preferences`) plus evaluation pairs on the held-out prompts; **pickscore**, the
   world's CLIP (``resources/toyworld/clip``) fine-tuned on those pairs' clean images
   (:mod:`spotune.toyworld.pickscore`), as PickScore is CLIP fine-tuned on Pick-a-Pic; and **spm**,
   ``train-spm`` from that PickScore, its per-timestep pair accuracy measured. That takes longer than the
   default demo (the data is the slow part);
4. **spo**: SPO fine-tuning (LoRA) with ``spotune train``'s recipe, judged by that SPM;
5. **trajectory**: the same recipe, data, judge and budget with ``pairing=trajectory`` (the
   Diffusion-DPO-style baseline SPO argues against), when the recipe offers it. The package ships this
   stage as the default settings build it (``resources/toyworld/stages``, :mod:`spotune.toyworld.shipped_stages`):
   a run whose key matches copies it instead of training, so the default demo trains SPO alone
   (``shipped_stages=false`` trains it here);
6. **gradspo**: the same again with ``algorithm=gradspo`` (GradSPO: EMA sampling model, loss on
   noise-prediction targets), evaluated with its trained LoRA, the one GradSPO's official code releases;
7. **evaluation**: base vs each fine-tuned model on the study's test prompts with the same seeds, and the world's measured properties
   (:mod:`spotune.toyworld.properties`).

``methods`` chooses which of stages 4-6 run (default ``[spo, trajectory]``, which keeps the demo's time);
the report shows every one that ran side by side.

The report (``report.json``, ``report.html``, ``grid.png``, ``plots/``, the trained LoRA) goes to the
output folder, which must be new or empty unless ``overwrite`` is set.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from spotune.config import ConfigError, config_to_dict
from spotune.errors import SpotuneError
from spotune.toyworld.methods import GRADSPO_KEYS, LPO_KEYS, METHODS
from spotune.toyworld.resources import SHIPPED_LRM_FOLDER, SHIPPED_STAGES_FOLDER, digest_file, digest_files, resource_dir
from spotune.utils.io import atomic_directory, atomic_write_json, atomic_write_text, remove_stale_temporaries

logger = logging.getLogger(__name__)

CACHE_ENV = "SPOTUNE_CACHE"
DEMO_FORMAT = 2  # bump when a stage's outputs change meaning, so old caches are not reused (2: three-scale aesthetic)
STUDY_REPORT = "bench/results/toyworld-study/study.md"  # the multi-seed answer, in the repository
class DemoError(SpotuneError, RuntimeError):
    """The demo cannot run as asked (an output folder in use, a missing packaged model, ...)."""


def _help(text: str, default):
    if isinstance(default, list):  # a fresh list per config
        return field(default_factory=lambda: list(default), metadata={"help": text})
    return field(default=default, metadata={"help": text})


STUDY_CHOICE = "study_choice.json"  # under resources/toyworld/configs, written by bench/study_world.py --write-choice


def study_choice(path: Path | None = None) -> dict[str, dict[str, Any]]:
    """``{method: {"learning_rate": lr, "iterations": n}}`` chosen by the multi-seed study on its validation
    split; ``{}`` when the file does not exist (the spo YAML's settings then apply to every method)."""
    path = path or resource_dir() / "configs" / STUDY_CHOICE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DemoError(f"{path}: not valid JSON ({exc}); expected {{\"chosen\": {{method: {{learning_rate, iterations}}}}}} "
                        "as bench/study_world.py writes it, or pass study_settings=false") from None
    choice = data.get("chosen", {}) if isinstance(data, dict) else None
    if not isinstance(choice, dict):
        raise DemoError(f"{path}: expected an object with a 'chosen' object of methods; pass study_settings=false to ignore it")
    for method, values in choice.items():
        if method not in METHODS or not isinstance(values, dict) or not {"learning_rate", "iterations"} <= set(values):
            raise DemoError(f"{path}: chosen.{method} must be a method of {', '.join(METHODS)} with learning_rate and iterations")
    return choice


@dataclass
class DemoConfig:
    output: str = _help("Folder for the report (report.json, report.html, grid.png, plots/, LoRA).", "spotune-demo")
    overwrite: bool = _help("Write into an output folder that already holds files (replacing the demo's own files).", False)
    cache_dir: str | None = _help(f"Stage cache; ${CACHE_ENV} or ~/.cache/spotune when unset.", None)
    base_model: str | None = _help("Base model folder; the shipped resources/toyworld/base when unset.", None)
    clip_model: str | None = _help("spm=train: the world's CLIP that the pickscore stage fine-tunes; the shipped "
                                   "resources/toyworld/clip when unset.", None)
    pickscore_model: str | None = _help("spm=shipped: the CLIPModel folder the shipped SPM extends; the shipped "
                                        "resources/toyworld/pickscore when unset.", None)
    spm_config: str | None = _help("train-spm YAML of the spm stage; the shipped toyworld_spm.yaml when unset.", None)
    spo_config: str | None = _help("train YAML of the spo and trajectory stages; the shipped toyworld_spo.yaml when unset.", None)
    spm: Literal["shipped", "train"] = _help(
        "shipped: judge with the packaged SPM (trained with train-spm when the package was made). train: make "
        "preference pairs and train the SPM in this run (much slower).", "shipped")
    spm_checkpoint: str | None = _help("spm=shipped: SPM weights to use instead of the packaged resources/toyworld/spm.", None)
    lrm_checkpoint: str | None = _help("methods with lpo: the latent reward model LPO judges with (a folder judge=lrm loads); "
                                       "the packaged resources/toyworld/lrm when unset.", None)
    shipped_stages: bool = _help(
        "Take a stage the package ships (resources/toyworld/stages: the trajectory-DPO baseline, trained by this demo's "
        "own stage at the default settings when the package was made) when this run's settings give it the same stage "
        "key, instead of training it here; false trains every method in this run.", True)
    threads: int = _help(
        "torch CPU threads; 0: the cores free when each stage starts (a thread waiting for a core that another "
        "process keeps busy slows torch many times over).", 0)
    seed: int = _help("Seed of the data, the trainings and the evaluation noise.", 0)
    # -- preference data --
    train_pairs: int = _help("spm=train: generic preference pairs on the training prompts (the shipped judge's 4,096).", 4096)
    eval_pairs: int = _help("spm=train: pairs on the held-out prompts for the SPM's accuracy.", 256)
    data_inference_steps: int = _help("DDIM steps of the base-model samples in the preference data.", 20)
    rater_aesthetic: float = _help("Rater weight of aesthetics (the exact aesthetic score: lighting, vividness, cleanliness; standardised).", 1.5)
    rater_layout: float = _help("Rater weight of layout (subject size and centring, standardised, averaged).", 1.0)
    rater_alignment: float = _help("Rater weight of alignment (1 when the image shows the caption).", 1.0)
    rater_decisiveness: float = _help("Scale of utility gaps in the rater's Bradley-Terry draw (higher: less label noise).", 3.0)
    # -- stage budgets (the YAML files hold everything else) --
    pickscore_steps: int = _help("spm=train: optimizer steps of the pickscore stage (batch 32).", 600)
    spm_steps: int | None = _help("SPM optimizer steps; the spm YAML's max_steps when unset.", None)
    spo_iterations: int | None = _help("SPO iterations; the spo YAML's max_iterations when unset.", None)
    study_settings: bool = _help(
        "Train each method at the learning rate and for the number of iterations the multi-seed study chose on its "
        "validation split (resources/toyworld/configs/study_choice.json); false: the spo YAML's. spo_iterations "
        "still overrides the iterations.", True)
    methods: list[str] = _help(
        "Fine-tuning methods to run and compare, any of spo, trajectory (the Diffusion-DPO-style baseline), "
        "gradspo (GradSPO) and lpo (LPO, judged by the shipped latent reward model), e.g. methods=[spo,lpo]; each "
        "adds one training stage of the same budget.",
        ["spo", "trajectory"])
    trajectory_baseline: bool = _help("false drops trajectory from methods (the older way to skip the baseline).", True)
    # -- evaluation --
    eval_seeds_per_prompt: int = _help("Same-seed images per test prompt and model (the study's 8: seeds 0-7 for seed=0).", 8)
    eval_inference_steps: int = _help("DDIM steps of the evaluation images (eta 0, CFG 5).", 20)
    grid_columns: int = _help("Test prompts shown in grid.png (one seed each).", 12)
    progress: bool = _help("Show progress bars.", True)

    def validate(self) -> None:
        checks = [
            (self.threads >= 0, f"threads must be >= 0 (0: the free cores), got threads={self.threads}"),
            (self.train_pairs >= 2 and self.eval_pairs >= 1, "train_pairs must be >= 2 and eval_pairs >= 1"),
            (self.eval_seeds_per_prompt >= 1, "eval_seeds_per_prompt must be >= 1"),
            (self.spm_steps is None or self.spm_steps >= 1, "spm_steps must be >= 1"),
            (self.spo_iterations is None or self.spo_iterations >= 1, "spo_iterations must be >= 1"),
            (self.grid_columns >= 1, "grid_columns must be >= 1"),
            (len(self.methods) >= 1 and all(m in METHODS for m in self.methods) and len(set(self.methods)) == len(self.methods),
             f"methods must be distinct names among {', '.join(METHODS)} (e.g. methods=[spo,gradspo]), got {self.methods}"),
            (self.trajectory_baseline or self.methods != ["trajectory"], "trajectory_baseline=false leaves no method to run"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"config: {message}")


# ================================================================================================
# the stage cache
# ================================================================================================
def cache_root(config: DemoConfig) -> Path:
    root = config.cache_dir or os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "spotune")
    return Path(os.path.expanduser(root)) / "toyworld"


def stage_key(name: str, payload: dict[str, Any]) -> str:
    text = json.dumps({"stage": name, "format": DEMO_FORMAT, **payload}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class StageRecord:
    name: str
    folder: Path
    key: str
    seconds: float  # time this run spent on it (0 when cached)
    build_seconds: float  # time the build took when it ran
    cached: bool
    shipped: bool = False  # copied from the package's prebuilt stages (resources/toyworld/stages), not built here


def stage_state(record: StageRecord) -> str:
    """How a stage came to be, for the progress output: its time here, or where it was taken from."""
    if record.shipped:
        return f"shipped with the package, built by this stage in {record.build_seconds:.0f} s when it was made"
    return "cached" if record.cached else f"{record.seconds:.0f} s"


class StageCache:
    """Finished stage folders under ``root``; a folder with ``stage.json`` is complete.

    ``shipped``: a read-only folder of stage folders built the same way when the package was made (the
    package's ``resources/toyworld/stages``). A stage whose key names one of them is copied from there
    (:mod:`spotune.toyworld.shipped_stages`) rather than built: the key hashes every setting the stage's result
    depends on, so it is the folder this build would write (the same code, data and seeds; the thread count,
    recorded in its ``stage.json``, can change the last bits of a float sum).
    """

    def __init__(self, root: Path, shipped: Path | None = None) -> None:
        self.root = root
        self.shipped = shipped
        remove_stale_temporaries(root)  # stage folders a killed demo was building (each can be a whole run)

    def shipped_folder(self, name: str, key: str) -> Path | None:
        """The package's complete folder for stage ``name`` with ``key``, or ``None``."""
        if self.shipped is None:
            return None
        folder = self.shipped / f"{name}-{key}"
        return folder if (folder / "stage.json").is_file() else None

    def is_built(self, name: str, payload: dict[str, Any]) -> bool:
        """Whether stage ``name`` with these settings is in the cache (complete) or shipped."""
        key = stage_key(name, payload)
        return (self.root / f"{name}-{key}" / "stage.json").is_file() or self.shipped_folder(name, key) is not None

    def get_or_build(self, name: str, payload: dict[str, Any], build: Callable[[Path], dict[str, Any]],
                     resumable: bool = False) -> StageRecord:
        """Reuse ``root/<name>-<key>`` if complete, else run ``build(tmp_folder)`` and rename it into place.

        ``build`` fills the temporary folder and returns a JSON-able summary, stored in ``stage.json``.
        ``resumable``: ``build`` continues what an interrupted build left in the folder (a training run's
        checkpoints), so a Ctrl-C or SIGTERM keeps the folder for the next run; otherwise it is removed.
        """
        key = stage_key(name, payload)
        folder = self.root / f"{name}-{key}"
        if (folder / "stage.json").is_file():
            logger.info("%s: cached (%s)", name, folder)
            return self._finished(name, folder, key)
        if folder.exists():  # an interrupted build left a folder without stage.json
            shutil.rmtree(folder)
        shipped = self.shipped_folder(name, key)
        if shipped is not None:  # copied into the cache with this machine's paths, as if built here
            from spotune.toyworld.shipped_stages import unpack_stage

            with atomic_directory(folder) as tmp:
                unpack_stage(shipped, tmp, folder)
            # An interrupted build of the same key is superseded: the shipped folder is what it would have become.
            shutil.rmtree(self.partial_folder(name, key), ignore_errors=True)
            return self._finished(name, folder, key)
        t0 = time.perf_counter()
        # A training stage is built under a fixed name that a Ctrl-C or SIGTERM leaves in place: its run folder
        # keeps its checkpoints there, and the next demo resumes it (resume_settings).
        with atomic_directory(folder, resumable_as=self.partial_folder(name, key) if resumable else None) as tmp:
            summary = build(tmp)
            seconds = time.perf_counter() - t0
            # The thread count is recorded, not keyed: it changes float sums' order, so the last bits of a result.
            atomic_write_json(tmp / "stage.json", {"stage": name, "key": key, "payload": payload, "seconds": seconds,
                                                   "threads": torch.get_num_threads(), "summary": summary})
        return StageRecord(name, folder, key, seconds, seconds, False)

    @staticmethod
    def _finished(name: str, folder: Path, key: str) -> StageRecord:
        """The record of a complete folder this run did not build (cached, or copied from the package)."""
        info = json.loads((folder / "stage.json").read_text())
        return StageRecord(name, folder, key, 0.0, float(info.get("seconds", 0.0)), True, bool(info.get("shipped")))

    def partial_folder(self, name: str, key: str) -> Path:
        """Where stage ``name`` with ``key`` is built; an interrupted build stays there for the next run."""
        return self.root / f".partial-{name}-{key}"

    @staticmethod
    def summary(record: StageRecord) -> dict[str, Any]:
        return json.loads((record.folder / "stage.json").read_text())["summary"]


# ================================================================================================
# the demo
# ================================================================================================
def resume_settings(run_dir: Path) -> dict[str, Any]:
    """``resume``/``overwrite`` for a training stage's run folder: continue the checkpoint an interrupted demo
    left in it, else start afresh (replacing what a run stopped before its first checkpoint left)."""
    from spotune.checkpoint import list_checkpoints

    if list_checkpoints(run_dir):
        return {"resume": "latest", "overwrite": False}
    return {"resume": None, "overwrite": True}


def _recipe_config(cls, yaml_path: Path, overrides: dict[str, Any]):
    """Load a recipe's YAML as ``--config`` reads it and apply overrides given as values (not strings)."""
    from spotune.config import config_from_dict, read_config_file

    values = read_config_file(yaml_path)
    values.update(overrides)
    return config_from_dict(cls, values, str(yaml_path), dict.fromkeys(overrides, "demo settings"))


class Demo:
    """Runs the stages of the module docstring and writes the report."""

    def __init__(self, config: DemoConfig) -> None:
        self.cfg = config
        self.out = Path(config.output)
        res = resource_dir()
        self.cache = StageCache(cache_root(config), shipped=res / SHIPPED_STAGES_FOLDER if config.shipped_stages else None)
        self.base_dir = Path(config.base_model) if config.base_model else res / "base"
        self.clip_dir = Path(config.clip_model) if config.clip_model else res / "clip"
        self.pickscore_dir = Path(config.pickscore_model) if config.pickscore_model else res / "pickscore"
        self.spm_yaml = Path(config.spm_config) if config.spm_config else res / "configs" / "toyworld_spm.yaml"
        self.spo_yaml = Path(config.spo_config) if config.spo_config else res / "configs" / "toyworld_spo.yaml"
        from spotune.toyworld.shipping import SHIPPED_SPM_WEIGHTS

        self.shipped_spm = Path(config.spm_checkpoint) if config.spm_checkpoint else res / "spm" / SHIPPED_SPM_WEIGHTS
        self.shipped_lrm = Path(config.lrm_checkpoint) if config.lrm_checkpoint else res / SHIPPED_LRM_FOLDER
        self.records: dict[str, StageRecord] = {}
        self._threads: int | None = None  # torch's CPU threads as last set (threads=0 chooses them per stage)

    # -- checks -------------------------------------------------------------------------------------
    def check(self) -> None:
        judge_backbone = ("CLIP model", self.clip_dir) if self.cfg.spm == "train" else ("PickScore model", self.pickscore_dir)
        for what, folder, marker in (("base model", self.base_dir, "model_index.json"), (*judge_backbone, "config.json")):
            if not (folder / marker).is_file():
                raise DemoError(
                    f"{what} folder {folder} has no {marker}; the package ships it under spotune/resources/toyworld "
                    "(reinstall spotune, or make it with `python -m spotune.toyworld.pretrain configs/toyworld_pretrain.yaml`)"
                )
        if self.cfg.spm == "shipped" and not self.shipped_spm.is_file():
            raise DemoError(
                f"SPM checkpoint {self.shipped_spm} does not exist; pass spm=train to train one in this run, or "
                "spm_checkpoint=FILE"
            )
        if "lpo" in self.methods() and not (self.shipped_lrm / "state.json").is_file():
            raise DemoError(
                f"LRM folder {self.shipped_lrm} holds no state.json (the shipped latent reward model LPO judges with); "
                "pass lrm_checkpoint=FOLDER (a folder `python -m spotune.toyworld.shipping --lrm` writes), or drop lpo from methods"
            )
        self._check_cache_folder()
        for yaml_file in (self.spm_yaml, self.spo_yaml):
            if not yaml_file.is_file():
                raise DemoError(f"stage config {yaml_file} does not exist")
        if self.out.exists() and not self.out.is_dir():
            raise DemoError(f"output {self.out} exists and is not a folder")
        if self.out.is_dir() and any(self.out.iterdir()) and not self.cfg.overwrite:
            raise DemoError(
                f"output folder {self.out} already holds files; choose another --output, empty it, or pass "
                "--overwrite to replace the demo's files in it"
            )

    def _check_cache_folder(self) -> None:
        """Make the stage cache folder and write a file in it, up front: a file on its path, a read-only disk
        or a folder without write permission is one line naming the folder and the key, before any stage."""
        source = "cache_dir" if self.cfg.cache_dir else (f"${CACHE_ENV}" if os.environ.get(CACHE_ENV) else "the default cache")
        probe = self.cache.root
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not probe.is_dir():
            raise DemoError(
                f"{source}: {probe} is a file, so the stage cache {self.cache.root} cannot be made there; pass "
                f"cache_dir=FOLDER (or set ${CACHE_ENV}) to a folder"
            )
        from spotune.utils.io import make_temp_file

        try:
            self.cache.root.mkdir(parents=True, exist_ok=True)
            make_temp_file(self.cache.root / "write-check").unlink()
        except OSError as exc:
            where = f" at {exc.filename}" if exc.filename and Path(exc.filename) != self.cache.root else ""
            raise DemoError(
                f"{source}: the stage cache {self.cache.root} cannot be written ({exc.strerror or exc}{where}); pass "
                f"cache_dir=FOLDER (or set ${CACHE_ENV}) to a writable folder"
            ) from None

    def _set_threads(self) -> None:
        """torch's CPU threads for what comes next: ``threads``, or the cores free now; said when it changes."""
        from spotune.utils.cpu import choose_threads

        choice = choose_threads(self.cfg.threads)
        if choice.threads != self._threads:
            print(f"spotune demo: {choice.reason}", flush=True)
            torch.set_num_threads(choice.threads)
            self._threads = choice.threads

    # -- stages -------------------------------------------------------------------------------------
    def _stage(self, name: str, payload: dict[str, Any], build: Callable[[Path], dict[str, Any]],
               resumable: bool = False) -> StageRecord:
        print(f"\n== {name} ==", flush=True)
        if self.cfg.threads == 0 and not self.cache.is_built(name, payload):
            self._set_threads()  # the machine's load may have changed since the last stage
        try:
            record = self.cache.get_or_build(name, payload, build, resumable=resumable)
        except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: the command's line names the stage
            exc.demo_stage = name
            raise
        print(f"== {name}: done ({stage_state(record)}) -> {record.folder}", flush=True)
        self.records[name] = record
        return record

    def pairs_stage(self, base_key: str) -> StageRecord:
        from spotune.toyworld.preferences import RaterWeights, write_dataset

        cfg = self.cfg
        weights = RaterWeights(cfg.rater_aesthetic, cfg.rater_layout, cfg.rater_alignment, cfg.rater_decisiveness)
        payload = {"base": base_key, "train_pairs": cfg.train_pairs, "eval_pairs": cfg.eval_pairs, "seed": cfg.seed,
                   "steps": cfg.data_inference_steps, "rater": dataclasses.asdict(weights)}

        def build(folder: Path) -> dict[str, Any]:
            bar = _progress(cfg.progress, 2 * (cfg.train_pairs + cfg.eval_pairs), "base-model samples")
            try:
                return write_dataset(folder, self.base_dir, cfg.train_pairs, cfg.eval_pairs, cfg.seed, weights,
                                     cfg.data_inference_steps, progress=bar.update)
            finally:
                bar.close()

        return self._stage("pairs", payload, build)

    def pickscore_stage(self, clip_key: str, pairs: StageRecord) -> StageRecord:
        from spotune.toyworld.pickscore import PickScoreTraining, train_pickscore

        cfg = self.cfg
        settings = PickScoreTraining(steps=cfg.pickscore_steps, seed=cfg.seed)
        payload = {"clip": clip_key, "pairs": pairs.key, "settings": dataclasses.asdict(settings)}

        def build(folder: Path) -> dict[str, Any]:
            record = train_pickscore(self.clip_dir, pairs.folder, folder / "model", settings)
            return {k: v for k, v in record.items() if k != "loss"}

        return self._stage("pickscore", payload, build)

    def spm_stage(self, base_key: str, pickscore: StageRecord, pairs: StageRecord) -> StageRecord:
        from spotune.recipes.train_spm import TrainSPMConfig, run_train_spm

        cfg = self.cfg
        overrides: dict[str, Any] = {
            "pretrained_model": str(self.base_dir), "clip_path": str(pickscore.folder / "model"), "processor_path": None,
            "train_data": str(pairs.folder / "train.parquet"), "eval_data": str(pairs.folder / "eval.parquet"),
            "seed": cfg.seed, "progress": cfg.progress,
        }
        if cfg.spm_steps is not None:
            overrides["max_steps"] = cfg.spm_steps
        template = _recipe_config(TrainSPMConfig, self.spm_yaml, {**overrides, "output_dir": "-"})
        payload = {"base": base_key, "pickscore": pickscore.key, "pairs": pairs.key,
                   "config": {k: v for k, v in config_to_dict(template).items() if k not in ("output_dir", "pretrained_model", "clip_path", "train_data", "eval_data", "progress", "preempt_grace_s")}}

        def build(folder: Path) -> dict[str, Any]:
            from spotune.toyworld.properties import spm_accuracy

            config = dataclasses.replace(template, output_dir=str(folder / "run"), **resume_settings(folder / "run"))
            config.validate()
            metrics = run_train_spm(config)
            summary: dict[str, Any] = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            summary["accuracy_by_labels"] = spm_accuracy(
                self.base_dir, pickscore.folder / "model", folder / "run", pairs.folder / "eval.parquet", folder,
                timesteps=tuple(template.eval_timesteps), seed=cfg.seed, guidance_scale=template.guidance_scale,
                batch_size=template.eval_batch_size)
            return summary

        return self._stage("spm", payload, build, resumable=True)

    def spo_stage(self, name: str, base_key: str, judge_clip: Path, judge_key: str, spm_path: Path, spm_key: str,
                  method: str, extra: dict[str, Any] | None = None) -> StageRecord:
        """Fine-tune with ``spotune train``'s recipe: ``method`` is a key of :data:`METHODS`.

        ``extra`` holds more train settings as values (the study's learning rate and checkpoints); they
        enter the stage key through the config like every other setting, and the demo passes none.
        """
        from spotune.recipes.trainers import run_train_spo
        from spotune.recipes.train_spo_config import TrainSPOConfig
        from spotune.toyworld.world import prompt_split

        cfg = self.cfg
        overrides: dict[str, Any] = {
            "pretrained_model": str(self.base_dir), "prompts": "-",
            "judge": "spm", "judge_clip_path": str(judge_clip), "judge_checkpoint": str(spm_path),
            "seed": cfg.seed, "progress": cfg.progress,
        }
        overrides.update(METHODS[method][1])
        if overrides["judge"] == "lrm":  # LPO judges latents with the world's latent reward model, not the SPM
            judge_key = spm_key = digest_files(self.shipped_lrm)
            overrides.update(judge_clip_path=None, judge_checkpoint=str(self.shipped_lrm))
        if cfg.spo_iterations is not None:
            overrides["max_iterations"] = cfg.spo_iterations
        overrides.update(extra or {})
        template = _recipe_config(TrainSPOConfig, self.spo_yaml, {**overrides, "output_dir": "-"})
        # Keys that change no result (paths, progress, preemption, what is recorded for the eye) stay out of the key.
        skipped = ("output_dir", "pretrained_model", "prompts", "judge_clip_path", "judge_checkpoint", "progress", "preempt_grace_s",
                   "tree_every", "tree_prompt")
        if method != "gradspo":  # "algorithm" stays in LPO's key (the others' is the default, spo)
            skipped += tuple(k for k in GRADSPO_KEYS if method != "lpo" or k != "algorithm")
        if method != "lpo":
            skipped += LPO_KEYS
        payload = {"base": base_key, "judge_clip": judge_key, "spm": spm_key, "train_prompts": [p.caption for p in prompt_split()[0]],
                   "config": {k: v for k, v in config_to_dict(template).items() if k not in skipped}}

        def build(folder: Path) -> dict[str, Any]:
            prompts = folder / "train_prompts.txt"
            atomic_write_text(prompts, "".join(p.caption + "\n" for p in prompt_split()[0]))
            config = dataclasses.replace(template, output_dir=str(folder / "run"), prompts=str(prompts),
                                         **resume_settings(folder / "run"))
            config.validate()
            metrics = run_train_spo(config)
            return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}

        return self._stage(name, payload, build, resumable=True)

    # -- the whole chain ------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from spotune.toyworld import report as report_mod

        t_start = time.perf_counter()
        self.check()
        self._set_threads()
        _quiet_libraries()
        base_key = digest_files(self.base_dir)
        print(f"spotune demo: base model {self.base_dir}, cache {self.cache.root}", flush=True)

        from spotune.toyworld.shipping import SHIPPED_SPM_INFO, spm_run_record

        pairs_summary: dict[str, Any] | None = None
        if self.cfg.spm == "train":
            pairs = self.pairs_stage(base_key)
            pickscore = self.pickscore_stage(digest_files(self.clip_dir), pairs)
            spm = self.spm_stage(base_key, pickscore, pairs)
            judge_clip, judge_key = pickscore.folder / "model", pickscore.key
            spm_path, spm_key = spm.folder / "run", spm.key
            spm_record = spm_run_record(spm_path)
            spm_record["source"] = "trained in this run (spm=train)"
            spm_record["accuracy_by_labels"] = StageCache.summary(spm).get("accuracy_by_labels")
            pairs_summary = StageCache.summary(pairs)
            pickscore_record = StageCache.summary(pickscore)
        else:
            judge_clip, judge_key, spm_path, spm_key = self.shipped_judge()
            info = self.shipped_spm.with_name(SHIPPED_SPM_INFO)
            spm_record = json.loads(info.read_text()) if info.is_file() else {"final": {}, "start": None, "loss": []}
            spm_record["source"] = f"shipped ({self.shipped_spm}), accuracy measured when it was trained"
            pairs_summary = spm_record.get("data")
            ps_info = self.pickscore_dir / "pickscore.json"
            pickscore_record = json.loads(ps_info.read_text()) if ps_info.is_file() else {}
            print(f"\n== spm: the shipped step-aware preference model ({self.shipped_spm})", flush=True)
        runs: dict[str, StageRecord] = {}  # report name -> stage, in the order of METHODS
        for method in self.methods():
            if method == "trajectory" and not trajectory_pairing_available():
                print("\n== trajectory: skipped (this version of the SPO recipe has no pairing=trajectory) ==")
                continue
            runs[METHODS[method][0]] = self.spo_stage(method, base_key, judge_clip, judge_key, spm_path, spm_key, method,
                                                      extra=self.study_extra(method))

        print("\n== evaluation ==", flush=True)
        if self.cfg.threads == 0:
            self._set_threads()
        t0 = time.perf_counter()
        results = self.evaluate(judge_clip, spm_path, runs)
        eval_seconds = time.perf_counter() - t0
        print(f"== evaluation: done ({eval_seconds:.0f} s)", flush=True)

        stages = {name: {"seconds": r.seconds, "build_seconds": r.build_seconds, "cached": r.cached, "shipped": r.shipped,
                         "folder": str(r.folder)}
                  for name, r in self.records.items()}
        stages["evaluation"] = {"seconds": eval_seconds, "build_seconds": eval_seconds, "cached": False, "folder": None}
        report = report_mod.build_report(
            results, stages=stages,
            pairs_summary=pairs_summary or {},
            spm_record=spm_record,
            pickscore_record={k: v for k, v in pickscore_record.items() if k != "loss"},
            settings=config_to_dict(self.cfg),
            seconds_total=time.perf_counter() - t_start,
            world={"x0_prediction": self.x0_properties, "spm_accuracy_by_labels": spm_record.get("accuracy_by_labels"),
                   "study_settings": {name: self.study_extra(m) for m, (name, _) in METHODS.items() if m in self.methods()},
                   "multi_seed_study": STUDY_REPORT},
        )
        self.out.mkdir(parents=True, exist_ok=True)
        report_mod.write_figures(self.out, report, results,
                                 spo_runs={name: record.folder / "run" for name, record in runs.items()},
                                 grid_columns=self.cfg.grid_columns)
        report_mod.set_total_time(report, time.perf_counter() - t_start)
        report_mod.write_html(self.out, report)
        atomic_write_json(self.out / "report.json", report)
        print("\n" + report_mod.format_table(report), flush=True)
        print(f"\nreport: {self.out / 'report.html'}  ({report['seconds_total']:.0f} s in all)", flush=True)
        return report

    def shipped_judge(self) -> tuple[Path, str, Path, str]:
        """spm=shipped's judge: (PickScore folder, its key, SPM weights, their key), as the training stages key them."""
        return self.pickscore_dir, digest_files(self.pickscore_dir), self.shipped_spm, digest_file(self.shipped_spm)

    def study_extra(self, method: str) -> dict[str, Any]:
        """The study's chosen learning rate and iterations for ``method`` (``{}`` when not asked or not chosen)."""
        chosen = study_choice().get(method) if self.cfg.study_settings else None
        if not chosen:
            return {}
        extra: dict[str, Any] = {"learning_rate": float(chosen["learning_rate"])}
        if self.cfg.spo_iterations is None:
            extra["max_iterations"] = int(chosen["iterations"])
        return extra

    def methods(self) -> list[str]:
        """The methods to run, in the order of :data:`METHODS` (so the report's columns do not depend on typing order)."""
        chosen = set(self.cfg.methods) - (set() if self.cfg.trajectory_baseline else {"trajectory"})
        return [m for m in METHODS if m in chosen]

    def evaluate(self, judge_clip: Path, spm_path: Path, runs: dict[str, StageRecord]):
        """Base and every fine-tuned model (its trained LoRA) on the study's test prompts, same seeds; and the
        world's properties (x0-prediction aesthetics of the base) on the same captions and seeds."""
        from spotune.models import load_pipeline
        from spotune.preference.factory import build_judge
        from spotune.toyworld.evaluate import EvaluationSet, evaluate_model, unet_with_lora
        from spotune.toyworld.properties import X0Recorder

        cfg = self.cfg
        captions, seeds = self.evaluation_captions()
        evalset = EvaluationSet(captions, seeds, num_inference_steps=cfg.eval_inference_steps)
        pipe = load_pipeline(str(self.base_dir))
        judge = build_judge("spm", clip_path=str(judge_clip), checkpoint=str(spm_path))
        models = [("base", pipe.unet)] + [(name, unet_with_lora(pipe.unet, record.folder / "run")) for name, record in runs.items()]
        # The base's evaluation renders the very trajectories the world's x0-prediction properties read (same
        # captions, seeds and batches): they are recorded on the way instead of rendered a second time.
        recorder = X0Recorder(pipe.scheduler, pipe.vae, cfg.eval_inference_steps, chunk_size=evalset.batch_size)
        results = []
        for name, unet in models:
            result = evaluate_model(name, unet, pipe, judge, evalset, on_x0_prediction=recorder if name == "base" else None)
            print(f"   {name}: {len(captions)} images in {result.seconds:.0f} s", flush=True)
            results.append(result)
        t0 = time.perf_counter()
        self.x0_properties = recorder.summary(results[0].images, captions)
        self.x0_properties["seconds"] = time.perf_counter() - t0
        return results


    def evaluation_captions(self) -> tuple[list[str], list[int]]:
        """The test split's captions, each with seeds ``seed * 1000 + 0 .. eval_seeds_per_prompt - 1``."""
        from spotune.toyworld.world import prompt_splits

        cfg = self.cfg
        test = prompt_splits().test
        captions = [p.caption for p in test for _ in range(cfg.eval_seeds_per_prompt)]
        seeds = [cfg.seed * 1000 + s for _ in test for s in range(cfg.eval_seeds_per_prompt)]
        return captions, seeds


def _quiet_libraries() -> None:
    """Keep the terminal to the demo's own progress: no per-component loading bars or library chatter."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    logging.getLogger("tensorboard").setLevel(logging.WARNING)


def trajectory_pairing_available() -> bool:
    from spotune.recipes.train_spo_config import TrainSPOConfig

    return "pairing" in {f.name for f in dataclasses.fields(TrainSPOConfig)}


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(enabled: bool, total: int, desc: str):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True)


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Run the demo (see the module docstring); returns the report written to ``report.json``."""
    return Demo(config).run()
