"""Where the toy world's shipped files live and what they are called (a leaf module: the demo, the
preferences, the properties and the shipping code all read it, and it imports none of them)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


# The files of a shipped step-aware preference model's folder (spotune.toyworld.shipping writes them).
SHIPPED_SPM_WEIGHTS = "spm.safetensors"
SHIPPED_SPM_INFO = "spm.json"
# The shipped latent reward model (LPO's judge): a folder that ``judge=lrm judge_checkpoint=FOLDER`` loads
# (``lrm.safetensors`` and a ``state.json`` naming the shipped base model relative to the folder), and its record.
SHIPPED_LRM_FOLDER = "lrm"
SHIPPED_LRM_INFO = "lrm.json"


def resource_dir() -> Path:
    """The package's ``resources/toyworld`` folder (shipped base model, CLIP and stage configs)."""
    return Path(str(resources.files("spotune") / "resources" / "toyworld"))


__all__ = ["SHIPPED_LRM_FOLDER", "SHIPPED_LRM_INFO", "SHIPPED_SPM_INFO", "SHIPPED_SPM_WEIGHTS", "resource_dir"]
