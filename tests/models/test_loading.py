"""load_pipeline from every kind of source, and its errors."""

import json

import pytest
import torch
from diffusers import DDIMScheduler

from spotune.models import BUILTIN_TINY_SD15, ModelLoadError, load_pipeline


def test_builtin_and_folder_give_the_same_model(tiny_pipeline_dir):
    a = load_pipeline(BUILTIN_TINY_SD15)
    b = load_pipeline(str(tiny_pipeline_dir))
    assert isinstance(a.scheduler, DDIMScheduler) and isinstance(b.scheduler, DDIMScheduler)
    x, t, emb = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(a.unet(x, t, emb).sample, b.unet(x, t, emb).sample)


def test_dtype(tiny_pipeline_dir):
    pipe = load_pipeline(str(tiny_pipeline_dir), dtype=torch.bfloat16)
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.bfloat16


def test_errors_name_the_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_pipeline(str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match="model_index.json is missing"):
        load_pipeline(str(tmp_path))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ModelLoadError, match=str(tmp_path)):
        load_pipeline(str(tmp_path))
    weird = tmp_path / "model.gguf"
    weird.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="unknown model file type"):
        load_pipeline(str(weird))
