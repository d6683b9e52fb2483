"""Where the toy world's shipped files live and what they are called (a leaf module: the demo, the
preferences, the properties and the shipping code all read it, and it imports none of them)."""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path


# The files of a shipped step-aware preference model's folder (spotune.toyworld.shipping writes them).
SHIPPED_SPM_WEIGHTS = "spm.safetensors"
SHIPPED_SPM_INFO = "spm.json"
# The shipped latent reward model (LPO's judge): a folder that ``judge=lrm judge_checkpoint=FOLDER`` loads
# (``lrm.safetensors`` and a ``state.json`` naming the shipped base model relative to the folder), and its record.
SHIPPED_LRM_FOLDER = "lrm"
SHIPPED_LRM_INFO = "lrm.json"
# Demo stages built when the package was made (stage folders named ``<stage>-<key>``, as the demo's cache holds them),
# taken instead of a build whose key matches: the trajectory-DPO baseline, so the default demo trains SPO alone.
SHIPPED_STAGES_FOLDER = "stages"


def resource_dir() -> Path:
    """The package's ``resources/toyworld`` folder (shipped base model, CLIP and stage configs)."""
    return Path(str(resources.files("spotune") / "resources" / "toyworld"))


def digest_files(folder: Path) -> str:
    """SHA-256 over a folder's file names and contents (identifies the shipped weights)."""
    h = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(file.relative_to(folder)).encode())
        h.update(file.read_bytes())
    return h.hexdigest()[:16]


def digest_file(file: Path) -> str:
    return hashlib.sha256(file.read_bytes()).hexdigest()[:16]


__all__ = ["SHIPPED_LRM_FOLDER", "SHIPPED_LRM_INFO", "SHIPPED_STAGES_FOLDER", "SHIPPED_SPM_INFO", "SHIPPED_SPM_WEIGHTS", "digest_file", "digest_files",
           "resource_dir"]
