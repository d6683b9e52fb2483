"""LoRA weights in memory (:class:`LoraWeights`) and the files they come from and go to.

Reading (:func:`load_lora_file`) accepts a spotune run or checkpoint folder, a diffusers LoRA
(``pytorch_lora_weights.safetensors`` or its folder) and a kohya/webui ``.safetensors``; all three give
the same peft-named state dict. Writing (:func:`diffusers_lora_file`, :func:`webui_lora_file`) returns
tensors plus metadata; the caller writes them atomically.

The scale of a module's update is ``alpha / rank``: ``W' = W + (alpha / r) * B @ A`` with A = lora_A
[r, in] and B = lora_B [out, r].
"""

from __future__ import annotations

import collections
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from spotune.errors import SpotuneError
from spotune.export.metadata import SAI_MODEL_SPEC_VERSION, SD15_DEFAULT_RESOLUTION, kohya_hashes, model_name, now_iso
from spotune.export.naming import (
    DIFFUSERS_UNET_PREFIX,
    KOHYA_ALPHA,
    KOHYA_DOWN,
    KOHYA_TEXT_PREFIXES,
    KOHYA_UNET_PREFIX,
    KOHYA_UP,
    ORIGINAL_LAYOUT_MARKERS,
    PEFT_A,
    PEFT_B,
    kohya_module_name,
    module_from_kohya,
    split_peft_key,
)
from spotune.utils.pickles import UnsafePickleError, load_weights_only

if TYPE_CHECKING:
    from spotune.models.family import ModelFamily

DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # what diffusers' save_lora_weights writes
TORCH_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


class LoraFormatError(SpotuneError, ValueError):
    """A LoRA file that cannot be read, is for another architecture, or does not fit the model."""


@dataclass
class LoraWeights:
    """A UNet LoRA in spotune's (peft) naming.

    Attributes:
        state_dict: ``<module>.lora_A.weight`` [r, in] (or [r, in, kh, kw] for convolutions) and
            ``<module>.lora_B.weight`` [out, r] (or [out, r, 1, 1]), diffusers module names.
        rank: the most common rank r over modules.
        alpha: the most common alpha; a module's update is scaled by its alpha / its rank.
        source_format: "spotune", "diffusers" or "webui".
        source: the file or folder the weights were read from (for error messages).
        alphas: alpha of every module (module name -> alpha).
        layout: ``diffusers`` (module names as in diffusers' UNet) or ``original`` (the LDM/sgm UNet's
            names, dotted: ``input_blocks.4.1.transformer_blocks.0.attn1.to_q``, as kohya's SDXL files
            carry them); :mod:`spotune.export.lora_layout` converts between the two for a UNet config.
    """

    state_dict: dict[str, torch.Tensor]
    rank: int
    alpha: float
    source_format: str
    source: Path
    alphas: dict[str, float] = field(default_factory=dict)
    layout: str = "diffusers"

    @property
    def modules(self) -> list[str]:
        """Adapted module names, sorted."""
        return sorted({split_peft_key(k)[0] for k in self.state_dict})  # type: ignore[index]

    def module_rank(self, module: str) -> int:
        return int(self.state_dict[f"{module}.{PEFT_A}"].shape[0])

    def module_alpha(self, module: str) -> float:
        return float(self.alphas.get(module, self.alpha))

    def module_scale(self, module: str) -> float:
        """alpha / r of one module: the factor on ``B @ A``."""
        return self.module_alpha(module) / self.module_rank(module)

    def delta(self, module: str) -> torch.Tensor:
        """The weight update ``(alpha / r) * B @ A`` of one module in fp32: [out, in] or [out, in, kh, kw]."""
        a = self.state_dict[f"{module}.{PEFT_A}"].float()
        b = self.state_dict[f"{module}.{PEFT_B}"].float()
        if a.ndim == 4:  # conv LoRA: B is [out, r, 1, 1], A is [r, in, kh, kw]
            product = torch.einsum("or,rikl->oikl", b.flatten(1), a)
        else:
            product = b @ a
        return self.module_scale(module) * product


# -- reading --------------------------------------------------------------------------------------


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and safetensors metadata of ``path``; pickles are read with ``weights_only=True``."""
    try:
        if path.suffix in TORCH_PICKLE_SUFFIXES:
            loaded = load_weights_only(path)
            if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
                loaded = loaded["state_dict"]
            if not isinstance(loaded, dict):
                raise ValueError(f"holds a {type(loaded).__name__}, not a dict of tensors")
            tensors = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
            return tensors, {}
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            return {k: handle.get_tensor(k) for k in handle.keys()}, metadata
    except UnsafePickleError:
        raise  # already one line naming the file
    except Exception as exc:  # safetensors and torch raise many types; the user needs the file name
        raise LoraFormatError(
            f"{path}: cannot read it as a LoRA file ({type(exc).__name__}: {exc}); expected a .safetensors "
            "file (or a torch .bin/.pt)"
        ) from exc


def _majority(values: list[float]) -> float:
    return collections.Counter(values).most_common(1)[0][0]


def _finish(
    state: dict[str, torch.Tensor], alphas: dict[str, float], fmt: str, source: Path, layout: str = "diffusers"
) -> LoraWeights:
    """Check that every module has a matching A/B pair and wrap them in :class:`LoraWeights`."""
    if not state:
        raise LoraFormatError(f"{source}: holds no UNet LoRA weights")
    modules = sorted({split_peft_key(k)[0] for k in state})  # type: ignore[index]
    ranks = []
    for module in modules:
        a, b = state.get(f"{module}.{PEFT_A}"), state.get(f"{module}.{PEFT_B}")
        if a is None or b is None:
            missing = f"{module}.{PEFT_A if a is None else PEFT_B}"
            raise LoraFormatError(f"{source}: module {module} has no {missing} (each module needs both halves)")
        if a.ndim not in (2, 4) or b.ndim != a.ndim or a.shape[0] != b.shape[1]:
            raise LoraFormatError(
                f"{source}: module {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; expected "
                "A [r, in] and B [out, r] with the same r"
            )
        ranks.append(int(a.shape[0]))
    alphas = {m: float(alphas.get(m, state[f"{m}.{PEFT_A}"].shape[0])) for m in modules}
    return LoraWeights(
        state_dict=state,
        rank=int(_majority(ranks)),
        alpha=float(_majority(list(alphas.values()))),
        source_format=fmt,
        source=source,
        alphas=alphas,
        layout=layout,
    )


def _from_kohya(tensors: dict[str, torch.Tensor], source: Path) -> LoraWeights:
    text_keys = [k for k in tensors if k.startswith(KOHYA_TEXT_PREFIXES)]
    if any(k.startswith("lora_te2_") for k in text_keys):
        raise LoraFormatError(
            f"{source}: holds SDXL text-encoder weights (e.g. {next(k for k in text_keys if k.startswith('lora_te2_'))}); "
            f"spotune applies UNet LoRAs (keys starting with {KOHYA_UNET_PREFIX})"
        )
    if text_keys:
        only = "only text-encoder weights" if len(text_keys) == len(tensors) else "text-encoder weights"
        raise LoraFormatError(
            f"{source}: holds {only} (e.g. {text_keys[0]}); spotune applies UNet LoRAs "
            f"(keys starting with {KOHYA_UNET_PREFIX})"
        )
    state: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    layouts: dict[str, str] = {}
    for key, value in tensors.items():
        name, _, part = key.partition(".")
        if not name.startswith(KOHYA_UNET_PREFIX):
            raise LoraFormatError(f"{source}: key {key} is not a kohya UNet LoRA key (expected {KOHYA_UNET_PREFIX}...)")
        body = name.removeprefix(KOHYA_UNET_PREFIX)
        # kohya names SDXL's modules by the original (sgm) UNet, SD1.5's by diffusers' UNet.
        layouts.setdefault("original" if body.startswith(ORIGINAL_LAYOUT_MARKERS) else "diffusers", key)
        module = module_from_kohya(body)
        if part == KOHYA_DOWN:
            state[f"{module}.{PEFT_A}"] = value
        elif part == KOHYA_UP:
            state[f"{module}.{PEFT_B}"] = value
        elif part == KOHYA_ALPHA:
            alphas[module] = float(value.float().item())
        else:
            raise LoraFormatError(
                f"{source}: key {key} is not plain LoRA (expected .{KOHYA_DOWN}, .{KOHYA_UP} or .{KOHYA_ALPHA}; "
                "LyCORIS/LoHa/DoRA variants are not supported)"
            )
    if len(layouts) > 1:
        raise LoraFormatError(
            f"{source}: mixes original-layout names ({layouts['original']}) with diffusers-layout ones "
            f"({layouts['diffusers']}); a kohya file uses one UNet layout"
        )
    return _finish(state, alphas, "webui", source, layout=next(iter(layouts), "diffusers"))


def _pattern_value(module: str, patterns: dict[str, Any]) -> Any | None:
    """peft's rule for rank_pattern / alpha_pattern keys: the key matches a suffix of the module path."""
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?(?:{pattern})", module):
            return value
    return None


def _from_diffusers(tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: Path) -> LoraWeights:
    config: dict[str, Any] = {}
    if DIFFUSERS_METADATA_KEY in metadata:
        try:
            packed = json.loads(metadata[DIFFUSERS_METADATA_KEY])
        except json.JSONDecodeError as exc:
            raise LoraFormatError(f"{source}: metadata '{DIFFUSERS_METADATA_KEY}' is not JSON ({exc})") from exc
        config = {k.removeprefix(DIFFUSERS_UNET_PREFIX): v for k, v in packed.items() if k.startswith(DIFFUSERS_UNET_PREFIX)}
    state: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    for key, value in tensors.items():
        if key.startswith(("text_encoder.", "text_encoder_2.")):
            raise LoraFormatError(f"{source}: key {key} is a text-encoder LoRA weight; spotune applies UNet LoRAs only")
        name = key.removeprefix(DIFFUSERS_UNET_PREFIX)
        # The pre-peft diffusers spelling of the same tensors.
        name = name.replace(".lora.down.weight", f".{PEFT_A}").replace(".lora.up.weight", f".{PEFT_B}")
        if name.endswith(".alpha") and value.numel() == 1:
            alphas[name.removesuffix(".alpha")] = float(value.float().item())
        elif split_peft_key(name):
            state[name] = value
        else:
            raise LoraFormatError(
                f"{source}: key {key} is not a LoRA weight (expected unet.<module>.lora_A.weight / lora_B.weight)"
            )
    modules = {split_peft_key(k)[0] for k in state}  # type: ignore[index]
    if config:
        # diffusers' metadata is the LoraConfig: lora_alpha with per-module exceptions in alpha_pattern.
        for module in modules:
            if module in alphas:
                continue
            alpha = _pattern_value(module, config.get("alpha_pattern") or {})
            alphas[module] = float(alpha if alpha is not None else config.get("lora_alpha", config.get("r")))
    # Without metadata diffusers takes alpha = rank (scale 1), which _finish does for missing modules.
    return _finish(state, alphas, "diffusers", source)


def _from_checkpoint(folder: Path, which: str = "trained") -> LoraWeights:
    from spotune.checkpoint import load_weights, read_state, resolve_checkpoint

    checkpoint = resolve_checkpoint(folder)
    state = read_state(checkpoint)
    kind, weights = load_weights(checkpoint, which)
    if kind != "lora":
        raise LoraFormatError(
            f"{checkpoint}: a full fine-tune checkpoint holds a whole UNet, not a LoRA "
            "(export it with --format merged or single-file)"
        )
    lora = state.get("lora") or {}
    rank = int(lora.get("rank") or _majority([int(v.shape[0]) for k, v in weights.items() if k.endswith(PEFT_A)]))
    alpha = float(lora["alpha"]) if lora.get("alpha") is not None else float(rank)
    modules = {split_peft_key(k)[0] for k in weights if split_peft_key(k)}  # type: ignore[index]
    unknown = [k for k in weights if not split_peft_key(k)]
    if unknown:
        raise LoraFormatError(f"{checkpoint}/{'ema' if which == 'ema' else 'lora'}.safetensors: key {unknown[0]} is not a peft LoRA weight")
    return _finish(weights, {m: alpha for m in modules}, "spotune", checkpoint)


def _detect(tensors: dict[str, torch.Tensor]) -> str | None:
    if any(k.startswith((KOHYA_UNET_PREFIX, *KOHYA_TEXT_PREFIXES)) for k in tensors):
        return "webui"
    if any(".lora_A." in k or ".lora_B." in k or ".lora.down." in k or ".lora.up." in k for k in tensors):
        return "diffusers"
    return None


def load_lora_file(path: str | Path, weights: str = "trained") -> LoraWeights:
    """Read a UNet LoRA from any of the formats spotune knows.

    Args:
        path: a spotune run folder (latest checkpoint) or checkpoint folder; a diffusers LoRA folder
            (with ``pytorch_lora_weights.safetensors``) or file; a kohya/webui ``.safetensors``.
        weights: for a run or checkpoint folder, "trained" or "ema" (a GradSPO run's EMA LoRA).
    kohya files with original-layout UNet names (kohya's SDXL naming) are read with ``layout="original"``;
    :func:`~spotune.export.apply.apply_lora` renames them for the UNet they are applied to.

    Raises:
        LoraFormatError: naming the file and the first key that does not fit (text-encoder weights, a mix
            of both UNet layouts, LyCORIS variants, corrupt files).
    """
    path = Path(path)
    if not path.exists():
        raise LoraFormatError(f"{path} does not exist (expected a LoRA .safetensors file, or a run/checkpoint folder)")
    if path.is_dir():
        if (path / "state.json").is_file() or (path / "checkpoints").is_dir():
            return _from_checkpoint(path, weights)
        if (path / DIFFUSERS_LORA_FILE).is_file():
            path = path / DIFFUSERS_LORA_FILE
        else:
            raise LoraFormatError(
                f"{path} is a folder but neither a spotune run/checkpoint (state.json or checkpoints/) nor a "
                f"diffusers LoRA folder ({DIFFUSERS_LORA_FILE})"
            )
    tensors, metadata = _read_tensors(path)
    kind = _detect(tensors)
    if kind == "webui":
        return _from_kohya(tensors, path)
    if kind == "diffusers":
        return _from_diffusers(tensors, metadata, path)
    if any(k.startswith("model.diffusion_model.") for k in tensors):
        raise LoraFormatError(f"{path} is a full model checkpoint, not a LoRA (pass it as the base model)")
    first = next(iter(tensors), "(no tensors)")
    raise LoraFormatError(
        f"{path}: no LoRA weights recognised (first key {first}); expected kohya keys "
        f"({KOHYA_UNET_PREFIX}...lora_down.weight) or diffusers keys (unet.<module>.lora_A.weight)"
    )


# -- writing --------------------------------------------------------------------------------------


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.detach().to("cpu", dtype=dtype).contiguous()


def diffusers_lora_tensors(weights: LoraWeights) -> dict[str, torch.Tensor]:
    """peft-named fp32 tensors whose plain product is the update: ``B' @ A' = (alpha / r) * B @ A``.

    diffusers before 0.34 ignores any alpha in a diffusers-format file: it builds its LoraConfig from
    the tensors alone, with ``r`` the most common rank of the ``lora_B`` tensors and ``lora_alpha`` the
    rank of the first one, so every module gets scale ``first rank / its rank``; 0.34 on reads the
    LoraConfig from the ``lora_adapter_metadata`` header. A file is applied the same by both only if
    that header says what the old rule assumes. So each module's alpha / r is folded into its
    lora_B, and modules of lower rank are zero-padded to the largest rank (zero rows of A and zero
    columns of B add nothing to ``B @ A``): every module then has rank R and alpha R, scale 1.

    Returns:
        ``<module>.lora_A.weight`` [R, in] (or [R, in, kh, kw]) and ``<module>.lora_B.weight``
        [out, R] (or [out, R, 1, 1]), float32.
    """
    full_rank = max(weights.module_rank(m) for m in weights.modules)
    out: dict[str, torch.Tensor] = {}
    for module in weights.modules:
        a = weights.state_dict[f"{module}.{PEFT_A}"].detach().float().cpu()
        b = weights.state_dict[f"{module}.{PEFT_B}"].detach().float().cpu() * weights.module_scale(module)
        missing = full_rank - a.shape[0]
        if missing:
            a = torch.cat([a, a.new_zeros((missing, *a.shape[1:]))], dim=0)
            b = torch.cat([b, b.new_zeros((b.shape[0], missing, *b.shape[2:]))], dim=1)
        out[f"{module}.{PEFT_A}"] = a
        out[f"{module}.{PEFT_B}"] = b
    return out


def diffusers_lora_file(weights: LoraWeights, dtype: torch.dtype = torch.float16) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata in the layout of diffusers' ``StableDiffusionPipeline.save_lora_weights``.

    Keys are ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` holding :func:`diffusers_lora_tensors`
    (alpha / r folded into lora_B, one rank R for all modules), so every diffusers version applies the
    same update. The ``lora_adapter_metadata`` header (read from diffusers 0.34 on) is the LoraConfig
    with ``r = lora_alpha = R``, keys prefixed ``unet.``; only the fields that define the update are
    written (r, lora_alpha, target_modules, rank_pattern, alpha_pattern): a full
    ``LoraConfig.to_dict()`` names fields that older peft releases reject.
    """
    if weights.layout != "diffusers":
        raise LoraFormatError(f"{weights.source}: a diffusers LoRA names diffusers modules, these are in the {weights.layout} layout")
    folded = diffusers_lora_tensors(weights)
    rank = int(next(iter(folded.values())).shape[0])
    config = {
        "r": rank,
        "lora_alpha": rank,
        "target_modules": weights.modules,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    packed = {f"{DIFFUSERS_UNET_PREFIX}{key}": value for key, value in config.items()}
    tensors = {f"{DIFFUSERS_UNET_PREFIX}{k}": _cast(v, dtype) for k, v in sorted(folded.items())}
    metadata = {"format": "pt", DIFFUSERS_METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True)}
    return tensors, metadata


def webui_metadata(
    weights: LoraWeights,
    title: str,
    description: str = "",
    resolution: int = SD15_DEFAULT_RESOLUTION,
    base_model: str | None = None,
    family: "ModelFamily | None" = None,
) -> dict[str, str]:
    """kohya ``ss_*`` and Stability's ``modelspec.*`` metadata for a LoRA of ``family`` (every value a string).

    The values kohya's ``train_network.py`` writes: webui shows ``ss_output_name`` as the LoRA's alias,
    reads ``ss_base_model_version`` / ``ss_v2`` for its family (``sd_v1``, ``sdxl_base_v1-0``), and lists
    ``ss_sd_model_name`` (the base model's name, never a local path: :func:`model_name`).
    ``modelspec.architecture`` / ``.implementation`` are kohya's for the family (``sai_model_spec.py``).
    The ``sshs_*`` hashes are added by :func:`webui_lora_file`, which knows the tensors.
    """
    from spotune.models.family import SD15

    family = family or SD15
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(weights.rank),
        "ss_network_alpha": str(float(weights.alpha)),
        "ss_base_model_version": family.ss_base_model_version,
        "ss_v2": "False",
        "ss_sd_model_name": model_name(base_model),
        "ss_output_name": title,
        "ss_training_comment": description,
        "modelspec.sai_model_spec": SAI_MODEL_SPEC_VERSION,
        "modelspec.architecture": family.modelspec_architecture,
        "modelspec.implementation": family.modelspec_lora_implementation,
        "modelspec.title": title,
        "modelspec.description": description,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": "epsilon",
        "modelspec.date": now_iso(),
    }


def webui_lora_file(
    weights: LoraWeights,
    dtype: torch.dtype = torch.float16,
    title: str = "spotune LoRA",
    description: str = "",
    resolution: int = SD15_DEFAULT_RESOLUTION,
    base_model: str | None = None,
    family: "ModelFamily | None" = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """One kohya-named state dict for A1111/Forge/ComfyUI, plus its metadata.

    ``weights`` must carry the module names kohya uses for ``family`` (``family.kohya_unet_layout``:
    diffusers names for SD1.5, original-layout names for SDXL; :mod:`spotune.export.lora_layout` converts).

    Keys: ``lora_unet_<module>.lora_down.weight`` (= lora_A), ``.lora_up.weight`` (= lora_B) and
    ``.alpha`` (0-dim); every client scales by ``alpha / rank``, the rank read from lora_down. The alpha
    stays fp32 whatever ``dtype`` is, so e.g. 0.3 is not rounded to fp16's 0.2998 (readers call
    ``.item()`` on it, so its dtype does not matter to them). ``sshs_model_hash`` /
    ``sshs_legacy_hash`` are computed from exactly these tensors (:func:`kohya_hashes`).
    """
    from spotune.models.family import SD15

    family = family or SD15
    if weights.layout != family.kohya_unet_layout:
        raise LoraFormatError(
            f"{weights.source}: a webui LoRA for {family.title} names UNet modules in the {family.kohya_unet_layout} "
            f"layout, these are in the {weights.layout} layout"
        )
    tensors: dict[str, torch.Tensor] = {}
    for module in weights.modules:
        name = kohya_module_name(module)
        tensors[f"{name}.{KOHYA_DOWN}"] = _cast(weights.state_dict[f"{module}.{PEFT_A}"], dtype)
        tensors[f"{name}.{KOHYA_UP}"] = _cast(weights.state_dict[f"{module}.{PEFT_B}"], dtype)
        tensors[f"{name}.{KOHYA_ALPHA}"] = torch.tensor(weights.module_alpha(module), dtype=torch.float32)
    metadata = webui_metadata(weights, title, description, resolution, base_model, family)
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = kohya_hashes(tensors, metadata)
    return tensors, metadata
