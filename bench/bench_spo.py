"""Seconds per SPO iteration, per phase, with counted FLOPs and peak memory.

    python bench/bench_spo.py                                # tiny CPU config, 5 iterations after 1 warm-up
    python bench/bench_spo.py --family sdxl                  # tiny SDXL (configs/tiny_sdxl.yaml: the SDXL sampler)
    python bench/bench_spo.py --iterations 10 key=value ...  # any train config override
    python bench/bench_spo.py --size full --json out.json    # SD1.5 + ViT-H/14 judge, random weights
    python bench/bench_spo.py --size full --family sdxl      # SDXL base 1.0's architecture, the SDXL recipe
    python bench/bench_spo.py --size full --emulate-reference      # and the authors' cost structure, side by side
    python bench/bench_spo.py --size full --config configs/sd15_spo_24gb.yaml --memory-cap-gb 24
    python bench/bench_spo.py --flop-table                   # per-image TFLOP at 512 px (meta device, seconds)
    python bench/bench_spo.py --size full --algorithm both   # SPO and LPO (configs/sd15_lpo.yaml) in one run

``--size full`` runs the real recipe (``SPOTrainer``: setup, sampling, training) on SD1.5's architecture
from the configs spotune ships and the step-aware judge over PickScore's ViT-H/14, all with random
weights, and the paper's settings (configs/sd15_spo.yaml: 10 prompts, k = 4, 20 steps, divert 4, CFG 5,
512 px, LoRA rank 4, fp16). Only the preference threshold is 0, since a random judge rarely clears 0.3:
every pair is trained on, the most training an iteration can hold (160 tuples). ``--family sdxl`` does
the same with SDXL base 1.0's architecture (the shipped configs: UNet, VAE, both text encoders) and the
SDXL recipe (configs/sdxl_spo.yaml: 2 prompts, k = 2, 3 inner steps, 1024 px, LoRA rank 64, fp16, the VAE
in fp16 as the fp16-fix VAE runs).

Without CUDA it runs a proving mode sized for a small CPU (256 px, 1 prompt, k = 2, 4 steps, divert 2,
bf16 where the CPU has native bf16 (AVX512-BF16 or AMX), else fp32; flags below change each), so the
full-size code paths run and their FLOPs are counted anywhere.

``--predict`` also runs ``spotune plan``'s prediction of the same config (one iteration on fake tensors)
and puts it beside the measurement: predicted and measured peak allocated memory, predicted and measured
seconds per iteration (on CUDA, for the card found in the plan's table by its name).

Per phase (UNet sampling, VAE decode, judge, training forward, reference forward, backward, optimizer,
other) it reports seconds, counted FLOPs (torch.utils.flop_counter, counted on the first iteration) and
the fraction of the chip's peak; also seconds per iteration, tuples per second and peak memory (CUDA:
torch's peak allocated and reserved; CPU: max RSS). On CUDA each phase boundary synchronises the device
so phases are timed separately; the recipe itself has no such syncs.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

PHASES = ("unet_sampling", "vae_decode", "judge", "train_forward", "train_reference", "train_backward", "optimizer", "other")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ================================================================================================
# tiny mode (the CPU config through the recipe, as before)
# ================================================================================================
def run_tiny(args) -> dict:
    from spotune.config import load_config
    from spotune.recipes.trainers import trainer_class
    from spotune.recipes.train_spo_config import TrainSPOConfig

    with tempfile.TemporaryDirectory() as tmp:
        total = args.iterations + args.warmup
        config = load_config(
            TrainSPOConfig, args.config,
            [f"output_dir={tmp}/run", "log_with=none", "progress=false", "validate_every_epochs=0",
             f"max_iterations={total}", "num_epochs=1000", "checkpoint_every=0", *args.overrides],
        )
        trainer = trainer_class(config)(config)
        trainer.setup()
        sampling, training, pairs = [], [], []
        for i in range(total):
            epoch, index = divmod(trainer.iteration, trainer.iterations_per_epoch)
            prompts = trainer._prompts_for(epoch, index)
            t0 = time.perf_counter()
            result = trainer.sample(prompts)
            t1 = time.perf_counter()
            trainer.train_on_pairs(result.pairs)
            t2 = time.perf_counter()
            trainer.iteration += 1
            if i >= args.warmup:
                sampling.append(t1 - t0)
                training.append(t2 - t1)
                pairs.append(len(result.pairs))
        device = trainer.accelerator.device
        family, sampler = trainer.family.name, trainer.sampler_kind
        trainer.cleanup()

    peak_mb, peak_kind = _peak_memory_mb(device)
    return {
        "config": args.config,
        "overrides": args.overrides,
        "family": family,
        "sampler": sampler,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "iterations_measured": args.iterations,
        "seconds_sampling_median": statistics.median(sampling),
        "seconds_training_median": statistics.median(training),
        "seconds_iteration_median": statistics.median(s + t for s, t in zip(sampling, training)),
        "pairs_per_iteration_mean": statistics.mean(pairs),
        "peak_memory_mb": round(peak_mb, 1),
        "peak_memory_kind": peak_kind,
    }


def _peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "max RSS"


# ================================================================================================
# full size
# ================================================================================================
# The paper's settings per family (GPU) and the CPU proving mode's: resolution, prompts per round, k.
FULL_SETTINGS = {"sd15": {"paper": (512, 10, 4), "proving": (256, 1, 2)},
                 "sdxl": {"paper": (1024, 2, 2), "proving": (256, 1, 2)}}
FULL_CONFIGS = {"sd15": "configs/sd15_spo.yaml", "sdxl": "configs/sdxl_spo.yaml"}
LPO_CONFIGS = {"sd15": "configs/sd15_lpo.yaml", "sdxl": "configs/sdxl_lpo.yaml"}
# LPO's paper settings (prompts per round, k) where they differ from SPO's; its proving mode is SPO's.
LPO_PAPER = {"sd15": (5, 4), "sdxl": (4, 4)}


def _full_overrides(args, cuda: bool, algorithm: str = "spo") -> list[str]:
    """The paper's settings on CUDA, the proving mode's otherwise; each flag overrides either.

    Every pair is kept (a random judge rarely clears a real threshold): SPO's threshold 0, LPO's range 0..0.
    """
    proving = not cuda and not args.paper_settings
    pick = lambda flag, gpu, cpu: flag if flag is not None else (gpu if not proving else cpu)  # noqa: E731
    paper, cpu = FULL_SETTINGS[args.family]["paper"], FULL_SETTINGS[args.family]["proving"]
    if algorithm == "lpo":
        paper = (paper[0], *LPO_PAPER[args.family])
    prompts = ROOT.parent / "shared" / "data" / "spo_4k_training_prompts.json"
    settings = {
        "resolution": pick(args.resolution, paper[0], cpu[0]),
        "sample_batch_size": pick(args.prompts, paper[1], cpu[1]),
        "num_samples_per_step": pick(args.k, paper[2], cpu[2]),
        "num_inference_steps": pick(args.steps, 20, 4),
        "divert_start_step": pick(args.divert, 4, 2) if algorithm == "spo" else pick(args.divert, 0, 0),
        "mixed_precision": pick(args.dtype, "fp16", cpu_mixed_precision()[0]),
        "prompts": str(prompts) if prompts.is_file() else "builtin:tiny-prompts",
    }
    if algorithm == "lpo":
        settings.update(lpo_threshold_min=0.0, lpo_threshold_max=0.0)
    else:
        settings["preference_threshold"] = 0.0
    return [f"{k}={v}" for k, v in settings.items()]


def cpu_mixed_precision() -> tuple[str, str]:
    """The proving mode's precision on this CPU, and why: bf16 only where the CPU computes it natively.

    Without AVX512-BF16 or AMX, bf16 matmuls are emulated: on one such CPU a full-size bf16 iteration had not
    finished after 25 minutes where fp32 took 89 s, so fp32 (mixed_precision "no") is the default there.
    """
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        flags = []
    native = [flag for flag in ("amx_bf16", "avx512_bf16") if flag in flags]
    if native:
        return "bf16", f"bf16: the CPU has {' and '.join(native)}"
    return "no", "fp32: the CPU has no native bf16 (no avx512_bf16 or amx_bf16 in /proc/cpuinfo)"


@contextmanager
def _random_full_size_models(device: torch.device, family: str = "sd15"):
    """Make the recipe's setup load random SD1.5 or SDXL and the ViT-H/14 judge instead of files.

    Dtypes are the recipe's own: the training dtype for the diffusion model (for SDXL, the fp16-fix VAE's
    case), ``judge_dtype`` for the judge.
    """
    import full_size

    build = full_size.build_sdxl_random if family == "sdxl" else full_size.build_sd15_random

    def load_pipeline(source, dtype=torch.float32, device_=None, **kwargs):
        return build(dtype, device)

    def build_judge(kind, *args, dtype=None, **kwargs):
        if kind == "lrm":  # LPO's latent reward model over the family's own UNet and text encoders
            return full_size.build_lrm_random(family, dtype or torch.float32, device)
        return full_size.build_vit_h_judge(dtype or torch.float32, device)

    with mock.patch("spotune.recipes.train_spo.load_pipeline", load_pipeline), \
            mock.patch("spotune.preference.factory.build_judge", build_judge):
        yield


def _predict(config, device: torch.device, memory_cap_gb: float | None) -> dict:
    """``spotune plan``'s report for ``config``, on this CUDA card (its memory, or the cap when one is set)
    when the plan's table knows it."""
    from spotune.plan.gpus import gpu_for_device_name
    from spotune.plan.predict import predict_iteration
    from spotune.plan.report import PlanSettings, assess

    settings = PlanSettings()
    if device.type == "cuda":
        total_gib = torch.cuda.get_device_properties(device).total_memory / 2**30
        settings.gpu = gpu_for_device_name(torch.cuda.get_device_name(device), total_gib)
        settings.memory_gib = min(total_gib, memory_cap_gb) if memory_cap_gb else total_gib
    card = int(settings.memory_gib * 2**30) if settings.memory_gib else None
    prediction = predict_iteration(config, card_memory_bytes=card)
    return assess(prediction, settings)


def run_full(args, mode: str) -> dict:
    """One full-size run of ``mode`` ("spotune", "spotune-lpo" or "emulated-reference"); returns its report."""
    import full_size
    from spotune.config import load_config
    from spotune.errors import SpotuneError
    from spotune.models.compiled import compile_models
    from spotune.recipes.trainers import trainer_class
    from spotune.recipes.train_spo_config import TrainSPOConfig

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    emulated = mode == "emulated-reference"
    algorithm = "lpo" if mode == "spotune-lpo" else "spo"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
        if args.memory_cap_gb:
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gb * 2**30 / total), device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    overrides = _full_overrides(args, cuda, algorithm)
    config_file = LPO_CONFIGS[args.family] if algorithm == "lpo" else (args.config or FULL_CONFIGS[args.family])
    report: dict = {"mode": mode, "device": torch.cuda.get_device_name(device) if cuda else "cpu",
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "judge_dtype": "fp32" if emulated else args.judge_dtype, "tf32": bool(cuda and args.tf32),
                    "compile": args.compile, "channels_last": args.channels_last, "memory_cap_gb": args.memory_cap_gb,
                    "proving_mode": not cuda and not args.paper_settings}
    if not cuda and args.dtype is None:
        report["cpu_precision"] = cpu_mixed_precision()[1]
        print(f"[{mode}] CPU precision: {report['cpu_precision']} (--dtype chooses)", file=sys.stderr, flush=True)
    if emulated:
        report["note"] = ("emulation of the authors' cost structure on spotune's sampler: a deep-copied reference "
                          "UNet, four guided passes per tuple, float32 judge outside autocast; not their code")
    clock = full_size.PhaseClock(device)
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(
            TrainSPOConfig, str(ROOT / config_file) if not Path(config_file).is_absolute() else config_file,
            [f"output_dir={tmp}/run", "log_with=none", "progress=false", "validate_every_epochs=0",
             "num_epochs=1000", "checkpoint_every=0", "compile=false", f"allow_tf32={str(args.tf32).lower()}",
             f"judge_dtype={'fp32' if emulated else args.judge_dtype}", *overrides, *args.overrides],
        )
        report["config"] = config_file
        report["algorithm"] = algorithm
        report["family"] = args.family
        report["settings"] = {k: getattr(config, k) for k in (
            "resolution", "sample_batch_size", "num_samples_per_step", "num_inference_steps", "divert_start_step",
            "guidance_scale", "algorithm", "train_batch_size", "train_micro_batch_size", "gradient_checkpointing", "mixed_precision",
            "lora_rank", "decode_chunk_size", "judge_batch_size", "offload_text_encoder", "judge_dtype", "max_grad_norm",
            "prompts")}
        if args.predict and not emulated:
            report["prediction"] = _predict(config, device, args.memory_cap_gb)
        trainer = trainer_class(config)(config)
        iterations: list[dict] = []
        flops: dict[str, int] = {}
        t0 = time.perf_counter()
        try:
            with _random_full_size_models(device, args.family):
                trainer.setup()
            report["seconds_setup"] = time.perf_counter() - t0
            acc = trainer.accelerator
            base = acc.unwrap_model(trainer.unet)
            # SDPA is what both libraries pick by default; recorded so a run that fell back is visible.
            report["attention"] = {
                "unet": sorted({type(p).__name__ for p in base.attn_processors.values()}),
                "vae": sorted({type(p).__name__ for p in trainer.vae.attn_processors.values()}),
                "judge": trainer.judge.model.config._attn_implementation if hasattr(trainer.judge, "model") else "lrm",
            }
            if args.channels_last:
                base.to(memory_format=torch.channels_last)
                trainer.vae.to(memory_format=torch.channels_last)
            clock.hook_unet(base)
            if emulated:
                full_size.emulate_reference_training(trainer, clock)
            trainer.vae.decode = clock.wrap(trainer.vae.decode, "vae_decode")
            trainer.judge.score = clock.wrap(trainer.judge.score, "judge")
            acc.backward = clock.wrap(acc.backward, "train_backward")
            acc.clip_grad_norm_ = clock.wrap(acc.clip_grad_norm_, "optimizer")
            trainer.optimizer.step = clock.wrap(trainer.optimizer.step, "optimizer")
            if cuda:
                report["memory_after_setup_gb"] = torch.cuda.memory_allocated(device) / 2**30

            total = 1 + args.warmup + args.iterations  # iteration 0 counts FLOPs; then warm-up; then measured
            for i in range(total):
                if i == 1 and args.compile:  # compiled after the FLOP count, exactly as setup would compile
                    compile_models(acc.unwrap_model(trainer.unet), trainer.vae, trainer.judge, config.compile_backend)
                    if emulated:
                        compile_models(trainer.emulated_reference_unet, backend=config.compile_backend)
                clock.counting = i == 0
                clock.reset()
                epoch, index = divmod(trainer.iteration, trainer.iterations_per_epoch)
                prompts = trainer._prompts_for(epoch, index)
                clock.sync()
                start = time.perf_counter()
                clock.stage = "sampling"
                result = trainer.sample(prompts)
                clock.sync()
                middle = time.perf_counter()
                clock.stage = "training"
                stats = trainer.train_on_pairs(result.pairs)
                clock.sync()
                end = time.perf_counter()
                clock.stage = "other"
                trainer.iteration += 1
                seconds = dict(clock.seconds)
                seconds["other"] = (end - start) - sum(seconds.values())
                record = {"seconds": end - start, "seconds_sampling": middle - start, "seconds_training": end - middle,
                          "tuples": len(result.pairs), "phases": seconds, "loss": stats.get("loss")}
                if i == 0:
                    flops = dict(clock.flops)
                    report["flop_count_iteration"] = record
                elif i > args.warmup:
                    iterations.append(record)
                print(f"[{mode}] iteration {i}{' (FLOP count)' if i == 0 else ''}: {record['seconds']:.2f} s, "
                      f"{record['tuples']} tuples", file=sys.stderr, flush=True)
            report["fits"] = True
        except torch.OutOfMemoryError as exc:
            report["fits"] = False
            report["error"] = f"out of memory: {str(exc).splitlines()[0]}"
        except SpotuneError as exc:
            report["fits"] = None
            report["error"] = str(exc)
        finally:
            trainer.cleanup()

    if cuda:
        report["peak_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        report["peak_reserved_gb"] = torch.cuda.max_memory_reserved(device) / 2**30
    else:
        report["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if not iterations:
        return report
    if "prediction" in report:
        predicted = report["prediction"]
        report["predicted_vs_measured"] = {
            "peak_gib": {"predicted": predicted["peak_gib"], "measured_allocated": report.get("peak_allocated_gb"),
                         "measured_reserved": report.get("peak_reserved_gb")},
            "seconds_per_iteration": {"predicted": predicted.get("seconds_per_iteration"),
                                      "measured": statistics.median(r["seconds"] for r in iterations)},
        }

    median = lambda key: statistics.median(r[key] for r in iterations)  # noqa: E731
    seconds_it = median("seconds")
    tuples = statistics.mean(r["tuples"] for r in iterations)
    peaks = full_size.chip_peaks(device, args.peak_tflops)
    mixed = config.mixed_precision if config.mixed_precision != "no" else "fp32"
    phases = {}
    for name in PHASES:
        secs = statistics.median(r["phases"].get(name, 0.0) for r in iterations)
        counted = flops.get(name, 0)
        row = {"seconds": secs, "tflop": counted / 1e12}
        if secs > 0 and counted:
            row["tflop_per_s"] = counted / secs / 1e12
            if peaks:
                precision = report["judge_dtype"] if name == "judge" else mixed
                if precision == "fp32" and report["tf32"]:
                    precision = "tf32"
                row["fraction_of_peak"] = row["tflop_per_s"] / peaks[precision]
                row["peak_precision"] = precision
        phases[name] = row
    total_flops = sum(flops.values())
    report.update({
        "iterations_measured": len(iterations),
        "seconds_per_iteration": seconds_it,
        "seconds_sampling": median("seconds_sampling"),
        "seconds_training": median("seconds_training"),
        "tuples_per_iteration": tuples,
        "tuples_per_second": tuples / seconds_it,
        "tflop_per_iteration": total_flops / 1e12,
        "tflop_per_s": total_flops / seconds_it / 1e12,
        "phases": phases,
        "iterations": iterations,
    })
    if peaks:
        report["chip_peak_tflops"] = peaks
        report["fraction_of_peak"] = report["tflop_per_s"] / peaks[mixed]
        report["flop_floor_seconds"] = total_flops / (peaks[mixed] * 1e12)
    return report


def _table(reports: list[dict]) -> str:
    """A markdown table of the runs, one column per run."""
    heads = [f"{r['mode']}" + (" (compile)" if r.get("compile") else "") for r in reports]
    lines = ["| phase | " + " | ".join(heads) + " |", "| --- |" + " --- |" * len(reports)]
    for name in PHASES:
        cells = []
        for r in reports:
            row = r.get("phases", {}).get(name)
            if row is None:
                cells.append("-")
                continue
            cell = f"{row['seconds']:.2f} s, {row['tflop']:.2f} TFLOP"
            if "fraction_of_peak" in row:
                cell += f", {100 * row['fraction_of_peak']:.0f}% of peak"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for key, fmt in (("seconds_per_iteration", "{:.2f}"), ("tuples_per_second", "{:.3f}"), ("tflop_per_iteration", "{:.1f}"),
                     ("peak_allocated_gb", "{:.1f}"), ("peak_reserved_gb", "{:.1f}"), ("peak_rss_gb", "{:.1f}"), ("fits", "{}")):
        if any(key in r for r in reports):
            lines.append(f"| {key} | " + " | ".join(fmt.format(r[key]) if key in r else "-" for r in reports) + " |")
    return "\n".join(lines)


def run_flop_table(args) -> dict:
    import full_size

    unit = full_size.count_unit_flops(args.resolution or 512)
    spo, lpo = full_size.iteration_flops(unit), full_size.lpo_iteration_flops(unit)
    return {"resolution": args.resolution or 512, "tflop_per_unit": unit,
            "paper_iteration_tflop": spo,
            # LPO at SPO's paper batch (10 prompts, k = 4, 20 steps), every pair kept, so the two compare.
            "lpo_iteration_tflop": lpo,
            "lpo_over_spo": lpo["total_spotune"] / spo["total_spotune"],
            "counted_on": "meta device (shapes only) with torch.utils.flop_counter.FlopCounterMode"}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--family", choices=("sd15", "sdxl"), default="sd15",
                        help="model family (tiny: configs/tiny_cpu.yaml or tiny_sdxl.yaml; full: SD1.5 or SDXL base 1.0's architecture, random weights)")
    parser.add_argument("--config", default=None, help="train config (tiny: configs/tiny_cpu.yaml or tiny_sdxl.yaml, full: configs/sd15_spo.yaml or sdxl_spo.yaml)")
    parser.add_argument("--iterations", type=int, default=None, help="measured iterations (tiny: 5, full: 3 on CUDA, 1 on CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up iterations (tiny: 1; full: 1 after the FLOP-count iteration on CUDA, 0 on CPU)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--flop-table", action="store_true", help="count per-image TFLOP at --resolution (512) on the meta device and exit")
    parser.add_argument("--algorithm", choices=("spo", "lpo", "both"), default="spo",
                        help="full size: SPO (--config or the family's SPO recipe), LPO (configs/<family>_lpo.yaml), or both in one run")
    full = parser.add_argument_group("full size")
    full.add_argument("--emulate-reference", action="store_true", help="also run the authors' cost structure, as an emulation")
    full.add_argument("--only-reference", action="store_true", help="run only the emulation")
    full.add_argument("--memory-cap-gb", type=float, default=None, help="behave like a card with this much memory (CUDA)")
    full.add_argument("--compile", action="store_true", help="torch.compile the UNet, VAE decoder and judge after the FLOP count")
    full.add_argument("--channels-last", action="store_true", help="UNet and VAE weights in channels_last memory format")
    full.add_argument("--dtype", choices=("fp16", "bf16", "no"), default=None, help="mixed precision (CUDA: fp16; CPU: bf16 with native bf16, else no)")
    full.add_argument("--judge-dtype", choices=tuple(DTYPES), default="fp32", help="the judge's precision (judge_dtype; it scores outside autocast)")
    full.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True, help="TF32 matmuls on CUDA")
    full.add_argument("--resolution", type=int, default=None)
    full.add_argument("--prompts", type=int, default=None, help="prompts per iteration (sample_batch_size)")
    full.add_argument("--k", type=int, default=None, help="candidates per step")
    full.add_argument("--steps", type=int, default=None, help="DDIM steps")
    full.add_argument("--divert", type=int, default=None, help="divert_start_step")
    full.add_argument("--predict", action="store_true", help="also predict the run with spotune plan's machinery, side by side")
    full.add_argument("--paper-settings", action="store_true", help="the paper's settings even without CUDA")
    full.add_argument("--peak-tflops", type=float, default=None, help="the chip's peak, when not in the built-in table")
    parser.add_argument("overrides", nargs="*", help="key=value train config overrides")
    args = parser.parse_args(argv)

    if args.flop_table:
        report = run_flop_table(args)
    elif args.size == "tiny":
        args.config = args.config or str(ROOT / "configs" / ("tiny_sdxl.yaml" if args.family == "sdxl" else "tiny_cpu.yaml"))
        args.iterations = 5 if args.iterations is None else args.iterations
        args.warmup = 1 if args.warmup is None else args.warmup
        report = run_tiny(args)
    else:
        cuda = torch.cuda.is_available()
        args.iterations = (3 if cuda else 1) if args.iterations is None else args.iterations
        args.warmup = (1 if cuda else 0) if args.warmup is None else args.warmup
        first = {"spo": ["spotune"], "lpo": ["spotune-lpo"], "both": ["spotune", "spotune-lpo"]}[args.algorithm]
        modes = ["emulated-reference"] if args.only_reference else first + (["emulated-reference"] if args.emulate_reference else [])
        runs = []
        for mode in modes:
            runs.append(run_full(args, mode))
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        report = {"runs": runs, "table": _table(runs)}
        by_mode = {r["mode"]: r for r in runs}
        if "emulated-reference" in by_mode and all("tuples_per_second" in r for r in runs):
            report["throughput_vs_emulated_reference"] = runs[0]["tuples_per_second"] / by_mode["emulated-reference"]["tuples_per_second"]
        if all("tflop_per_iteration" in by_mode.get(m, {}) for m in ("spotune", "spotune-lpo")):
            spo, lpo = by_mode["spotune"], by_mode["spotune-lpo"]
            report["lpo_over_spo"] = {"tflop_per_iteration": lpo["tflop_per_iteration"] / spo["tflop_per_iteration"],
                                      "seconds_per_iteration": lpo["seconds_per_iteration"] / spo["seconds_per_iteration"],
                                      "seconds_per_tuple": (lpo["seconds_per_iteration"] / lpo["tuples_per_iteration"])
                                      / (spo["seconds_per_iteration"] / spo["tuples_per_iteration"])}
        print(report["table"], file=sys.stderr)
    print(json.dumps(report, indent=2, default=str))
    if args.json:
        import full_size

        full_size.write_json(args.json, json.loads(json.dumps(report, default=str)))
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
