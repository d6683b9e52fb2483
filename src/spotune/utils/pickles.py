"""The one way spotune reads a torch pickle: weights only, and one line when a file holds more.

``torch.load(weights_only=True)`` refuses a pickle that would rebuild Python objects (and so run code
named in the file). Its message spans several lines and ends by suggesting ``weights_only=False``, which
would run a stranger's code; :func:`load_weights_only` says instead what the file holds and how to turn a
file one trusts into safetensors.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from spotune.errors import SpotuneError

# torch's WeightsUnpickler names the first object it refused: "Unsupported global: GLOBAL __main__.Obj was not ..."
_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+) was not an allowed global")


class UnsafePickleError(SpotuneError, ValueError):
    """A pickle that holds more than tensors: loading it would run code named in the file."""


class DamagedPickleError(SpotuneError, ValueError):
    """A file torch cannot unpickle at all: damaged, truncated, or no torch checkpoint."""


# torch wraps every failure of a weights-only load in the same long text; the refusal of an object names a
# global ("Unsupported global: ..."), while a damaged file fails on its bytes ("Unsupported operand 110").
_REFUSED_OBJECT = "Unsupported global"
_UNPICKLER_REASON_RE = re.compile(r"WeightsUnpickler error:\s*(.+?)(?:\n|$)")


def load_weights_only(path: str | Path, map_location: Any = "cpu", **kwargs: Any) -> Any:
    """``torch.load(path, map_location, weights_only=True, **kwargs)``.

    Raises:
        UnsafePickleError: the file pickles Python objects besides tensors, naming the file, the first such
            object when torch names it, and how to convert a trusted file to safetensors.
        DamagedPickleError: torch could not unpickle the file's bytes (one line naming the file and why).
        Exception: whatever else torch raises for a damaged or truncated file (callers name the file).
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True, **kwargs)
    except pickle.UnpicklingError as exc:
        if _REFUSED_OBJECT not in str(exc):  # the bytes themselves are broken: no advice about weights_only
            found = _UNPICKLER_REASON_RE.search(str(exc))
            reason = found.group(1).strip() if found else " ".join(str(exc).split())[:200]
            raise DamagedPickleError(
                f"{path} is damaged, truncated or not a torch checkpoint (unpickling failed: {reason})"
            ) from None
        found = _GLOBAL_RE.search(str(exc))
        what = f"pickled Python objects, e.g. {found.group(1)}" if found else "pickled Python objects"
        raise UnsafePickleError(
            f"{path} holds more than tensors ({what}), and loading those would run code named in the file; spotune "
            "loads only weights-only pickles and .safetensors files. If you trust the file, convert it once: in "
            "Python, load it with torch.load and weights_only=False, save its dict of tensors with "
            "safetensors.torch.save_file to a .safetensors file, and give spotune that file"
        ) from None
