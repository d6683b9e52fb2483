"""From a predicted iteration to the answer a user wants: does it fit my card, how long, and what would fit.

:func:`assess` turns a :class:`~spotune.plan.predict.Prediction` into the report (a JSON-ready dict);
:func:`search_knobs` re-predicts with one memory knob changed at a time until the recipe fits;
:func:`format_report` writes the text ``spotune plan`` prints.

Fits means: predicted peak x (1 + ``margin_fraction``) + ``margin_gib`` <= the card's memory. The margin
stands for what is not a tensor storage: the CUDA context (about 0.3-0.6 GiB), cuBLAS/cuDNN workspaces,
and the caching allocator's fragmentation (reserved above allocated). Its defaults are stated, not
calibrated on a GPU yet.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from spotune.plan.gpus import BANDWIDTH_EFFICIENCY, COMPUTE_EFFICIENCY, GPU, LAUNCH_SECONDS, op_seconds
from spotune.plan.predict import PHASE_TITLES, Prediction
from spotune.plan.recorder import PRECISIONS, PhaseRecord

GIB = 2**30
MARGIN_GIB = 1.0
MARGIN_FRACTION = 0.10
TRAINING_PHASES = ("train_forward", "train_reference", "train_ema", "train_backward", "optimizer", "ema_update", "other")


@dataclass
class PlanSettings:
    """The card and the assumptions a plan is made with."""

    gpu: GPU | None = None
    memory_gib: float | None = None  # the card's memory; from ``gpu`` when not given
    margin_gib: float = MARGIN_GIB
    margin_fraction: float = MARGIN_FRACTION
    compute_efficiency: float = COMPUTE_EFFICIENCY
    bandwidth_efficiency: float = BANDWIDTH_EFFICIENCY
    processes: int = 1

    @property
    def card_gib(self) -> float | None:
        if self.memory_gib is not None:
            return self.memory_gib
        return self.gpu.memory_gib if self.gpu else None

    def needed_gib(self, peak_bytes: int) -> float:
        return peak_bytes / GIB * (1 + self.margin_fraction) + self.margin_gib


def phase_seconds(record: PhaseRecord, gpu: GPU, allow_tf32: bool, settings: PlanSettings) -> float:
    """Predicted seconds of a phase on ``gpu``: the sum of its ops' roofline times."""
    total = 0.0
    for flops, nbytes, precision in zip(record.op_flops, record.op_bytes, record.op_precision):
        total += op_seconds(gpu, flops, nbytes, PRECISIONS[precision], allow_tf32,
                            settings.compute_efficiency, settings.bandwidth_efficiency)
    return total


def _total_iterations(prediction: Prediction, processes: int) -> tuple[int, int]:
    """(iterations per epoch, iterations of the run) with ``processes`` GPUs sharing each round."""
    from spotune.recipes.common import planned_iterations

    cfg = prediction.config
    per_epoch = prediction.prompt_count // (cfg.sample_batch_size * processes)
    if per_epoch == 0:
        return 0, 0
    return per_epoch, planned_iterations(cfg.num_epochs, per_epoch, cfg.max_iterations)


def assess(prediction: Prediction, settings: PlanSettings) -> dict:
    """The report of one prediction on one card (JSON-ready; sizes in GiB, times in seconds)."""
    cfg = prediction.config
    gpu = settings.gpu
    phases = []
    seconds_total = 0.0
    for name, record in prediction.phases.items():
        row = {"phase": name, "title": PHASE_TITLES.get(name, name), "peak_gib": record.peak / GIB,
               "resident_gib": record.resident / GIB, "tflop": record.total_flops / 1e12, "calls": record.calls}
        if gpu is not None and name != "setup":
            row["seconds"] = phase_seconds(record, gpu, cfg.allow_tf32, settings)
            seconds_total += row["seconds"]
        phases.append(row)
    card = settings.card_gib
    needed = settings.needed_gib(prediction.peak)
    per_epoch, total_iterations = _total_iterations(prediction, settings.processes)
    report = {
        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if isinstance(v, (int, float, str, bool, type(None)))},
        "family": prediction.family, "sampler": prediction.sampler, "algorithm": cfg.algorithm,
        "architecture": prediction.architecture, "judge": prediction.judge_architecture,
        "predicted": True,
        "peak_gib": prediction.peak / GIB, "peak_phase": prediction.peak_phase,
        "needed_gib": needed, "card_gib": card, "fits": (needed <= card) if card is not None else None,
        "margin": {"gib": settings.margin_gib, "fraction": settings.margin_fraction},
        "weights_gib": {k: v / GIB for k, v in prediction.weights.items()},
        "after_setup_gib": prediction.after_setup / GIB,
        "trainable_parameters": prediction.trainable_parameters,
        "tuples_per_iteration": prediction.tuples,
        "tflop_per_iteration": sum(r["tflop"] for r in phases if r["phase"] != "setup"),
        "phases": phases,
        "attention_kernels": prediction.sdpa_kernels,
        "processes": settings.processes, "iterations_per_epoch": per_epoch, "total_iterations": total_iterations,
        "notes": [*prediction.notes,
                  "every pair is kept (the most an iteration can train on); at preference_threshold > 0 fewer are",
                  "validation, checkpoints and start-up are not in the time"],
        "seconds_to_predict": prediction.seconds_to_predict,
    }
    if gpu is not None:
        report["gpu"] = dataclasses.asdict(gpu)
        report["assumptions"] = {"compute_efficiency": settings.compute_efficiency,
                                 "bandwidth_efficiency": settings.bandwidth_efficiency,
                                 "launch_seconds_per_op": LAUNCH_SECONDS}
        report["seconds_per_iteration"] = seconds_total
        report["run_hours"] = seconds_total * total_iterations / 3600
        if settings.processes > 1:
            report["notes"].append(f"{settings.processes} processes: each runs this iteration on its share; the "
                                   "gradient all-reduce's time and DDP's gradient buckets (about the trained "
                                   "weights' size again) are not included")
        if gpu.bf16 is None and cfg.mixed_precision == "bf16":
            report["notes"].append(f"{gpu.name} has no bf16: use mixed_precision=fp16")
    return report


# -- what would make it fit ----------------------------------------------------------------------------
def knob_candidates(config, phase: str) -> list[tuple[str, object]]:
    """Memory settings that keep the recipe's maths and lower ``phase``'s peak, in the order to try them."""
    candidates: list[tuple[str, object]] = []
    if not config.offload_text_encoder:
        candidates.append(("offload_text_encoder", True))
    if phase in TRAINING_PHASES:
        if not config.gradient_checkpointing:
            candidates.append(("gradient_checkpointing", True))
        micro = config.train_micro_batch_size or config.train_batch_size
        if micro > 1:
            candidates.append(("train_micro_batch_size", max(1, micro // 2)))
    elif phase == "unet_sampling":
        rows = config.sample_micro_batch_size or 2 * config.num_samples_per_step * config.sample_batch_size
        if rows > 1:
            candidates.append(("sample_micro_batch_size", max(1, rows // 2)))
    elif phase == "vae_decode":
        chunk = config.decode_chunk_size
        if chunk == 0 or chunk > 1:
            candidates.append(("decode_chunk_size", 4 if chunk == 0 else max(1, chunk // 2)))
    elif phase == "judge":
        size = config.judge_batch_size or config.num_samples_per_step * config.sample_batch_size
        if size > 1:
            candidates.append(("judge_batch_size", max(1, size // 2)))
    return candidates


def search_knobs(config, prediction: Prediction, settings: PlanSettings,
                 predict: Callable[[object], Prediction], max_steps: int = 8) -> list[dict]:
    """Change one memory setting at a time, for the phase that peaks, re-predicting after each, until it fits.

    Each step's peak is predicted by running the iteration again, not estimated. Returns the steps in
    order, each with every setting changed so far (cumulative) and the predicted peak.
    """
    card = settings.card_gib
    steps: list[dict] = []
    if card is not None and settings.margin_gib >= card:
        return [{"stopped": f"the margin alone ({settings.margin_gib:.1f} GiB) fills the card ({card:.1f} GiB)"}]
    current, current_prediction = config, prediction
    changed: list[str] = []
    while card is not None and settings.needed_gib(current_prediction.peak) > card and len(steps) < max_steps:
        candidates = knob_candidates(current, current_prediction.peak_phase)
        if not candidates:
            steps.append({"stopped": f"no memory setting that keeps the recipe's maths lowers the "
                                     f"{PHASE_TITLES.get(current_prediction.peak_phase)} peak"})
            break
        key, value = candidates[0]
        current = dataclasses.replace(current, **{key: value})
        current_prediction = predict(current)
        needed = settings.needed_gib(current_prediction.peak)
        changed.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
        steps.append({"settings": list(changed),
                      "peak_gib": current_prediction.peak / GIB, "peak_phase": current_prediction.peak_phase,
                      "needed_gib": needed, "fits": needed <= card})
    return steps


# -- text ------------------------------------------------------------------------------------------------
def _size(gib: float) -> str:
    return f"{gib:.2f} GiB" if gib >= 1 else f"{gib * 1024:.1f} MiB"


def _hours(hours: float) -> str:
    return f"{hours * 60:.0f} min" if hours < 1 else f"{hours:.1f} h"


def format_report(report: dict, config_name: str) -> str:
    """The text ``spotune plan`` prints (every figure is a prediction)."""
    gpu = report.get("gpu")
    lines = [f"spotune plan: {config_name} ({report['algorithm']}, {report['family']}, sampler {report['sampler']}); "
             "every figure below is predicted, not measured",
             f"  architecture: {report['architecture']}; judge: {report['judge']}",
             f"  one iteration: {report['tuples_per_iteration']} tuples trained (every pair kept), "
             f"{report['tflop_per_iteration']:.1f} TFLOP"]
    lines.append("  weights on the GPU: " + ", ".join(f"{k} {_size(v)}" for k, v in report["weights_gib"].items() if v))
    unit, scale = ("GiB", 1) if report["peak_gib"] >= 1 else ("MiB", 1024)
    head = f"  {'phase':<32} {'peak ' + unit:>9} {'resident':>9} {'TFLOP':>9}"
    if gpu:
        head += f" {'s on ' + gpu['name']:>16}"
    lines += ["", head]
    for row in report["phases"]:
        if row["phase"] == "setup":
            continue
        resident = row["resident_gib"] * scale if row["phase"] != "other" else 0.0
        line = f"  {row['title']:<32} {row['peak_gib'] * scale:>9.2f} {resident:>9.2f} {row['tflop']:>9.1f}"
        if gpu:
            line += f" {row['seconds']:>16.2f}"
        lines.append(line)
    lines.append("")
    margin = report["margin"]
    need = (f"peak {_size(report['peak_gib'])} (in {PHASE_TITLES.get(report['peak_phase'], report['peak_phase'])}); "
            f"needs {report['needed_gib']:.1f} GiB with the margin ({margin['fraction']:.0%} + {margin['gib']:.1f} GiB "
            "for the CUDA context, workspaces and fragmentation; --margin-gb, --margin-fraction)")
    lines.append("  " + need)
    if report["card_gib"] is not None:
        card = f"{gpu['name']} ({report['card_gib']:.1f} GiB)" if gpu else f"{report['card_gib']:.1f} GiB"
        verdict = "FITS" if report["fits"] else "DOES NOT FIT"
        lines.append(f"  {verdict} on {card}")
    if gpu:
        a = report["assumptions"]
        lines.append(f"  {report['seconds_per_iteration']:.1f} s per iteration on {gpu['name']} "
                     f"(assumed {a['compute_efficiency']:.0%} of peak FLOP/s, {a['bandwidth_efficiency']:.0%} of bandwidth); "
                     f"{report['total_iterations']} iterations "
                     f"({report['iterations_per_epoch']} per epoch"
                     f"{', ' + str(report['processes']) + ' processes' if report['processes'] > 1 else ''}): "
                     f"{_hours(report['run_hours'])}")
    for step in report.get("knobs", []):
        if "stopped" in step:
            lines.append(f"  then: {step['stopped']}")
        else:
            lines.append(f"  with {' '.join(step['settings'])}: peak {_size(step['peak_gib'])}, needs {step['needed_gib']:.1f} GiB: "
                         f"{'fits' if step['fits'] else 'does not fit yet'}")
    lines += [f"  note: {note}" for note in report["notes"]]
    return "\n".join(lines)


__all__ = ["MARGIN_FRACTION", "MARGIN_GIB", "PlanSettings", "assess", "format_report", "knob_candidates",
           "phase_seconds", "search_knobs"]
