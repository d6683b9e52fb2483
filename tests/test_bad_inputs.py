"""Bad input to every command, one row each: the command line, what its one error line must say, the exit code.

Each case runs ``spotune.cli.main`` in this process and stops at config or input validation (nothing trains),
so a row costs about a second. To add one, append a :class:`Case` to :data:`CASES`: ``{tmp}`` in the
arguments and needles is the test's temporary folder, and ``setup`` (optional) makes the files the case
needs there or patches what it simulates (a read-only disk). A case with ``code=0`` is input that must be
accepted (a byte-order mark); its needles are looked for in stdout and its ``check`` runs afterwards.
Value-range checks of train and train-spm live in tests/test_cli_errors.py's tables.
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from spotune.cli import main

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ["train", "--config", str(ROOT / "configs" / "tiny_cpu.yaml"), "log_with=none", "progress=false"]
LPO = ["train", "--config", str(ROOT / "configs" / "tiny_lpo.yaml"), "progress=false"]
TRAIN_SPM = ["train-spm", "--config", str(ROOT / "configs" / "tiny_spm.yaml")]
LOOP = "is a symbolic-link loop (its links lead back to themselves)"
NOT_WEIGHTS = ("holds more than tensors (pickled Python objects, e.g. test_bad_inputs.Payload)",
               "spotune loads only weights-only pickles and .safetensors files", "convert it once")


def generate(*flags: str, model: str = "builtin:tiny-sd15") -> list[str]:
    """``spotune generate`` on the tiny model, one DDIM step (key=value overrides go after the flags)."""
    return ["generate", "--model", model, *flags, "steps=1", "grid=false"]


def export(source: str, output: str) -> list[str]:
    """``spotune export SOURCE --format webui --output OUTPUT``."""
    return ["export", source, "--format", "webui", "--output", output]


class Payload:
    """A pickled object that is not a tensor: ``torch.load(weights_only=True)`` refuses to rebuild it."""


@dataclass
class Case:
    id: str
    argv: list[str]
    needles: tuple[str, ...]
    code: int = 1
    setup: Callable[[Path, pytest.MonkeyPatch], None] | None = None
    absent: tuple[str, ...] = ()  # must not be in the error line (advice that would not work)
    check: Callable[[Path], None] | None = None  # after a case that succeeds


# -- what the cases need -------------------------------------------------------------------------------


def symlink_loop(tmp: Path, _=None) -> None:
    """``tmp/loop`` -> ``tmp/loop2`` -> ``tmp/loop``."""
    os.symlink(tmp / "loop2", tmp / "loop")
    os.symlink(tmp / "loop", tmp / "loop2")


def run_without_checkpoint(tmp: Path, _=None) -> None:
    """What a run killed before its first checkpoint leaves: the folder and an empty checkpoints/."""
    (tmp / "run" / "checkpoints").mkdir(parents=True)


def pickle_with_an_object(name: str) -> Callable[[Path, pytest.MonkeyPatch], None]:
    def make(tmp: Path, _=None) -> None:
        torch.save({"lora_unet_x.lora_down.weight": torch.zeros(4, 8), "extra": Payload()}, tmp / name)
    return make


def tiny_pairs(tmp: Path, _=None) -> None:
    """``tmp/pairs.parquet``: eight synthetic Pick-a-Pic-format pairs of 32 px images."""
    from spotune.data.pickapic import synthetic_pairs, write_pairs_parquet

    write_pairs_parquet(tmp / "pairs.parquet", *synthetic_pairs(8, 32, seed=0))


def text_file(name: str, text: str) -> Callable[[Path, pytest.MonkeyPatch], None]:
    def make(tmp: Path, _=None) -> None:
        (tmp / name).write_text(text, encoding="utf-8")
    return make


def bom_config(tmp: Path, _=None) -> None:
    text = (ROOT / "configs" / "tiny_cpu.yaml").read_text(encoding="utf-8")
    (tmp / "bom.yaml").write_text("\ufeff" + text + "\nseed: 7\n", encoding="utf-8")


def read_only(under: str, calls: tuple[str, ...]) -> Callable[[Path, pytest.MonkeyPatch], None]:
    """Make ``os.<call>`` fail with EROFS for paths under ``tmp/under``, as on a read-only file system.

    Simulated: tests run as root, for whom a 0o555 folder is still writable.
    """
    def make(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        (tmp / "ro").mkdir()
        (tmp / "ro" / "toyworld").mkdir()
        root = str(tmp / under)
        for name in calls:
            real = getattr(os, name)

            def refused(path, *args, _real=real, **kwargs):
                if os.fspath(path).startswith(root):
                    raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
                return _real(path, *args, **kwargs)

            monkeypatch.setattr(os, name, refused)
    return make


def environment(name: str, value: str, then: Callable | None = None) -> Callable[[Path, pytest.MonkeyPatch], None]:
    def make(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv(name, value.format(tmp=tmp))
        if then is not None:
            then(tmp, monkeypatch)
    return make


def first_prompt_is(expected: str) -> Callable[[Path], None]:
    def check(tmp: Path) -> None:
        record = json.loads((tmp / "gens" / "base" / "metadata.jsonl").read_text(encoding="utf-8").splitlines()[0])
        assert record["prompt"] == expected
    return check


# -- the table -----------------------------------------------------------------------------------------

CASES = [
    # train: a run folder that holds no checkpoint names overwrite=true, never resume=latest
    Case("train-folder-without-checkpoint", [*TRAIN, "output_dir={tmp}/run"],
         ("{tmp}/run already holds a run that stopped before its first complete checkpoint", "overwrite=true"),
         setup=run_without_checkpoint, absent=("resume=latest",)),
    Case("train-resume-latest-without-checkpoint", [*TRAIN, "output_dir={tmp}/run", "resume=latest"],
         ("resume=latest: no checkpoint was written in {tmp}/run", "pass overwrite=true"), setup=run_without_checkpoint),
    Case("train-config-with-bom", [*TRAIN[:1], "--config", "{tmp}/bom.yaml", "--print-config"], ("seed: 7",),
         code=0, setup=bom_config),
    # train-spm
    Case("train-output-symlink-loop", [*TRAIN, "output_dir={tmp}/loop"],
         (f"{{tmp}}/loop {LOOP}", "output_dir=FOLDER"), absent=("Errno",), setup=symlink_loop),
    Case("train-negative-preempt-grace", [*TRAIN, "output_dir={tmp}/run", "preempt_grace_s=-1"],
         ("preempt_grace_s must be >= 0 (0: no limit), got preempt_grace_s=-1.0",)),
    # train algorithm=lpo
    Case("lpo-with-a-pixel-judge", [*TRAIN, "output_dir={tmp}/run", "algorithm=lpo"],
         ("algorithm=lpo judges noisy latents and needs judge=lrm", "got judge=tiny-clip"),),
    Case("lrm-judge-for-spo", [*TRAIN, "output_dir={tmp}/run", "judge=lrm", "judge_checkpoint=builtin:tiny-lrm"],
         ("judge=lrm scores latents, which only algorithm=lpo samples; set algorithm=lpo",)),
    Case("lpo-threshold-min-above-max", [*LPO, "output_dir={tmp}/run", "lpo_threshold_min=0.6", "lpo_threshold_max=0.5"],
         ("lpo_threshold_min and lpo_threshold_max must satisfy 0 <= min <= max < 1, got lpo_threshold_min=0.6",)),
    Case("lpo-lrm-folder-without-unet", [*LPO, "output_dir={tmp}/run", "judge_checkpoint={tmp}/lrm"],
         ("judge_checkpoint: {tmp}/lrm: not an LRM folder: unet/config.json is missing",),
         setup=lambda tmp, _: (tmp / "lrm" / "text_encoder").mkdir(parents=True)),
    Case("lpo-sdxl-lrm-for-an-sd15-model", [*LPO, "output_dir={tmp}/run", "judge_checkpoint=builtin:tiny-lrm-sdxl"],
         ("judge_checkpoint=builtin:tiny-lrm-sdxl: an SDXL latent reward model cannot judge the latents of builtin:tiny-sd15",)),
    Case("train-spm-negative-preempt-grace",
         [*TRAIN_SPM, "train_data={tmp}/pairs.parquet", "output_dir={tmp}/run", "preempt_grace_s=-5"],
         ("preempt_grace_s must be >= 0 (0: no limit), got preempt_grace_s=-5.0",)),
    Case("train-spm-lrm-timestep-grid-too-fine", [*TRAIN_SPM, "train_data={tmp}/pairs.parquet", "model=lrm", "timestep_grid=5000"],
         ("timestep_grid must be in [0, 1000] (0: every timestep; N: the N-step DDIM grid), got timestep_grid=5000",)),
    Case("train-spm-lrm-init-from-a-folder",
         ["train-spm", "--config", str(ROOT / "configs" / "tiny_lrm.yaml"), "train_data={tmp}/pairs.parquet",
          "output_dir={tmp}/run", "init_checkpoint={tmp}", "progress=false"],
         ("{tmp}: no such file; expected the lrm.safetensors a train-spm model=lrm checkpoint holds",), setup=tiny_pairs),
    Case("train-spm-pair-filter-rows", [*TRAIN_SPM, "train_data={tmp}/pairs.parquet", "output_dir={tmp}/run",
                                        "pair_filter_csv={tmp}/gaps.csv"],
         ("pair_filter_csv={tmp}/gaps.csv: 1 rows, but train_data {tmp}/pairs.parquet has 8",),
         setup=lambda tmp, mp=None: (tiny_pairs(tmp), text_file("gaps.csv", "different_flag,aesthetic_gap,clipscore_gap,"
                                                                "vqascore_gap\n1,0,1,1\n")(tmp))),
    Case("train-spm-pair-filter-columns", [*TRAIN_SPM, "train_data={tmp}/pairs.parquet", "output_dir={tmp}/run",
                                           "pair_filter_csv={tmp}/gaps.csv"],
         ("{tmp}/gaps.csv: no column vqascore_gap; pair_filter_csv needs the columns",),
         setup=lambda tmp, mp=None: (tiny_pairs(tmp), text_file("gaps.csv", "different_flag,aesthetic_gap,clipscore_gap\n")(tmp))),
    Case("train-spm-best-outside-eval-timesteps", [*TRAIN_SPM, "train_data={tmp}/pairs.parquet", "keep_best_at=3"],
         ("keep_best_at=3 must be one of eval_timesteps",)),
    Case("train-spm-resume-latest-without-checkpoint",
         [*TRAIN_SPM, "train_data={tmp}/pairs.parquet", "output_dir={tmp}/run", "resume=latest"],
         ("resume=latest: no checkpoint was written in {tmp}/run", "overwrite=true"), setup=run_without_checkpoint),
    # plan (each refused before anything is predicted)
    Case("plan-unknown-gpu", ["plan", "--config", str(ROOT / "configs" / "tiny_cpu.yaml"), "--gpu", "GTX-480"],
         ("--gpu GTX-480: unknown GPU; known: H200, H100", "RTX-4090", "T4", "give --memory-gb N")),
    Case("plan-zero-processes", ["plan", "--config", str(ROOT / "configs" / "tiny_cpu.yaml"), "--processes", "0"],
         ("--processes takes a whole number >= 1, got 0",)),
    Case("plan-json-onto-a-users-file", ["plan", "--config", str(ROOT / "configs" / "tiny_cpu.yaml"), "--json", "{tmp}/notes.json"],
         ("--json {tmp}/notes.json: the file exists and is not a spotune plan report, so it is not replaced",),
         setup=text_file("notes.json", '{"mine": 1}\n')),
    Case("plan-json-into-a-missing-folder", ["plan", "--config", str(ROOT / "configs" / "tiny_cpu.yaml"), "--json", "{tmp}/no/plan.json"],
         ("--json {tmp}/no/plan.json: its folder {tmp}/no does not exist",)),
    Case("plan-negative-seed", ["plan", "--config", str(ROOT / "configs" / "tiny_cpu.yaml"), "seed=-1"],
         ("command line: seed must be >= 0, got seed=-1",)),
    # view
    Case("view-missing-run", ["view", "{tmp}/no-run"], ("{tmp}/no-run: no such run folder",)),
    Case("view-a-file", ["view", "{tmp}/notes.txt"], ("{tmp}/notes.txt: is a file, not a run folder",),
         setup=text_file("notes.txt", "mine")),
    Case("view-not-a-run", ["view", "{tmp}"], ("{tmp}: not a spotune run folder (no config.yaml, no checkpoints/)",)),
    Case("view-run-symlink-loop", ["view", "{tmp}/loop"], (f"{{tmp}}/loop {LOOP}", "RUN"), setup=symlink_loop),
    Case("view-output-onto-a-users-file", ["view", "{tmp}/run", "--output", "{tmp}/notes.html"],
         ("{tmp}/notes.html: exists and was not written by spotune view",), setup=lambda tmp, _: (
             (tmp / "run").mkdir(), (tmp / "run" / "config.yaml").write_text("seed: 1\n"), (tmp / "notes.html").write_text("mine"))),
    # generate
    Case("generate-negative-seed", generate("--prompt", "a", "--out", "{tmp}/gens") + ["seed=-1"],
         ("command line: seed must be >= 0, got seed=-1",)),
    Case("generate-out-symlink-loop", generate("--prompt", "a", "--out", "{tmp}/loop"),
         (f"{{tmp}}/loop {LOOP}", "--out (output_dir=)"), setup=symlink_loop),
    Case("generate-nul-in-prompt-file", generate("--prompt-file", "{tmp}/p.txt", "--out", "{tmp}/gens"),
         ("{tmp}/p.txt: row 2 holds a NUL character (\\x00) at character 6",),
         setup=text_file("p.txt", "a blue square\na red\x00 circle\n")),
    Case("generate-prompt-file-with-bom", generate("--prompt-file", "{tmp}/p.txt", "--out", "{tmp}/gens"),
         ("base: 1 new",), code=0, setup=text_file("p.txt", "\ufeffa red circle\n"),
         check=first_prompt_is("a red circle")),
    Case("generate-csv-with-bom", generate("--prompt-file", "{tmp}/p.csv", "--out", "{tmp}/gens"),
         ("base: 1 new",), code=0, setup=text_file("p.csv", "\ufeffprompt,n\na red circle,1\n"),
         check=first_prompt_is("a red circle")),
    Case("generate-model-pickle-with-objects", generate("--prompt", "a", "--out", "{tmp}/gens", model="{tmp}/model.ckpt"),
         ("{tmp}/model.ckpt", *NOT_WEIGHTS),
         setup=pickle_with_an_object("model.ckpt"), absent=("will likely succeed",)),
    # eval
    Case("eval-images-symlink-loop", ["eval", "--images", "{tmp}/loop", "--out", "{tmp}/report"],
         (f"{{tmp}}/loop {LOOP}", "--images"), setup=symlink_loop),
    Case("eval-out-symlink-loop", ["eval", "--images", "{tmp}/images", "--out", "{tmp}/loop"],
         (f"{{tmp}}/loop {LOOP}", "--out (output_dir=)"), setup=symlink_loop),
    # eval-spm
    Case("eval-spm-lrm-without-checkpoint", ["eval-spm", "data={tmp}/pairs.parquet", "judge=lrm"],
         ("judge=lrm needs judge_checkpoint=PATH",), setup=tiny_pairs),
    # eval-lrm
    Case("eval-lrm-pixel-judge", ["eval-lrm", "data={tmp}/pairs.parquet", "judge=pickscore"],
         ("eval-lrm measures a latent reward model (judge=lrm), got judge=pickscore", "spotune eval-spm")),
    Case("eval-lrm-sdxl-lrm-on-sd15-latents", ["eval-lrm", "data={tmp}/pairs.parquet", "judge_checkpoint=builtin:tiny-lrm-sdxl",
                                               "pretrained_model=builtin:tiny-sd15",
                                               "num_workers=0", "progress=false"],
         ("judge_checkpoint=builtin:tiny-lrm-sdxl: an SDXL latent reward model cannot judge the latents of builtin:tiny-sd15",),
         setup=tiny_pairs),
    Case("eval-spm-negative-seed", ["eval-spm", "data={tmp}/pairs.parquet", "seed=-3"],
         ("seed must be >= 0, got seed=-3",)),
    # export
    Case("export-source-symlink-loop", export("{tmp}/loop", "{tmp}/x.safetensors"),
         (f"{{tmp}}/loop {LOOP}", "SOURCE"), setup=symlink_loop),
    Case("export-output-symlink-loop", export("{tmp}/lora.pt", "{tmp}/loop/x.safetensors"),
         (f"{{tmp}}/loop/x.safetensors {LOOP}", "--output"), setup=symlink_loop),
    Case("export-lora-pickle-with-objects", export("{tmp}/lora.pt", "{tmp}/x.safetensors"),
         ("{tmp}/lora.pt", *NOT_WEIGHTS), setup=pickle_with_an_object("lora.pt"), absent=("will likely succeed",)),
    # demo
    Case("demo-negative-threads", ["demo", "--output", "{tmp}/report", "threads=-1"],
         ("threads must be >= 0 (0: the free cores), got threads=-1",)),
    Case("demo-negative-seed", ["demo", "--output", "{tmp}/report", "seed=-1"], ("seed must be >= 0, got seed=-1",)),
    Case("demo-output-symlink-loop", ["demo", "--output", "{tmp}/loop"], (f"{{tmp}}/loop {LOOP}", "--output"),
         setup=symlink_loop),
    Case("demo-cache-dir-read-only", ["demo", "--output", "{tmp}/report", "cache_dir={tmp}/ro/cache"],
         ("cache_dir: the stage cache {tmp}/ro/cache/toyworld cannot be written (Read-only file system",
          "cache_dir=FOLDER"), setup=read_only("ro", ("mkdir", "open"))),
    Case("demo-cache-toyworld-folder-read-only", ["demo", "--output", "{tmp}/report", "cache_dir={tmp}/ro"],
         ("cache_dir: the stage cache {tmp}/ro/toyworld cannot be written (Read-only file system",
          "cache_dir=FOLDER"), setup=read_only("ro/toyworld", ("open",))),
    Case("demo-spotune-cache-read-only", ["demo", "--output", "{tmp}/report"],
         ("$SPOTUNE_CACHE: the stage cache {tmp}/ro/toyworld cannot be written", "set $SPOTUNE_CACHE"),
         setup=environment("SPOTUNE_CACHE", "{tmp}/ro", read_only("ro/toyworld", ("open",)))),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)  # nothing a case writes by mistake lands in the checkout
    monkeypatch.delenv("SPOTUNE_DEBUG", raising=False)
    if case.setup is not None:
        case.setup(tmp_path, monkeypatch)
    fill = lambda text: text.replace("{tmp}", str(tmp_path))  # noqa: E731
    code = main([fill(arg) for arg in case.argv])
    out, err = capsys.readouterr()
    assert code == case.code, err
    assert "Traceback" not in err, err
    if case.code == 0:
        for needle in case.needles:
            assert fill(needle) in out, (needle, out)
        if case.check is not None:
            case.check(tmp_path)
        return
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1, err
    for needle in case.needles:
        assert fill(needle) in errors[0], (fill(needle), errors[0])
    for needle in case.absent:
        assert fill(needle) not in errors[0], (needle, errors[0])
    assert not (tmp_path / "report").exists()  # refused before any output was made


def test_every_command_has_a_case() -> None:
    from spotune.cli import COMMAND_MODULES

    commands = {module.rsplit(".", 1)[1].replace("_", "-") for module in COMMAND_MODULES}
    assert commands <= {case.argv[0] for case in CASES}
