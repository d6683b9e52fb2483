"""Image scorers by name: ``get_scorer(name, **paths)`` returns ``scorer(images, prompts) -> [B] scores``.

=============  ==========================================================  ====================================
name           what                                                        path arguments
=============  ==========================================================  ====================================
pickscore      PickScore_v1: logit_scale.exp() * cosine                    model_path, processor_path
hpsv2          HPS v2: 100 * cosine of the converted open_clip ViT-H-14    checkpoint_path, tokenizer_path
hpsv21         HPS v2.1 (same model, newer checkpoint)                     checkpoint_path, tokenizer_path
aesthetic      LAION aesthetic predictor v2 on CLIP ViT-L/14               head_path, clip_path
clipscore      100 * max(cosine, 0) with a named CLIP                      model_path, processor_path
imagereward    ImageReward (BLIP + linear head)                            checkpoint_path, med_config_path,
                                                                           tokenizer_path
spm            the step-aware preference model at t = 0                    clip_path, checkpoint_path,
                                                                           processor_path
=============  ==========================================================  ====================================

Every scorer also takes ``device`` ("auto": CUDA when present), ``dtype`` ("float32" by default)
and ``batch_size``. Heavy imports happen when a scorer is built, not when this module is imported.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable

from spotune.eval.scorers.base import (
    BUILTIN_TINY_CLIP,
    MissingWeightError,
    Scorer,
    ScorerError,
    WeightFormatError,
    WeightSpec,
    require_path,
)


# name -> (module, factory, fixed leading arguments)
_FACTORIES: dict[str, tuple[str, str, tuple[Any, ...]]] = {
    "pickscore": ("spotune.eval.scorers.pickscore", "load_pickscore", ()),
    "hpsv2": ("spotune.eval.scorers.hps", "load_hps", ("hpsv2",)),
    "hpsv21": ("spotune.eval.scorers.hps", "load_hps", ("hpsv21",)),
    "aesthetic": ("spotune.eval.scorers.aesthetic", "load_aesthetic", ()),
    "clipscore": ("spotune.eval.scorers.clipscore", "load_clipscore", ()),
    "imagereward": ("spotune.eval.scorers.imagereward", "load_imagereward", ()),
    "spm": ("spotune.eval.scorers.spm", "load_spm", ()),
}
SCORER_NAMES: tuple[str, ...] = tuple(_FACTORIES)


def _factory(name: str) -> tuple[Callable[..., Scorer], tuple[Any, ...]]:
    if name not in _FACTORIES:
        raise ScorerError(f"unknown scorer '{name}'; available: {', '.join(SCORER_NAMES)}")
    module_name, attr, fixed = _FACTORIES[name]
    return getattr(importlib.import_module(module_name), attr), fixed


def scorer_parameters(name: str) -> list[str]:
    """The keyword arguments ``get_scorer(name, ...)`` accepts."""
    factory, fixed = _factory(name)
    params = list(inspect.signature(factory).parameters)
    return params[len(fixed) :]


def weight_specs(name: str) -> tuple[WeightSpec, ...]:
    """The local files scorer ``name`` needs (what, where published, which argument takes the path)."""
    if name not in _FACTORIES:
        raise ScorerError(f"unknown scorer '{name}'; available: {', '.join(SCORER_NAMES)}")
    module = importlib.import_module(_FACTORIES[name][0])
    if name in ("hpsv2", "hpsv21"):
        return (module.checkpoint_spec(name), module.TOKENIZER_SPEC)
    return tuple(module.WEIGHTS)


def missing_weights(name: str, **paths: Any) -> list[str]:
    """Messages for every required weight of ``name`` not given or not found (empty: all present).

    Checks paths only (nothing is loaded), so that a run can refuse to start before hours of work.
    """
    problems = []
    for spec in weight_specs(name):
        value = paths.get(spec.param)
        if str(value) == BUILTIN_TINY_CLIP or (spec.optional and not value):
            continue
        try:
            require_path(name, value, spec)
        except MissingWeightError as exc:
            problems.append(str(exc))
    return problems


def get_scorer(name: str, **paths: Any) -> Scorer:
    """Build the scorer ``name`` from local weight paths (nothing is downloaded).

    Example: ``get_scorer("pickscore", model_path="PickScore_v1", processor_path="CLIP-ViT-H-14")``.

    Raises:
        ScorerError: an unknown name or keyword.
        MissingWeightError: a weight path not given or not found (the message names the file expected
            and where it is published).
        WeightFormatError: a weight file that does not hold what the scorer expects.
    """
    factory, fixed = _factory(name)
    accepted = scorer_parameters(name)
    unknown = sorted(set(paths) - set(accepted))
    if unknown:
        raise ScorerError(f"scorer '{name}' takes no argument(s) {unknown}; it accepts {accepted}")
    return factory(*fixed, **paths)


__all__ = [
    "SCORER_NAMES",
    "MissingWeightError",
    "Scorer",
    "ScorerError",
    "WeightFormatError",
    "WeightSpec",
    "get_scorer",
    "missing_weights",
    "scorer_parameters",
    "weight_specs",
]
