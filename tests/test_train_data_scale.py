"""Large datasets: indexing 1,000 images reads headers only (no pixel decoded, memory flat), items
decode lazily, and an image whose pixels are broken stops training with our error naming the file."""

import io
import os
import tracemalloc

import numpy as np
import pytest
from PIL import Image, ImageFile

from gralora_diffusion.train import TrainingError
from gralora_diffusion.train.data import DreamBoothDataset, EpochBatches, scan_images

COUNT = 1000


@pytest.fixture
def decodes(monkeypatch):
    """How many times PIL decodes pixel data (ImageFile.load, the one place every format decodes)."""
    calls = []
    real = ImageFile.ImageFile.load

    def counting(self):
        calls.append(getattr(self, "filename", None))
        return real(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting)
    return calls


@pytest.fixture(scope="module")
def thousand(tmp_path_factory):
    """1,000 small PNGs (16 distinct random pictures, 96x80 px, ~23 kB each), written as bytes."""
    folder = tmp_path_factory.mktemp("thousand")
    rng = np.random.default_rng(0)
    pictures = []
    for _ in range(16):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(buffer, format="PNG")
        pictures.append(buffer.getvalue())
    for i in range(COUNT):
        (folder / f"img-{i:04d}.png").write_bytes(pictures[i % len(pictures)])
    return folder


def test_indexing_a_thousand_images_decodes_none_and_stays_small(thousand, decodes):
    fds = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    tracemalloc.start()
    try:
        records = scan_images(thousand, "a photo of sks teapot")
        dataset = DreamBoothDataset(records, resolution=64, center_crop=True, seed=0)
        batches = EpochBatches(dataset, batch_size=4, seed=0)
        epoch = batches.for_epoch(0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(records) == len(dataset) == COUNT and len(epoch) == COUNT // 4
    assert all(r.size == (80, 96) for r in records)
    assert decodes == []  # headers only: not one image decoded at index time
    if fds is not None:  # no image kept open (a lazily opened PIL image holds its file)
        assert len(os.listdir("/proc/self/fd")) - fds < 10
    # tracemalloc sees Python-side memory (file bytes, arrays, records; keeping every file's bytes
    # would be 1,000 x 23 kB = 23 MB), not PIL's pixel buffers: the decode count above covers those.
    print(f"indexing {COUNT} images: peak traced allocation {peak / 1e6:.2f} MB")
    assert peak < 3e6, f"indexing allocated {peak / 1e6:.1f} MB at its peak"


def test_items_decode_lazily_their_own_image_only(thousand, decodes):
    records = scan_images(thousand, "a photo of sks teapot")
    dataset = DreamBoothDataset(records, resolution=64, center_crop=True, seed=0)
    for index in (0, 517, COUNT - 1):
        before = len(decodes)
        example = dataset[index]["instance"]
        assert set(decodes[before:]) == {str(records[index].path)}  # this item's image, nothing else
        assert example["pixel_values"].shape == (3, 64, 64)
        assert example["time_ids"].tolist() == [80, 96, 0, 6, 64, 64]  # original size, centre crop (96 -> 77 px wide), target


def test_an_image_broken_past_its_header_stops_training_naming_the_file(tmp_path):
    good = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])  # header intact, pixels cut
    records = scan_images(tmp_path, "a photo")  # a JPEG's pixels are not checked at index time
    with pytest.raises(TrainingError, match=r"cut\.jpg: cannot decode the image.*Remove or replace it"):
        DreamBoothDataset(records, resolution=32)[0]
