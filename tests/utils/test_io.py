"""Atomic writes: modes from the umask, and temporaries that a killed process left removed."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys

import pytest
import torch

from spotune.utils.io import (
    atomic_directory,
    atomic_save_safetensors,
    atomic_write_text,
    make_temp_dir,
    make_temp_file,
    remove_stale_temporaries,
)


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750), (0o077, 0o600, 0o700)])
def test_written_files_and_folders_get_the_umask_modes(tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        atomic_save_safetensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors")  # safetensors alone writes 0600
        with atomic_directory(tmp_path / "folder") as tmp:
            (tmp / "sub").mkdir()
            atomic_save_safetensors({"w": torch.zeros(2)}, tmp / "sub" / "w.safetensors")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.txt") == file_mode and _mode(tmp_path / "w.safetensors") == file_mode
    assert _mode(tmp_path / "folder") == dir_mode and _mode(tmp_path / "folder" / "sub") == dir_mode
    assert _mode(tmp_path / "folder" / "sub" / "w.safetensors") == file_mode


def test_only_temporaries_of_dead_processes_are_removed(tmp_path, caplog):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    dead = proc.pid
    stale_dir = tmp_path / f".spo-0123456789abcdef.p{dead}-k3j4.tmp"  # e.g. a demo stage a kill -9 interrupted
    stale_dir.mkdir()
    (stale_dir / "run").mkdir()
    stale_old = tmp_path / f".merged.p{dead}-1a2b3c4d.old"
    stale_old.write_text("an output that was being replaced")
    mine = make_temp_file(tmp_path / "x.json")  # this live process's own
    mine_dir = make_temp_dir(tmp_path / "y")
    user = [tmp_path / ".hidden.tmp", tmp_path / f".notes.p{dead}.tmp", tmp_path / "report.tmp"]  # not our names
    for path in user:
        path.write_text("the user's")
    with caplog.at_level(logging.INFO):
        removed = remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted([stale_dir, stale_old])
    assert mine.exists() and mine_dir.exists() and all(p.read_text() == "the user's" for p in user)
    assert str(stale_dir) in caplog.text and f"process {dead}" in caplog.text


def test_the_demo_cache_drops_stale_stage_folders(tmp_path):
    from spotune.toyworld.demo import StageCache

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    stale = tmp_path / f".spm-0123456789abcdef.p{proc.pid}-zz.tmp"
    stale.mkdir()
    done = tmp_path / "spm-0123456789abcdef"
    done.mkdir()
    (done / "stage.json").write_text("{}")
    StageCache(tmp_path)
    assert not stale.exists() and (done / "stage.json").is_file()


def test_a_full_disk_inside_a_staged_folder_names_the_folder_and_the_file(tmp_path, monkeypatch):
    """However deep the file and whatever type the writing library raises, the one line names the output."""
    import spotune.utils.io as io

    def full(tensors, path, metadata=None):  # safetensors' own error type, with the OS's text
        raise RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')

    monkeypatch.setattr(io, "save_file", full)
    with pytest.raises(io.DiskFullError) as info:
        with atomic_directory(tmp_path / "out") as tmp:
            atomic_write_text(tmp / "a.txt", "kept until the rename")
            atomic_save_safetensors({"w": torch.zeros(1)}, tmp / "unet" / "weights.safetensors")
    message = str(info.value)
    assert message.startswith(f"no space left on the device while writing {tmp_path / 'out'} (unet/weights.safetensors): ")
    assert "\n" not in message and os.listdir(tmp_path) == []
    assert io.disk_full_from(ValueError("a bad value"), tmp_path / "out") is None
