"""Training data from a 🤗 `datasets` dataset: a Hub id (cached or online), or a local `imagefolder`
(metadata.jsonl / metadata.csv), parquet files, or a `save_to_disk` folder, through
`datasets.load_dataset` / `load_from_disk`.

Rows become the same `ImageRecord`s the folder path makes (`DatasetRecord`), so buckets, crops,
caches and the loop do not care where an image came from. The image column is read with
`Image(decode=False)`: a row gives its bytes (or file path) and pixels are decoded only when the
item is used, by `images.read_image` like every other image. Sizes for aspect buckets come from the
rows' `height`/`width` columns when the dataset stores them, else from each image's header (never its
pixels), and are not read at all without buckets.

`--streaming` reads an `IterableDataset` as one fixed sequence of rows (data epoch 0 shuffled with a
buffer, then epoch 1, ...), cut into micro-batches of batch_size x processes rows; a resumed run
re-reads (without decoding) the rows its first micro-batches used and skips them, so it sees exactly
the rows an uninterrupted run sees next.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..constants import REFERENCE_IMAGES
from ..errors import ImageFileError, TrainConfigError
from ..images import ImageBytes, image_size, read_image
from .data import CAPTION_KEYS, DreamBoothDataset, ImageRecord, _item_rng, collate, drop_caption

logger = logging.getLogger("gralora_diffusion.train")

SIZE_COLUMNS = (("height", "width"), ("original_height", "original_width"))
SHUFFLE_BUFFER = 1000  # rows a streamed dataset is shuffled within (datasets' IterableDataset.shuffle)


@dataclass(frozen=True)
class DatasetRecord(ImageRecord):
    """One row: `path` names it for messages and cache keys ("owner/name[train] row 12"); the image is
    `rows[row][column]`, read only when the item is decoded (`rows`: the Dataset, or [row] when streamed)."""
    rows: Any = field(default=None, compare=False, repr=False)
    row: int = 0
    column: str = "image"

    def source(self):
        return image_source(self.rows[self.row][self.column], self.path)


def image_source(value, where):
    """What the image reader (`images.read_image`, `image_size`) opens for one image cell: a file path,
    or the bytes in memory, named by `where`."""
    if isinstance(value, dict):  # datasets' Image(decode=False): {"bytes": ..., "path": ...}
        if value.get("bytes"):
            return ImageBytes(value["bytes"], str(where))
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return ImageBytes(bytes(value), str(where))
    if isinstance(value, str) and value:
        return Path(value)
    if value is not None and hasattr(value, "save"):  # a PIL image (a column read with decode=True)
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return ImageBytes(buffer.getvalue(), str(where))
    raise TrainConfigError(f"{where}: the image cell holds {type(value).__name__}, not an image (bytes, a file path or a PIL image).")


# ---- opening -----------------------------------------------------------------------------------------
def _is_saved_to_disk(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _cached_snapshot(repo_id: str) -> str | None:
    """The local snapshot of a Hub dataset in huggingface_hub's cache, or None. `datasets` offline only
    finds datasets it prepared itself; a `hf download --repo-type dataset` copy lives here."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, repo_type="dataset", local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError, OSError, ValueError):
        return None


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def open_dataset(name: str, config_name: str | None = None, split: str = "train", streaming: bool = False):
    """A `datasets.Dataset` (or `IterableDataset` when streaming) for --dataset_name; a one-line
    TrainConfigError when it cannot be found or read."""
    import datasets
    from huggingface_hub import constants

    where = f"--dataset_name {name}"
    local = Path(name).expanduser()
    shown = not datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # "Generating train split" bars: ours are the training bars
    try:
        if local.is_dir() and _is_saved_to_disk(local):
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise TrainConfigError(f"{where}: no split {split!r}; its splits are {', '.join(ds)} (--dataset_split).")
                ds = ds[split]
            return ds.to_iterable_dataset() if streaming else ds
        if local.exists() and not local.is_dir():
            raise TrainConfigError(f"{where}: is a file; give a folder of data files, a save_to_disk folder or a Hub id.")
        path = str(local) if local.is_dir() else name
        if not local.is_dir() and constants.HF_HUB_OFFLINE:
            path = _cached_snapshot(name) or name
        return datasets.load_dataset(path, config_name, split=split, streaming=streaming)
    except TrainConfigError:
        raise
    except (ValueError, FileNotFoundError, ConnectionError, OSError, KeyError, ImportError,
            datasets.exceptions.DatasetNotFoundError) as err:
        raise TrainConfigError(f"{where}: cannot load it ({_one_line(err)}).") from None
    finally:
        if shown:
            datasets.enable_progress_bars()


@dataclass(frozen=True)
class Columns:
    image: str
    caption: str | None
    size: tuple[str, str] | None  # (height column, width column) when the dataset stores sizes


def find_columns(features, image_column: str | None, caption_column: str | None, where: str) -> Columns:
    """The image, caption and size columns: as given, else found from the features (the first Image
    feature; text/caption/prompt, or the only string column). Wrong or missing: one line listing the columns."""
    import datasets

    if features is None:
        raise TrainConfigError(f"{where}: the dataset declares no features (columns); pass --image_column and --caption_column.")
    names = list(features)
    listing = f"its columns are {', '.join(names)}"
    for flag, value in (("--image_column", image_column), ("--caption_column", caption_column)):
        if value is not None and value not in names:
            raise TrainConfigError(f"{where}: {flag} {value!r} is not a column; {listing}.")
    image = image_column or next((n for n in names if isinstance(features[n], datasets.Image)), None)
    if image is None:
        raise TrainConfigError(f"{where}: no image column found (no Image feature); {listing}. Pass --image_column.")
    strings = [n for n in names if n != image and getattr(features[n], "dtype", None) in ("string", "large_string")]
    caption = caption_column or next((n for n in CAPTION_KEYS if n in strings), None) or (strings[0] if len(strings) == 1 else None)
    size = next((pair for pair in SIZE_COLUMNS if all(c in names for c in pair)), None)
    return Columns(image, caption, size)


def _caption(row: dict, columns: Columns, prompt: str | None) -> str | None:
    value = row.get(columns.caption) if columns.caption else None
    text = str(value).strip() if value is not None else ""
    return text or prompt


def _uncaptioned_error(where: str, columns: Columns, count: int, first: list) -> TrainConfigError:
    said = f"no caption column ({columns.caption!r} is empty there)" if columns.caption else "no caption column was found"
    return TrainConfigError(f"{where}: {count} row(s) ({', '.join(map(str, first))}{', ...' if count > 3 else ''}) have "
                            f"{said}; pass --instance_prompt for them, or --caption_column.")


def prepare(ds, image_column: str | None, caption_column: str | None, where: str):
    """(dataset with its image column undecoded, Columns)."""
    import datasets

    columns = find_columns(ds.features, image_column, caption_column, where)
    if isinstance(ds.features[columns.image], datasets.Image):
        ds = ds.cast_column(columns.image, datasets.Image(decode=False))
    return ds, columns


def dataset_records(cfg, need_sizes: bool) -> list[DatasetRecord]:
    """Every row of a (map-style) dataset as a record, captions from the caption column, else
    --instance_prompt. `need_sizes`: read sizes (stored columns, else image headers) for buckets."""
    where = f"--dataset_name {cfg.dataset_name}"
    ds = open_dataset(cfg.dataset_name, cfg.dataset_config_name, cfg.dataset_split)
    if cfg.max_train_samples is not None:
        ds = ds.select(range(min(cfg.max_train_samples, len(ds))))
    if len(ds) == 0:
        raise TrainConfigError(f"{where}: split {cfg.dataset_split!r} has no rows.")
    ds, columns = prepare(ds, cfg.image_column, cfg.caption_column, where)
    label = f"{cfg.dataset_name}[{cfg.dataset_split}]"
    text_columns = [c for c in (columns.caption, *(columns.size or ())) if c]
    # captions and stored sizes as whole columns (no image bytes read, no per-row formatting)
    table = ds.select_columns(text_columns).to_dict() if text_columns else {}
    records, uncaptioned = [], []
    for i in range(len(ds)):
        row = {name: values[i] for name, values in table.items()}
        caption = _caption(row, columns, cfg.instance_prompt)
        if not caption:
            uncaptioned.append(f"row {i}")
            continue
        size = (0, 0)
        if columns.size:
            size = (int(row[columns.size[0]]), int(row[columns.size[1]]))
        elif need_sizes:
            try:
                size = image_size(image_source(ds[i][columns.image], f"{label} row {i}"))
            except ImageFileError as err:  # skipped, as the folder path skips unreadable files
                logger.warning("warning: skipping %s", err)
                continue
        records.append(DatasetRecord(path=Path(f"{label} row {i}"), caption=caption, size=size, rows=ds, row=i, column=columns.image))
    if uncaptioned:
        raise _uncaptioned_error(where, columns, len(uncaptioned), uncaptioned[:3])
    if not records:
        raise TrainConfigError(f"{where}: none of its {len(ds)} row(s) could be read; see the warnings above.")
    return records


def data_fingerprint(records) -> str:
    """Changes when any training image may have changed: dataset rows by the dataset's own fingerprint,
    files by size and modification time."""
    digest = hashlib.sha256()
    for record in records:
        rows = getattr(record, "rows", None)
        if rows is not None:
            stamp = getattr(rows, "_fingerprint", None) or id(rows)
        else:
            stat = Path(record.path).stat()
            stamp = (stat.st_size, stat.st_mtime_ns)
        digest.update(repr((str(record.path), stamp)).encode())
    return digest.hexdigest()[:16]


def reference_images(cfg, limit: int = REFERENCE_IMAGES) -> list:
    """The instance images for fidelity metrics (evaluate, compare, --validation_metrics), decoded by
    `images.read_image`: the folder's images, or the dataset's first `limit` rows."""
    if not getattr(cfg, "dataset_name", None):
        from ..evaluate import read_instance_images

        return read_instance_images(cfg.instance_data_dir)
    where = f"--dataset_name {cfg.dataset_name}"
    ds = open_dataset(cfg.dataset_name, cfg.dataset_config_name, cfg.dataset_split, streaming=cfg.streaming)
    ds, columns = prepare(ds, cfg.image_column, getattr(cfg, "caption_column", None), where)
    count = min(limit, cfg.max_train_samples or limit)
    images = []
    for i, row in enumerate(itertools.islice(iter(ds), count)):
        images.append(read_image(image_source(row[columns.image], f"{cfg.dataset_name}[{cfg.dataset_split}] row {i}")))
    if not images:
        raise TrainConfigError(f"{where}: split {cfg.dataset_split!r} has no rows.")
    return images


# ---- streaming ---------------------------------------------------------------------------------------
class StreamBatches(torch.utils.data.IterableDataset):
    """Collated micro-batches of a streamed dataset, from micro-batch `start` on.

    The rows form one endless sequence: data epoch 0 (shuffled by seed within SHUFFLE_BUFFER rows),
    then epoch 1 (reshuffled), ... Global micro-batch m is rows [m·B·W, (m+1)·B·W); process r takes its
    B rows at offset r·B. Row p's augmentation and caption dropout draw from (seed, 0, p), so the item is
    a function of its place in the sequence. Read in the training process (no DataLoader workers:
    `datasets` would hand each worker only some of the stream's shards, and the order would follow them)."""

    def __init__(self, cfg, items: DreamBoothDataset, batch_size: int, seed: int, num_replicas: int = 1, rank: int = 0):
        where = f"--dataset_name {cfg.dataset_name}"
        stream = open_dataset(cfg.dataset_name, cfg.dataset_config_name, cfg.dataset_split, streaming=True)
        if cfg.max_train_samples is not None:
            stream = stream.take(cfg.max_train_samples)
        self.stream, self.columns = prepare(stream, cfg.image_column, cfg.caption_column, where)
        self.where, self.label = where, f"{cfg.dataset_name}[{cfg.dataset_split}]"
        self.prompt, self.items = cfg.instance_prompt, items
        self.batch_size, self.seed, self.num_replicas, self.rank = batch_size, seed, num_replicas, rank
        self.caption_dropout, self.start = cfg.caption_dropout, 0
        self.micro_batches = cfg.max_train_steps * cfg.gradient_accumulation_steps

    def __len__(self) -> int:
        """Micro-batches of the whole run: to the loop, a streamed run is one long epoch."""
        return self.micro_batches

    def rows(self):
        """(position, row) of the endless sequence."""
        position = 0
        for epoch in itertools.count():
            stream = self.stream.shuffle(seed=self.seed, buffer_size=SHUFFLE_BUFFER)
            stream.set_epoch(epoch)
            before = position
            for row in stream:
                yield position, row
                position += 1
            if position == before:
                raise TrainConfigError(f"{self.where}: split has no rows.")

    def record(self, position: int, row: dict) -> DatasetRecord:
        caption = _caption(row, self.columns, self.prompt)
        if not caption:
            raise _uncaptioned_error(self.where, self.columns, 1, [f"streamed row {position}"])
        value = row[self.columns.image]
        if isinstance(value, dict):
            raw = value.get("bytes") or (value.get("path") or "").encode()
        else:
            raw = value if isinstance(value, bytes) else repr(value).encode()
        # named by its content: the same image is the same cache key in every data epoch
        name = f"{self.label} image {hashlib.sha1(raw).hexdigest()[:16]}"
        return DatasetRecord(path=Path(name), caption=caption, size=(0, 0), rows=[row], row=0, column=self.columns.image)

    def example(self, position: int, row: dict) -> dict:
        record = self.record(position, row)
        target = (self.items.resolution, self.items.resolution)
        rng = _item_rng(self.seed, 0, position)
        example = {"instance": self.items._example(record, target, rng)}
        if self.items.classes:
            example["class"] = self.items._example(self.items.classes[position % len(self.items.classes)], target, rng)
        return drop_caption(example, self.caption_dropout, self.seed, 0, position)

    def __iter__(self):
        per_micro = self.batch_size * self.num_replicas
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        chunk: list = []
        micro = 0
        for position, row in self.rows():
            chunk.append((position, row))
            if len(chunk) < per_micro:
                continue
            if micro >= self.start:
                yield collate([self.example(p, r) for p, r in chunk[mine]])
            micro += 1
            chunk = []




def instance_records(cfg) -> list[ImageRecord]:
    """The training images before any model loads: the folder's (`scan_images`), the dataset's rows,
    or, streamed, none yet (the stream is opened and its columns checked)."""
    from .data import scan_images

    if not cfg.dataset_name:
        return scan_images(cfg.instance_data_dir, cfg.instance_prompt, "instance")
    if cfg.streaming:
        where = f"--dataset_name {cfg.dataset_name}"
        prepare(open_dataset(cfg.dataset_name, cfg.dataset_config_name, cfg.dataset_split, streaming=True),
                cfg.image_column, cfg.caption_column, where)
        return []
    return dataset_records(cfg, need_sizes=bool(cfg.aspect_buckets))
