"""`spotune export --overwrite` replaces earlier exports only; what it writes is readable by other users."""

from __future__ import annotations

import hashlib
import os
import re
import stat
from pathlib import Path

import pytest

from spotune.cli import main
from spotune.utils.outputs import OUTPUT_MARKER


def _checksums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _export(run: Path, fmt: str, out: Path, *extra: str) -> int:
    return main(["export", str(run), "--format", fmt, "--output", str(out), "--overwrite", *extra])


def test_overwrite_refuses_a_folder_spotune_did_not_write(lora_run, tmp_path, capsys):
    mine = tmp_path / "my-loras"
    (mine / "sub").mkdir(parents=True)
    (mine / "pytorch_lora_weights.safetensors").write_bytes(b"not even safetensors")  # a recognised name ...
    (mine / "notes.txt").write_text("precious")  # ... beside a file spotune never writes
    (mine / "sub" / "model.ckpt").write_bytes(os.urandom(64))
    before = _checksums(tmp_path)
    assert _export(lora_run.run, "diffusers", mine) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "would delete" in err
    assert str(mine / "notes.txt") in err and str(mine / "sub") in err
    assert "pytorch_lora_weights.safetensors" not in err  # only what is not spotune's is listed
    assert _checksums(tmp_path) == before  # nothing deleted, no temporary left


def test_overwrite_refuses_a_non_safetensors_file_and_a_folder_where_a_file_goes(lora_run, tmp_path, capsys):
    text = tmp_path / "thesis.safetensors"
    text.write_text("years of work")
    folder = tmp_path / "folder.safetensors"
    folder.mkdir()
    (folder / "keep.png").write_bytes(b"\x89PNG")
    before = _checksums(tmp_path)
    assert _export(lora_run.run, "webui", text) == 1
    assert "not a safetensors file" in capsys.readouterr().err
    assert _export(lora_run.run, "webui", folder) == 1
    err = capsys.readouterr().err
    assert "is a folder" in err and str(folder / "keep.png") in err
    assert _checksums(tmp_path) == before


def test_merged_export_is_marked_and_replaced_by_the_next_one(lora_run, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["export", str(lora_run.run), "--format", "merged", "--output", str(out), "--dtype", "fp32"]) == 0
    assert (out / OUTPUT_MARKER).is_file() and (out / "model_index.json").is_file()
    assert _export(lora_run.run, "merged", out) == 0  # the marker vouches for every entry
    (out / "my-notes.txt").write_text("added by hand")
    before = _checksums(out)
    assert _export(lora_run.run, "merged", out) == 1
    assert str(out / "my-notes.txt") in capsys.readouterr().err
    assert _checksums(out) == before


def test_a_sigterm_during_an_overwriting_export_keeps_the_earlier_one_and_leaves_no_temporaries(lora_run, tmp_path, capsys, monkeypatch):
    import signal

    import spotune.export.api as api

    out = tmp_path / "merged"
    assert _export(lora_run.run, "merged", out) == 0
    before = _checksums(out)
    writing = api.apply_umask_modes

    def terminated_while_writing(path):  # everything is written into the temporary folder by now
        os.kill(os.getpid(), signal.SIGTERM)
        writing(path)

    monkeypatch.setattr(api, "apply_umask_modes", terminated_while_writing)
    assert _export(lora_run.run, "merged", out) == 143
    assert capsys.readouterr().err.splitlines()[-1] == (  # after any loading bars
        "spotune export: terminated by SIGTERM; nothing was written under the output's name (its temporary files "
        "were removed)")
    assert _checksums(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_a_full_disk_during_an_overwriting_merged_export_is_one_line_and_keeps_the_earlier_one(lora_run, tmp_path, capsys, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    out = tmp_path / "merged"
    assert _export(lora_run.run, "merged", out) == 0
    before = _checksums(out)
    capsys.readouterr()

    def full(*args, **kwargs):  # what safetensors raises when the disk fills under save_pretrained
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    for extra in ([], ["--dtype", "fp32"]):  # onto the earlier export (--overwrite), then a changed one
        assert _export(lora_run.run, "merged", out, *extra) == 1
        err = capsys.readouterr().err
        (line,) = [line for line in err.splitlines() if ": error: " in line]  # progress bars aside
        assert "Traceback" not in err
        assert line.startswith(f"spotune export: error: no space left on the device while writing {out}")
        assert re.search(r": [0-9.]+ MiB free there\. Nothing written before was changed", line), line
        assert _checksums(out) == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temporary left beside it
    assert main(["export", str(lora_run.run), "--format", "merged", "--output", str(tmp_path / "new")]) == 1
    assert f"while writing {tmp_path / 'new'}" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_exports_get_the_umask_modes(lora_run, tmp_path, umask_022):
    file = tmp_path / "webui.safetensors"
    folder = tmp_path / "diffusers"
    assert _export(lora_run.run, "webui", file) == 0
    assert _export(lora_run.run, "diffusers", folder) == 0
    assert _mode(file) == 0o644
    assert _mode(folder) == 0o755 and _mode(folder / "pytorch_lora_weights.safetensors") == 0o644
    assert _export(lora_run.run, "webui", file) == 0  # a replacement too
    assert _mode(file) == 0o644
