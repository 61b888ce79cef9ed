"""Training data: find the images and captions, turn each into a tensor plus SDXL's size conditioning.

Scanning (`scan_images`) reads every file's header once, never its pixels: size and EXIF rotation
come from the header, a PNG's chunks are checked (CRC) without decoding. So indexing 100k images is
cheap and memory stays flat, files that are not images are skipped with one warning line, and a
folder with nothing usable fails before any model loads. Pixels are decoded lazily, per item; an
image whose pixels turn out broken then (a truncated JPEG) stops training naming the file.
Augmentation draws from a per-(seed, epoch, index) RNG, so an item is the same whenever it is read:
that is what makes a resumed run and a cached-latents run see the very same data.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..constants import IMAGE_SUFFIXES
from ..errors import ImageFileError, TrainConfigError, UnreadableImageError
from ..images import UNREADABLE, image_size, read_image, to_rgb  # noqa: F401 - to_rgb: re-exported
from .image_cache import ImageCache

logger = logging.getLogger("gralora_diffusion.train")

CAPTION_KEYS = ("text", "caption", "prompt")
# A dropped caption (--caption_dropout): the loss encodes it as the pipeline encodes an empty prompt.
EMPTY_PROMPT = ""


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    caption: str
    size: tuple[int, int]  # (height, width) after EXIF rotation

    def source(self):
        """What the image reader opens (a dataset row gives its bytes: hf_dataset.DatasetRecord)."""
        return self.path


# The one image reader (gralora_diffusion.images): these names stay for the trainer's other callers.
load_image, displayed_size = read_image, image_size
_UNREADABLE = (*UNREADABLE, ImageFileError)


def read_text(path: Path, what: str) -> str:
    """A UTF-8 text file; anything else is one line naming the file (not a UnicodeDecodeError)."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise TrainConfigError(f"{path}: {what} is not valid UTF-8 (byte {err.start}); save it as UTF-8.") from None
    except OSError as err:
        raise TrainConfigError(f"{path}: cannot read the {what} ({err.strerror or err}).") from None


def _read_captions(folder: Path) -> dict[str, str]:
    """file name -> caption from metadata.jsonl (diffusers' ImageFolder layout: file_name + text).
    A null or empty caption means none: the image falls back to the prompt."""
    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        return {}
    captions = {}
    for number, line in enumerate(read_text(meta, "the caption file").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name = row["file_name"]
            if not any(k in row for k in CAPTION_KEYS):
                raise KeyError(CAPTION_KEYS[0])
            caption = next((row[k] for k in CAPTION_KEYS if row.get(k) is not None), "")
        except (json.JSONDecodeError, KeyError, TypeError):
            raise TrainConfigError(
                f"{meta}, line {number}: expected a JSON object with \"file_name\" and one of {', '.join(CAPTION_KEYS)}."
            ) from None
        if str(caption).strip():
            captions[str(name)] = str(caption).strip()
    return captions


def caption_for(path: Path, captions: dict[str, str], prompt: str | None) -> str | None:
    """<image>.txt beside the image, else metadata.jsonl's caption, else `prompt`; empty ones count as none."""
    txt = path.with_suffix(".txt")
    caption = read_text(txt, "the caption file").strip() if txt.is_file() else ""
    return caption or captions.get(path.name) or prompt


def scan_images(folder, prompt: str | None, what: str = "instance") -> list[ImageRecord]:
    """Every readable image of `folder` with its caption (.txt beside it > metadata.jsonl > `prompt`)."""
    flag = f"--{what}_data_dir"
    if folder is None:
        raise TrainConfigError(f"{flag} is required.")
    folder = Path(folder)
    if not folder.exists():
        raise TrainConfigError(f"{flag} {folder}: no such folder.")
    if not folder.is_dir():
        raise TrainConfigError(f"{flag} {folder}: is a file, not a folder of images.")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise TrainConfigError(f"{flag} {folder}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in it.")
    captions = _read_captions(folder)
    records, uncaptioned = [], []
    for path in files:
        try:
            size = displayed_size(path)
        except _UNREADABLE as err:
            logger.warning("warning: skipping %s", str(err).split("\n")[0] if isinstance(err, ImageFileError)
                           else f"{path}: unreadable image ({str(err).splitlines()[0] if str(err) else type(err).__name__})")
            continue
        caption = caption_for(path, captions, prompt)
        if not caption:
            uncaptioned.append(path.name)
            continue
        records.append(ImageRecord(path=path, caption=caption, size=size))
    if uncaptioned:
        raise TrainConfigError(
            f"--{what}_prompt is missing and {len(uncaptioned)} image(s) in {folder} have no caption "
            f"({', '.join(uncaptioned[:3])}{', ...' if len(uncaptioned) > 3 else ''}). Pass --{what}_prompt, "
            "or add <image>.txt files / a metadata.jsonl."
        )
    if not records:
        raise TrainConfigError(f"{flag} {folder}: none of the {len(files)} image file(s) could be read; see the warnings above.")
    return records


def epoch_items(instances: int, repeats: int, classes: int = 0) -> int:
    """Items in an epoch: every instance image `repeats` times, and every class image at least once."""
    return max(instances * repeats, classes)


def count_images(folder: Path) -> int:
    """Image files in `folder` (by suffix, hidden ones left out), none if it does not exist."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    return sum(1 for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def resample_filter(mode: str) -> Image.Resampling:
    """PIL's filter for an --image_interpolation_mode name (torchvision's nearest_exact is PIL's nearest)."""
    return Image.Resampling[{"nearest_exact": "nearest"}.get(mode, mode).upper()]


def _item_rng(seed: int, epoch: int, index: int) -> random.Random:
    return random.Random(f"{seed}/{epoch}/{index}")


class DreamBoothDataset(torch.utils.data.Dataset):
    """Items are addressed as (epoch, index): augmentation is a pure function of (seed, epoch, index).

    An epoch covers max(instance images x repeats, class images) items, item i pairing instance
    i mod (instances) with class image i mod (classes), as diffusers' DreamBooth dataset does: so
    every class image is trained on once per epoch, not only the first len(instances) of them."""

    def __init__(self, instances, resolution, center_crop=False, random_flip=False, buckets=None, repeats=1, seed=0, classes=None,
                 image_cache_mb=0, interpolation="bilinear", caption_dropout=0.0):
        self.instances, self.classes = list(instances), list(classes or [])
        self.caption_dropout = caption_dropout
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.buckets, self.repeats, self.seed = buckets, repeats, seed
        self.cache = ImageCache(image_cache_mb)  # decoded, resized images by (path, target size)
        self.resample = resample_filter(interpolation)

    def __len__(self) -> int:
        return epoch_items(len(self.instances), self.repeats, len(self.classes))

    def target_size(self, index: int) -> tuple[int, int]:
        if not self.buckets:
            return (self.resolution, self.resolution)
        from diffusers.training_utils import find_nearest_bucket

        h, w = self.instances[index % len(self.instances)].size
        return self.buckets[find_nearest_bucket(h, w, self.buckets)]

    def __getitem__(self, item):
        epoch, index = item if isinstance(item, tuple) else (0, item)
        rng = _item_rng(self.seed, epoch, index)
        target = self.target_size(index)
        example = {"instance": self._example(self.instances[index % len(self.instances)], target, rng)}
        if self.classes:
            example["class"] = self._example(self.classes[index % len(self.classes)], target, rng)
        return drop_caption(example, self.caption_dropout, self.seed, epoch, index)

    def _example(self, record: ImageRecord, target: tuple[int, int], rng: random.Random) -> dict:
        resized, original = self.cache.get((record.path, target), lambda: self.decode(record, target, self.resample))
        (th, tw), (height, width) = target, resized.shape[:2]
        if self.center_crop:
            top, left = (height - th) // 2, (width - tw) // 2
        else:
            top, left = rng.randint(0, height - th), rng.randint(0, width - tw)
        crop = resized[top : top + th, left : left + tw]
        flip = self.random_flip and rng.random() < 0.5
        if flip:
            crop = crop[:, ::-1]
            left = width - left - tw  # the crop's left edge in the mirrored picture
        pixels = torch.from_numpy(np.ascontiguousarray(crop, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0
        return {
            "pixel_values": pixels,
            "prompt": record.caption,
            "time_ids": torch.tensor([*original, top, left, th, tw], dtype=torch.float32),
            "key": (str(record.path), top, left, th, tw, flip),
        }

    @staticmethod
    def decode(record: ImageRecord, target: tuple[int, int], resample=Image.Resampling.BILINEAR) -> tuple[np.ndarray, tuple[int, int]]:
        """The image as uint8 [height, width, 3], resized (small ones upscaled) to cover `target`,
        and its (height, width) as decoded: the part of an item that is the same at every step."""
        try:
            image = load_image(record.source())
        except _UNREADABLE as err:
            raise UnreadableImageError(str(err) if isinstance(err, ImageFileError) else
                                       f"{record.path}: cannot decode the image ({str(err).splitlines()[0] if str(err) else type(err).__name__}). "
                                       "Remove or replace it.") from None
        original = (image.height, image.width)
        th, tw = target
        scale = max(th / image.height, tw / image.width)  # cover the target; small images are upscaled
        size = (max(tw, math.ceil(image.width * scale - 1e-6)), max(th, math.ceil(image.height * scale - 1e-6)))
        if size != image.size:
            image = image.resize(size, resample)
        return np.asarray(image, dtype=np.uint8), original


def drop_caption(example: dict, share: float, seed: int, epoch: int, index: int) -> dict:
    """--caption_dropout: the instance caption becomes EMPTY_PROMPT for `share` of the items, drawn
    from the item's own RNG (a stream apart from its crop's), so a resumed run drops the same ones."""
    if share and random.Random(f"caption/{seed}/{epoch}/{index}").random() < share:
        example["instance"] = {**example["instance"], "prompt": EMPTY_PROMPT}
    return example


def collate(examples: list[dict]) -> dict:
    """Instance examples first, then their class examples: the loss splits the batch in two halves."""
    parts = [e["instance"] for e in examples] + [e["class"] for e in examples if "class" in e]
    return {
        "pixel_values": torch.stack([p["pixel_values"] for p in parts]),
        "prompts": [p["prompt"] for p in parts],
        "time_ids": torch.stack([p["time_ids"] for p in parts]),
        "keys": [p["key"] for p in parts],
        "with_prior": len(parts) > len(examples),
    }


class EpochBatches:
    """Deterministic batches for (epoch, rank): same-bucket batches, shuffled by seed and epoch,
    padded so every rank gets the same count, rank r taking batches r, r + world, ...
    We shard here rather than through `accelerator.prepare(dataloader)` so a resumed run can start
    at an exact batch without reading the skipped ones."""

    def __init__(self, dataset: DreamBoothDataset, batch_size: int, seed: int, num_replicas: int = 1, rank: int = 0):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.num_replicas, self.rank = num_replicas, rank
        groups: dict[tuple[int, int], list[int]] = {}
        for index in range(len(dataset)):
            groups.setdefault(dataset.target_size(index), []).append(index)
        self.groups = [groups[k] for k in sorted(groups)]

    def __len__(self) -> int:
        total = sum(math.ceil(len(g) / self.batch_size) for g in self.groups)
        return math.ceil(total / self.num_replicas)

    def for_epoch(self, epoch: int) -> list[list[tuple[int, int]]]:
        rng = random.Random(f"batches/{self.seed}/{epoch}")
        batches = []
        for group in self.groups:
            order = group[:]
            rng.shuffle(order)
            batches += [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        rng.shuffle(batches)
        per_rank = len(self)
        batches = (batches * self.num_replicas)[: per_rank * self.num_replicas]  # pad by wrapping around
        return [[(epoch, i) for i in b] for b in batches[self.rank :: self.num_replicas]]


def ensure_class_images(folder, prompt: str, count: int, generate, batch_size: int, seed: int, log=print, progress=None) -> int:
    """Generate class images until `folder` holds `count` readable images, with
    `generate(prompts, generators) -> PIL images` (the base model). Image i is named class-{i:05d}.png
    and drawn with seed (seed, i), so a run killed halfway and restarted ends with exactly the
    images an uninterrupted run writes. `progress(total)` makes a progress bar (counted in images).
    Returns how many were generated."""
    from ..adapter_file import atomic_write

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    missing = count - count_images(folder)
    if missing <= 0:
        return 0
    todo, i = [], 0
    while len(todo) < missing:
        if not (folder / f"class-{i:05d}.png").exists():
            todo.append(i)
        i += 1
    log(f"Generating {missing} class image(s) for prior preservation in {folder} ...")
    with progress(missing) if progress else contextlib.nullcontext() as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            images = generate([prompt] * len(chunk), [torch.Generator().manual_seed(seed * 100003 + j) for j in chunk])
            for j, image in zip(chunk, images):
                atomic_write(folder / f"class-{j:05d}.png", lambda tmp, im=image: im.save(tmp, format="PNG"))
            if bar is not None:
                bar.update(len(chunk))
    return missing
