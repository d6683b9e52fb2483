"""What every scorer shares: the call contract, batching, weight-file checks, device and dtype.

A scorer is a callable ``scorer(images: list[PIL.Image], prompts: list[str]) -> torch.Tensor`` that
returns one float32 score per image (on the CPU). Subclasses of :class:`Scorer` implement
:meth:`Scorer.score_batch`; the base class validates the inputs, cuts them into batches and runs
without gradients. Weight files are never downloaded: :func:`require_path` turns a missing path
into an error that names the file expected and where it is published.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from spotune.errors import SpotuneError
from spotune.hints import key
from spotune.utils.pickles import UnsafePickleError, load_weights_only


BUILTIN_TINY_CLIP = "builtin:tiny-clip"  # the tiny random CLIP built in code (tests, CPU demos)


class ScorerError(SpotuneError, ValueError):
    """A scorer asked for by a wrong name, with wrong arguments, or fed inputs it cannot score."""


class MissingWeightError(SpotuneError, FileNotFoundError):
    """A scorer's weight file (or folder) was not given or does not exist."""


class WeightFormatError(SpotuneError, ValueError):
    """A weight file that exists but does not hold what the scorer expects."""


@dataclass(frozen=True)
class WeightSpec:
    """One local file or folder a scorer needs.

    Attributes:
        param: the keyword argument of :func:`spotune.eval.get_scorer` that takes its path.
        expected: what should be there, e.g. ``HPS_v2_compressed.pt``.
        published: where the user can get it.
        kind: ``"file"``, ``"dir"``, or ``"any"`` (a file or a folder, e.g. a checkpoint or a run).
        optional: the scorer can do without it (it then looks elsewhere, e.g. in the model folder).
    """

    param: str
    expected: str
    published: str
    kind: str = "file"
    optional: bool = False


def require_path(scorer: str, path: str | Path | None, spec: WeightSpec) -> Path:
    """``path`` as a :class:`Path` when it exists and has the right kind, else a :class:`MissingWeightError`.

    Messages name the setting as the running command calls it (``pickscore_model`` in ``spotune eval``,
    see :mod:`spotune.hints`), or the keyword argument of :func:`spotune.eval.get_scorer` otherwise.
    """
    where = {"file": f"the file {spec.expected}", "dir": f"a folder holding {spec.expected}"}.get(spec.kind, spec.expected)
    name = key(spec.param)
    if path is None or str(path).strip() == "":
        raise MissingWeightError(
            f"scorer '{scorer}' needs {where} (published at {spec.published}); nothing was given: "
            f"pass its local path as {name}=PATH. Nothing is downloaded."
        )
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise MissingWeightError(
            f"scorer '{scorer}': {name}={resolved} does not exist (expected {where}, "
            f"published at {spec.published})"
        )
    if spec.kind == "file" and not resolved.is_file():
        raise MissingWeightError(f"scorer '{scorer}': {name}={resolved} is not a file (expected {where})")
    if spec.kind == "dir" and not resolved.is_dir():
        raise MissingWeightError(f"scorer '{scorer}': {name}={resolved} is not a folder (expected {where})")
    return resolved


def load_state_dict_file(path: Path, scorer: str) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a pickled checkpoint (read with ``weights_only=True``).

    Checkpoints that wrap the weights (``{"state_dict": ...}``, ``{"model": ...}``) are unwrapped and
    a DistributedDataParallel ``module.`` prefix is removed.
    """
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as exc:
            raise WeightFormatError(f"scorer '{scorer}': {path} is not a readable safetensors file ({exc})") from exc
    else:
        try:
            state = load_weights_only(path)
        except UnsafePickleError as exc:
            raise WeightFormatError(f"scorer '{scorer}': {exc}") from None
        except Exception as exc:
            raise WeightFormatError(
                f"scorer '{scorer}': {path} could not be read as a tensor checkpoint with weights_only=True ({exc})"
            ) from exc
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightFormatError(f"scorer '{scorer}': {path} does not hold a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` / ``"auto"`` -> CUDA when present, else the CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """``None`` / ``"auto"`` -> float32 (scores are compared across runs, so full precision by default)."""
    if dtype is None or str(dtype) == "auto":
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ScorerError(f"unknown dtype '{dtype}'; use one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


class Scorer:
    """Base class: ``scorer(images, prompts) -> [B]`` float32 scores, computed in batches.

    Args:
        batch_size: images per forward pass.
        device: where the model runs.
    """

    name: str = "scorer"

    def __init__(self, batch_size: int = 16, device: torch.device | None = None) -> None:
        if batch_size < 1:
            raise ScorerError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        self.device = device or torch.device("cpu")

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        """[B] images and captions -> [B] scores (any float dtype or device)."""
        raise NotImplementedError

    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        images, prompts = list(images), list(prompts)
        if len(images) != len(prompts):
            raise ScorerError(f"{self.name}: got {len(images)} images but {len(prompts)} prompts")
        for i, (image, prompt) in enumerate(zip(images, prompts)):
            if not isinstance(image, Image.Image):
                raise ScorerError(f"{self.name}: item {i} is a {type(image).__name__}, expected a PIL image")
            if not isinstance(prompt, str):
                raise ScorerError(f"{self.name}: prompt {i} is a {type(prompt).__name__}, expected text")
        if not images:
            return torch.zeros(0)
        out = []
        with torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                stop = start + self.batch_size
                scores = self.score_batch(images[start:stop], prompts[start:stop])
                out.append(scores.detach().float().reshape(-1).cpu())
        return torch.cat(out)
