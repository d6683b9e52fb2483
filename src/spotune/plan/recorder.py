"""What an iteration allocates and computes, op by op: live tensor storages, FLOPs and bytes moved, per phase.

:class:`ExecutionRecorder` is a ``TorchDispatchMode``. Every ATen op the recipe runs passes through it, so
it sees each new tensor storage (weak references tell it when the storage dies), the op's FLOPs (from
torch's own FLOP formulas) and the bytes the op reads and writes. It works the same on real tensors (a
real CPU run, measured) and under ``FakeTensorMode`` (shapes and dtypes only: the prediction), which is
what lets a test check that both give the same peak.

Bytes are counted as the CUDA caching allocator counts ``torch.cuda.memory_allocated``: each storage
rounded up to 512 bytes. Fragmentation, the CUDA context and library workspaces are not tensor storages;
:mod:`spotune.plan.report` keeps a margin for them.

Under ``FakeTensorMode`` there are no values, so the few places where the recipe reads one need a stand-in
(``stand_ins=True``):

* ``nonzero`` (which pairs pass the preference threshold) returns every index: every pair is kept, the
  most an iteration can train on, so the prediction is the worst case of memory and of time;
* a scalar read (``.item()``, ``float(t)``, ``.tolist()``: statistics, the finite-loss check) returns 0;
* an op whose tensor inputs are all real (the scheduler's tables and timesteps) runs for real, so the
  sampler's control flow sees the true timesteps.
"""

from __future__ import annotations

import weakref
from array import array
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

ALLOCATION_ROUNDING = 512  # bytes: the CUDA caching allocator's smallest block unit
aten = torch.ops.aten

# Ops that only ask about a tensor's layout: no kernel, nothing allocated.
_METADATA_OPS = {
    aten.sym_size.default, aten.sym_stride.default, aten.sym_numel.default, aten.sym_storage_offset.default,
    aten.is_contiguous.default, aten.is_contiguous.memory_format, aten.is_strides_like_format.default,
    aten.is_non_overlapping_and_dense.default, aten.size.default, aten.stride.default, aten.numel.default,
    aten.dim.default, aten.storage_offset.default, torch.ops.prim.layout.default, torch.ops.prim.device.default,
}
# Matrix-product kernels, which run on tensor cores (TF32 for float32 inputs where allowed).
TENSOR_CORE_OPS = {"mm", "bmm", "addmm", "baddbmm", "convolution", "convolution_backward", "_convolution",
                   "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward",
                   "_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward",
                   "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward",
                   "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward"}


def rounded(nbytes: int) -> int:
    """``nbytes`` rounded up to the allocator's 512-byte unit (0 stays 0)."""
    return -(-nbytes // ALLOCATION_ROUNDING) * ALLOCATION_ROUNDING


def cpu_attention_flop_formulas() -> dict[Any, Callable[..., int]]:
    """FLOP formulas (on shapes, as ``FlopCounterMode(custom_mapping=...)`` takes them) for the CPU
    flash-attention kernels torch's registry lacks.

    On a CPU, ``scaled_dot_product_attention`` runs ``_scaled_dot_product_flash_attention_for_cpu``, which
    stands in for CUDA's flash kernel (same FLOPs, no attention matrix in memory); without these entries
    attention would count as zero FLOPs.
    """
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    def cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    def cpu_sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    formulas: dict[Any, Callable[..., int]] = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        formulas[aten._scaled_dot_product_flash_attention_for_cpu] = cpu_sdpa
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        formulas[aten._scaled_dot_product_flash_attention_for_cpu_backward] = cpu_sdpa_backward
    return formulas


def flop_formulas() -> dict[Any, Callable[..., int]]:
    """torch's FLOP formulas by op packet plus :func:`cpu_attention_flop_formulas`, each called with the op's
    tensors (``formula(*args, **kwargs, out_val=out)``)."""
    from torch.utils.flop_counter import flop_registry, shape_wrapper

    return {**flop_registry, **{op: shape_wrapper(f) for op, f in cpu_attention_flop_formulas().items()}}


# Precision classes of an op's FLOPs: what the GPU's peak for it is ("tc-fp32": float32 on tensor cores
# where TF32 is allowed; "fp32": float32 elsewhere; "none": no counted FLOPs).
PRECISIONS = ("none", "fp16", "bf16", "tc-fp32", "fp32")


@dataclass
class PhaseRecord:
    """One phase's totals over the iteration.

    ``peak`` is the most bytes live at once during the phase; ``resident`` is what was live when the phase
    began on the call that reached that peak (weights, optimizer state, earlier phases' outputs), so
    ``peak - resident`` is the phase's own working memory.
    """

    name: str
    peak: int = 0
    resident: int = 0
    calls: int = 0
    flops: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    # One entry per kernel run (views excluded), for the time estimate: FLOPs, bytes read plus written,
    # and the index of its precision class in PRECISIONS.
    op_flops: array = field(default_factory=lambda: array("d"))
    op_bytes: array = field(default_factory=lambda: array("d"))
    op_precision: array = field(default_factory=lambda: array("B"))

    @property
    def total_flops(self) -> int:
        return sum(self.flops.values())


class ExecutionRecorder(TorchDispatchMode):
    """Counts live storage bytes (and their peak), FLOPs and bytes moved, attributed to named phases.

    Use as a context manager around the code to record (inside ``FakeTensorMode`` for a prediction);
    enter phases with :meth:`phase`. Storages on ``ignore_devices`` (by default the meta device, where
    the planner parks what the recipe offloads to host memory) are not counted.

    Args:
        stand_ins: answer value reads on fake tensors (see the module docstring); off for real runs.
        keep_ops: keep each op's :class:`OpCost` (for the time estimate); off when only memory is wanted.
    """

    def __init__(self, *, stand_ins: bool = False, keep_ops: bool = True,
                 ignore_devices: tuple[str, ...] = ("meta",)) -> None:
        super().__init__()
        self.stand_ins = stand_ins
        self.keep_ops = keep_ops
        self.ignore_devices = ignore_devices
        self.current = 0
        self.peak = 0
        self._live: dict[int, tuple[weakref.ref, int]] = {}
        self._formulas = flop_formulas()
        self.phases: dict[str, PhaseRecord] = {}
        self._phase: PhaseRecord = self._record("other")
        self._entered_at = 0
        self._phase_depth = 0
        self.sdpa_kernels: set[str] = set()

    # -- phases ------------------------------------------------------------------------------------
    def _record(self, name: str) -> PhaseRecord:
        if name not in self.phases:
            self.phases[name] = PhaseRecord(name)
        return self.phases[name]

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Attribute what runs inside to ``name``; a phase entered inside another belongs to the outer one
        (a UNet call inside ``backward``'s recomputation is backward's)."""
        if self._phase_depth:
            self._phase_depth += 1
            try:
                yield
            finally:
                self._phase_depth -= 1
            return
        outer, outer_entered = self._phase, self._entered_at
        self._phase, self._entered_at, self._phase_depth = self._record(name), self.current, 1
        self._phase.calls += 1
        try:
            yield
        finally:
            self._phase, self._entered_at, self._phase_depth = outer, outer_entered, 0

    def wrap(self, fn: Callable, name: str | Callable[[], str]) -> Callable:
        """``fn`` with every call recorded as phase ``name`` (or the name the callable returns then)."""

        def recorded(*args, **kwargs):
            with self.phase(name() if callable(name) else name):
                return fn(*args, **kwargs)

        return recorded

    def hook_module(self, module: torch.nn.Module, name: Callable[[], str]) -> None:
        """Record every forward of ``module`` as the phase ``name()`` names at the time of the call."""
        opened: list[Any] = []

        def pre(mod, args, kwargs):
            context = self.phase(name())
            context.__enter__()
            opened.append(context)

        def post(mod, args, kwargs, output):
            opened.pop().__exit__(None, None, None)

        module.register_forward_pre_hook(pre, with_kwargs=True)
        module.register_forward_hook(post, with_kwargs=True)

    # -- storages ----------------------------------------------------------------------------------
    def _track(self, tensor: torch.Tensor) -> None:
        if tensor.device.type in self.ignore_devices:
            return
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._live:
            return
        nbytes = rounded(storage.nbytes())
        self._live[key] = (weakref.ref(storage, lambda _ref, key=key: self._release(key)), nbytes)
        self.current += nbytes
        if self.current > self.peak:
            self.peak = self.current
        phase = self._phase
        if self.current > phase.peak:
            phase.peak, phase.resident = self.current, self._entered_at

    def _release(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            self.current -= entry[1]

    def live_bytes_of(self, tensors) -> int:
        """Bytes of the distinct tracked storages among ``tensors`` (an iterable of tensors)."""
        seen: dict[int, int] = {}
        for tensor in tensors:
            if tensor is None or tensor.device.type in self.ignore_devices:
                continue
            storage = tensor.untyped_storage()
            seen[storage._cdata] = rounded(storage.nbytes())
        return sum(seen.values())

    # -- the dispatch ------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA_OPS:
            return func(*args, **kwargs)
        flat_in = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        if self.stand_ins:
            fake_in = [a for a in flat_in if isinstance(a, FakeTensor)]
            # Real inputs only (the scheduler's tables, time ids built from Python numbers): real outputs.
            # Real meta tensors (what the planner offloads) go on to the fake mode, which makes them fake.
            if flat_in and not fake_in and not any(a.is_meta for a in flat_in):
                with _disable_current_modes():
                    out = func(*args, **kwargs)
                for tensor in tree_flatten(out)[0]:
                    if isinstance(tensor, torch.Tensor):
                        self._track(tensor)
                return out
            if fake_in and func is aten._local_scalar_dense.default:
                return False if args[0].dtype == torch.bool else 0
            if fake_in and func is aten.nonzero.default:
                out = _every_index(args[0])
                self._track(out)
                return out
        packet = func._overloadpacket
        out = func(*args, **kwargs)
        flat_out = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        for tensor in flat_out:
            self._track(tensor)
        self._count(func, packet, args, kwargs, out, flat_in, flat_out)
        return out

    def _count(self, func, packet, args, kwargs, out, flat_in, flat_out) -> None:
        flops = 0
        if packet in self._formulas:
            flops = int(self._formulas[packet](*args, **kwargs, out_val=out))
        name = packet.__name__
        if "scaled_dot_product" in name and "backward" not in name:
            self.sdpa_kernels.add(name)
        returns = func._schema.returns
        alias = returns[0].alias_info if returns else None
        kernel = not (alias is not None and not alias.is_write)  # a view runs no kernel
        dtype = next((t.dtype for t in flat_in if t.is_floating_point()), None)
        if flops == 0:
            precision = "none"
        elif dtype in (torch.float16, torch.bfloat16):
            precision = "fp16" if dtype == torch.float16 else "bf16"
        else:
            precision = "tc-fp32" if name in TENSOR_CORE_OPS else "fp32"
        phase = self._phase
        if flops:
            phase.flops[precision] += flops
        if self.keep_ops and kernel:
            phase.op_flops.append(flops)
            phase.op_bytes.append(_bytes_touched(flat_in) + _bytes_touched(flat_out))
            phase.op_precision.append(PRECISIONS.index(precision))

    @property
    def total_flops(self) -> int:
        return sum(p.total_flops for p in self.phases.values())


def _bytes_touched(tensors: list[torch.Tensor]) -> int:
    """Bytes an op reads or writes in ``tensors``: each tensor's own elements (a view's, not its base's;
    a tensor passed twice counts twice, as a kernel reading it twice would)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def _every_index(mask: torch.Tensor) -> torch.Tensor:
    """``mask.nonzero()`` as if every element were true: [numel, dim] indices in row-major order."""
    grids = torch.meshgrid(*[torch.arange(n, device=mask.device) for n in mask.shape], indexing="ij")
    return torch.stack(grids, dim=-1).reshape(-1, mask.dim())


__all__ = ["ALLOCATION_ROUNDING", "PRECISIONS", "ExecutionRecorder", "PhaseRecord", "cpu_attention_flop_formulas",
           "flop_formulas", "rounded"]
