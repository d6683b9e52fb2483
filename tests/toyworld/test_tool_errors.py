"""The world's `python -m spotune.toyworld.*` tools: bad input is one line and exit 1, never lost user files."""

from __future__ import annotations

import pytest

from spotune.config import ConfigError
from spotune.toyworld import pickscore, preferences, pretrain


def _one_error_line(capsys, program: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].startswith(f"python -m spotune.toyworld.{program}: error: ")
    return err[0]


def test_pretrain_bad_key_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("SPOTUNE_DEBUG", raising=False)
    assert pretrain.main([f"work_dir={tmp_path / 'w'}", "timestep_density=logit"]) == 1
    assert "timestep_density must be one of uniform, sd15_snr" in _one_error_line(capsys, "pretrain")
    assert not (tmp_path / "w").exists()  # refused before anything was written


def test_debug_gives_the_traceback(tmp_path, monkeypatch):
    monkeypatch.delenv("SPOTUNE_DEBUG", raising=False)
    with pytest.raises(ConfigError, match="unknown key"):
        pretrain.main([f"work_dir={tmp_path}", "no_such_key=1", "--debug"])
    monkeypatch.setenv("SPOTUNE_DEBUG", "1")
    with pytest.raises(ConfigError, match="unknown key"):
        pretrain.main([f"work_dir={tmp_path}", "no_such_key=1"])


def test_preferences_refuses_a_folder_it_did_not_write(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("SPOTUNE_DEBUG", raising=False)
    (tmp_path / "train.parquet").write_bytes(b"the user's own file")
    assert preferences.main([str(tmp_path)]) == 1
    assert "not written by this tool" in _one_error_line(capsys, "preferences")
    assert (tmp_path / "train.parquet").read_bytes() == b"the user's own file"


def test_preferences_replaces_its_own_output_only_when_asked(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("SPOTUNE_DEBUG", raising=False)
    (tmp_path / "summary.json").write_text("{}")
    assert preferences.main([str(tmp_path)]) == 1
    assert "--overwrite" in _one_error_line(capsys, "preferences")
    # with --overwrite it goes on, and a missing model is still one line
    assert preferences.main([str(tmp_path), "--overwrite", "--base-model", str(tmp_path / "missing")]) == 1
    assert "does not exist" in _one_error_line(capsys, "preferences")


def test_a_bad_model_leaves_no_folder_behind(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("SPOTUNE_DEBUG", raising=False)
    out = tmp_path / "pairs"
    assert preferences.main([str(out), "--base-model", str(tmp_path / "missing")]) == 1
    _one_error_line(capsys, "preferences")
    assert not out.exists()


def test_pickscore_missing_clip_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("SPOTUNE_DEBUG", raising=False)
    assert pickscore.main([str(tmp_path / "no-clip"), str(tmp_path), str(tmp_path / "out")]) == 1
    assert "does not exist" in _one_error_line(capsys, "pickscore")


def test_a_sigterm_ends_a_tool_with_one_line_and_exit_143(capsys, monkeypatch):
    import os
    import signal
    import time

    from spotune.cli import run_tool

    monkeypatch.delenv("SPOTUNE_DEBUG", raising=False)

    def terminated(argv):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        return 0

    assert run_tool("python -m spotune.toyworld.pretrain", terminated, []) == 143
    assert capsys.readouterr().err == "python -m spotune.toyworld.pretrain: terminated by SIGTERM\n"
