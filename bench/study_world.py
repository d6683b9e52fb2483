"""The miniature world's multi-seed study: SPO, the trajectory baseline and GradSPO under one protocol.

    python bench/study_world.py --output runs/study            # the full study (about an hour on 2 CPU cores)
    python bench/study_world.py --estimate                     # its estimated run time, without running it
    python bench/study_world.py --help                         # every setting (the grid, budget, seeds, ...)

The protocol (splits, grid, budget, selection rule, seeds, measures) is written down in
``src/spotune/resources/toyworld/README.md``; the defaults below are that protocol. In short: every
method trains once per learning rate of the grid (training seed ``--selection-seed``) for the same
budget with checkpoints along the way; each checkpoint is evaluated on the *validation* captions and
the (learning rate, iterations) with the highest aesthetic win rate over the base is chosen (ties: fewer
iterations, then the smaller learning rate); then every method trains with each of ``--seeds`` at its
chosen learning rate and is evaluated on the *test* captions, with the same evaluation seeds for every
model. The trainings are the demo's own stages (:class:`spotune.toyworld.demo.Demo`, its stage cache,
base model, shipped SPM and ``toyworld_spo.yaml``), so a rerun reuses every finished training.

It writes ``study.json`` (everything), ``study.md`` (the tables), ``plots/`` (win rate against
iterations and against the guided UNet evaluations of sampling) and ``study_choice.json`` (each
method's chosen learning rate and iterations: copy it to ``src/spotune/resources/toyworld/configs/``,
where ``spotune demo`` reads it) into ``--output``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spotune.toyworld.metrics import AESTHETIC_COMPONENTS

# The demo's stage times measured on 2 CPU cores (docs/demo-and-world.md, "Measured"): 30 iterations of the shipped
# toyworld_spo.yaml per method, and the evaluation of 3 models x 192 images in 55 s. The run-time
# estimate scales these; it is an estimate, not a measurement of the study.
MEASURED_SECONDS_PER_ITERATION = {"spo": 186.0 / 30, "trajectory": 223.0 / 30, "gradspo": 262.0 / 30,
                                  "lpo": 34.0 / 10}  # LPO: the demo's lpo stage, 10 iterations (SPO took 133 s beside it)
MEASURED_SECONDS_PER_EVAL_IMAGE = 55.0 / (3 * 192)
STUDY_FORMAT = 2  # 2: the three-scale aesthetic (lighting, vividness, cleanliness)


class StudyError(Exception):
    """The study cannot run as asked (one line for the user)."""


# ================================================================================================
# settings
# ================================================================================================
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="study_world.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="runs/toyworld-study", help="folder for study.json, study.md and plots/ (new or empty unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="write into an output folder that already holds files")
    p.add_argument("--cache-dir", default=None, help="the demo's stage cache (default: $SPOTUNE_CACHE or ~/.cache/spotune)")
    p.add_argument("--methods", nargs="+", default=["spo", "trajectory", "gradspo"], help="methods among the demo's METHODS")
    p.add_argument("--learning-rates", nargs="+", type=float, default=[3e-5, 1e-4, 3e-4], help="the learning-rate grid")
    p.add_argument("--iterations", type=int, default=30, help="the iteration budget of every training")
    p.add_argument("--checkpoint-every", type=int, default=10, help="candidate numbers of iterations: multiples of this up to the budget")
    p.add_argument("--selection-seed", type=int, default=0, help="training seed of the grid runs")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds of the final runs")
    p.add_argument("--eval-seeds-per-prompt", type=int, default=8, help="evaluation seeds 0..N-1 of every prompt, the same for every model")
    p.add_argument("--eval-inference-steps", type=int, default=20, help="DDIM steps of the evaluation images (eta 0, CFG 5)")
    p.add_argument("--prompts-per-split", type=int, default=0, help="use only the first N validation and test prompts (0: all; for a quick check)")
    p.add_argument("--spo-config", default=None, help="train YAML of the trainings (default: the shipped toyworld_spo.yaml)")
    p.add_argument("--base-model", default=None, help="base model folder that SPO trains and the evaluation renders "
                   "(default: the shipped resources/toyworld/base; a candidate world's base model)")
    p.add_argument("--pickscore-model", default=None, help="the CLIPModel folder the SPM extends "
                   "(default: the shipped resources/toyworld/pickscore)")
    p.add_argument("--spm-checkpoint", default=None, help="the judge's SPM weights, trained on the same base model "
                   "(default: the shipped resources/toyworld/spm/spm.safetensors)")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples of every interval")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--progress", action="store_true", help="show the trainings' progress bars")
    p.add_argument("--estimate", action="store_true", help="print the estimated run time of these settings and stop")
    args = p.parse_args(argv)
    _validate(args)
    return args


def _validate(args: argparse.Namespace) -> None:
    from spotune.toyworld.demo import METHODS

    unknown = [m for m in args.methods if m not in METHODS]
    checks = [
        (not unknown and len(set(args.methods)) == len(args.methods), f"--methods: distinct names among {', '.join(METHODS)}, got {args.methods}"),
        (all(lr > 0 for lr in args.learning_rates), f"--learning-rates: positive numbers, got {args.learning_rates}"),
        (args.iterations >= 1, f"--iterations: at least 1, got {args.iterations}"),
        (1 <= args.checkpoint_every <= args.iterations, f"--checkpoint-every: between 1 and --iterations ({args.iterations}), got {args.checkpoint_every}"),
        (args.iterations % args.checkpoint_every == 0, f"--iterations ({args.iterations}) must be a multiple of --checkpoint-every ({args.checkpoint_every})"),
        (len(set(args.seeds)) == len(args.seeds) and len(args.seeds) >= 1, f"--seeds: distinct training seeds, got {args.seeds}"),
        (args.eval_seeds_per_prompt >= 1, f"--eval-seeds-per-prompt: at least 1, got {args.eval_seeds_per_prompt}"),
        (args.prompts_per_split >= 0, f"--prompts-per-split: 0 (all) or more, got {args.prompts_per_split}"),
        (args.resamples >= 100, f"--resamples: at least 100, got {args.resamples}"),
        (args.threads >= 1, f"--threads: at least 1, got {args.threads}"),
    ]
    for ok, message in checks:
        if not ok:
            raise StudyError(message)
    _validate_model_paths(args)


def _validate_model_paths(args: argparse.Namespace) -> None:
    """Each model flag names something of the right kind, checked here so that the message names the
    study's flag (the demo behind it would name its own key, e.g. ``spm_checkpoint=FILE``)."""
    expected = [  # (flag, value, is it a folder, a file it must hold or the file itself, what it is)
        ("--base-model", args.base_model, True, "model_index.json", "a diffusers base-model folder"),
        ("--pickscore-model", args.pickscore_model, True, "config.json", "a CLIPModel folder"),
        ("--spm-checkpoint", args.spm_checkpoint, False, None, "the SPM's .safetensors file"),
        ("--spo-config", args.spo_config, False, None, "a train YAML file"),
    ]
    for flag, value, folder, inside, what in expected:
        if value is None:
            continue
        path = Path(value)
        if folder and not (path / inside).is_file():
            raise StudyError(f"{flag} {path}: expected {what} (with {inside}); pass {flag} FOLDER, or leave it out for the shipped one")
        if not folder and not path.is_file():
            raise StudyError(f"{flag} {path}: no such file; expected {what}; pass {flag} FILE, or leave it out for the shipped one")
    _check_world_models(args)


# Config keys that say how a model was made or stored, not its architecture: a candidate world's model may
# differ there (its own VAE latent scale, fp32 instead of the shipped fp16, other initialisation settings).
_NOT_ARCHITECTURE = frozenset({
    "_diffusers_version", "_name_or_path", "dtype", "torch_dtype", "transformers_version", "scaling_factor",
    "shift_factor", "latents_mean", "latents_std", "force_upcast", "initializer_factor", "initializer_range",
    "logit_scale_init_value", "attention_dropout", "dropout",
})


def _read_config(file: Path, flag: str, path: Path) -> dict[str, Any]:
    try:
        value = json.loads(file.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as exc:
        raise StudyError(f"{flag} {path}: {file} is not readable JSON ({type(exc).__name__}); pass {flag} with a "
                         "model of the world's architecture, or leave it out for the shipped one") from None
    if not isinstance(value, dict):
        raise StudyError(f"{flag} {path}: {file} is not a JSON object; pass {flag} with a model of the world's "
                         "architecture, or leave it out for the shipped one")
    return value


def _differences(found: Any, shipped: Any, prefix: str = "") -> list[str]:
    """``key: value here, value in the world's`` for each architecture key of two configs that differs."""
    if not (isinstance(found, dict) and isinstance(shipped, dict)):
        return [] if found == shipped else [f"{prefix.rstrip('.')}: {found!r} here, {shipped!r} in the world's"]
    out: list[str] = []
    for k in sorted(set(found) | set(shipped)):
        if k not in _NOT_ARCHITECTURE:
            out += _differences(found.get(k), shipped.get(k), f"{prefix}{k}.")
    return out


def _refuse_differences(flag: str, path: Path, what: str, differences: list[str]) -> None:
    if differences:
        shown = "; ".join(differences[:3]) + (f"; and {len(differences) - 3} more" if len(differences) > 3 else "")
        raise StudyError(f"{flag} {path}: {what} is not of the miniature world's architecture ({shown}); pass "
                         f"{flag} with a model of the world's architecture, or leave it out for the shipped one")


def _check_world_models(args: argparse.Namespace) -> None:
    """Each model the study is given is of the world's family and architecture, as its shipped counterpart:
    the base an SD1.5-family pipeline whose UNet, VAE and text encoder match the shipped base's configs, the
    PickScore model a CLIPModel of the shipped one's config, the SPM checkpoint the shipped SPM's tensors."""
    from spotune.errors import SpotuneError
    from spotune.models.family import SD15
    from spotune.models.loading import folder_family
    from spotune.toyworld.demo import resource_dir
    from spotune.toyworld.shipping import SHIPPED_SPM_WEIGHTS

    shipped = resource_dir()
    if args.base_model is not None:
        path = Path(args.base_model)
        try:
            family = folder_family(path)
        except SpotuneError as exc:
            raise StudyError(f"--base-model {path}: {exc}") from None
        if family is not SD15:
            raise StudyError(f"--base-model {path}: {family.title}, but the miniature world's base is {SD15.title} "
                             "of the shipped base's architecture; pass --base-model with a world base model, or leave "
                             "it out for the shipped one")
        for component in ("unet", "vae", "text_encoder"):
            file = path / component / "config.json"
            if not file.is_file():
                raise StudyError(f"--base-model {path}: no {component}/config.json; expected a diffusers pipeline "
                                 "folder of the world's architecture, or leave it out for the shipped one")
            world = _read_config(shipped / "base" / component / "config.json", "--base-model", path)
            _refuse_differences("--base-model", path, f"its {component}",
                                _differences(_read_config(file, "--base-model", path), world))
    if args.pickscore_model is not None:
        path = Path(args.pickscore_model)
        world = _read_config(shipped / "pickscore" / "config.json", "--pickscore-model", path)
        _refuse_differences("--pickscore-model", path, "its CLIPModel",
                            _differences(_read_config(path / "config.json", "--pickscore-model", path), world))
    if args.spm_checkpoint is not None:
        from spotune.preference.step_aware import read_spm_state_dict

        path = Path(args.spm_checkpoint)
        try:
            found = {k: tuple(v.shape) for k, v in read_spm_state_dict(path).items()}
        except SpotuneError as exc:
            raise StudyError(f"--spm-checkpoint {path}: {exc}") from None
        world = {k: tuple(v.shape) for k, v in read_spm_state_dict(shipped / "spm" / SHIPPED_SPM_WEIGHTS).items()}
        missing, extra = sorted(set(world) - set(found)), sorted(set(found) - set(world))
        differences = [f"{len(missing)} of the world's tensors missing, e.g. {missing[0]}"] if missing else []
        differences += [f"{len(extra)} tensors the world's has not, e.g. {extra[0]}"] if extra else []
        differences += [f"{k}: shape {list(found[k])} here, {list(world[k])} in the world's"
                        for k in sorted(set(found) & set(world)) if found[k] != world[k]]
        _refuse_differences("--spm-checkpoint", path, "its step-aware preference model", differences)


def checkpoint_iterations(args: argparse.Namespace) -> list[int]:
    """The candidate numbers of iterations: every multiple of --checkpoint-every up to the budget."""
    return list(range(args.checkpoint_every, args.iterations + 1, args.checkpoint_every))


def planned_work(args: argparse.Namespace, validation_prompts: int, test_prompts: int) -> dict[str, int]:
    """What these settings train and render: trainings built, training iterations, evaluation images."""
    grid_runs = len(args.learning_rates)
    final_runs = len(args.seeds) - (1 if args.selection_seed in args.seeds else 0)  # the selection run is reused
    checkpoints = len(checkpoint_iterations(args))
    images = args.eval_seeds_per_prompt * (
        validation_prompts * (1 + len(args.methods) * grid_runs * checkpoints)
        + test_prompts * (1 + len(args.methods) * len(args.seeds) * checkpoints))
    trainings = len(args.methods) * (grid_runs + final_runs)
    return {"trainings": trainings, "training_iterations": trainings * args.iterations, "eval_images": images}


def estimate_seconds(args: argparse.Namespace, validation_prompts: int, test_prompts: int) -> dict[str, float]:
    """Run time of :func:`planned_work` with the shipped toyworld_spo.yaml, scaled from the demo's measured
    stage times (the constants above); a shrunken YAML runs far faster than this."""
    runs_per_method = planned_work(args, validation_prompts, test_prompts)["trainings"] // len(args.methods)
    train = sum(MEASURED_SECONDS_PER_ITERATION[m] * args.iterations * runs_per_method for m in args.methods)
    images = planned_work(args, validation_prompts, test_prompts)["eval_images"]
    evaluate = images * MEASURED_SECONDS_PER_EVAL_IMAGE * args.eval_inference_steps / 20
    return {"training": train, "evaluation": evaluate, "total": train + evaluate}


# ================================================================================================
# trainings (the demo's stages)
# ================================================================================================
@dataclass
class Training:
    method: str
    learning_rate: float
    seed: int
    run: Path  # the run folder (checkpoints/iter-XXXXXXXX inside)
    seconds: float  # how long the stage took to build (also when this run found it in the cache)
    cached: bool
    unet_evaluations_per_iteration: int
    judged_candidates_per_iteration: int
    seconds_per_iteration: float  # mean seconds of sampling + training per iteration, from the run's metrics.jsonl


class Trainer:
    """Trains through :meth:`spotune.toyworld.demo.Demo.spo_stage`, one Demo per training seed."""

    def __init__(self, args: argparse.Namespace) -> None:
        from spotune.toyworld.demo import Demo, DemoConfig, digest_file, digest_files

        self.args = args
        self._demos: dict[int, Any] = {}
        # The Demo only trains here (its output folder is never written), so its output check is moot.
        self._make = lambda seed: Demo(DemoConfig(
            output=str(Path(args.output) / "unused"), overwrite=True, cache_dir=args.cache_dir, spo_config=args.spo_config,
            threads=args.threads, seed=seed, progress=args.progress, methods=list(args.methods),
            base_model=args.base_model, pickscore_model=args.pickscore_model, spm_checkpoint=args.spm_checkpoint))
        probe = self.demo(args.selection_seed)
        probe.check()
        self.base_dir, self.pickscore_dir, self.spm_path = probe.base_dir, probe.pickscore_dir, probe.shipped_spm
        self.base_key = digest_files(probe.base_dir)
        self.judge_key = digest_files(probe.pickscore_dir)
        self.spm_key = digest_file(probe.shipped_spm)
        self.lrm_path = probe.shipped_lrm  # LPO's judge (the demo's stage reads it itself)
        self.trainings: list[Training] = []

    def demo(self, seed: int):
        if seed not in self._demos:
            self._demos[seed] = self._make(seed)
        return self._demos[seed]

    def train(self, method: str, learning_rate: float, seed: int) -> Training:
        from spotune.diffusion.sampler import judged_candidates, sampling_unet_evaluations
        from spotune.recipes.run_log import read_metrics

        extra = {"learning_rate": learning_rate, "max_iterations": self.args.iterations,
                 "checkpoint_every": self.args.checkpoint_every, "keep_checkpoints": None}
        record = self.demo(seed).spo_stage(f"{method}-lr{learning_rate:g}-seed{seed}", self.base_key, self.pickscore_dir,
                                           self.judge_key, self.spm_path, self.spm_key, method, extra=extra)
        config = json.loads((record.folder / "stage.json").read_text())["payload"]["config"]
        sampler = "trajectory" if config.get("pairing", "step") == "trajectory" else "step"
        sampler = "lpo" if config.get("algorithm") == "lpo" else sampler
        shape = (int(config["sample_batch_size"]), int(config["num_inference_steps"]), int(config["divert_start_step"]),
                 int(config["num_samples_per_step"]))
        records = [r for r in read_metrics(record.folder / "run") if "seconds_sampling" in r]
        seconds = (sum(r["seconds_sampling"] + r.get("seconds_training", 0.0) for r in records) / len(records)
                   if records else math.nan)
        training = Training(method, learning_rate, seed, record.folder / "run", record.build_seconds, record.cached,
                            sampling_unet_evaluations(sampler, *shape), judged_candidates(sampler, *shape), seconds)
        self.trainings.append(training)
        return training


def checkpoint_at(run: Path, iteration: int) -> Path:
    """The run's checkpoint folder of exactly ``iteration`` (checkpoint_every makes one at every multiple)."""
    from spotune.checkpoint import list_checkpoints, read_state

    for folder in list_checkpoints(run):
        if int(read_state(folder)["iteration"]) == iteration:
            return folder
    raise StudyError(f"{run} has no checkpoint of iteration {iteration}; its stage folder is incomplete, remove it to retrain")


# ================================================================================================
# evaluation
# ================================================================================================
class Evaluator:
    """Base and checkpoints on one caption split, the same evaluation seeds for every model."""

    def __init__(self, trainer: Trainer, args: argparse.Namespace, splits) -> None:
        from spotune.models import load_pipeline
        from spotune.preference.factory import build_judge

        self.args = args
        self.pipe = load_pipeline(str(trainer.base_dir))
        self.judge = build_judge("spm", clip_path=str(trainer.pickscore_dir), checkpoint=str(trainer.spm_path))
        limit = args.prompts_per_split or None
        self.prompts = {"validation": splits.validation[:limit], "test": splits.test[:limit]}
        self._base: dict[str, Any] = {}
        self.seconds = 0.0
        self.images = 0

    def evalset(self, split: str):
        from spotune.toyworld.evaluate import EvaluationSet

        n = self.args.eval_seeds_per_prompt
        prompts = self.prompts[split]
        return EvaluationSet([p.caption for p in prompts for _ in range(n)], [s for _ in prompts for s in range(n)],
                             num_inference_steps=self.args.eval_inference_steps)

    def _run(self, name: str, unet, split: str):
        from spotune.toyworld.evaluate import evaluate_model

        result = evaluate_model(name, unet, self.pipe, self.judge, self.evalset(split))
        self.seconds += result.seconds
        self.images += len(result.judge_scores)
        return result

    def base(self, split: str):
        if split not in self._base:
            self._base[split] = self._run("base", self.pipe.unet, split)
        return self._base[split]

    def checkpoint(self, folder: Path, split: str) -> dict[str, list[float]]:
        """Per-image measurements of a checkpoint against the base (lists of the split's B images)."""
        from spotune.toyworld.evaluate import position_change, unet_with_lora, win_outcomes

        base = self.base(split)
        model = self._run(folder.name, unet_with_lora(self.pipe.unet, folder), split)
        return {
            "win": win_outcomes(model.scores.aesthetic, base.scores.aesthetic).tolist(),
            "preference_win": win_outcomes(model.judge_scores.astype(float), base.judge_scores.astype(float)).tolist(),
            "aesthetic_delta": (model.scores.aesthetic - base.scores.aesthetic).tolist(),
            **{f"{name}_delta": (getattr(model.scores, name) - getattr(base.scores, name)).tolist()
               for name in AESTHETIC_COMPONENTS},
            "aligned": model.scores.aligned.tolist(),
            "size_drift": abs(model.scores.object_fraction - base.scores.object_fraction).tolist(),
            "position_drift": position_change(model.scores, base.scores).tolist(),  # NaN: no subject in one image
        }


# ================================================================================================
# the study
# ================================================================================================
def interval(rows: list[list[float]], args: argparse.Namespace, missing: bool = False) -> dict[str, Any]:
    from spotune.eval.stats import two_level_bootstrap

    return two_level_bootstrap(rows, resamples=args.resamples, missing=missing).to_dict()


def select(grid: list[dict[str, Any]]) -> dict[str, Any]:
    """The protocol's rule (the world's README): the highest validation win rate; ties to fewer iterations, then the smaller learning rate."""
    return sorted(grid, key=lambda g: (-round(g["win_rate"], 12), g["iterations"], g["learning_rate"]))[0]


def run_study(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from spotune.toyworld.demo import METHODS, _quiet_libraries, digest_files
    from spotune.toyworld.world import prompt_splits
    from spotune.utils.io import atomic_write_json, atomic_write_text

    t_start = time.perf_counter()
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise StudyError(f"--output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise StudyError(f"--output {out} already holds files; choose another --output, empty it, or pass --overwrite")
    torch.set_num_threads(args.threads)
    _quiet_libraries()
    splits = prompt_splits()
    trainer = Trainer(args)
    evaluator = Evaluator(trainer, args, splits)
    iterations = checkpoint_iterations(args)
    seconds: dict[str, float] = {"training": 0.0}

    def train(method: str, lr: float, seed: int) -> Training:
        t0 = time.perf_counter()
        training = trainer.train(method, lr, seed)
        seconds["training"] += time.perf_counter() - t0
        return training

    # -- 1. the grid, judged on validation ------------------------------------------------------
    selection: dict[str, Any] = {}
    for method in args.methods:
        grid = []
        for lr in args.learning_rates:
            training = train(method, lr, args.selection_seed)
            for it in iterations:
                measured = evaluator.checkpoint(checkpoint_at(training.run, it), "validation")
                rate = interval([measured["win"]], args)
                grid.append({"learning_rate": lr, "iterations": it, "win_rate": rate["mean"],
                             "win_rate_ci": [rate["ci_low"], rate["ci_high"]]})
                print(f"   validation {method} lr {lr:g} iteration {it}: win rate {100 * rate['mean']:.1f}%", flush=True)
        chosen = select(grid)
        selection[method] = {"grid": grid, "chosen": {"learning_rate": chosen["learning_rate"], "iterations": chosen["iterations"],
                                                     "validation_win_rate": chosen["win_rate"]}}
        print(f"== {method}: chose lr {chosen['learning_rate']:g}, {chosen['iterations']} iterations", flush=True)

    # -- 2. the seeds at the chosen settings, reported on test ------------------------------------
    methods: dict[str, Any] = {}
    curves: dict[str, Any] = {}
    for method in args.methods:
        chosen = selection[method]["chosen"]
        per_seed: dict[int, dict[int, dict[str, list[float]]]] = {}
        per_iteration_cost = judged = 0
        seconds_per_iteration = []
        for seed in args.seeds:
            training = train(method, chosen["learning_rate"], seed)
            per_iteration_cost, judged = training.unet_evaluations_per_iteration, training.judged_candidates_per_iteration
            seconds_per_iteration.append(training.seconds_per_iteration)
            per_seed[seed] = {it: evaluator.checkpoint(checkpoint_at(training.run, it), "test") for it in iterations}
        at = {seed: per_seed[seed][chosen["iterations"]] for seed in args.seeds}
        rows = lambda key, table=at: [table[s][key] for s in args.seeds]  # noqa: E731  [seeds][images]
        base_test = evaluator.base("test")
        methods[method] = {
            "name": METHODS[method][0],
            "learning_rate": chosen["learning_rate"],
            "iterations": chosen["iterations"],
            "seeds": list(args.seeds),
            "win_rate": interval(rows("win"), args),
            "preference_win_rate": interval(rows("preference_win"), args),
            "aesthetic_delta": interval(rows("aesthetic_delta"), args),
            **{f"{name}_delta": interval(rows(f"{name}_delta"), args) for name in AESTHETIC_COMPONENTS},
            "alignment": interval(rows("aligned"), args),
            "alignment_base": float(base_test.scores.aligned.mean()),
            "layout_drift_size": interval(rows("size_drift"), args),
            "layout_drift_position_px": interval(rows("position_drift"), args, missing=True),
            "unet_evaluations_per_iteration": per_iteration_cost,
            "judged_candidates_per_iteration": judged,
            # Measured in this run: the mean over the final seeds' iterations (sampling + training), on this machine.
            "seconds_per_iteration": sum(seconds_per_iteration) / len(seconds_per_iteration),
        }
        curve = {"iterations": iterations, "unet_evaluations": [it * per_iteration_cost for it in iterations],
                 "win_rate": [], "ci_low": [], "ci_high": []}
        for it in iterations:
            rate = interval([per_seed[s][it]["win"] for s in args.seeds], args)
            curve["win_rate"].append(rate["mean"])
            curve["ci_low"].append(rate["ci_low"])
            curve["ci_high"].append(rate["ci_high"])
        curves[method] = curve
        w = methods[method]["win_rate"]
        print(f"== {method} on test: win rate {100 * w['mean']:.1f}% [{100 * w['ci_low']:.1f}%, {100 * w['ci_high']:.1f}%]", flush=True)

    seconds["evaluation"] = evaluator.seconds
    seconds["total"] = time.perf_counter() - t_start
    n_val, n_test = len(evaluator.prompts["validation"]), len(evaluator.prompts["test"])
    report = {
        "format": STUDY_FORMAT,
        "settings": {k: v for k, v in vars(args).items() if k not in ("estimate",)},
        "protocol": "src/spotune/resources/toyworld/README.md, 'The study's protocol'",
        # Which world was studied: the shipped one unless --base-model / --pickscore-model / --spm-checkpoint.
        "models": {"base_model": str(trainer.base_dir), "base_digest": trainer.base_key,
                   "pickscore_model": str(trainer.pickscore_dir), "pickscore_digest": trainer.judge_key,
                   "spm_checkpoint": str(trainer.spm_path), "spm_digest": trainer.spm_key,
                   **({"lrm_checkpoint": str(trainer.lrm_path), "lrm_digest": digest_files(trainer.lrm_path)}
                      if "lpo" in args.methods else {})},
        "splits": {"train_prompts": len(splits.train),
                   "validation": [p.caption for p in evaluator.prompts["validation"]],
                   "test": [p.caption for p in evaluator.prompts["test"]],
                   "eval_seeds": list(range(args.eval_seeds_per_prompt))},
        "checkpoint_iterations": iterations,
        "selection": selection,
        "methods": methods,
        "curves": curves,
        "base": {split: {"aesthetic": float(r.scores.aesthetic.mean()),
                         **{name: float(getattr(r.scores, name).mean()) for name in AESTHETIC_COMPONENTS}, "alignment": float(r.scores.aligned.mean()),
                         "subject_size": float(r.scores.object_fraction.mean())} for split, r in evaluator._base.items()},
        "trainings": [{"method": t.method, "learning_rate": t.learning_rate, "seed": t.seed, "stage": str(t.run.parent),
                       "build_seconds": t.seconds, "cached": t.cached} for t in trainer.trainings],
        "seconds": seconds,
        "evaluated_images": evaluator.images,
        "planned": planned_work(args, n_val, n_test),
        "trainings_built": sum(not t.cached for t in trainer.trainings),
        "estimated_seconds": estimate_seconds(args, n_val, n_test),
        "estimate_basis": "the demo's measured stage times on 2 CPU cores (SPO 186 s, trajectory 223 s, GradSPO 262 s "
                          "per 30 iterations, LPO 34 s per 10; 55 s per 576 evaluation images), scaled to these settings with "
                          "the shipped toyworld_spo.yaml",
        "interval": f"95% percentile bootstrap, {args.resamples} resamples, training seeds and images resampled as "
                    "crossed factors (spotune.eval.stats.two_level_bootstrap)",
    }
    out.mkdir(parents=True, exist_ok=True)
    write_plots(out / "plots", report)
    atomic_write_json(out / "study.json", report)
    atomic_write_text(out / "study.md", markdown(report))
    atomic_write_json(out / "study_choice.json", study_choice(report))
    print(f"\nstudy: {out / 'study.md'} ({seconds['total']:.0f} s)", flush=True)
    return report


# ================================================================================================
# the report
# ================================================================================================
def study_choice(report: dict[str, Any]) -> dict[str, Any]:
    """What ``spotune demo`` reads (``resources/toyworld/configs/study_choice.json``): each method's chosen
    learning rate and iterations, with where they came from."""
    return {
        "source": "bench/study_world.py, selection on the validation split (training seed "
                  f"{report['settings']['selection_seed']}); the full report is bench/results/toyworld-study/study.md",
        "chosen": {method: {"learning_rate": sel["chosen"]["learning_rate"], "iterations": sel["chosen"]["iterations"]}
                   for method, sel in report["selection"].items()},
    }


def _pct(d: dict[str, Any]) -> str:
    return f"{100 * d['mean']:.1f}% [{100 * d['ci_low']:.1f}%, {100 * d['ci_high']:.1f}%]"


def _num(d: dict[str, Any], digits: int = 4) -> str:
    if any(isinstance(d[k], float) and math.isnan(d[k]) for k in ("mean", "ci_low", "ci_high")):
        return "-"
    return f"{d['mean']:.{digits}f} [{d['ci_low']:.{digits}f}, {d['ci_high']:.{digits}f}]"


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        "# The miniature world's multi-seed study",
        "",
        f"Protocol: {report['protocol']}. Test split: {len(report['splits']['test'])} prompts x "
        f"{len(report['splits']['eval_seeds'])} evaluation seeds; training seeds {s['seeds']}; intervals: {report['interval']}.",
        "",
        f"World: base model {report['models']['base_model']}, judge {report['models']['spm_checkpoint']} on "
        f"{report['models']['pickscore_model']}" + (f"; LPO's latent reward model {report['models']['lrm_checkpoint']}"
                                                    if "lrm_checkpoint" in report["models"] else "") + ".",
        "",
        "| method | lr | iterations | aesthetic win rate vs base | aesthetic delta | alignment (base "
        f"{100 * next(iter(report['methods'].values()))['alignment_base']:.1f}%) | size drift | position drift (px) | "
        "sampling UNet evaluations / iteration |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for m in report["methods"].values():
        lines.append(f"| {m['name']} | {m['learning_rate']:g} | {m['iterations']} | {_pct(m['win_rate'])} | "
                     f"{_num(m['aesthetic_delta'])} | {_pct(m['alignment'])} | {_num(m['layout_drift_size'])} | "
                     f"{_num(m['layout_drift_position_px'], 2)} | {m['unet_evaluations_per_iteration']} |")
    lines += ["", "## Cost of one iteration (chosen settings, the final seeds' runs)", "",
              "| method | sampling UNet evaluations | candidates judged | how they are judged | seconds (sampling + training) |",
              "| --- | ---: | ---: | --- | ---: |"]
    for key, m in report["methods"].items():
        how = {"lpo": "as noisy latents by the LRM", "trajectory": "final images, decoded, by the SPM"}.get(
            key, "x0-predictions, decoded, by the SPM")
        seconds = m.get("seconds_per_iteration", math.nan)
        lines.append(f"| {m['name']} | {m['unet_evaluations_per_iteration']} | {m.get('judged_candidates_per_iteration', '-')} | "
                     f"{how} | {'-' if math.isnan(seconds) else f'{seconds:.2f}'} |")
    lines += ["", "## Aesthetic delta by component (test, chosen settings)", "",
              "| method | " + " | ".join(AESTHETIC_COMPONENTS) + " |", "| --- |" + " ---: |" * len(AESTHETIC_COMPONENTS)]
    for m in report["methods"].values():
        lines.append(f"| {m['name']} | " + " | ".join(_num(m[f"{name}_delta"]) for name in AESTHETIC_COMPONENTS) + " |")
    lines += ["", "## Selection on the validation split (training seed "
              f"{s['selection_seed']}): aesthetic win rate vs base", "",
              "| method | lr | " + " | ".join(f"{it} it." for it in report["checkpoint_iterations"]) + " |",
              "| --- | ---: |" + " ---: |" * len(report["checkpoint_iterations"])]
    for method, sel in report["selection"].items():
        for lr in s["learning_rates"]:
            cells = [f"{100 * g['win_rate']:.1f}%" for g in sel["grid"] if g["learning_rate"] == lr]
            mark = " (chosen)" if lr == sel["chosen"]["learning_rate"] else ""
            lines.append(f"| {report['methods'][method]['name']}{mark} | {lr:g} | " + " | ".join(cells) + " |")
    lines += ["", "## Test win rate along training (chosen learning rate, every seed)", "",
              "| method | " + " | ".join(f"{it} it." for it in report["checkpoint_iterations"]) + " |",
              "| --- |" + " ---: |" * len(report["checkpoint_iterations"])]
    for method, c in report["curves"].items():
        lines.append(f"| {report['methods'][method]['name']} | " + " | ".join(f"{100 * w:.1f}%" for w in c["win_rate"]) + " |")
    sec, est = report["seconds"], report["estimated_seconds"]
    lines += ["", f"Run time of this run: {sec['total']:.0f} s (training {sec['training']:.0f} s, evaluation "
              f"{sec['evaluation']:.0f} s). Estimate for these settings from {report['estimate_basis']}: "
              f"{est['total']:.0f} s.", "", "![win rate against iterations](plots/win_rate.png)", ""]
    return "\n".join(lines)


def write_plots(folder: Path, report: dict[str, Any]) -> None:
    """plots/win_rate.png: test win rate (with its interval) against iterations and against sampling UNet evaluations."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from spotune.utils.io import atomic_path

    folder.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for method, c in report["curves"].items():
        label = report["methods"][method]["name"]
        for ax, xs in zip(axes, (c["iterations"], c["unet_evaluations"])):
            (line,) = ax.plot(xs, c["win_rate"], marker="o", label=label)
            ax.fill_between(xs, c["ci_low"], c["ci_high"], alpha=0.15, color=line.get_color())
    for ax, xlabel in zip(axes, ("iterations", "guided UNet evaluations of sampling")):
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("aesthetic win rate vs base (test)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    with atomic_path(folder / "win_rate.png") as tmp:
        tmp.write_bytes(buffer.getvalue())


# ================================================================================================
def main(argv: list[str] | None = None) -> int:
    from spotune.errors import SpotuneError
    from spotune.toyworld.world import prompt_splits

    try:
        args = parse_args(argv)
        if args.estimate:
            splits = prompt_splits()
            n = args.prompts_per_split or None
            est = estimate_seconds(args, len(splits.validation[:n]), len(splits.test[:n]))
            print(f"estimated run time: {est['total']:.0f} s ({est['total'] / 60:.0f} min: training {est['training']:.0f} s, "
                  f"evaluation {est['evaluation']:.0f} s), scaled from the demo's measured stage times on 2 CPU cores")
            return 0
        run_study(args)
    except (StudyError, SpotuneError) as exc:
        print(f"study_world.py: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
