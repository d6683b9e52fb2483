"""Writing a latent reward model in its authors' folder layout, for their LPO code and anyone who reads it.

    python -m spotune.preference.lrm_layout RUN OUT

``RUN`` is whatever ``judge=lrm judge_checkpoint=`` loads from a ``spotune train-spm model=lrm`` run: the run
folder (its latest checkpoint), a checkpoint folder, or ``RUN/best``. ``OUT`` (which must not exist) becomes
the folder the authors' ``save`` writes (``lrm/lrm_15/trainer/models/sd15_preference_model.py``; SDXL's in
``lrm/lrm_xl``):

* ``unet/``: a whole diffusers UNet, ``save_pretrained`` with safetensors. The LRM never runs the up path, so
  the authors' files hold the base model's up blocks untouched; spotune drops them, so they are taken from
  the base model the run names;
* ``text_encoder/`` (SDXL also ``text_encoder_2/``);
* ``state_dict.pt``: ``{"visual_projection": {"weight": W}, "text_projection": {"weight": T}`` (SD1.5 only)
  ``, "logit_scale": float}``, a pickle of tensors and a float, which a weights-only load reads;
* ``tokenizer/`` (``tokenizer_2/``), which the authors' folders lack and spotune's loader prefers when present.

:func:`spotune.preference.lrm.load_lrm` loads the result back (tested: the same scores).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from spotune.errors import SpotuneError
from spotune.preference.lrm import LatentRewardModel, load_lrm, lrm_base_model


def write_authors_layout(lrm: LatentRewardModel, base_model: str, out: str | Path) -> Path:
    """Write ``lrm`` to the new folder ``out`` in the authors' layout (module docstring), its UNet's up path
    taken from ``base_model`` (the diffusion model the LRM was made from)."""
    from spotune.models.loading import load_pipeline
    from spotune.utils.io import atomic_directory

    out = Path(out)
    if out.exists():
        raise SpotuneError(f"{out} already exists; the LRM folder is written to a new path (choose another OUT)")
    pipe = load_pipeline(base_model, dtype=torch.float32)
    unet = pipe.unet
    trained = {k.removeprefix("unet."): v for k, v in lrm.state_dict().items() if k.startswith("unet.")}
    missing, unexpected = unet.load_state_dict(trained, strict=False)
    if unexpected:
        raise SpotuneError(f"base model {base_model}: its UNet does not hold the LRM's weights ({sorted(unexpected)[:3]}); "
                           "give the model the LRM was made from")
    kept = [k for k in missing if not k.startswith(("up_blocks.", "conv_norm_out.", "conv_out."))]
    if kept:
        raise SpotuneError(f"the LRM lacks UNet weights its base has outside the up path ({kept[:3]})")
    with atomic_directory(out) as tmp:
        unet.save_pretrained(str(tmp / "unet"), safe_serialization=True)
        names = ["text_encoder", "text_encoder_2"]
        for name, encoder, tokenizer in zip(names, lrm.text_encoders, lrm.tokenizers):
            encoder.to(torch.float32).save_pretrained(str(tmp / name), safe_serialization=True)
            tokenizer.save_pretrained(str(tmp / name.replace("text_encoder", "tokenizer")))
        state = {"visual_projection": {"weight": lrm.visual_projection.weight.detach().float().cpu().clone()},
                 "logit_scale": float(lrm.logit_scale.detach())}
        if lrm.text_projection is not None:
            state["text_projection"] = {"weight": lrm.text_projection.weight.detach().float().cpu().clone()}
        torch.save(state, tmp / "state_dict.pt")
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Write a train-spm model=lrm run's LRM in the LPO authors' folder layout.")
    parser.add_argument("run", help="a train-spm model=lrm run, checkpoint, or RUN/best")
    parser.add_argument("out", help="the new folder (unet/, text_encoder/, state_dict.pt)")
    parser.add_argument("--base-model", default=None, help="the model the LRM was made from (default: the one its run names)")
    args = parser.parse_args(argv)
    try:
        base = args.base_model or lrm_base_model(args.run)
        if base is None:
            raise SpotuneError(f"{args.run}: not a train-spm model=lrm run or checkpoint (an LRM folder is already in "
                               "the authors' layout)")
        print(write_authors_layout(load_lrm(args.run, dtype=torch.float32), base, args.out))
    except (SpotuneError, OSError) as exc:
        print(f"lrm_layout: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
