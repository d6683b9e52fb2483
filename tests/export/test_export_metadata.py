"""What exported files say about themselves: no local paths, the trained resolution, kohya's hashes."""

from __future__ import annotations

import hashlib
import json

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save

from export_helpers import write_checkpoint
from spotune.export import export_checkpoint
from spotune.export.metadata import model_default_resolution, model_name


def _metadata(path) -> dict[str, str]:
    with safe_open(str(path), "pt") as handle:
        return handle.metadata()


@pytest.mark.parametrize(
    "source,name",
    [
        ("/models/stable-diffusion-v1-5/", "stable-diffusion-v1-5"),
        ("C:\\models\\v1-5-pruned-emaonly.safetensors", "v1-5-pruned-emaonly.safetensors"),
        ("~/weights/sd15.ckpt", "sd15.ckpt"),
        ("../sd15", "sd15"),
        ("stable-diffusion-v1-5/stable-diffusion-v1-5", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
        ("builtin:tiny-sd15", "builtin:tiny-sd15"),
        (None, ""),
    ],
)
def test_model_name_is_never_a_path(source, name):
    assert model_name(source) == name


def test_an_existing_relative_folder_is_named_by_its_base_name(tmp_path, monkeypatch):
    (tmp_path / "models" / "sd15").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert model_name("models/sd15") == "sd15"  # on disk, so not a hub id


def test_no_local_path_in_any_metadata(lora_run, base_dir, tmp_path):
    webui = _metadata(export_checkpoint(lora_run.run, "webui", tmp_path / "w.safetensors"))
    single = _metadata(export_checkpoint(lora_run.run, "single-file", tmp_path / "s.safetensors"))
    for meta in (webui, single):
        leaks = {k: v for k, v in meta.items() if str(base_dir) in v or str(tmp_path) in v or "/tmp" in v}
        assert leaks == {}
    assert base_dir.name in webui["ss_training_comment"] and webui["ss_training_comment"] == webui["modelspec.description"]
    assert webui["ss_sd_model_name"] == base_dir.name
    assert single["modelspec.merged_from"] == base_dir.name and base_dir.name in single["modelspec.description"]
    assert webui["modelspec.sai_model_spec"] == single["modelspec.sai_model_spec"] == "1.0.1"


def test_resolution_unset_is_the_base_models_default(lora_run, tmp_path):
    # A base whose VAE says 48 px, so the value can only come from the model's config.
    base = tmp_path / "base-48"
    (base / "vae").mkdir(parents=True)
    (base / "vae" / "config.json").write_text(json.dumps({"sample_size": 48}))
    run = tmp_path / "run"
    ckpt = write_checkpoint(run, 1, "lora", str(base), {"lora.safetensors": lora_run.lora})
    state = json.loads((ckpt / "state.json").read_text())
    state["config"]["resolution"] = None
    (ckpt / "state.json").write_text(json.dumps(state))
    meta = _metadata(export_checkpoint(run, "webui", tmp_path / "w.safetensors"))
    assert meta["modelspec.resolution"] == "48x48"
    assert model_default_resolution("builtin:tiny-sd15") == 32
    assert model_default_resolution(str(tmp_path / "sd15.safetensors")) == 512  # not on disk: SD1.5's own
    (tmp_path / "sd15.safetensors").write_bytes(b"")
    assert model_default_resolution(str(tmp_path / "sd15.safetensors")) == 512  # shipped SD1.5 configs


def test_sshs_hashes_are_what_webui_and_kohya_compute(lora_run, tmp_path):
    out = export_checkpoint(lora_run.run, "webui", tmp_path / "w.safetensors")
    meta = _metadata(out)
    data = out.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    # webui (hashes.sha256 with use_addnet_hash): SHA-256 of the bytes after the header.
    assert meta["sshs_model_hash"] == hashlib.sha256(data[header:]).hexdigest()
    # kohya's legacy hash: 64 KiB at 1 MiB of the file serialised with its ss_* metadata only (this
    # file is smaller than 1 MiB, so that is the hash of nothing; the full-size test reads real bytes).
    ss_only = save(load_file(str(out)), {k: v for k, v in meta.items() if k.startswith("ss_")})
    assert meta["sshs_legacy_hash"] == hashlib.sha256(ss_only[0x100000:0x110000]).hexdigest()[:8]
