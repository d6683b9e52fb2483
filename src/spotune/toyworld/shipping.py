"""Packaging a trained judge for the package (the step-aware preference model, or LPO's latent reward
model), with its provenance.

The miniature world ships its SPM like its base model: trained once with the project's own recipe
(``spotune train-spm``, on generic preference data written by :mod:`spotune.toyworld.preferences`),
then copied here in fp16 with a JSON record of how it was made and how accurate it is per timestep::

    python -m spotune.toyworld.shipping RUN_FOLDER DATA_FOLDER OUT_FOLDER [--overwrite]
    python -m spotune.toyworld.shipping --lrm RUN_FOLDER DATA_FOLDER OUT_FOLDER [--overwrite]
    python -m spotune.toyworld.shipping --stage CACHE/toyworld/<stage>-<key> [--overwrite]

``OUT_FOLDER/spm.safetensors`` is a checkpoint that ``judge=spm`` (with the world's CLIP as
``judge_clip_path``) loads; ``OUT_FOLDER/spm.json`` holds the run's config, its evaluation history
(pair accuracy per timestep at every evaluation) and its training-loss curve, so the demo can report
and plot them without the run folder.

With ``--lrm`` the run is a ``train-spm model=lrm`` run: ``OUT_FOLDER`` becomes a checkpoint folder that
``judge=lrm judge_checkpoint=OUT_FOLDER`` loads (``lrm.safetensors`` in fp16, and a ``state.json`` naming the
base model relative to the folder, so the package may live anywhere), with ``lrm.json`` beside the weights.

With ``--stage`` a finished stage of the demo's cache goes into ``resources/toyworld/stages``: the demo copies it
into a user's cache instead of building it whenever its settings give the same stage key (the trajectory-DPO
baseline ships this way, so the default demo trains SPO alone).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from spotune.checkpoint import CHECKPOINT_FORMAT, read_state, resolve_checkpoint
from spotune.errors import SpotuneError
from spotune.preference.spm_eval import SPM_EVAL_TIMESTEPS
from spotune.preference.step_aware import SPM_WEIGHTS_NAME, read_spm_state_dict
from spotune.toyworld.resources import (
    SHIPPED_LRM_INFO,
    SHIPPED_SPM_INFO,
    SHIPPED_SPM_WEIGHTS,
    SHIPPED_STAGES_FOLDER,
    digest_files,
    resource_dir,
)
from spotune.utils.io import atomic_save_safetensors, atomic_write_json



def accuracy_by_step(state: dict[str, Any]) -> dict[int, dict[str, float]]:
    """``{optimizer step: {timestep: accuracy}}`` from a train-spm checkpoint's ``state.json``."""
    out: dict[int, dict[str, float]] = {}
    for row in state.get("eval", []):
        total = int(row["total"])
        out.setdefault(int(row["step"]), {})[str(row["timestep"])] = int(row["correct"]) / total if total else float("nan")
    return out


def spm_run_record(run: str | Path) -> dict[str, Any]:
    """What the demo reports about a train-spm run: final and initial accuracy per timestep, history, loss curve."""
    from spotune.toyworld.report import read_scalars

    checkpoint = resolve_checkpoint(run)
    state = read_state(checkpoint)
    history = accuracy_by_step(state)
    steps = sorted(history)
    loss = read_scalars(Path(run)).get("train/loss", []) if (Path(run) / "logs").is_dir() else []
    return {
        "steps": int(state["optimizer_step"]),
        "final": history[steps[-1]] if steps else {},
        "final_step": steps[-1] if steps else None,
        "start": history[0] if 0 in history and len(steps) > 1 else None,
        "history": {str(k): v for k, v in history.items()},
        "loss": [[int(s), float(v)] for s, v in loss],
        "config": state.get("config", {}),
    }


def ship_spm(run: str | Path, data: str | Path | None, out: str | Path, overwrite: bool = False,
             base_model: str | Path | None = None, pickscore: str | Path | None = None) -> Path:
    """Copy the latest checkpoint of train-spm run ``run`` to ``out`` (fp16 weights + provenance JSON).

    Args:
        run: a train-spm run folder (its latest checkpoint is shipped).
        data: the folder written by ``python -m spotune.toyworld.preferences`` (its ``summary.json`` is
            recorded when present), or ``None``.
        out: destination folder; refuses to replace files unless ``overwrite``.
        base_model, pickscore: the base model and the PickScore the SPM extends; with both and the data's
            ``eval.parquet``, the SPM's accuracy against the rater and against the aesthetic alone
            (:func:`spotune.toyworld.properties.spm_accuracy`) is measured into the record.
    """
    out = Path(out)
    weights_file, info_file = out / SHIPPED_SPM_WEIGHTS, out / SHIPPED_SPM_INFO
    if not overwrite and (weights_file.exists() or info_file.exists()):
        raise SpotuneError(f"{out} already holds a shipped SPM; pass --overwrite to replace it")
    checkpoint = resolve_checkpoint(run)
    state = read_spm_state_dict(checkpoint / SPM_WEIGHTS_NAME)
    half = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in state.items()}
    atomic_save_safetensors(half, weights_file, metadata={"format": "pt", "spotune_kind": "step-aware-preference-model"})
    record = spm_run_record(run)
    record["trained_with"] = "spotune train-spm (spotune.recipes.train_spm), all weights, from the world's CLIP"
    if data is not None and (Path(data) / "summary.json").is_file():
        record["data"] = json.loads((Path(data) / "summary.json").read_text())
    if data is not None and base_model is not None and pickscore is not None and (Path(data) / "eval.parquet").is_file():
        import tempfile

        from spotune.toyworld.properties import spm_accuracy

        config = record.get("config", {})
        with tempfile.TemporaryDirectory() as work:
            record["accuracy_by_labels"] = spm_accuracy(
                base_model, pickscore, run, Path(data) / "eval.parquet", work,
                timesteps=tuple(config.get("eval_timesteps", SPM_EVAL_TIMESTEPS)), seed=int(config.get("seed", 0)),
                guidance_scale=float(config.get("guidance_scale", 5.0)), batch_size=int(config.get("eval_batch_size", 64)))
    atomic_write_json(info_file, record)
    return out


def ship_lrm(run: str | Path, data: str | Path | None, out: str | Path, overwrite: bool = False) -> Path:
    """Copy the latest checkpoint of train-spm ``model=lrm`` run ``run`` to the folder ``out`` (fp16 weights, a
    ``state.json`` naming its base model relative to ``out``, and ``lrm.json``: accuracy history and provenance).

    The base model the run trained from must be the one shipped beside ``out`` (or any folder: its path is
    written relative to ``out``); its digest goes into the record, so a changed base is visible.
    """
    import os

    from safetensors.torch import load_file

    from spotune.preference.lrm import LRM_WEIGHTS_NAME

    out = Path(out)
    if not overwrite and out.exists() and any(out.iterdir()):
        raise SpotuneError(f"{out} already holds files; pass --overwrite to replace the shipped LRM")
    checkpoint = resolve_checkpoint(run)
    state = read_state(checkpoint)
    if state.get("kind") != "lrm":
        raise SpotuneError(f"{checkpoint}: not a train-spm model=lrm checkpoint (kind={state.get('kind')!r})")
    config = dict(state.get("config") or {})
    builtin = str(config.get("pretrained_model") or "").startswith("builtin:")
    base = Path(config.get("pretrained_model") or "")
    if not builtin and not (base / "model_index.json").is_file():
        raise SpotuneError(f"{checkpoint}: its base model {base} is not a diffusers folder on this machine")
    out.mkdir(parents=True, exist_ok=True)
    weights = load_file(str(checkpoint / LRM_WEIGHTS_NAME))
    half = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in weights.items()}
    atomic_save_safetensors(half, out / LRM_WEIGHTS_NAME, metadata={"format": "pt", "spotune_kind": "latent-reward-model"})
    if not builtin:  # a built-in model is named as such; a folder relative to the shipped one
        config["pretrained_model"] = os.path.relpath(base.resolve(), out.resolve())
    # This machine's paths mean nothing where the package is installed: keep the data's stage names only.
    for key in ("train_data", "eval_data"):
        if config.get(key):
            config[key] = f"{Path(config[key]).parent.name}/{Path(config[key]).name}"
    config["output_dir"] = "-"
    atomic_write_json(out / "state.json", {"format": CHECKPOINT_FORMAT, "kind": "lrm",
                                           "iteration": state["optimizer_step"], "optimizer_step": state["optimizer_step"],
                                           "eval": state.get("eval", []), "config": config})
    record = spm_run_record(run)
    record["config"] = config
    record["trained_with"] = ("spotune train-spm model=lrm (spotune.recipes.train_spm): the base model's UNet (down and mid "
                              "blocks) and text encoder, trained on noised latents")
    record["base_model_digest"] = None if builtin else digest_files(base)
    if data is not None and (Path(data) / "summary.json").is_file():
        record["data"] = json.loads((Path(data) / "summary.json").read_text())
    atomic_write_json(out / SHIPPED_LRM_INFO, record)
    return out


def ship_stage(stage: str | Path, out_root: str | Path | None = None, overwrite: bool = False) -> Path:
    """Copy a finished demo stage (``CACHE/toyworld/<stage>-<key>``) into the package's prebuilt stages
    (``resources/toyworld/stages`` unless ``out_root``), where the demo takes it instead of building it when
    its settings give the same key (:mod:`spotune.toyworld.shipped_stages` says how paths travel).

    An earlier shipped folder of the same stage (another key) is replaced only with ``overwrite``.
    """
    from spotune.toyworld.shipped_stages import pack_stage
    from spotune.utils.io import atomic_directory

    stage = Path(stage)
    info_file = stage / "stage.json"
    if not info_file.is_file():
        raise SpotuneError(f"{stage}: not a finished demo stage (no stage.json); pass a folder of the demo's cache, "
                           "CACHE/toyworld/<stage>-<key>")
    info = json.loads(info_file.read_text())
    name, key = info.get("stage"), info.get("key")
    if stage.name != f"{name}-{key}":
        raise SpotuneError(f"{stage}: its stage.json names stage {name!r} with key {key!r}, not this folder's name")
    out_root = Path(out_root) if out_root is not None else resource_dir() / SHIPPED_STAGES_FOLDER
    target = out_root / stage.name
    earlier = sorted(p for p in out_root.glob(f"{name}-*") if p.is_dir()) if out_root.is_dir() else []
    if earlier and not overwrite:
        raise SpotuneError(f"{out_root} already ships stage {name} ({', '.join(p.name for p in earlier)}); pass "
                           "--overwrite to replace it")
    out_root.mkdir(parents=True, exist_ok=True)
    staging = out_root / f".{stage.name}.new"
    if staging.exists():
        shutil.rmtree(staging)
    with atomic_directory(staging) as tmp:
        pack_stage(stage, tmp, [stage.resolve(), stage.resolve().parent / f".partial-{stage.name}"])
        info["shipped"] = True
        atomic_write_json(tmp / "stage.json", info)
    for old in earlier:  # the new folder is whole before any old one goes
        shutil.rmtree(old)
    staging.rename(target)
    return target


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Ship a train-spm run's SPM (fp16) with its provenance, a train-spm "
                                     "model=lrm run's LRM (--lrm), or a finished demo stage (--stage).")
    parser.add_argument("run", nargs="?")
    parser.add_argument("data", nargs="?", help="the preference-data folder it was trained on (for the record)")
    parser.add_argument("out", nargs="?")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--stage", default=None, metavar="STAGE_FOLDER",
                        help="a finished demo stage (CACHE/toyworld/<stage>-<key>) to ship in resources/toyworld/stages")
    parser.add_argument("--lrm", action="store_true", help="the run is a train-spm model=lrm run: ship the LRM folder")
    parser.add_argument("--base-model", default=None, help="base model folder (default: the shipped resources/toyworld/base)")
    parser.add_argument("--pickscore", default=None, help="PickScore folder (default: the shipped resources/toyworld/pickscore)")
    args = parser.parse_args(argv)
    if args.stage is not None and args.run is not None:
        parser.error("--stage takes the stage folder alone (no RUN DATA OUT)")
    if args.stage is None and args.out is None:
        parser.error("RUN DATA OUT are required (or --stage STAGE_FOLDER)")
    try:
        print(_ship(args))
    except (SpotuneError, ValueError, OSError) as exc:
        print(f"shipping: {exc}", file=sys.stderr)
        return 1
    return 0


def _ship(args) -> Path:
    """What ``main``'s arguments ask for: a demo stage, an LRM folder or an SPM; returns where it went."""
    if args.stage is not None:
        return ship_stage(args.stage, overwrite=args.overwrite)
    if args.lrm:
        return ship_lrm(args.run, args.data, args.out, args.overwrite)
    base = args.base_model or resource_dir() / "base"
    pickscore = args.pickscore or resource_dir() / "pickscore"
    for what, folder, marker in (("--base-model", Path(base), "model_index.json"), ("--pickscore", Path(pickscore), "config.json")):
        if not (folder / marker).is_file():
            raise SpotuneError(f"{what} {folder} has no {marker} (expected a diffusers pipeline / CLIPModel folder)")
    return ship_spm(args.run, args.data, args.out, args.overwrite, base_model=base, pickscore=pickscore)


if __name__ == "__main__":
    sys.exit(main())
