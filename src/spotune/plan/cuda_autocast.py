"""CUDA's autocast precision rules, registered for CPU autocast while a prediction runs.

The prediction runs on fake CPU tensors (backward on fake CUDA tensors aborts a CPU-only torch build), so
autocast follows CPU autocast's op lists. Those differ from CUDA's where it matters for memory: under
CUDA autocast, ``group_norm`` and ``layer_norm`` return float32 (so a UNet's normalised activations, saved
for backward, take 4 bytes per value), and ``softmax`` / ``log_softmax`` run in float32; CPU autocast runs
them in the input's lower precision. This module gives CPU autocast CUDA's rule for those ops (and the
elementwise ones CUDA also runs in float32), for the duration of a ``with`` block only.

fp16 is predicted as bf16 on the CPU (``spotune.plan.predict``): the same two bytes per value, and CPU
autocast's lower precision is bf16.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Iterator

import torch

# (overload, how its inputs are cast): "fp32" casts every floating tensor argument to float32;
# "fp32_dtype" passes dtype=float32 to an op that takes one (softmax's rule on CUDA).
CUDA_FP32_RULES = {
    "group_norm": "fp32",
    "layer_norm": "fp32",
    "exp": "fp32",
    "log": "fp32",
    "rsqrt": "fp32",
    "pow.Tensor_Scalar": "fp32",
    "mse_loss": "fp32",
    "softmax.int": "fp32_dtype",
    "log_softmax.int": "fp32_dtype",
}


def _to_fp32(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64:
        return value.float()
    return value


def _kernel(overload: str, rule: str):
    name, _, variant = overload.partition(".")
    op = getattr(getattr(torch.ops.aten, name), variant or "default")

    def run_in_fp32(*args, **kwargs):
        with torch.autocast("cpu", enabled=False):
            if rule == "fp32_dtype":
                self, dim = args[0], args[1]
                if not torch.is_autocast_enabled("cpu") and self.dtype in (torch.float16, torch.bfloat16):
                    return op(self, dim, torch.float32)
                return op(*args, **kwargs)
            return op(*[_to_fp32(a) for a in args], **{k: _to_fp32(v) for k, v in kwargs.items()})

    return run_in_fp32


@contextmanager
def cuda_autocast_rules() -> Iterator[None]:
    """Inside the block, CPU autocast casts as CUDA autocast does for :data:`CUDA_FP32_RULES`."""
    library = torch.library.Library("aten", "IMPL")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "overriding a previously registered kernel" for ops CPU lists too
            for overload, rule in CUDA_FP32_RULES.items():
                library.impl(overload, _kernel(overload, rule), "AutocastCPU")
        yield
    finally:
        library._destroy()


__all__ = ["CUDA_FP32_RULES", "cuda_autocast_rules"]
