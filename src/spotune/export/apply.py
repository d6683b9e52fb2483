"""Put a :class:`LoraWeights` onto a diffusers UNet: as a switchable peft adapter, or fused into the weights.

Every module the LoRA names is checked against the UNet first: the LoRA's family (SD1.5 or SDXL, read
from its names and shapes) is the UNet's, then each module exists, is a Linear or Conv2d, and the shapes
fit. So a LoRA for another architecture fails with the file and the offending key before anything is
changed. This is the one place export and generate check it. kohya's SDXL files, named by the original
(sgm) UNet layout, are renamed to diffusers' modules here from the UNet's own config.
"""

from __future__ import annotations

import torch
from torch import nn

from spotune.export.lora_files import LoraFormatError, LoraWeights
from spotune.export.lora_layout import diffusers_module_names, lora_family
from spotune.export.naming import PEFT_A, PEFT_B, kohya_lookup
from spotune.export.original_layout import OriginalLayoutError
from spotune.models.family import FamilyError, ModelFamily, family_of_unet


def _base_layer(module: nn.Module) -> nn.Module:
    """The wrapped layer of a peft LoRA layer (the UNet may already carry an adapter), else the module."""
    return getattr(module, "base_layer", module)


def _plain_module_names(unet: nn.Module) -> dict[str, nn.Module]:
    """Module names of the UNet as it is without any peft adapter (``lora_A``, ``base_layer`` left out)."""
    return {
        name: module
        for name, module in unet.named_modules()
        if name and not any(part in ("base_layer", "lora_A", "lora_B", "lora_dropout", "lora_embedding_A",
                                     "lora_embedding_B", "lora_magnitude_vector") for part in name.split("."))
    }


def _expected_shapes(layer: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    if isinstance(layer, nn.Linear):
        return (rank, layer.in_features), (layer.out_features, rank)
    if isinstance(layer, nn.Conv2d):
        return (rank, layer.in_channels // layer.groups, *layer.kernel_size), (layer.out_channels, rank, 1, 1)
    return None


def check_lora_family(
    weights: LoraWeights, family: ModelFamily, what: str, fix: str = "use it with a base model of its own family"
) -> None:
    """Refuse a LoRA of the other family than ``family`` (``what``: how to name the model it would go on;
    ``fix``: what the user can change, e.g. the command's option).

    Raises:
        FamilyError: naming the LoRA file, both families and the evidence.
    """
    found, why = lora_family(weights)
    if found is not None and found is not family:
        raise FamilyError(
            f"{weights.source} is a LoRA for {found.title} ({why}), but {what} is {family.title}: {fix}"
        )


def resolve_modules(unet: nn.Module, weights: LoraWeights) -> dict[str, str]:
    """Map each module name of ``weights`` to the UNet's module name, checking family, existence and shapes.

    kohya names are read back heuristically (:func:`~spotune.export.naming.module_from_kohya`); when
    that guess is not a module here, the underscored form is matched exactly against this UNet.
    Original-layout names (kohya's SDXL) are renamed by this UNet's config first.

    Raises:
        FamilyError: a LoRA of the other family.
        LoraFormatError: naming ``weights.source`` and the first key that does not fit.
    """
    check_lora_family(weights, family_of_unet(unet), "the base model")
    diffusers_names = {m: m for m in weights.modules}
    if weights.layout != "diffusers":
        try:
            diffusers_names = diffusers_module_names(weights.modules, unet.config)
        except OriginalLayoutError as exc:
            raise LoraFormatError(f"{weights.source}: {exc}") from exc
    modules = _plain_module_names(unet)
    by_underscore = kohya_lookup(modules)
    resolved: dict[str, str] = {}
    for name in weights.modules:
        candidate = diffusers_names[name]
        target = candidate if candidate in modules else by_underscore.get(candidate.replace(".", "_"))
        key = f"{name}.{PEFT_A}"
        if target is None:
            raise LoraFormatError(
                f"{weights.source}: key {key} targets module {name}, which this UNet does not have "
                "(is the LoRA for another architecture, e.g. SDXL?)"
            )
        layer = _base_layer(modules[target])
        rank = weights.module_rank(name)
        expected = _expected_shapes(layer, rank)
        if expected is None:
            raise LoraFormatError(
                f"{weights.source}: key {key} targets {target}, a {type(layer).__name__}; LoRA fits Linear and Conv2d only"
            )
        got = (tuple(weights.state_dict[key].shape), tuple(weights.state_dict[f"{name}.{PEFT_B}"].shape))
        if got != expected:
            raise LoraFormatError(
                f"{weights.source}: key {key} has lora_A {got[0]} / lora_B {got[1]}, but module {target} of this "
                f"UNet needs {expected[0]} / {expected[1]} (a LoRA for another architecture or model size)"
            )
        resolved[name] = target
    return resolved


@torch.no_grad()
def fuse_lora_weights(unet: nn.Module, weights: LoraWeights, scale: float = 1.0) -> None:
    """Add ``scale * (alpha / r) * B @ A`` to each adapted weight in place (computed in fp32)."""
    modules = _plain_module_names(unet)
    for name, target in resolve_modules(unet, weights).items():
        layer = _base_layer(modules[target])
        update = scale * weights.delta(name)
        layer.weight.copy_((layer.weight.float() + update.to(layer.weight.device)).to(layer.weight.dtype))


def apply_lora(
    unet: nn.Module,
    weights: LoraWeights,
    scale: float = 1.0,
    *,
    fuse: bool = False,
    adapter_name: str = "spotune_lora",
) -> str | None:
    """Add ``weights`` to a diffusers UNet.

    Args:
        unet: a ``UNet2DConditionModel`` (it may already carry other peft adapters).
        weights: from :func:`~spotune.export.load_lora_file`.
        scale: multiplies every module's alpha / r (1.0 = the LoRA as trained, 0 = off).
        fuse: add the update into the base weights (no adapter remains; fastest at inference). Otherwise
            a peft adapter named ``adapter_name`` is added and made the active adapter.
        adapter_name: the peft adapter name to use when not fusing.
    Returns:
        The adapter name, or ``None`` when fused.
    Raises:
        LoraFormatError: a module that does not exist in ``unet`` or whose shape does not match.
    """
    if fuse:
        fuse_lora_weights(unet, weights, scale)
        return None
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    resolved = resolve_modules(unet, weights)
    targets = sorted(resolved.values())
    state = {}
    for name, target in resolved.items():
        state[f"{target}.{PEFT_A}"] = weights.state_dict[f"{name}.{PEFT_A}"]
        state[f"{target}.{PEFT_B}"] = weights.state_dict[f"{name}.{PEFT_B}"]
    rank_of = {t: weights.module_rank(n) for n, t in resolved.items()}
    alpha_of = {t: weights.module_alpha(n) for n, t in resolved.items()}
    config = LoraConfig(
        r=weights.rank,
        lora_alpha=weights.alpha,
        # Full module paths; patterns anchored with ^ so a path never matches a deeper module's suffix.
        target_modules=targets,
        rank_pattern={f"^{t}": r for t, r in rank_of.items() if r != weights.rank},
        alpha_pattern={f"^{t}": a for t, a in alpha_of.items() if a != weights.alpha},
        init_lora_weights=False,
    )
    unet.add_adapter(config, adapter_name=adapter_name)
    set_peft_model_state_dict(unet, state, adapter_name=adapter_name)
    loaded = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    if set(loaded) != set(state):
        extra = sorted(set(loaded) ^ set(state))
        raise LoraFormatError(f"{weights.source}: the adapter did not take key {extra[0]}")
    for module in unet.modules():
        if isinstance(module, LoraLayer):
            module.set_scale(adapter_name, scale)
    return adapter_name
