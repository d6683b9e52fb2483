"""The GPUs a plan can be made for: data-sheet memory, bandwidth and dense peaks, and the roofline time model.

Peaks are the vendors' dense figures (no structured sparsity), tensor-core fp16/bf16 with float32
accumulation (what PyTorch's matmuls use; GeForce cards run it at half their fp16-accumulate rate), TF32
tensor-core, and plain float32. Memory is the total the driver reports (nvidia-smi), in GiB.

Time of one op on a card (:func:`op_seconds`): the larger of its FLOPs at ``compute_efficiency`` of the
peak for its precision, its bytes read and written at ``bandwidth_efficiency`` of the memory bandwidth,
and ``launch_seconds`` (an eager PyTorch op's dispatch and launch, which bounds small kernels). The
efficiencies are assumptions, stated in every report, not measurements.
"""

from __future__ import annotations

from dataclasses import dataclass

from spotune.errors import SpotuneError

# Assumed fractions of the data-sheet figures an eager PyTorch UNet reaches, and the per-op floor.
COMPUTE_EFFICIENCY = 0.45
BANDWIDTH_EFFICIENCY = 0.7
LAUNCH_SECONDS = 6e-6


@dataclass(frozen=True)
class GPU:
    """One card's data-sheet figures (TFLOP/s dense; GB/s; GiB)."""

    name: str
    memory_gib: float
    bandwidth_gbs: float
    fp16: float
    bf16: float | None  # None: no bf16 (Turing)
    tf32: float | None  # None: no TF32 tensor cores (before Ampere)
    fp32: float

    def peak(self, precision: str, allow_tf32: bool) -> float:
        """TFLOP/s for an op of ``precision`` (spotune.plan.recorder.PRECISIONS)."""
        if precision == "fp16":
            return self.fp16
        if precision == "bf16":
            return self.bf16 if self.bf16 is not None else self.fp32
        if precision == "tc-fp32" and allow_tf32 and self.tf32 is not None:
            return self.tf32
        return self.fp32


GPUS: dict[str, GPU] = {g.name: g for g in (
    GPU("H200", 140.4, 4800, 989.4, 989.4, 494.7, 66.9),
    GPU("H100", 79.6, 3350, 989.4, 989.4, 494.7, 66.9),
    GPU("A100-80GB", 80.0, 2039, 312.0, 312.0, 156.0, 19.5),
    GPU("A100-40GB", 40.0, 1555, 312.0, 312.0, 156.0, 19.5),
    GPU("L40S", 45.0, 864, 362.1, 362.1, 183.0, 91.6),
    GPU("RTX-4090", 23.99, 1008, 165.2, 165.2, 82.6, 82.6),
    GPU("RTX-3090", 24.0, 936, 71.0, 71.0, 35.6, 35.6),
    GPU("RTX-4080", 16.0, 717, 97.5, 97.5, 48.7, 48.7),
    GPU("RTX-4070-Ti", 12.0, 504, 80.2, 80.2, 40.1, 40.1),
    GPU("A10", 22.5, 600, 125.0, 125.0, 62.5, 31.2),
    GPU("L4", 22.5, 300, 121.0, 121.0, 60.0, 30.3),
    GPU("T4", 15.0, 320, 65.0, None, None, 8.1),
)}


def _key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


_ALIASES = {_key(alias): name for name, aliases in {
    "H100": ("h100sxm", "h10080gb"), "A100-80GB": ("a100", "a10080g"), "A100-40GB": ("a10040g",),
    "RTX-4090": ("4090",), "RTX-3090": ("3090",), "RTX-4080": ("4080",), "RTX-4070-Ti": ("4070ti",),
}.items() for alias in aliases}


def find_gpu(name: str) -> GPU:
    """The card called ``name`` (case, spaces and dashes ignored: "rtx 4090", "4090", "a100-40gb").

    Raises:
        SpotuneError: one line listing the known cards and ``--memory-gb`` for any other.
    """
    wanted = _key(name)
    for known in GPUS:
        if _key(known) == wanted:
            return GPUS[known]
    if wanted in _ALIASES:
        return GPUS[_ALIASES[wanted]]
    raise SpotuneError(f"--gpu {name}: unknown GPU; known: {', '.join(GPUS)} (for another card give --memory-gb N)")


def gpu_for_device_name(device_name: str, total_gib: float) -> GPU | None:
    """The table's card for a CUDA device name ("NVIDIA A100-SXM4-80GB", "NVIDIA GeForce RTX 4090"), or None."""
    key = _key(device_name)
    if "a100" in key:
        return GPUS["A100-80GB" if total_gib > 60 else "A100-40GB"]
    for name in sorted(GPUS, key=lambda n: -len(_key(n))):  # longest first: "l40s" before "l4"
        if _key(name) in key or _key(name).removeprefix("rtx") in key:
            return GPUS[name]
    return None


def op_seconds(gpu: GPU, flops: float, nbytes: float, precision: str, allow_tf32: bool,
               compute_efficiency: float = COMPUTE_EFFICIENCY, bandwidth_efficiency: float = BANDWIDTH_EFFICIENCY,
               launch_seconds: float = LAUNCH_SECONDS) -> float:
    """Predicted seconds of one op on ``gpu`` (the roofline in the module docstring)."""
    compute = flops / (gpu.peak(precision, allow_tf32) * 1e12 * compute_efficiency) if flops else 0.0
    memory = nbytes / (gpu.bandwidth_gbs * 1e9 * bandwidth_efficiency)
    return max(compute, memory, launch_seconds)


__all__ = ["BANDWIDTH_EFFICIENCY", "COMPUTE_EFFICIENCY", "GPU", "GPUS", "LAUNCH_SECONDS", "find_gpu", "gpu_for_device_name", "op_seconds"]
