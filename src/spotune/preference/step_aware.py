"""The step-aware preference model (SPM) of SPO: PickScore with the image tower conditioned on t.

Architecture (what the published ``*_step-aware_preference_model.bin`` files hold):

* a shared timestep embedder ``t_embedder``: sinusoidal features of t (256 frequencies, ``[cos, sin]``,
  max period 10000) -> Linear(256, E) -> SiLU -> Linear(E, E), with E the vision hidden size;
* in every vision encoder layer, ``adaLN_modulation`` = SiLU -> Linear(E, 6E) turns that embedding into
  (shift, scale, gate) for the attention and for the MLP branch, DiT style::

      h = h + gate_msa * attn(LN1(h) * (1 + scale_msa) + shift_msa)
      h = h + gate_mlp * mlp(LN2(h) * (1 + scale_mlp) + shift_mlp)

* after ``post_layernorm`` of the class token, ``vision_model.adaLN_modulation`` = SiLU -> Linear(E, 2E)
  gives (shift, scale): ``pooled * (1 + scale) + shift``, then ``visual_projection``.

The modulation layers start as the identity (weights 0, biases 0 except the two gates at 1), so an
untrained SPM scores exactly as the CLIP it wraps. The text tower is untouched.

The modules are added to a transformers ``CLIPModel`` in place: the layers become
:class:`TimeConditionedEncoderLayer` (a ``CLIPEncoderLayer`` subclass that adopts the original
sub-modules), and the embedding reaches them as the ``time_emb`` keyword, which transformers 5
passes from ``CLIPVisionModel`` through ``CLIPEncoder`` to every layer. State-dict keys are therefore
``model.`` + the CLIPModel key, plus ``model.t_embedder.mlp.{0,2}.*``,
``model.vision_model.encoder.layers.{i}.adaLN_modulation.1.*`` and ``model.vision_model.adaLN_modulation.1.*``:
exactly the official layout.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from transformers import CLIPModel
from transformers.models.clip.modeling_clip import CLIPEncoderLayer

from spotune.preference.clip_judge import CLIP_MEAN, CLIP_STD, ClipStyleJudge
from spotune.preference.loading import JudgeLoadError, load_clip
from spotune.utils.pickles import UnsafePickleError, load_weights_only

FREQUENCY_EMBEDDING_SIZE = 256
MAX_PERIOD = 10000
SPM_WEIGHTS_NAME = "spm.safetensors"


def timestep_frequencies(
    timesteps: torch.Tensor, dim: int = FREQUENCY_EMBEDDING_SIZE, max_period: int = MAX_PERIOD
) -> torch.Tensor:
    """Sinusoidal features of (possibly fractional) timesteps, as in DiT / GLIDE.

    ``freqs_i = max_period ** (-i / half)`` for ``i < half = dim // 2``; the output is
    ``[cos(t * freqs), sin(t * freqs)]``.

    Args:
        timesteps: [B] timesteps, any numeric dtype (computed in float32: bf16 cannot hold t = 951).
    Returns:
        [B, dim] float32.
    """
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    freqs = torch.exp(-math.log(max_period) * exponent)  # [half]
    args = timesteps.float()[:, None] * freqs[None]  # [B, half]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """t -> [B, E]: sinusoidal features -> Linear(256, E) -> SiLU -> Linear(E, E) (key ``t_embedder.mlp.*``)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = FREQUENCY_EMBEDDING_SIZE) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        # As SPO initialises it; irrelevant to the identity start, which the zero modulations give.
        nn.init.normal_(self.mlp[0].weight, std=0.02)
        nn.init.normal_(self.mlp[2].weight, std=0.02)
        nn.init.zeros_(self.mlp[0].bias)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        """[B] -> [B, E] in the MLP's dtype."""
        freqs = timestep_frequencies(timesteps, self.frequency_embedding_size)
        return self.mlp(freqs.to(self.mlp[0].weight.dtype))


def _modulation(hidden_size: int, chunks: int, gate_chunks: Sequence[int] = ()) -> nn.Sequential:
    """SiLU -> Linear(E, chunks * E), initialised to the identity: all zero except bias 1 on the gates."""
    linear = nn.Linear(hidden_size, chunks * hidden_size)
    nn.init.zeros_(linear.weight)
    with torch.no_grad():
        linear.bias.zero_()
        for chunk in gate_chunks:
            linear.bias[chunk * hidden_size : (chunk + 1) * hidden_size] = 1.0
    return nn.Sequential(nn.SiLU(), linear)


class TimeConditionedEncoderLayer(CLIPEncoderLayer):
    """A CLIP vision encoder layer with DiT-style adaLN modulation from the timestep embedding.

    Built from an existing :class:`CLIPEncoderLayer`, whose sub-modules (``self_attn``, ``layer_norm1``,
    ``mlp``, ``layer_norm2``) it adopts without copying, so the pretrained weights keep their key names.
    """

    # Chunk order of adaLN_modulation's output: shift, scale, gate for attention, then for the MLP.
    GATE_CHUNKS = (2, 5)

    def __init__(self, layer: CLIPEncoderLayer) -> None:
        nn.Module.__init__(self)  # not CLIPEncoderLayer.__init__: the sub-modules are adopted, not rebuilt
        for name, value in vars(layer).items():
            if not name.startswith("_"):
                setattr(self, name, value)  # embed_dim, training
        for name, child in layer.named_children():
            self.add_module(name, child)
        weight = layer.layer_norm1.weight
        self.adaLN_modulation = _modulation(self.embed_dim, 6, self.GATE_CHUNKS).to(weight.device, weight.dtype)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        time_emb: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """[B, N, E] tokens, [B, E] timestep embedding -> [B, N, E]."""
        if time_emb is None:
            raise RuntimeError(
                "TimeConditionedEncoderLayer got no time_emb: call the vision model with time_emb=..., with a "
                "transformers version (>= 5) whose CLIPEncoder passes keyword arguments to its layers"
            )
        mod = self.adaLN_modulation(time_emb)[:, None, :]  # [B, 1, 6E]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        x = self.layer_norm1(hidden_states) * (1 + scale_msa) + shift_msa
        x, _ = self.self_attn(hidden_states=x, attention_mask=attention_mask, **kwargs)
        hidden_states = hidden_states + gate_msa * x
        x = self.layer_norm2(hidden_states) * (1 + scale_mlp) + shift_mlp
        return hidden_states + gate_mlp * self.mlp(x)


def add_time_conditioning(model: CLIPModel) -> CLIPModel:
    """Turn a ``CLIPModel`` into the SPM's time-conditioned CLIP, in place (identity-initialised).

    Adds ``model.t_embedder``, ``model.vision_model.adaLN_modulation`` and swaps every vision encoder
    layer for a :class:`TimeConditionedEncoderLayer`. Calling it twice is an error.
    """
    if hasattr(model, "t_embedder"):
        raise ValueError("this CLIPModel already has time conditioning")
    vision = model.vision_model
    hidden = model.config.vision_config.hidden_size
    weight = vision.post_layernorm.weight
    layers = vision.encoder.layers
    for i in range(len(layers)):
        layers[i] = TimeConditionedEncoderLayer(layers[i])
    vision.adaLN_modulation = _modulation(hidden, 2).to(weight.device, weight.dtype)
    model.t_embedder = TimestepEmbedder(hidden).to(weight.device, weight.dtype)
    return model


# -- checkpoints ------------------------------------------------------------------------------------


def resolve_spm_weights(path: str | Path) -> Path:
    """The weights file behind ``path``: a ``.bin``/``.pt``/``.safetensors`` file, a train-spm checkpoint
    folder (its ``spm.safetensors``) or a train-spm run folder (its latest checkpoint)."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if (path / SPM_WEIGHTS_NAME).is_file():
            return path / SPM_WEIGHTS_NAME
        from spotune.checkpoint import CheckpointError, resolve_checkpoint

        try:
            folder = resolve_checkpoint(path)
        except CheckpointError as exc:
            raise JudgeLoadError(
                f"SPM checkpoint {path} is a folder without {SPM_WEIGHTS_NAME} and without train-spm checkpoints"
            ) from exc
        if not (folder / SPM_WEIGHTS_NAME).is_file():
            raise JudgeLoadError(f"checkpoint {folder} has no {SPM_WEIGHTS_NAME} (not a train-spm checkpoint?)")
        return folder / SPM_WEIGHTS_NAME
    raise JudgeLoadError(
        f"SPM checkpoint {path} does not exist (expected an official .bin, a .safetensors file, or a "
        "train-spm run or checkpoint folder)"
    )


def read_spm_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an SPM state dict from ``path`` (see :func:`resolve_spm_weights`) onto the CPU.

    Pickled files (``.bin``, ``.pt``, ``.pth``, ``.ckpt``) are read weights-only
    (:func:`spotune.utils.pickles.load_weights_only`), which refuses to run pickled code. Raises
    :class:`JudgeLoadError` naming the file, or :class:`UnsafePickleError` for a pickle holding objects.
    """
    file = resolve_spm_weights(path)
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file))
        else:
            state = load_weights_only(file)
    except UnsafePickleError:
        raise  # already one line naming the file
    except Exception as exc:  # corrupt, truncated, or a pickle with code in it
        raise JudgeLoadError(f"cannot read SPM checkpoint {file}: {type(exc).__name__}: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise JudgeLoadError(f"SPM checkpoint {file} is not a state dict of named tensors")
    return state


def _short_list(keys: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


class StepAwarePreferenceModel(ClipStyleJudge):
    """SPO's step-aware preference model: scores noisy x0-predictions, knowing their timestep.

    Args:
        model: a transformers ``CLIPModel`` (PickScore_v1 weights for the real thing); time conditioning
            is added to it in place, identity-initialised.
        tokenizer: its CLIP tokenizer.
        image_size, image_mean, image_std: the processor's pre-processing (defaults: the vision tower's
            size, OpenAI CLIP's mean/std).
    """

    def __init__(
        self,
        model: CLIPModel,
        tokenizer,
        image_size: int | None = None,
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
        text_cache_size: int = 4096,
    ) -> None:
        size = image_size or model.config.vision_config.image_size
        super().__init__(tokenizer, size, image_mean, image_std, text_cache_size)
        self.model = add_time_conditioning(model)

    @classmethod
    def from_pretrained(
        cls,
        clip_path: str | Path,
        checkpoint: str | Path | None = None,
        processor_path: str | Path | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> "StepAwarePreferenceModel":
        """Load an SPM, ready to judge (eval mode, no gradients).

        Args:
            clip_path: a local CLIPModel folder (PickScore_v1), or ``builtin:tiny-clip``.
            checkpoint: an official ``.bin`` (read with ``weights_only=True``), a ``.safetensors`` written by
                :meth:`save`, or a train-spm run/checkpoint folder. Without it the SPM is the identity-
                initialised extension of ``clip_path``, scoring exactly as that CLIP does.
            processor_path: folder with the tokenizer and ``preprocessor_config.json`` (default: ``clip_path``).
            device, dtype: where and in what precision to put the weights (CPU, float32 by default).
        Raises:
            JudgeLoadError: a missing folder/file, a folder without weights, an unreadable checkpoint, or a
                checkpoint whose keys or shapes do not match (each named).
        """
        model, tokenizer, processing = load_clip(clip_path, processor_path)
        spm = cls(model, tokenizer, processing.size, processing.mean, processing.std)
        if checkpoint is not None:
            spm.load_checkpoint(checkpoint)
        spm.to(device=device, dtype=dtype or torch.float32)
        return spm.eval().requires_grad_(False)

    # -- features ------------------------------------------------------------------------------------
    def time_embedding(self, timesteps: torch.Tensor, batch: int) -> torch.Tensor:
        """Scalar or [B] timesteps -> [B, E] embedding."""
        t = torch.as_tensor(timesteps, device=self.model.logit_scale.device)
        if t.dim() == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"timesteps must be a scalar or have shape [{batch}], got {tuple(t.shape)}")
        return self.model.t_embedder(t)

    def image_features(self, pixel_values: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] normalised pixels, [B] timesteps -> [B, D] projected image features (not normalised)."""
        time_emb = self.time_embedding(timesteps, pixel_values.shape[0])  # [B, E]
        vision = self.model.vision_model
        out = vision(pixel_values=pixel_values, time_emb=time_emb)
        shift, scale = vision.adaLN_modulation(time_emb).chunk(2, dim=-1)  # [B, E] each
        pooled = out.pooler_output * (1 + scale) + shift
        return self.model.visual_projection(pooled)

    def text_features(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, L] -> [B, D] projected text features (not normalised)."""
        out = self.model.text_model(input_ids=input_ids)
        return self.model.text_projection(out.pooler_output)

    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    def forward(
        self, pixel_values: torch.Tensor, timesteps: torch.Tensor, input_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Everything the training loss needs in one call (DDP and autocast wrap ``forward`` only).

        Args:
            pixel_values: [N, 3, S, S] normalised pixels; timesteps: [N].
            input_ids: [B, L] caption ids.
        Returns:
            text features [B, D], image features [N, D] (neither normalised), and ``logit_scale`` (scalar, log space).
        """
        return self.text_features(input_ids), self.image_features(pixel_values, timesteps), self.model.logit_scale

    # -- weights -------------------------------------------------------------------------------------
    def load_checkpoint(self, path: str | Path) -> None:
        """Load all weights from an SPM checkpoint (see :func:`read_spm_state_dict`), checked key by key."""
        self.load_checked_state_dict(read_spm_state_dict(path), source=str(path))

    def load_checked_state_dict(self, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Load ``state`` strictly, with errors that name the offending keys.

        Every key of this model must be present with the same shape. Keys the model does not hold are
        only accepted when they are non-persistent buffers with the same value (older transformers saved
        ``embeddings.position_ids``; SPO's own loader accepts them the same way).
        """
        expected = self.state_dict()
        missing = [k for k in expected if k not in state]
        if missing:
            raise JudgeLoadError(
                f"{source}: missing key(s) {_short_list(missing)} (is it an SPM checkpoint for this CLIP? "
                "keys must be 'model.' + CLIPModel keys plus the adaLN_modulation and t_embedder keys)"
            )
        mismatched = [
            f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
            for k, v in expected.items()
            if tuple(state[k].shape) != tuple(v.shape)
        ]
        if mismatched:
            raise JudgeLoadError(
                f"{source}: shape mismatch for {_short_list(mismatched, 3)} (a checkpoint for another CLIP size?)"
            )
        buffers = dict(self.named_buffers())
        unexpected = [k for k in state if k not in expected]
        bad = [
            k for k in unexpected
            if k not in buffers or buffers[k].shape != state[k].shape or not torch.equal(buffers[k].cpu(), state[k].to(buffers[k].dtype))
        ]
        if bad:
            raise JudgeLoadError(f"{source}: unexpected key(s) {_short_list(bad)} not in this model")
        self.load_state_dict({k: state[k] for k in expected}, strict=True)
        self.clear_text_cache()

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write all weights as safetensors with the official key names (``model.`` + ...).

        Refuses to replace an existing file unless ``overwrite``; the write is atomic.
        """
        from spotune.utils.io import atomic_save_safetensors

        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} already exists; refusing to overwrite it")
        vision = self.model.config.vision_config
        metadata = {
            "format": "pt",
            "spotune_kind": "step-aware-preference-model",
            "vision_hidden_size": str(vision.hidden_size),
            "vision_layers": str(vision.num_hidden_layers),
            "image_size": str(self.image_size),
        }
        atomic_save_safetensors(self.state_dict(), path, metadata=metadata)
        return path
