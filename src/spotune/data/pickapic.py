"""Pick-a-Pic-format preference pairs from local parquet / arrow / ``datasets.save_to_disk`` folders.

A row is one human judgement: ``caption`` (str), ``jpg_0`` and ``jpg_1`` (encoded image bytes, or the
``{"bytes", "path"}`` struct the ``datasets`` Image feature stores), ``label_0`` and ``label_1``
(1/0, 0/1, or 0.5/0.5 for a tie). Optional columns are used when present: ``has_label`` (rows
without a label are dropped, unless ``keep_unlabelled`` asks to keep them as SPO's SPM trainer keeps
them in its training split) and ``num_example_per_prompt`` (otherwise counted from the captions).

Accepted sources (read with pyarrow; the ``datasets`` package is not needed):

* a ``.parquet`` file, or a folder of them (searched recursively; with ``split`` set, only files named
  ``{split}-*`` / ``{split}_*`` or under a ``{split}/`` folder, as in the hub's ``data/train-00000-of-00645.parquet``);
* an ``.arrow`` file (stream or file format), or a folder of them;
* a ``datasets.save_to_disk`` folder: a ``Dataset`` (``state.json``) or a ``DatasetDict``
  (``dataset_dict.json``, with ``split`` choosing the sub-folder; ``train`` by default).

Captions and labels are read up front (small); images are decoded when a pair is fetched, parquet
row group by row group, so a 300 GB dump is never loaded whole. :class:`BlockShuffleSampler` orders
pairs row group by row group, so each worker decodes from the group it has in memory.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from spotune.errors import SpotuneError

REQUIRED_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
IMAGE_COLUMNS = ("jpg_0", "jpg_1")
VALID_LABELS = {(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)}
# A row with has_label false may carry no preference at all (0/0). In the PickScore/SPO loss such a row
# counts as a tie term with zero target: a constant, so it adds no gradient, only weight to the batch's
# normalisation, which is what keeping it in training reproduces.
UNLABELLED_LABELS = VALID_LABELS | {(0.0, 0.0)}


class PairDataError(SpotuneError, ValueError):
    """A preference-pair source that is missing, lacks columns, or holds a bad row (named)."""


# -- files ----------------------------------------------------------------------------------------


def _split_matches(file: Path, root: Path, split: str) -> bool:
    rel = file.relative_to(root)
    return split in rel.parts[:-1] or file.name.startswith((f"{split}-", f"{split}_", f"{split}."))


def find_pair_files(path: str | Path, split: str | None = None) -> list[Path]:
    """The data files of a source (see the module docstring), sorted; raises :class:`PairDataError`."""
    root = Path(path).expanduser()
    if not root.exists():
        raise PairDataError(f"preference data {root} does not exist")
    if root.is_file():
        if root.suffix not in (".parquet", ".arrow"):
            raise PairDataError(f"{root}: unknown data file type '{root.suffix}' (expected .parquet or .arrow)")
        return [root]
    if (root / "dataset_dict.json").is_file():
        chosen = split or "train"
        try:
            splits = json.loads((root / "dataset_dict.json").read_text(encoding="utf-8-sig")).get("splits", [])
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PairDataError(f"{root / 'dataset_dict.json'}: not valid JSON ({exc})") from exc
        if chosen not in splits:
            raise PairDataError(f"{root}: no split '{chosen}' in this DatasetDict (splits: {splits})")
        return find_pair_files(root / chosen)
    if (root / "state.json").is_file():
        try:
            state = json.loads((root / "state.json").read_text(encoding="utf-8-sig"))
            files = [root / f["filename"] for f in state["_data_files"]]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise PairDataError(f"{root / 'state.json'}: not a datasets save_to_disk state ({exc})") from exc
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise PairDataError(f"{root}: data file(s) listed in state.json are missing: {missing}")
        return files
    files = sorted(root.rglob("*.parquet")) or sorted(root.rglob("*.arrow"))
    if split is not None:
        files = [f for f in files if _split_matches(f, root, split)]
    if not files:
        where = f" for split '{split}'" if split else ""
        raise PairDataError(f"{root}: no .parquet or .arrow files{where}")
    return files


class _Source:
    """One data file: its schema, its size, and random access to its image columns by row."""

    def __init__(self, file: Path) -> None:
        self.file = file
        self._table: pa.Table | None = None  # arrow: the memory-mapped table (opened lazily, per process)
        self._groups: OrderedDict[int, pa.Table] = OrderedDict()  # parquet: a few decoded row groups
        try:
            if file.suffix == ".parquet":
                meta = pq.ParquetFile(file).metadata
                self.schema = meta.schema.to_arrow_schema()
                sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
            else:
                table = self._arrow_table()
                self.schema = table.schema
                sizes = [table.num_rows]
        except (OSError, pa.ArrowException) as exc:
            raise PairDataError(f"{file}: cannot read it as {file.suffix[1:]} ({exc})") from exc
        self.block_sizes = sizes
        self.block_starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.num_rows = int(self.block_starts[-1])

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers re-open files themselves; never pickle memory maps or cached groups.
        state = dict(self.__dict__)
        state["_table"], state["_groups"] = None, OrderedDict()
        return state

    def _arrow_table(self) -> pa.Table:
        if self._table is None:
            source = pa.memory_map(str(self.file))
            try:
                self._table = pa.ipc.open_stream(source).read_all()  # what datasets writes
            except pa.ArrowInvalid:
                source.seek(0)
                self._table = pa.ipc.open_file(source).read_all()
        return self._table

    def check_columns(self) -> None:
        missing = [c for c in REQUIRED_COLUMNS if c not in self.schema.names]
        if missing:
            raise PairDataError(
                f"{self.file}: missing column(s) {missing}; Pick-a-Pic format needs {list(REQUIRED_COLUMNS)} "
                f"(found {self.schema.names})"
            )

    def read_columns(self, names: Sequence[str]) -> pa.Table:
        """Whole columns (captions, labels): small next to the images."""
        if self.file.suffix == ".parquet":
            return pq.read_table(self.file, columns=list(names))
        return self._arrow_table().select(list(names))

    def image_cells(self, row: int) -> tuple[Any, Any]:
        """The two raw image cells of file row ``row``."""
        if self.file.suffix == ".parquet":
            block = int(np.searchsorted(self.block_starts, row, side="right") - 1)
            group = self._groups.get(block)
            if group is None:
                group = pq.ParquetFile(self.file).read_row_group(block, columns=list(IMAGE_COLUMNS))
                self._groups[block] = group
                while len(self._groups) > 2:
                    self._groups.popitem(last=False)
            self._groups.move_to_end(block)
            local = row - int(self.block_starts[block])
        else:
            group, local = self._arrow_table(), row
        return tuple(group.column(c)[local].as_py() for c in IMAGE_COLUMNS)  # type: ignore[return-value]


# -- images ----------------------------------------------------------------------------------------


def decode_image(cell: Any, where: str) -> Image.Image:
    """Encoded bytes, or a datasets Image struct ``{"bytes", "path"}``, -> an RGB PIL image."""
    if isinstance(cell, dict):
        data, path = cell.get("bytes"), cell.get("path")
        if data is None and path:
            try:
                data = Path(path).read_bytes()
            except OSError as exc:
                raise PairDataError(f"{where}: image file {path} cannot be read ({exc})") from exc
        cell = data
    if not isinstance(cell, (bytes, bytearray)) or not cell:
        raise PairDataError(f"{where}: expected encoded image bytes, got {type(cell).__name__}")
    try:
        image = Image.open(io.BytesIO(cell))
        image.load()
        return image.convert("RGB")
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise PairDataError(f"{where}: image does not decode ({type(exc).__name__}: {exc})") from exc


def image_to_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """Resize the shortest side to ``resolution`` (bicubic), centre-crop, scale to [-1, 1].

    As SPO's SPM dataset does it, through the CLIP image processor of transformers 4.27 with
    ``shortest_edge`` and ``crop_size`` set to the resolution: the long side becomes
    ``int(resolution * long / short)`` (truncated), the crop offsets are floored.

    Returns:
        [3, resolution, resolution] float32.
    """
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(resolution * long / short)
    new_w, new_h = (resolution, new_long) if w <= h else (new_long, resolution)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # [R, R, 3]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


# -- the dataset -----------------------------------------------------------------------------------


@dataclass
class PairBatch:
    """A collated batch of B preference pairs.

    Attributes:
        pixel_values_0, pixel_values_1: [B, 3, R, R] float32 in [-1, 1].
        captions: B captions.
        label_0, label_1: [B] float32 (1/0, 0/1 or 0.5/0.5).
        num_pairs: [B] float32, how many pairs the dataset holds for each caption (the loss weight is 1/this).
        rows: B ``file row N`` strings, for messages.
        index: [B] long, the pairs' indices in their dataset (keys of per-pair caches).
        clip_pixels_0, clip_pixels_1: [B, 3, S, S] the original images through a CLIP processor, when the
            dataset was asked for them (PickScore relabelling, :mod:`spotune.preference.relabel`); else ``None``.
    """

    pixel_values_0: torch.Tensor
    pixel_values_1: torch.Tensor
    captions: list[str]
    label_0: torch.Tensor
    label_1: torch.Tensor
    num_pairs: torch.Tensor
    rows: list[str]
    index: torch.Tensor | None = None
    clip_pixels_0: torch.Tensor | None = None
    clip_pixels_1: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.captions)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PairBatch":
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return PairBatch(
            move(self.pixel_values_0), move(self.pixel_values_1), self.captions,
            move(self.label_0), move(self.label_1), move(self.num_pairs), self.rows,
            move(self.index), move(self.clip_pixels_0), move(self.clip_pixels_1),
        )

    def with_labels(self, labels: torch.Tensor) -> "PairBatch":
        """The same pairs with other labels ([B, 2]: label_0, label_1), on the labels' current device."""
        device = self.label_0.device
        return dataclasses.replace(self, label_0=labels[:, 0].to(device), label_1=labels[:, 1].to(device))


class PickAPicPairs(torch.utils.data.Dataset):
    """Preference pairs of a Pick-a-Pic-format source; item i is a dict ready for :func:`collate_pairs`.

    Args:
        path: a file or folder (see the module docstring).
        split: which split of a DatasetDict / hub-style parquet folder.
        resolution: images are resized and centre-cropped to this square size (the diffusion model's);
            an attribute that may be changed until pairs are fetched.
        max_pairs: keep only the first N labelled pairs (evaluation subsets).
        keep_unlabelled: keep rows whose ``has_label`` is false (their labels may also be 0/0), as SPO's
            SPM trainer does in its training split; evaluation splits drop them (the default).

    The attribute ``clip_pixels`` (``None`` by default) may be set to a picklable ``PIL image -> [3, S, S]``
    function; items then also carry both original images through it (before any resizing to ``resolution``).
    Raises:
        PairDataError: a missing source, missing columns, a null caption or labels that are not
            1/0, 0/1 or 0.5/0.5 (naming the file and row). Undecodable images are reported when the
            pair is fetched, by the training loop (workers hand the message back rather than raising).
    """

    def __init__(
        self,
        path: str | Path,
        split: str | None = None,
        resolution: int = 512,
        max_pairs: int | None = None,
        keep_unlabelled: bool = False,
    ) -> None:
        self.resolution = resolution
        self.clip_pixels: Callable[[Image.Image], torch.Tensor] | None = None
        self.sources = [_Source(f) for f in find_pair_files(path, split)]
        captions: list[str] = []
        labels: list[tuple[float, float]] = []
        given_counts: list[float] | None = []
        index: list[tuple[int, int]] = []  # (source, file row) of each kept pair
        for s, source in enumerate(self.sources):
            source.check_columns()
            names = ["caption", "label_0", "label_1"]
            names += [c for c in ("has_label", "num_example_per_prompt") if c in source.schema.names]
            cols = source.read_columns(names).to_pydict()
            has_label = cols.get("has_label")
            counts = cols.get("num_example_per_prompt")
            if counts is None:
                given_counts = None
            for row in range(source.num_rows):
                unlabelled = has_label is not None and not has_label[row]
                if unlabelled and not keep_unlabelled:
                    continue  # Pick-a-Pic keeps unlabelled judgements; evaluation has nothing to score them by
                where = f"{source.file} row {row}"
                caption = cols["caption"][row]
                if not isinstance(caption, str):
                    raise PairDataError(f"{where}: caption is {caption!r}, expected a string")
                if "\x00" in caption:  # as in prompt files: a broken export, not a caption
                    raise PairDataError(f"{where}: caption holds a NUL character (\\x00) at character "
                                        f"{caption.index(chr(0)) + 1}; a caption is plain text: remove it")
                pair = (cols["label_0"][row], cols["label_1"][row])
                try:
                    pair = (float(pair[0]), float(pair[1]))
                except (TypeError, ValueError):
                    raise PairDataError(f"{where}: labels {pair} are not numbers") from None
                if pair not in (UNLABELLED_LABELS if unlabelled else VALID_LABELS):
                    expected = "(1, 0), (0, 1), (0.5, 0.5) or (0, 0)" if unlabelled else "(1, 0), (0, 1) or (0.5, 0.5)"
                    raise PairDataError(f"{where}: labels (label_0, label_1) = {pair}; expected {expected}")
                if given_counts is not None:
                    count = counts[row]
                    if count is None or not count >= 1:
                        raise PairDataError(f"{where}: num_example_per_prompt is {count!r}, expected >= 1")
                    given_counts.append(float(count))
                captions.append(caption)
                labels.append(pair)
                index.append((s, row))
                if max_pairs is not None and len(index) >= max_pairs:
                    break
            if max_pairs is not None and len(index) >= max_pairs:
                break
        if not index:
            raise PairDataError(f"{path}: no labelled pairs found")
        self.captions = captions
        self.labels = np.asarray(labels, dtype=np.float32)  # [N, 2]
        if given_counts is None:
            per_caption = Counter(captions)
            given_counts = [float(per_caption[c]) for c in captions]
        self.num_pairs = np.asarray(given_counts, dtype=np.float32)  # [N]
        self.index = np.asarray(index, dtype=np.int64)  # [N, 2]

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def num_file_rows(self) -> int:
        """Rows of every source file together, unlabelled and skipped rows included."""
        return sum(source.num_rows for source in self.sources)

    def keep_file_rows(self, keep: np.ndarray) -> int:
        """Keep only the pairs whose row is true in ``keep``, [num_file_rows] bool over the sources' rows in order
        (a per-row filter such as :func:`spotune.data.pair_filter.mpcf_keep`); returns how many pairs remain."""
        offsets = np.cumsum([0] + [source.num_rows for source in self.sources])[:-1]
        chosen = keep[offsets[self.index[:, 0]] + self.index[:, 1]]
        self.captions = [c for c, k in zip(self.captions, chosen) if k]
        self.labels, self.num_pairs, self.index = self.labels[chosen], self.num_pairs[chosen], self.index[chosen]
        return len(self)

    def where(self, i: int) -> str:
        s, row = self.index[i]
        return f"{self.sources[s].file} row {row}"

    def images(self, i: int) -> tuple[Image.Image, Image.Image]:
        """The two decoded RGB images of pair i (raises :class:`PairDataError` naming file and row)."""
        s, row = (int(v) for v in self.index[i])
        cells = self.sources[s].image_cells(row)
        where = self.where(i)
        return tuple(decode_image(c, f"{where}, column {n}") for c, n in zip(cells, IMAGE_COLUMNS))  # type: ignore[return-value]

    def check_images(self) -> None:
        """Decode every pair's two images once; raise :class:`PairDataError` naming the first bad one.

        For data read again and again (evaluation sets): checked when a run starts, not when it
        first gets there.
        """
        for i in range(len(self)):
            self.images(i)

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            image_0, image_1 = self.images(i)
        except PairDataError as exc:
            # Raised inside a DataLoader worker, the message would come back wrapped in a traceback;
            # hand it to the main process as data instead (collate_pairs raises it there).
            return {"error": str(exc)}
        item = {
            "pixel_values_0": image_to_tensor(image_0, self.resolution),
            "pixel_values_1": image_to_tensor(image_1, self.resolution),
            "caption": self.captions[i],
            "label_0": float(self.labels[i, 0]),
            "label_1": float(self.labels[i, 1]),
            "num_pairs": float(self.num_pairs[i]),
            "row": self.where(i),
            "index": i,
        }
        if self.clip_pixels is not None:
            item["clip_pixels_0"], item["clip_pixels_1"] = self.clip_pixels(image_0), self.clip_pixels(image_1)
        return item

    @property
    def blocks(self) -> list[range]:
        """Ranges of dataset indices that live in one parquet row group (one per arrow file)."""
        out: list[range] = []
        start = 0
        keys = [(int(s), int(np.searchsorted(self.sources[s].block_starts, r, side="right"))) for s, r in self.index]
        for i in range(1, len(keys) + 1):
            if i == len(keys) or keys[i] != keys[start]:
                out.append(range(start, i))
                start = i
        return out

    @property
    def num_ties(self) -> int:
        """Pairs labelled 0.5/0.5."""
        return int(((self.labels[:, 0] == 0.5) & (self.labels[:, 1] == 0.5)).sum())

    @property
    def num_without_preference(self) -> int:
        """Kept unlabelled pairs labelled 0/0 (no gradient; they only weigh in the loss normalisation)."""
        return int(((self.labels[:, 0] == 0) & (self.labels[:, 1] == 0)).sum())


def collate_pairs(items: list[dict[str, Any]]) -> PairBatch | dict[str, str]:
    """Stack dataset items into a :class:`PairBatch`; a failed item turns the batch into ``{"error": msg}``."""
    for item in items:
        if "error" in item:
            return {"error": item["error"]}
    return PairBatch(
        pixel_values_0=torch.stack([it["pixel_values_0"] for it in items]),
        pixel_values_1=torch.stack([it["pixel_values_1"] for it in items]),
        captions=[it["caption"] for it in items],
        label_0=torch.tensor([it["label_0"] for it in items], dtype=torch.float32),
        label_1=torch.tensor([it["label_1"] for it in items], dtype=torch.float32),
        num_pairs=torch.tensor([it["num_pairs"] for it in items], dtype=torch.float32),
        rows=[it["row"] for it in items],
        index=torch.tensor([it["index"] for it in items], dtype=torch.long) if all("index" in it for it in items) else None,
        clip_pixels_0=torch.stack([it["clip_pixels_0"] for it in items]) if "clip_pixels_0" in items[0] else None,
        clip_pixels_1=torch.stack([it["clip_pixels_1"] for it in items]) if "clip_pixels_1" in items[0] else None,
    )


def checked_batch(batch: PairBatch | dict[str, str]) -> PairBatch:
    """Raise the :class:`PairDataError` a worker handed back, or pass the batch through."""
    if isinstance(batch, dict):
        raise PairDataError(batch["error"])
    return batch


class BlockShuffleSampler(torch.utils.data.Sampler[int]):
    """A seeded shuffle that keeps parquet row groups together: the order of the blocks is shuffled,
    then the order inside each block, so a worker decodes one row group at a time.

    ``set_epoch(e)`` changes the order; the same (seed, epoch) gives the same order on every process.
    """

    def __init__(self, blocks: list[range], seed: int = 0) -> None:
        self.blocks = blocks
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(len(b) for b in self.blocks)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        for b in torch.randperm(len(self.blocks), generator=generator).tolist():
            block = self.blocks[b]
            for j in torch.randperm(len(block), generator=generator).tolist():
                yield block.start + j


def encode_png(image: Image.Image | np.ndarray) -> bytes:
    """A PIL image or an [H, W, 3] uint8 array -> PNG bytes."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


SYNTHETIC_COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (230, 200, 40)}
SYNTHETIC_SHAPES = ("circle", "square")


def _render_shape(shape: str, rgb: tuple[int, int, int], size: int, rng: np.random.Generator, clean: bool) -> np.ndarray:
    """[size, size, 3] uint8: the shape on a plain light background (clean) or washed out on clutter."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = rng.uniform(0.35, 0.65, size=2) * size
    radius = rng.uniform(0.2, 0.3) * size
    if shape == "circle":
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
    else:
        mask = (np.abs(yy - cy) < radius) & (np.abs(xx - cx) < radius)
    colour = np.asarray(rgb, dtype=np.float32)
    if clean:
        image = np.full((size, size, 3), 235.0, dtype=np.float32)
    else:
        colour = 0.4 * colour + 0.6 * 128.0  # washed out towards grey
        image = 100.0 + rng.uniform(0, 80, size=(size // 4, size // 4, 3)).repeat(4, 0).repeat(4, 1)[:size, :size]
    image[mask] = colour
    return image.clip(0, 255).astype(np.uint8)


def synthetic_pairs(
    n: int, resolution: int = 32, seed: int = 0, tie_fraction: float = 0.125
) -> tuple[list[str], list[np.ndarray], list[np.ndarray], list[tuple[float, float]]]:
    """Miniature Pick-a-Pic pairs whose preference is learnable: for "a red circle", the clean image
    (the shape on a plain background) is preferred over the washed-out one on clutter.

    Ties (two clean images, labelled 0.5/0.5) make up about ``tie_fraction`` of the pairs; the preferred
    image is image 0 or image 1 at random. Deterministic in ``seed``.

    Returns:
        captions, images_0, images_1 ([R, R, 3] uint8 arrays), labels ((label_0, label_1) tuples).
    """
    rng = np.random.default_rng(seed)
    colours, captions, images_0, images_1, labels = list(SYNTHETIC_COLOURS), [], [], [], []
    for _ in range(n):
        colour, shape = colours[rng.integers(len(colours))], SYNTHETIC_SHAPES[rng.integers(len(SYNTHETIC_SHAPES))]
        rgb = SYNTHETIC_COLOURS[colour]
        good = _render_shape(shape, rgb, resolution, rng, clean=True)
        if rng.random() < tie_fraction:
            other, label = _render_shape(shape, rgb, resolution, rng, clean=True), (0.5, 0.5)
            pair = (good, other)
        elif rng.random() < 0.5:
            pair, label = (good, _render_shape(shape, rgb, resolution, rng, clean=False)), (1.0, 0.0)
        else:
            pair, label = (_render_shape(shape, rgb, resolution, rng, clean=False), good), (0.0, 1.0)
        captions.append(f"a {colour} {shape}")
        images_0.append(pair[0])
        images_1.append(pair[1])
        labels.append(label)
    return captions, images_0, images_1, labels


def write_pairs_parquet(
    path: str | Path,
    captions: Sequence[str],
    images_0: Sequence[Image.Image | np.ndarray | bytes],
    images_1: Sequence[Image.Image | np.ndarray | bytes],
    labels: Sequence[tuple[float, float]],
    overwrite: bool = False,
    row_group_size: int | None = None,
) -> Path:
    """Write preference pairs as a Pick-a-Pic-format parquet file (images PNG-encoded), atomically.

    Args:
        captions: N captions.
        images_0, images_1: N images each (PIL, [H, W, 3] uint8 arrays, or already encoded bytes).
        labels: N (label_0, label_1) pairs: (1, 0), (0, 1) or (0.5, 0.5).
        overwrite: replace an existing file (refused otherwise).
        row_group_size: rows per parquet row group (pyarrow's default when unset).
    """
    from spotune.utils.io import atomic_path

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; refusing to overwrite it")
    n = len(captions)
    if not (len(images_0) == len(images_1) == len(labels) == n):
        raise ValueError(f"got {n} captions, {len(images_0)}/{len(images_1)} images and {len(labels)} labels")
    encode = lambda im: im if isinstance(im, (bytes, bytearray)) else encode_png(im)  # noqa: E731
    table = pa.table({
        "caption": pa.array(list(captions), pa.string()),
        "jpg_0": pa.array([encode(im) for im in images_0], pa.binary()),
        "jpg_1": pa.array([encode(im) for im in images_1], pa.binary()),
        "label_0": pa.array([float(a) for a, _ in labels], pa.float64()),
        "label_1": pa.array([float(b) for _, b in labels], pa.float64()),
    })
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=row_group_size)
    return path
