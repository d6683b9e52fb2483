"""Every `spotune ...` command in README.md and docs/*.md runs as written, so the docs cannot drift from the code.

The commands come from the pages' fenced shell blocks (and inline code spans that give a command
with arguments). A command that several pages give runs once. Each is run through the real CLI,
in-process, in a scratch folder that sees the repository's ``configs/``:

* commands that need no external weights run for real: the tiny CPU trainings, the exports (and run pages) of those
  runs (the pages' ``runs/sd15_spo`` and ``runs/sdxl_spo`` swapped for the ``runs/tiny`` and
  ``runs/tiny_sdxl`` that docs/training.md trains without weights; those trainings run first), the tiny
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
# The pages whose commands run: the README, then docs/ in name order.
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]

# The pages' placeholder run folders and the tiny runs they train without weights.
EXPORT_SWAPS = {"runs/sd15_spo": "runs/tiny", "runs/sdxl_spo": "runs/tiny_sdxl"}
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


def page_name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def documented_commands() -> dict[str, list[str]]:
    """Each distinct command of the pages (the first spelling met; spacing aside, one command once), with the
    pages that give it, in page order then each page's order."""
    found: dict[tuple[str, ...], tuple[str, list[str]]] = {}
    for page in PAGES:
        for command in readme_commands(page.read_text(encoding="utf-8")):
            _, pages = found.setdefault(tuple(shlex.split(command)), (command, []))
            if page_name(page) not in pages:
                pages.append(page_name(page))
    return dict(found.values())


def _trains_a_swapped_run(command: str) -> bool:
    """A training that writes one of the runs the exports are pointed at."""
    argv = shlex.split(command)[1:]
    return argv[0] == "train" and "--list-keys" not in argv and any(
        f"output_dir={run}" in argv for run in EXPORT_SWAPS.values())


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
    if argv[0] in ("export", "view"):  # they read a trained run: the tiny one trained in its place
        return "run", [EXPORT_SWAPS.get(a, a) for a in argv]
    if argv[0] == "demo" or any(NEEDS_WEIGHTS.search(a) for a in argv):
        return "dry-run", [*argv, "--print-config"]
    return "run", argv


@dataclasses.dataclass
class Outcome:
    command: str
    pages: list[str]
    mode: str
    argv: list[str]
    code: int
    out: str
    err: str


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory) -> tuple[Path, list[Outcome]]:
    """Every command of the pages, run once in a scratch folder laid out like the repository root."""
    tmp = tmp_path_factory.mktemp("readme")
    work = tmp / "repo"
    work.mkdir()
    (work / "configs").symlink_to(ROOT / "configs")
    if (ROOT.parent / "shared").is_dir():
        (tmp / "shared").symlink_to(ROOT.parent / "shared")
    commands = documented_commands()
    # The runs the exports use come first; the rest keep the pages' order.
    order = sorted(commands, key=lambda c: 0 if _trains_a_swapped_run(c) else 1)
    outcomes = []
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        mp.setenv("SPOTUNE_CACHE", str(tmp / "cache"))
        for command in order:
            mode, argv = _plan(command)
            outcomes.append(Outcome(command, commands[command], mode, argv, *_run(argv)))
    return work, outcomes


def test_the_pages_list_the_commands_this_test_checks():
    commands = documented_commands()
    names = {shlex.split(c)[1] for c in commands}
    assert {"demo", "train", "train-spm", "eval-spm", "export", "generate", "eval", "plan", "view"} <= names, names
    for needed in ("configs/tiny_cpu.yaml", "configs/tiny_generate.yaml", "configs/tiny_eval.yaml", "--list-keys"):
        assert any(needed in c for c in commands), needed
    assert all(any(_trains_a_swapped_run(c) for c in commands if f"output_dir={run}" in c) for run in EXPORT_SWAPS.values())
    readme = [c for c, pages in commands.items() if page_name(README) in pages]
    assert any(c.startswith("spotune export runs/sd15_spo --format webui") for c in readme), readme


@pytest.mark.parametrize("page", PAGES, ids=page_name)
def test_every_command_of_the_page_runs_as_written(readme_run, page):
    _, outcomes = readme_run
    for o in outcomes:
        if page_name(page) not in o.pages:
            continue
        last = o.err.strip().splitlines()[-1:] if o.err.strip() else o.out[-300:]
        assert o.code == 0, f"`{o.command}` ({', '.join(o.pages)}) exited {o.code}: {last}"


def test_the_commands_without_weights_ran_for_real(readme_run):
    work, outcomes = readme_run
    ran = [o.command for o in outcomes if o.mode == "run"]
    assert any(c.startswith("spotune export") for c in ran)
    assert all(any(t in c for c in ran) for t in ("tiny_cpu.yaml", "tiny_sdxl.yaml", "tiny_generate.yaml", "tiny_eval.yaml"))
    for written in ("runs/tiny/config.yaml", "SPO-SD-v1-5_LoRA_webui.safetensors", "spo-lora/pytorch_lora_weights.safetensors",
                    "sd15-spo-merged/model_index.json", "sd15-spo.safetensors", "SPO-SDXL_LoRA_webui.safetensors",
                    "gens/tiny/grid.png", "reports/tiny/report.html"):
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
    """config.yaml written by the documented tiny run, given back with --config, is the config of that run."""
    from spotune.recipes.train_spo_config import TrainSPOConfig

    work, _ = readme_run
    written = work / "runs" / "tiny" / "config.yaml"
    assert load_config(TrainSPOConfig, written) == load_config(
        TrainSPOConfig, ROOT / "configs" / "tiny_cpu.yaml", ["output_dir=runs/tiny"])
    code, printed, _ = _run(["train", "--config", str(written), "--print-config"])
    assert code == 0 and printed == written.read_text()


@pytest.mark.parametrize("command", ["--help", "train --help", "train-spm --help", "eval-spm --help", "export --help",
                                     "generate --help", "eval --help", "demo --help", "plan --help"])
def test_help_of_every_command(command):
    code, out, _ = _run(command.split())
    assert code == 0 and out.startswith("usage: spotune")

