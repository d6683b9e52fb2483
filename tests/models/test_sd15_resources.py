"""The shipped SD1.5 config folder is a complete diffusers config: its tokenizer/ loads as SD1.5's CLIPTokenizer."""

from __future__ import annotations

import json

from transformers import CLIPTokenizer

from spotune.export.pipeline_folder import CLIP_TOKENIZER_CONFIG, bpe_file_texts
from spotune.models.single_file import _clip_vocab_and_merges, sd15_resources

# OpenAI CLIP's ids for this caption (start, "a", "photo", "of", "a", "cat", end).
OPENAI_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]


def test_shipped_tokenizer_files_are_the_ones_derived_from_the_bpe_file():
    folder = sd15_resources() / "tokenizer"
    vocab_text, merges_text = bpe_file_texts(*_clip_vocab_and_merges())
    assert (folder / "vocab.json").read_text(encoding="utf-8") == vocab_text
    assert (folder / "merges.txt").read_text(encoding="utf-8") == merges_text
    assert json.loads((folder / "tokenizer_config.json").read_text()) == CLIP_TOKENIZER_CONFIG
    vocab = json.loads(vocab_text)
    assert len(vocab) == 49408 and vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert len(merges_text.splitlines()) == 1 + 48894


def test_shipped_folder_gives_sd15s_tokenizer_as_from_single_file_loads_it():
    # diffusers' from_single_file(config=FOLDER) loads CLIPTokenizer.from_pretrained(FOLDER, subfolder="tokenizer").
    tokenizer = CLIPTokenizer.from_pretrained(str(sd15_resources()), subfolder="tokenizer", local_files_only=True)
    assert len(tokenizer) == 49408 and tokenizer.model_max_length == 77
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer("a photo of a cat").input_ids == OPENAI_IDS
    padded = tokenizer("A Photo of a CAT", padding="max_length", max_length=77).input_ids
    assert padded[:7] == OPENAI_IDS and padded[7:] == [49407] * 70
    index = json.loads((sd15_resources() / "model_index.json").read_text())
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
