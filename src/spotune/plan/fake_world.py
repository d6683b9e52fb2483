"""The fake world a prediction runs in: ``FakeTensorMode`` on CPU, CUDA's autocast rules, modules that convert.

Tensors created inside have shapes, dtypes and devices but no data, so a full-size SDXL iteration runs on
a laptop with no memory to speak of. Two things need help:

* ``Module.to`` / ``.float()`` on a module whose parameters are fake swaps the parameter tensors
  (``torch.utils.swap_tensors``), which refuses a tensor that anything holds a weak reference to, and the
  fake mode's own memo of converted tensors holds one to every parameter created inside it. The swap here
  first drops those memo entries (they only serve conversions of real tensors, which a parameter's swap
  never needs again).
* CPU autocast differs from CUDA's (:mod:`spotune.plan.cuda_autocast`).
"""

from __future__ import annotations

import warnings
import weakref
from contextlib import ExitStack, contextmanager
from typing import Iterator
from unittest import mock

import torch

from spotune.plan.cuda_autocast import cuda_autocast_rules


def _forget(tensor: torch.Tensor, memo: weakref.WeakValueDictionary) -> None:
    """Remove ``tensor`` from the fake mode's memo, which holds the only weak references to it."""
    keys = [getattr(ref, "key", None) for ref in weakref.getweakrefs(tensor)]
    for key in keys:  # (no weakref object may outlive this loop: a live one would still block the swap)
        if key is not None and key in memo.data and memo.data[key]() is tensor:
            del memo.data[key]


@contextmanager
def fake_world() -> Iterator[object]:
    """Inside: tensors are fake CPU tensors, autocast follows CUDA's rules; yields the ``FakeTensorMode``."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    real_swap = torch.utils.swap_tensors

    def swap(t1: torch.Tensor, t2: torch.Tensor) -> None:
        memo = mode.fake_tensor_converter.meta_converter.tensor_memo
        _forget(t1, memo)
        _forget(t2, memo)
        real_swap(t1, t2)

    with ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", message=".*data pointer of FakeTensor.*")
        stack.enter_context(mock.patch("torch.utils.swap_tensors", swap))
        stack.enter_context(cuda_autocast_rules())
        stack.enter_context(mode)
        yield mode


__all__ = ["fake_world"]
