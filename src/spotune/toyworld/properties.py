"""Measured properties of the miniature world: does its aesthetic show early, and does the judge see it?

SPO's premise is that a step-aware judge can tell, from the x0-prediction of a noisy step, which of
two candidates is heading for the better image. That needs an aesthetic that shows in early
x0-predictions, and a judge that reads it there. Two measurements say whether the world offers both:

* :func:`x0_prediction_aesthetics`: the exact aesthetic (and each component) of the decoded
  x0-predictions of the base model at t = 951, 701, 501 and 251 of its DDIM trajectories, and their
  Pearson correlation with the aesthetic of the final image of the same trajectory;
* :func:`spm_accuracy`: the step-aware preference model's pair accuracy at t in {0, 251, 501, 701, 951}
  on held-out pairs, twice: against the rater's underlying preference (the labels of ``eval.parquet``)
  and against the exact aesthetic alone (the more aesthetic image preferred; equal scores are ties,
  left out), both with ``spotune eval-spm``'s measurement;
* :func:`spm_view_readings`: what the SPM's views still show at those timesteps, read with the world's
  exact metrics: for each attribute (subject size, centring, each aesthetic component), how often the
  two views of a pair are ordered as the pair's images are, and how often the rater's utility computed
  from the views picks the rater's choice. A judge can read cues the exact metrics miss on a blurred
  view, so this is not a strict bound, but where the views order an attribute at chance, the
  information for it is gone from what the SPM is given.

The demo records all three in its report; the shipped SPM's ``spm.json`` records the last two.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spotune.diffusion.sampler import decode_latents
from spotune.preference.spm_eval import SPM_EVAL_TIMESTEPS
from spotune.toyworld.metrics import AESTHETIC_COMPONENTS, ImageScores, score_images
from spotune.toyworld.preferences import RaterWeights, Standardisation, centring, utilities
from spotune.toyworld.render import to_tensor, to_uint8
from spotune.toyworld.sampling import generate_with_pipeline
from spotune.utils.io import atomic_path

X0_TIMESTEPS = (951, 701, 501, 251)
SPM_ACCURACY_TARGET = 0.65  # at every t <= 701
AESTHETIC_TIE = 1e-6  # aesthetic scores this close are a tie in the aesthetic-only labels
_MEASURES = ("aesthetic", *AESTHETIC_COMPONENTS)
# What the view readings compare, and how each is read from ImageScores (higher = more of it).
VIEW_MEASURES = {
    "subject_size": lambda s: s.object_fraction,
    "centring": centring,
    "lighting": lambda s: s.lighting,
    "vividness": lambda s: s.vividness,
    "cleanliness": lambda s: s.cleanliness,
    "aesthetic": lambda s: s.aesthetic,
}


def _pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson correlation, or ``None`` (JSON null) when either side is constant."""
    if len(a) < 2 or float(np.std(a)) == 0.0 or float(np.std(b)) == 0.0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


class X0Recorder:
    """Keeps the decoded x0-predictions of chosen timesteps while a deterministic DDIM sampler runs.

    Pass it as ``on_x0_prediction`` to the sampler that renders the base model's images (the demo's evaluation
    of the base does), then :meth:`summary` with those final images: the properties then cost a decode per
    timestep kept, not a second generation.

    Args:
        scheduler: the sampler's DDIM scheduler (its steps decide which timesteps exist).
        vae: decodes the kept x0-predictions (in chunks of ``chunk_size``).
        timesteps: the timesteps to measure at; the sampler's nearest step stands in for one it lacks.
    """

    def __init__(self, scheduler, vae, num_inference_steps: int, timesteps: tuple[int, ...] = X0_TIMESTEPS,
                 chunk_size: int = 96) -> None:
        scheduler.set_timesteps(num_inference_steps)
        available = [int(t) for t in scheduler.timesteps]
        # 20-step DDIM on SD1.5's schedule has every wanted step (951, 901, ..., 1); fewer steps measure the nearest.
        self.timesteps = tuple(dict.fromkeys(min(available, key=lambda s: abs(s - t)) for t in timesteps))
        self.num_inference_steps = num_inference_steps
        self.vae, self.chunk_size = vae, chunk_size
        self.images: dict[int, list[np.ndarray]] = {t: [] for t in self.timesteps}

    @torch.no_grad()
    def __call__(self, t: int, x0: torch.Tensor) -> None:
        """The sampler's hook: ``x0`` [b, C, h, w] latents predicted at timestep ``t``."""
        if t in self.images:
            self.images[t].append(to_uint8(decode_latents(self.vae, x0, chunk_size=self.chunk_size).float().cpu()))

    def summary(self, finals: np.ndarray, captions: list[str]) -> dict[str, Any]:
        """The properties, given the [B, H, W, 3] uint8 final images of the same trajectories, in order.

        Returns:
            ``{"final": {measure: mean}, "by_timestep": {t: {"mean": {measure: mean}, "corr_with_final":
            {measure: r}}}, "images": B}`` with measures ``aesthetic`` and its three components; the
            correlation pairs each x0-prediction with the final image of its own trajectory.
        """
        final_scores = score_images(finals, captions)
        out: dict[str, Any] = {"images": len(captions), "num_inference_steps": self.num_inference_steps,
                               "final": {m: float(getattr(final_scores, m).mean()) for m in _MEASURES}, "by_timestep": {}}
        for t in self.timesteps:
            scores: ImageScores = score_images(np.concatenate(self.images[t]), captions)
            out["by_timestep"][str(t)] = {
                "mean": {m: float(getattr(scores, m).mean()) for m in _MEASURES},
                "corr_with_final": {m: _pearson(getattr(scores, m), getattr(final_scores, m)) for m in _MEASURES},
            }
        return out


def x0_prediction_aesthetics(
    pipe,
    captions: list[str],
    seeds: list[int],
    timesteps: tuple[int, ...] = X0_TIMESTEPS,
    num_inference_steps: int = 20,
    guidance_scale: float = 5.0,
    batch_size: int = 96,
) -> dict[str, Any]:
    """The aesthetic of x0-predictions along the base model's deterministic DDIM trajectories.

    Renders the trajectories itself; a caller that renders them anyway passes an :class:`X0Recorder` to its
    sampler instead (same numbers: the same sampler, seeds and batches).

    Args:
        pipe: the world's pipeline (SD1.5 family).
        captions, seeds: B captions and their starting-noise seeds (as :mod:`spotune.toyworld.sampling`).
        timesteps: the timesteps to measure at (the sampler's nearest step stands in for one it lacks).
    Returns:
        :meth:`X0Recorder.summary`'s dictionary.
    """
    if len(captions) != len(seeds):
        raise ValueError(f"{len(captions)} captions but {len(seeds)} seeds")
    recorder = X0Recorder(pipe.scheduler, pipe.vae, num_inference_steps, timesteps, chunk_size=batch_size)
    images = generate_with_pipeline(pipe, captions, seeds, num_inference_steps=num_inference_steps,
                                    guidance_scale=guidance_scale, batch_size=batch_size, on_x0_prediction=recorder)
    return recorder.summary(to_uint8(images), captions)


def write_aesthetic_labels(pairs: str | Path, out: str | Path) -> Path:
    """Copy a preference file with its labels replaced by the exact aesthetic's verdict.

    ``pairs`` is a parquet file written by :mod:`spotune.toyworld.preferences` (it has ``aesthetic_0``
    and ``aesthetic_1``). The more aesthetic image gets label 1; scores within ``AESTHETIC_TIE`` are a
    tie (0.5, 0.5), which accuracy leaves out.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(str(pairs))
    if "aesthetic_0" not in table.column_names:
        raise ValueError(f"{pairs}: no aesthetic_0/aesthetic_1 columns (not written by spotune.toyworld.preferences?)")
    a0 = np.asarray(table.column("aesthetic_0").to_pylist(), dtype=np.float64)
    a1 = np.asarray(table.column("aesthetic_1").to_pylist(), dtype=np.float64)
    tie = np.abs(a0 - a1) <= AESTHETIC_TIE
    label_0 = np.where(tie, 0.5, (a0 > a1).astype(np.float64))
    label_1 = np.where(tie, 0.5, 1.0 - label_0)
    table = table.set_column(table.column_names.index("label_0"), "label_0", pa.array(label_0))
    table = table.set_column(table.column_names.index("label_1"), "label_1", pa.array(label_1))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp, row_group_size=256)
    return out


def spm_accuracy(
    base_model: str | Path,
    pickscore: str | Path,
    spm_checkpoint: str | Path,
    eval_pairs: str | Path,
    work_dir: str | Path,
    timesteps: tuple[int, ...] = SPM_EVAL_TIMESTEPS,
    seed: int = 0,
    guidance_scale: float = 5.0,
    batch_size: int = 64,
) -> dict[str, Any]:
    """The SPM's pair accuracy per timestep against the rater and against the aesthetic alone.

    Args:
        base_model: the pipeline that makes the x0-prediction views.
        pickscore, spm_checkpoint: the judge (``judge=spm``).
        eval_pairs: held-out pairs with rater labels (``eval.parquet`` of the preference data).
        work_dir: where the aesthetic-labelled copy of the pairs is written.
    Returns:
        ``{"vs_rater": {t: accuracy}, "vs_aesthetic": {t: accuracy}, "pairs": N, "aesthetic_ties": K,
        "target": 0.65, "meets_target": bool, "view_readings": {...}}``; the target is at every t <= 701,
        accuracies leave ties out (``None`` where no pair was decisive), and ``view_readings`` is
        :func:`spm_view_readings` on the same pairs.
    """
    from spotune.recipes.eval_spm import EvalSPMConfig, run_eval_spm

    relabelled = write_aesthetic_labels(eval_pairs, Path(work_dir) / "eval_aesthetic.parquet")
    result: dict[str, Any] = {"timesteps": list(timesteps), "target": SPM_ACCURACY_TARGET}
    for key, data in (("vs_rater", eval_pairs), ("vs_aesthetic", relabelled)):
        config = EvalSPMConfig(
            judge="spm", judge_clip_path=str(pickscore), judge_checkpoint=str(spm_checkpoint),
            pretrained_model=str(base_model), data=str(data), resolution=None, guidance_scale=guidance_scale,
            timesteps=list(timesteps), batch_size=batch_size, num_workers=0, seed=seed, progress=False,
        )
        config.validate()
        rows = run_eval_spm(config)
        result[key] = {str(r.timestep): None if math.isnan(r.accuracy) else r.accuracy for r in rows}
        result[f"{key}_decisive_pairs"] = {str(r.timestep): r.total for r in rows}
        if key == "vs_rater":
            result["pairs"] = rows[0].total + rows[0].ties
        else:
            result["aesthetic_ties"] = rows[0].ties
    result["view_readings"] = spm_view_readings(base_model, eval_pairs, timesteps, seed=seed,
                                                guidance_scale=guidance_scale, batch_size=batch_size)
    early = [result["vs_rater"][str(t)] for t in timesteps if t <= 701]
    result["meets_target"] = bool(early) and all(a is not None and a >= SPM_ACCURACY_TARGET for a in early)
    return result


def _ordering_agreement(views: np.ndarray, truth: np.ndarray) -> tuple[float | None, int]:
    """Share of pairs whose two views are ordered as their images are, and how many pairs counted.

    Args:
        views, truth: [N, 2] one measure of both views and of both images.
    Pairs whose images tie (within ``AESTHETIC_TIE``) are left out; pairs whose views tie count one
    half (a coin would get them right half the time).
    """
    decisive = np.abs(truth[:, 0] - truth[:, 1]) > AESTHETIC_TIE
    if not decisive.any():
        return None, 0
    v, t = views[decisive], truth[decisive]
    tied = np.abs(v[:, 0] - v[:, 1]) <= AESTHETIC_TIE
    right = np.where(tied, 0.5, ((v[:, 0] > v[:, 1]) == (t[:, 0] > t[:, 1])).astype(np.float64))
    return float(right.mean()), int(decisive.sum())


def _read_pairs(eval_pairs: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Captions [N], images [N, 2, H, W, 3] uint8 and rater labels [N] (1.0 where image 0 is preferred)."""
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    wanted = ["caption", "jpg_0", "jpg_1", "label_0"]
    missing = [c for c in wanted if c not in pq.read_schema(str(eval_pairs)).names]
    if missing:
        raise ValueError(f"{eval_pairs}: no {', '.join(missing)} column(s) (expected pairs written by "
                         "python -m spotune.toyworld.preferences)")
    table = pq.read_table(str(eval_pairs), columns=wanted)
    decode = lambda b: np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))  # noqa: E731
    images = np.stack([np.stack([decode(a), decode(b)]) for a, b in zip(table.column("jpg_0").to_pylist(),
                                                                         table.column("jpg_1").to_pylist())])
    return table.column("caption").to_pylist(), images, np.asarray(table.column("label_0").to_pylist(), dtype=np.float64)


def _labelling(eval_pairs: Path, truth: ImageScores) -> tuple[Standardisation, RaterWeights, str]:
    """The standardisation and rater weights the labels were made with (``summary.json`` beside the pairs,
    written by :func:`spotune.toyworld.preferences.write_dataset`), else those of these images and the
    default rater; and where they came from."""
    import json

    summary = eval_pairs.parent / "summary.json"
    if not summary.is_file():
        return Standardisation.of(truth), RaterWeights(), "these pairs' images"
    try:
        record = json.loads(summary.read_text())
        scale, rater = record["scale"], record["rater"]
        return (Standardisation(**{k: float(scale[k]) for k in Standardisation.__dataclass_fields__}),
                RaterWeights(**{k: float(rater[k]) for k in RaterWeights.__dataclass_fields__}), str(summary))
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{summary}: expected JSON with 'scale' and 'rater' objects as write_dataset writes them "
                         f"({type(exc).__name__}: {exc}); remove it to standardise by the pairs' own images") from None


@torch.no_grad()
def spm_view_readings(
    base_model: str | Path,
    eval_pairs: str | Path,
    timesteps: tuple[int, ...] = SPM_EVAL_TIMESTEPS,
    seed: int = 0,
    guidance_scale: float = 5.0,
    batch_size: int = 64,
) -> dict[str, Any]:
    """The world's exact metrics read on the SPM's views, pair by pair, against the same metrics on the images.

    The views are those ``spotune eval-spm`` gives the SPM (:class:`~spotune.preference.noisy_views.
    NoisyViewMaker`: both images of a pair noised with one draw, x0-predicted by the guided base model,
    decoded), with noise drawn from ``seed``; the draws are not eval-spm's own, so the two measurements
    agree in distribution, not view by view.

    Args:
        base_model: the pipeline that makes the views.
        eval_pairs: held-out pairs written by :mod:`spotune.toyworld.preferences` (labels by utility).
    Returns:
        ``{"pairs": N, "scale_from": str, "by_timestep": {t: {"agreement": {measure: share}, "agreement_pairs":
        {measure: n}, "utility_vs_rater": share, "views_aligned": share, "snr": a_t / (1 - a_t)}}}``: ``agreement`` is the share of
        pairs whose views order the measure as their images do (pairs whose images tie on it left out);
        ``utility_vs_rater`` the share whose rater utility, computed from the views, prefers the labelled
        image; ``views_aligned`` the share of views in which the captioned shape, colour and backdrop are found.
    """
    from spotune.models import load_pipeline
    from spotune.preference.noisy_views import NoisyViewMaker

    eval_pairs = Path(eval_pairs)
    captions, images, label_0 = _read_pairs(eval_pairs)
    n = len(captions)
    flat_captions = [c for c in captions for _ in range(2)]
    truth = score_images(images.reshape(-1, *images.shape[2:]), flat_captions)
    scale, weights, scale_from = _labelling(eval_pairs, truth)
    truth_by_measure = {m: np.asarray(f(truth)).reshape(n, 2) for m, f in VIEW_MEASURES.items()}
    pipe = load_pipeline(str(base_model))
    maker = NoisyViewMaker(pipe, guidance_scale=guidance_scale, decode_chunk_size=batch_size)
    pixels = to_tensor(images.reshape(-1, *images.shape[2:])).reshape(n, 2, *images.shape[-1:], *images.shape[2:4])
    out: dict[str, Any] = {"pairs": n, "scale_from": scale_from, "timesteps": list(timesteps), "by_timestep": {}}
    alphas = maker.scheduler.alphas_cumprod
    for t in timesteps:
        generator = torch.Generator(maker.device).manual_seed(seed * 1000 + int(t))
        views: list[np.ndarray] = []
        for start in range(0, n, batch_size):
            chunk = slice(start, start + batch_size)
            v0, v1 = maker(pixels[chunk, 0], pixels[chunk, 1], captions[chunk],
                           torch.full((len(captions[chunk]),), int(t), dtype=torch.long), generator=generator)
            views.append(np.stack([to_uint8(v0), to_uint8(v1)], axis=1))  # [b, 2, H, W, 3]
        view_images = np.concatenate(views)
        read = score_images(view_images.reshape(-1, *view_images.shape[2:]), flat_captions)
        snr = float(alphas[int(t)] / (1.0 - alphas[int(t)]))  # signal-to-noise ratio of x_t, a_t / (1 - a_t)
        row: dict[str, Any] = {"snr": snr, "agreement": {}, "agreement_pairs": {}}
        for m, f in VIEW_MEASURES.items():
            row["agreement"][m], row["agreement_pairs"][m] = _ordering_agreement(np.asarray(f(read)).reshape(n, 2),
                                                                               truth_by_measure[m])
        u = utilities(read, weights, scale).reshape(n, 2)
        row["utility_vs_rater"] = float(((u[:, 0] > u[:, 1]) == (label_0 == 1.0)).mean())
        row["views_aligned"] = float(read.aligned.mean())
        out["by_timestep"][str(int(t))] = row
    return out


def remeasure_shipped_spm(data: str | Path, spm_folder: str | Path, base_model: str | Path, pickscore: str | Path,
                          write: bool = False, timesteps: tuple[int, ...] | None = None) -> dict[str, Any]:
    """:func:`spm_accuracy` (with its view readings) of a shipped SPM on ``data``'s ``eval.parquet``.

    Settings (seed, guidance, batch and, unless ``timesteps`` is given, the timesteps) are the record's
    own. With ``write``, the result replaces ``accuracy_by_labels`` in the folder's ``spm.json``
    (atomically; the rest of the record is kept); it needs the record's own timesteps.
    """
    import json
    import tempfile

    from spotune.toyworld.resources import SHIPPED_SPM_INFO, SHIPPED_SPM_WEIGHTS
    from spotune.utils.io import atomic_write_json

    spm_folder, data = Path(spm_folder), Path(data)
    info_file = spm_folder / SHIPPED_SPM_INFO
    for path in (spm_folder / SHIPPED_SPM_WEIGHTS, info_file, data / "eval.parquet"):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found (expected a shipped SPM folder and a preference-data folder)")
    record = json.loads(info_file.read_text())
    config = record.get("config", {})
    own = tuple(int(t) for t in config.get("eval_timesteps", SPM_EVAL_TIMESTEPS))
    if write and timesteps is not None and tuple(timesteps) != own:
        raise ValueError(f"{info_file}: --write keeps the record's own timesteps {list(own)}; drop --timesteps to write")
    with tempfile.TemporaryDirectory() as work:
        result = spm_accuracy(base_model, pickscore, spm_folder / SHIPPED_SPM_WEIGHTS, data / "eval.parquet", work,
                              timesteps=tuple(timesteps) if timesteps is not None else own,
                              seed=int(config.get("seed", 0)), guidance_scale=float(config.get("guidance_scale", 5.0)),
                              batch_size=int(config.get("eval_batch_size", 64)))
    if write:
        record["accuracy_by_labels"] = result
        atomic_write_json(info_file, record)
    return result


def _parse_timesteps(text: str) -> tuple[int, ...]:
    """``--timesteps`` "0,251,501" -> (0, 251, 501); one ValueError naming the flag otherwise."""
    problem = ValueError(f"--timesteps {text!r}: expected comma-separated integers in [0, 999], e.g. 0,251,501")
    try:
        timesteps = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise problem from None
    if not timesteps or any(not 0 <= t <= 999 for t in timesteps):
        raise problem
    return timesteps


def main(argv: list[str] | None = None) -> int:
    """Bad input is one line and exit code 1 (``--debug``: the traceback)."""
    from spotune.cli import run_tool

    return run_tool("python -m spotune.toyworld.properties", _main, argv)


def _main(argv: list[str]) -> int:
    """``python -m spotune.toyworld.properties DATA [--spm DIR] [--write]``: re-measure a shipped SPM."""
    import argparse
    import json
    import sys

    from spotune.toyworld.resources import resource_dir

    parser = argparse.ArgumentParser(description="Measure a shipped SPM's accuracy by labels and what its views show, "
                                                 "on a preference-data folder's eval.parquet.")
    parser.add_argument("data", help="a folder written by python -m spotune.toyworld.preferences")
    parser.add_argument("--spm", default=None, help="shipped SPM folder (default: the shipped resources/toyworld/spm)")
    parser.add_argument("--base-model", default=None, help="base model folder (default: the shipped one)")
    parser.add_argument("--pickscore", default=None, help="PickScore folder (default: the shipped one)")
    parser.add_argument("--write", action="store_true", help="store the result in the SPM folder's spm.json")
    parser.add_argument("--timesteps", default=None,
                        help="comma-separated timesteps to measure at (default: the record's eval_timesteps)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = resource_dir()
    try:
        timesteps = None if args.timesteps is None else _parse_timesteps(args.timesteps)
        result = remeasure_shipped_spm(args.data, args.spm or res / "spm", args.base_model or res / "base",
                                       args.pickscore or res / "pickscore", write=args.write, timesteps=timesteps)
    except (FileNotFoundError, ValueError) as exc:
        print(f"properties: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
