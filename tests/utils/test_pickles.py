"""Torch pickles are read weights-only, through one helper: a file that holds objects is one line, no advice to
run it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from spotune.utils.pickles import UnsafePickleError, load_weights_only

SRC = Path(__file__).resolve().parents[2] / "src" / "spotune"


class Payload:
    """Not a tensor: rebuilding it means running code the file names."""


def test_tensors_load_and_objects_are_refused_in_one_line(tmp_path):
    good, bad = tmp_path / "good.pt", tmp_path / "bad.pt"
    torch.save({"w": torch.ones(2)}, good)
    torch.save({"w": torch.ones(2), "extra": Payload()}, bad)
    assert torch.equal(load_weights_only(good)["w"], torch.ones(2))
    with pytest.raises(UnsafePickleError) as info:
        load_weights_only(bad)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{bad} holds more than tensors")
    assert "e.g. test_pickles.Payload" in message and "safetensors.torch.save_file" in message
    assert "will likely succeed" not in message and "add_safe_globals" not in message


def test_a_damaged_file_keeps_torchs_error_for_the_caller_to_name(tmp_path):
    damaged = tmp_path / "damaged.pt"
    torch.save({"w": torch.ones(2)}, damaged)
    damaged.write_bytes(damaged.read_bytes()[:40])
    with pytest.raises(Exception) as info:
        load_weights_only(damaged)
    assert not isinstance(info.value, UnsafePickleError)


def test_no_other_module_calls_torch_load():
    callers = [str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if re.search(r"\btorch\.load\(", p.read_text())]
    assert callers == ["utils/pickles.py"]


def test_a_damaged_file_is_one_line_without_advice_to_unpickle_it_unsafely(tmp_path):
    from spotune.utils.pickles import DamagedPickleError

    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"\x00garbage" * 64)
    with pytest.raises(DamagedPickleError) as info:
        load_weights_only(broken)
    message = str(info.value)
    assert message.startswith(f"{broken} is damaged, truncated or not a torch checkpoint (unpickling failed: ")
    assert "\n" not in message and "weights_only" not in message and "holds more than tensors" not in message
