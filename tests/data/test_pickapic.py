"""Pick-a-Pic-format pairs from parquet, arrow and save_to_disk layouts, built in code, and their errors."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from spotune.data.pickapic import (
    BlockShuffleSampler,
    PairDataError,
    PickAPicPairs,
    checked_batch,
    collate_pairs,
    encode_png,
    synthetic_pairs,
    write_pairs_parquet,
)
from spotune.errors import SpotuneError



def _table(n: int = 6, seed: int = 0, image_struct: bool = False, **extra) -> pa.Table:
    captions, im0, im1, labels = synthetic_pairs(n, 16, seed)
    cells = lambda images: [  # noqa: E731
        {"bytes": encode_png(im), "path": None} if image_struct else encode_png(im) for im in images
    ]
    columns = {
        "caption": captions,
        "jpg_0": cells(im0),
        "jpg_1": cells(im1),
        "label_0": [a for a, _ in labels],
        "label_1": [b for _, b in labels],
    }
    columns.update(extra)
    return pa.table(columns)


def _write_arrow_stream(table: pa.Table, path) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def test_parquet_pairs_decode_to_tensors_with_weights(tmp_path):
    captions, im0, im1, labels = synthetic_pairs(10, 24, seed=1)
    write_pairs_parquet(tmp_path / "pairs.parquet", captions, im0, im1, labels)
    pairs = PickAPicPairs(tmp_path / "pairs.parquet", resolution=16)
    assert len(pairs) == 10 and pairs.captions == captions
    assert pairs.labels.tolist() == [list(l) for l in labels]
    # num_pairs counts the pairs of each caption when the file has no num_example_per_prompt column
    assert pairs.num_pairs.tolist() == [float(captions.count(c)) for c in captions]
    item = pairs[3]
    assert item["pixel_values_0"].shape == (3, 16, 16) and item["pixel_values_0"].dtype == torch.float32
    assert item["pixel_values_0"].min() >= -1 and item["pixel_values_0"].max() <= 1
    assert item["row"].endswith("pairs.parquet row 3")
    # the decoded image is the one written (downscaled 24 -> 16 by the shortest side)
    assert pairs.images(3)[1].size == (24, 24) and np.array_equal(np.asarray(pairs.images(3)[1]), im1[3])
    batch = checked_batch(collate_pairs([pairs[i] for i in range(4)]))
    assert batch.pixel_values_1.shape == (4, 3, 16, 16) and len(batch) == 4
    assert batch.label_0.tolist() == [labels[i][0] for i in range(4)]
    with pytest.raises(FileExistsError):
        write_pairs_parquet(tmp_path / "pairs.parquet", captions, im0, im1, labels)


def test_arrow_and_save_to_disk_layouts(tmp_path):
    table = _table(6, image_struct=True)  # the datasets Image feature: {"bytes", "path"}
    _write_arrow_stream(table, tmp_path / "pairs.arrow")
    assert len(PickAPicPairs(tmp_path / "pairs.arrow", resolution=16)) == 6
    with pa.OSFile(str(tmp_path / "file_format.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)  # the random-access IPC format is read too
    assert PickAPicPairs(tmp_path / "file_format.arrow", resolution=16)[5]["caption"] == table.column("caption")[5].as_py()

    # a datasets DatasetDict saved with save_to_disk: dataset_dict.json + one folder per split
    root = tmp_path / "pickapic"
    for split, seed in (("train", 0), ("validation_unique", 1)):
        (root / split).mkdir(parents=True)
        _write_arrow_stream(_table(4, seed), root / split / "data-00000-of-00001.arrow")
        (root / split / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "validation_unique"]}))
    train = PickAPicPairs(root, resolution=16)
    valid = PickAPicPairs(root, split="validation_unique", resolution=16)
    assert train.captions == synthetic_pairs(4, 16, 0)[0] and valid.captions == synthetic_pairs(4, 16, 1)[0]
    assert valid[0]["pixel_values_0"].shape == (3, 16, 16)
    with pytest.raises(PairDataError, match="no split 'test'"):
        PickAPicPairs(root, split="test")


def test_hub_style_parquet_folder_with_splits_and_optional_columns(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(_table(6, 0, has_label=[1, 1, 0, 1, 1, 1], num_example_per_prompt=[2, 2, 1, 5, 5, 5]),
                   data / "train-00000-of-00002.parquet", row_group_size=2)
    pq.write_table(_table(4, 1), data / "train-00001-of-00002.parquet")
    pq.write_table(_table(3, 2), data / "validation_unique-00000-of-00001.parquet")
    train = PickAPicPairs(tmp_path, split="train", resolution=16)
    assert len(train) == 5 + 4  # the unlabelled row 2 of the first file is dropped
    assert train.where(2).endswith("train-00000-of-00002.parquet row 3")
    # num_example_per_prompt is used only when every file has it: here the second does not, so counted
    assert len(PickAPicPairs(data / "train-00000-of-00002.parquet", resolution=16).num_pairs) == 5
    assert PickAPicPairs(data / "train-00000-of-00002.parquet", resolution=16).num_pairs.tolist() == [2, 2, 5, 5, 5]
    assert len(PickAPicPairs(tmp_path, split="validation_unique", resolution=16)) == 3
    assert len(PickAPicPairs(tmp_path, split="train", resolution=16, max_pairs=3)) == 3
    # row groups of 2 rows become sampling blocks (row 2 dropped: its group keeps one pair)
    first = PickAPicPairs(data / "train-00000-of-00002.parquet", resolution=16)
    assert [list(b) for b in first.blocks] == [[0, 1], [2], [3, 4]]
    for i in range(len(train)):  # reading across row groups and files returns the right rows
        assert train[i]["caption"] == train.captions[i]


def test_block_shuffle_is_a_seeded_permutation_that_keeps_blocks_together():
    blocks = [range(0, 3), range(3, 5), range(5, 9)]
    sampler = BlockShuffleSampler(blocks, seed=4)
    order = list(sampler)
    assert sorted(order) == list(range(9)) and len(sampler) == 9
    assert order == list(BlockShuffleSampler(blocks, seed=4))
    runs = [next(i for i, b in enumerate(blocks) if k in b) for k in order]
    assert sum(1 for a, b in zip(runs, runs[1:]) if a != b) == 2  # each block appears as one run
    sampler.set_epoch(1)
    assert sorted(sampler) == list(range(9)) and list(sampler) != order


def test_missing_columns_name_the_file_and_the_columns(tmp_path):
    pq.write_table(_table(3).drop_columns(["label_1"]), tmp_path / "no_label.parquet")
    with pytest.raises(PairDataError, match=r"no_label\.parquet: missing column\(s\) \['label_1'\]"):
        PickAPicPairs(tmp_path / "no_label.parquet")


def test_bad_labels_and_captions_name_the_row(tmp_path):
    table = _table(4)
    labels = table.column("label_0").to_pylist()
    labels[2] = 0.7
    pq.write_table(table.set_column(3, "label_0", pa.array(labels)), tmp_path / "bad.parquet")
    with pytest.raises(PairDataError, match=r"bad\.parquet row 2: labels .*0\.7"):
        PickAPicPairs(tmp_path / "bad.parquet")
    captions = table.column("caption").to_pylist()
    captions[1] = None
    pq.write_table(table.set_column(0, "caption", pa.array(captions, pa.string())), tmp_path / "nocap.parquet")
    with pytest.raises(PairDataError, match=r"nocap\.parquet row 1: caption is None"):
        PickAPicPairs(tmp_path / "nocap.parquet")
    captions[1] = "a red\x00 circle"
    pq.write_table(table.set_column(0, "caption", pa.array(captions, pa.string())), tmp_path / "nul.parquet")
    with pytest.raises(PairDataError, match=r"nul\.parquet row 1: caption holds a NUL character \(\\x00\) at character 6"):
        PickAPicPairs(tmp_path / "nul.parquet")


def test_undecodable_image_is_reported_with_file_row_and_column(tmp_path):
    table = _table(4)
    cells = table.column("jpg_1").to_pylist()
    cells[2] = b"\x89PNG but not really"
    pq.write_table(table.set_column(2, "jpg_1", pa.array(cells, pa.binary())), tmp_path / "broken.parquet")
    pairs = PickAPicPairs(tmp_path / "broken.parquet", resolution=16)  # captions and labels are fine
    with pytest.raises(PairDataError, match=r"broken\.parquet row 2, column jpg_1: image does not decode"):
        pairs.images(2)
    # Through a DataLoader worker the message comes back as data and is raised, whole, in the loop.
    loader = torch.utils.data.DataLoader(pairs, batch_size=2, collate_fn=collate_pairs, num_workers=1)
    batches = list(loader)
    checked_batch(batches[0])
    with pytest.raises(PairDataError, match=r"^\S*broken\.parquet row 2, column jpg_1: image does not decode"):
        checked_batch(batches[1])


def test_missing_sources_are_named(tmp_path):
    with pytest.raises(PairDataError, match="nowhere does not exist"):
        PickAPicPairs(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PairDataError, match="no .parquet or .arrow files"):
        PickAPicPairs(tmp_path / "empty")
    (tmp_path / "notes.csv").write_text("caption\n")
    with pytest.raises(PairDataError, match="unknown data file type '.csv'"):
        PickAPicPairs(tmp_path / "notes.csv")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(PairDataError, match="junk.parquet: cannot read it as parquet"):
        PickAPicPairs(tmp_path / "junk.parquet")
    assert issubclass(PairDataError, SpotuneError)


def test_save_to_disk_json_files_with_a_byte_order_mark(tmp_path):
    root = tmp_path / "pickapic"
    (root / "train").mkdir(parents=True)
    _write_arrow_stream(_table(4, 0), root / "train" / "data-00000-of-00001.arrow")
    state = json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]})
    (root / "train" / "state.json").write_text("\ufeff" + state, encoding="utf-8")
    (root / "dataset_dict.json").write_text("\ufeff" + json.dumps({"splits": ["train"]}), encoding="utf-8")
    assert len(PickAPicPairs(root, resolution=16)) == 4
