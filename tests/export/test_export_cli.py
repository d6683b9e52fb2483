"""`spotune export` end to end: write, refuse to overwrite, overwrite on request."""

from __future__ import annotations

from spotune.cli import main
from spotune.export import load_lora_file


def test_cli_exports_webui_and_guards_the_output(lora_run, tmp_path, capsys):
    out = tmp_path / "spo.safetensors"
    argv = ["export", str(lora_run.run), "--format", "webui", "--output", str(out), "--dtype", "fp32"]
    assert main(argv) == 0
    assert str(out) in capsys.readouterr().out
    weights = load_lora_file(out)
    assert weights.source_format == "webui" and weights.alpha == 2.0
    assert all(v.dtype.is_floating_point and v.dtype.itemsize == 4 for v in weights.state_dict.values())

    before = out.read_bytes()
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "already exists" in err and str(out) in err and len(err.strip().splitlines()) == 1
    assert out.read_bytes() == before

    assert main([*argv[:-2], "--overwrite"]) == 0  # fp16 this time, replacing the fp32 file
    assert load_lora_file(out).state_dict[next(iter(weights.state_dict))].dtype.itemsize == 2


def test_cli_reads_a_yaml_config(lora_run, tmp_path, capsys):
    config = tmp_path / "export.yaml"
    config.write_text(f"format: diffusers\noutput: {tmp_path / 'lora'}\n")
    assert main(["export", str(lora_run.checkpoint), "--config", str(config)]) == 0
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert main(["export", "--config", str(config)]) == 1
    assert "source" in capsys.readouterr().err


def test_cli_requires_a_format(lora_run, tmp_path, capsys):
    assert main(["export", str(lora_run.run), "--output", str(tmp_path / "x.safetensors")]) == 1
    assert "format" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
