"""Every `spotune ...` command in README.md runs as written, so the README cannot drift from the code.

The commands come from the README's fenced shell blocks (and inline code spans that give a command
with arguments). Each is run through the real CLI, in-process, in a scratch folder that sees the
repository's ``configs/``:

* commands that need no external weights run for real: the tiny CPU training, the exports of that
  run (the README's ``runs/sd15_spo`` swapped for the ``runs/tiny`` it trains just above), the tiny
  generate/eval configs, ``--list-keys`` and ``--help``;
* commands that need real weights (``/models/...``, ``PATH`` placeholders, the ``sd15_*`` and ``sdxl_*`` configs)
  and the demo (8 minutes; ``tests/toyworld/test_demo.py`` runs it shrunk) are checked by a dry run,
  ``--print-config``: every key is resolved and validated, so a renamed key fails here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import shlex
from pathlib import Path

import pytest

from spotune.cli import main
from spotune.config import load_config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# The README's placeholder run folder and the tiny run it trains without weights.
EXPORT_SWAPS = {"runs/sd15_spo": "runs/tiny"}
# Arguments that point at weights this checkout does not have; a command holding one is only parsed.
NEEDS_WEIGHTS = re.compile(r"(^|[=/])(models/|PATH$|DIR$|file\.safetensors$)|configs/sd(15|xl)_")


def readme_commands(text: str) -> list[str]:
    """``spotune ...`` command lines of the fenced shell blocks, continuations joined, comments removed,
    then those of inline code spans that carry arguments (``spotune train --list-keys``)."""
    commands: list[str] = []
    for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        if lang not in ("", "bash", "sh", "shell", "console"):
            continue
        for line in re.sub(r"\\\n\s*", " ", body).splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip().removeprefix("$ ")
            if line.startswith("spotune "):
                commands.append(line)
    for span in re.findall(r"`(spotune [^`]+)`", text):
        if len(span.split()) > 2 and span not in commands:
            commands.append(span)
    return commands


def _run(argv: list[str]) -> tuple[int, str, str]:
    """Run ``spotune ARGV`` in this process; (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's --help
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


def _plan(command: str) -> tuple[str, list[str]]:
    """('run' | 'dry-run', argv without the program name)."""
    argv = shlex.split(command)[1:]
    if "--help" in argv or "-h" in argv or "--list-keys" in argv:
        return "run", argv
    if argv[0] == "export":
        return "run", [EXPORT_SWAPS.get(a, a) for a in argv]
    if argv[0] == "demo" or any(NEEDS_WEIGHTS.search(a) for a in argv):
        return "dry-run", [*argv, "--print-config"]
    return "run", argv


@dataclasses.dataclass
class Outcome:
    command: str
    mode: str
    argv: list[str]
    code: int
    out: str
    err: str


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory) -> tuple[Path, list[Outcome]]:
    """Every README command, run once in a scratch folder laid out like the repository root."""
    tmp = tmp_path_factory.mktemp("readme")
    work = tmp / "repo"
    work.mkdir()
    (work / "configs").symlink_to(ROOT / "configs")
    if (ROOT.parent / "shared").is_dir():
        (tmp / "shared").symlink_to(ROOT.parent / "shared")
    commands = readme_commands(README.read_text())
    # The run the exports use comes first; the rest keep the README's order.
    commands.sort(key=lambda c: 0 if "configs/tiny_cpu.yaml" in c and "--list-keys" not in c else 1)
    outcomes = []
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        mp.setenv("SPOTUNE_CACHE", str(tmp / "cache"))
        for command in commands:
            mode, argv = _plan(command)
            outcomes.append(Outcome(command, mode, argv, *_run(argv)))
    return work, outcomes


def test_readme_lists_the_commands_this_test_checks():
    commands = readme_commands(README.read_text())
    names = {shlex.split(c)[1] for c in commands}
    assert {"demo", "train", "train-spm", "eval-spm", "export", "generate", "eval"} <= names, names
    for needed in ("configs/tiny_cpu.yaml", "configs/tiny_generate.yaml", "configs/tiny_eval.yaml", "--list-keys"):
        assert any(needed in c for c in commands), needed


def test_every_readme_command_runs_as_written(readme_run):
    work, outcomes = readme_run
    for o in outcomes:
        last = o.err.strip().splitlines()[-1:] if o.err.strip() else o.out[-300:]
        assert o.code == 0, f"`{o.command}` exited {o.code}: {last}"
    ran = [o.command for o in outcomes if o.mode == "run"]
    assert any(c.startswith("spotune export") for c in ran)
    assert all(any(t in c for c in ran) for t in ("tiny_cpu.yaml", "tiny_generate.yaml", "tiny_eval.yaml"))
    for written in ("runs/tiny/config.yaml", "SPO-SD-v1-5_LoRA_webui.safetensors", "spo-lora/pytorch_lora_weights.safetensors",
                    "sd15-spo-merged/model_index.json", "sd15-spo.safetensors", "gens/tiny/grid.png", "reports/tiny/report.html"):
        assert (work / written).exists(), written


def test_commands_needing_weights_resolve_every_key_they_type(readme_run):
    _, outcomes = readme_run
    dry = [o for o in outcomes if o.mode == "dry-run"]
    assert any("configs/sd15_spo.yaml" in o.command for o in dry) and any(o.argv[0] == "demo" for o in dry)
    for o in dry:
        for item in o.argv[1:]:
            if "=" in item and not item.startswith("-"):  # every key typed is a key of the printed config
                key = item.split("=", 1)[0]
                assert re.search(rf"^{re.escape(key)}: ", o.out, re.M), (o.command, key)


def test_the_readme_run_config_reads_back_as_the_same_config(readme_run):
    """config.yaml written by the README's tiny run, given back with --config, is the config of that run."""
    from spotune.recipes.train_spo_config import TrainSPOConfig

    work, _ = readme_run
    written = work / "runs" / "tiny" / "config.yaml"
    assert load_config(TrainSPOConfig, written) == load_config(
        TrainSPOConfig, ROOT / "configs" / "tiny_cpu.yaml", ["output_dir=runs/tiny"])
    code, printed, _ = _run(["train", "--config", str(written), "--print-config"])
    assert code == 0 and printed == written.read_text()


@pytest.mark.parametrize("command", ["--help", "train --help", "train-spm --help", "eval-spm --help", "export --help",
                                     "generate --help", "eval --help", "demo --help"])
def test_help_of_every_command(command):
    code, out, _ = _run(command.split())
    assert code == 0 and out.startswith("usage: spotune")


def test_configuration_reference_names_only_real_keys_with_their_defaults():
    """The README's `spotune train` key table: every key exists and shows the code's default."""
    from spotune.config import describe_config
    from spotune.recipes.train_spo_config import TrainSPOConfig

    text = README.read_text()
    section = text[text.index("## Configuration reference"):]
    rows = dict(re.findall(r"^\| `(\w+)` \| (`[^|]*`) \|", section, re.M))
    code_rows = dict(re.findall(r"^\| `(\w+)` \| (`[^|]*`) \|", describe_config(TrainSPOConfig), re.M))
    assert rows, "no key table found"
    unknown = sorted(set(rows) - {f.name for f in dataclasses.fields(TrainSPOConfig)})
    assert not unknown, f"README names keys that do not exist: {unknown}"
    stale = {k: (v, code_rows[k]) for k, v in rows.items() if v != code_rows[k]}
    assert not stale, f"README defaults differ from the code (README, code): {stale}"
