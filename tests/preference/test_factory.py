"""build_judge: every kind, checkpoints given as files or train-spm folders, and its errors."""

from __future__ import annotations

import json

import pytest
import torch

from spotune.checkpoint import CHECKPOINT_FORMAT
from spotune.preference import (
    JUDGE_KINDS,
    ClipStyleJudge,
    JudgeLoadError,
    PickScoreJudge,
    PreferenceModel,
    StepAwarePreferenceModel,
    build_judge,
)


def _checkpoint_folder(run, step: int, spm: StepAwarePreferenceModel):
    folder = run / "checkpoints" / f"iter-{step:08d}"
    folder.mkdir(parents=True)
    spm.save(folder / "spm.safetensors")
    (folder / "state.json").write_text(json.dumps({"format": CHECKPOINT_FORMAT, "kind": "spm"}))
    return folder


def test_every_kind_builds_a_judge(clip_dir, tmp_path, make_images):
    spm = StepAwarePreferenceModel.from_pretrained(clip_dir)
    with torch.no_grad():
        spm.model.t_embedder.mlp[2].bias.fill_(0.5)
        spm.model.vision_model.adaLN_modulation[1].weight.normal_(std=0.2)
    weights = spm.save(tmp_path / "spm.safetensors")
    judges = {
        "tiny-clip": build_judge("tiny-clip"),
        "tiny-spm": build_judge("tiny-spm"),
        "pickscore": build_judge("pickscore", clip_path=str(clip_dir)),
        "spm": build_judge("spm", clip_path=str(clip_dir), checkpoint=str(weights)),
    }
    lrm = build_judge("lrm", checkpoint="builtin:tiny-lrm")  # the latent judge: scores [B, 4, h, w] latents
    assert set(judges) | {"lrm"} == set(JUDGE_KINDS)
    assert lrm.judges_latents and not lrm.training and not any(p.requires_grad for p in lrm.parameters())
    assert lrm.score(torch.randn(2, 4, 8, 8), ["a red circle", "a blue square"], torch.tensor([1, 951])).shape == (2,)
    images, prompts, t = make_images(2), ["a red circle", "a blue square"], torch.tensor([0, 700])
    for kind, judge in judges.items():
        assert isinstance(judge, ClipStyleJudge) and isinstance(judge, PreferenceModel), kind
        assert not judge.training and not any(p.requires_grad for p in judge.parameters()), kind
        assert judge.score(images, prompts, t).shape == (2,), kind
    assert isinstance(judges["pickscore"], PickScoreJudge)
    # The tiny kinds and the folder kinds are the same seeded CLIP: the untrained SPM scores as it does.
    torch.testing.assert_close(judges["tiny-spm"].score(images, prompts, t), judges["pickscore"].score(images, prompts))
    assert torch.equal(judges["spm"].score(images, prompts, t), spm.score(images, prompts, t))


def test_spm_checkpoint_may_be_a_train_spm_run_folder(clip_dir, tmp_path, make_images):
    spm = StepAwarePreferenceModel.from_pretrained(clip_dir)
    run = tmp_path / "run"
    _checkpoint_folder(run, 2, spm)
    with torch.no_grad():
        spm.model.vision_model.adaLN_modulation[1].bias.fill_(0.3)
    latest = _checkpoint_folder(run, 10, spm)
    judge = build_judge("spm", clip_path=str(clip_dir), checkpoint=str(run))
    assert torch.equal(judge.model.vision_model.adaLN_modulation[1].bias, torch.full((64,), 0.3))
    same = build_judge("tiny-spm", checkpoint=str(latest))  # a checkpoint folder works too
    images, prompts = make_images(2), ["a", "b"]
    assert torch.equal(same.score(images, prompts), judge.score(images, prompts))


def test_bad_settings_are_explained(clip_dir, tmp_path):
    with pytest.raises(JudgeLoadError, match="unknown judge kind 'clip'"):
        build_judge("clip")
    with pytest.raises(JudgeLoadError, match="needs clip_path=PATH"):
        build_judge("pickscore")
    with pytest.raises(JudgeLoadError, match="needs clip_path=PATH .* and checkpoint=PATH"):
        build_judge("spm", clip_path=str(clip_dir))
    with pytest.raises(JudgeLoadError, match="takes no checkpoint"):
        build_judge("tiny-clip", checkpoint="x.bin")
    empty_run = tmp_path / "empty-run"
    empty_run.mkdir()
    with pytest.raises(JudgeLoadError, match="empty-run"):
        build_judge("spm", clip_path=str(clip_dir), checkpoint=str(empty_run))
    with pytest.raises(JudgeLoadError, match="missing-folder does not exist"):
        build_judge("pickscore", clip_path=str(tmp_path / "missing-folder"))
