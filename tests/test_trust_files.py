"""Issue 10 (trust), files: export never writes over its source, shapes and dtypes are checked from
the header before any tensor is read, writes honour the umask, and a full disk or a read-only
folder gives one typed line with nothing half-written."""

import contextlib
import errno
import json
import os
import resource
import struct
import subprocess
import time

import pytest
from conftest import randomize_gralora_B
from peft import GraloraConfig, get_peft_model

import gralora_diffusion as gd
from gralora_diffusion.adapter_file import collect_adapter, read_adapter_file, save_adapter_file
from gralora_diffusion.atomic import atomic_write
from gralora_diffusion.cli import main as cli_main
from gralora_diffusion.constants import WEIGHT_NAME
from gralora_diffusion.errors import ExportError, OutputError

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A folder holding our adapter file (UNet and text encoder, random B)."""
    pipe = gd.tiny_sdxl_pipeline(seed=0)
    configs = gd.add_gralora(pipe, r=4, gralora_k=2, text_encoder_targets="attn")
    for c in configs:
        randomize_gralora_B(getattr(pipe, c))
    folder = tmp_path_factory.mktemp("adapter")
    save_adapter_file(folder / WEIGHT_NAME, *collect_adapter({c: getattr(pipe, c) for c in configs}), base_model="tiny")
    return folder / WEIGHT_NAME


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- 3: export never writes over its source --------------------------------------------------------


def test_export_refuses_every_spelling_of_its_source(adapter, tmp_path):
    folder = adapter.parent
    (tmp_path / "link.safetensors").symlink_to(adapter)
    os.link(adapter, tmp_path / "hardlink.safetensors")
    cases = [
        (adapter, adapter),  # the file itself
        (folder, adapter),  # folder form -> its pytorch_gralora_weights.safetensors
        (adapter, folder / ".." / folder.name / WEIGHT_NAME),  # `..` in the path
        (adapter, tmp_path / "link.safetensors"),  # a symlink to the source
        (tmp_path / "link.safetensors", adapter),  # the source given through a symlink
        (adapter, tmp_path / "hardlink.safetensors"),  # another name for the same inode
    ]
    before = snapshot(folder)
    for src, dst in cases:
        with pytest.raises(ExportError, match="a file of the source adapter"):
            gd.export_lora(src, dst)
    assert snapshot(folder) == before


def test_export_refuses_the_files_of_a_peft_folder(tmp_path):
    from test_adapter_file import CONFIG, Toy

    peft_dir = tmp_path / "peft"
    get_peft_model(Toy(), GraloraConfig(**CONFIG, init_weights=False)).save_pretrained(peft_dir)
    before = snapshot(peft_dir)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        with pytest.raises(ExportError, match="a file of the source adapter"):
            gd.export_lora(peft_dir, peft_dir / name)
    assert snapshot(peft_dir) == before
    report = gd.export_lora(peft_dir, peft_dir)  # the folder itself: a new file beside, allowed
    assert report.path.endswith("pytorch_lora_weights.safetensors") and snapshot(peft_dir).keys() > before.keys()


# -- 10: shapes and dtypes from the header, before any tensor is read ----------------------------------


def test_a_header_lying_about_a_huge_tensor_is_refused_without_reading_it(adapter, tmp_path):
    """The header claims a 4 GiB gralora_A of the wrong rank (the bytes are a sparse hole). Reading it
    would cost seconds and 4 GiB of memory; the header check refuses it first."""
    raw = adapter.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    key = next(k for k in header if k.endswith("gralora_A"))
    k, _, r = header[key]["shape"]
    big = k * 2**27 * (r + 1) * 4  # float32 [k, 2**27, r + 1] (r + 1: the wrong rank): 5 GiB for k=2, r=4
    packed, out = {"__metadata__": header["__metadata__"]}, bytearray()
    for name in sorted((x for x in header if x not in ("__metadata__", key)), key=lambda x: header[x]["data_offsets"]):
        start, end = header[name]["data_offsets"]
        packed[name] = {**header[name], "data_offsets": [len(out), len(out) + end - start]}
        out += data[start:end]
    packed[key] = {**header[key], "shape": [k, 2**27, r + 1], "data_offsets": [len(out), len(out) + big]}
    body = json.dumps(packed).encode()
    path = tmp_path / "liar.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(body)) + body + out)
        f.truncate(8 + len(body) + len(out) + big)  # sparse: no disk used
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB
    start = time.perf_counter()
    with pytest.raises(gd.AdapterFileError, match=r"do not fit the header's"):
        read_adapter_file(path)
    elapsed = time.perf_counter() - start
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert elapsed < 2.0, f"{elapsed:.2f} s: the tensor was read"
    assert grown_mb < 500, f"peak memory grew by {grown_mb:.0f} MB: the tensor was read"


# -- 13: writes honour the umask ----------------------------------------------------------------------


@contextlib.contextmanager
def umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_atomic_writes_get_the_mode_a_plain_open_gives(adapter, tmp_path, mask):
    with umask(mask):
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        expected = plain.stat().st_mode & 0o777
        gd.export_lora(adapter, tmp_path / "export.safetensors")
        pipe = gd.patch_pipeline(gd.tiny_sdxl_pipeline(seed=0))
        pipe.load_gralora_weights(adapter, adapter_name="default")
        saved = pipe.save_gralora_weights(tmp_path / "saved")
        atomic_write(tmp_path / "card.md", lambda tmp: open(tmp, "w").write("card"))
    assert expected == 0o666 & ~mask
    for path in (tmp_path / "export.safetensors", saved, tmp_path / "card.md"):
        assert path.stat().st_mode & 0o777 == expected, path


def test_overwriting_keeps_the_existing_files_mode(tmp_path):
    path = tmp_path / "secret.txt"
    path.write_text("old")
    path.chmod(0o600)
    with umask(0o022):
        atomic_write(path, lambda tmp: open(tmp, "w").write("new"))
    assert path.read_text() == "new" and path.stat().st_mode & 0o777 == 0o600


# -- 11: disk full and read-only folders --------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(folder, options):
    """A tiny tmpfs at `folder` (root only); None where mounting is not allowed."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                                           capture_output=True).returncode != 0:
        yield None
        return
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_disk_full_is_one_typed_line_and_leaves_nothing(adapter, tmp_path, monkeypatch, capsys):
    with tmpfs(tmp_path / "full", "size=16k") as folder:
        if folder is None:  # no mount here: the write itself fails as a full disk does
            import gralora_diffusion.export as export

            folder = tmp_path / "full"

            def full(*args, **kwargs):
                raise OSError(errno.ENOSPC, "No space left on device")

            monkeypatch.setattr(export, "save_file", full)
        dst = folder / "big.safetensors"
        with pytest.raises(OutputError, match="disk is full") as info:
            gd.export_lora(adapter, dst)
        assert str(dst) in str(info.value) and "\n" not in str(info.value)
        assert cli_main(["export-lora", str(adapter), str(dst)]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert len(err) == 1 and "disk is full" in err[0]
        assert list(folder.iterdir()) == []  # no temp file, no partial export


def test_read_only_folder_is_one_typed_line_and_leaves_the_old_file(adapter, tmp_path):
    pipe = gd.patch_pipeline(gd.tiny_sdxl_pipeline(seed=0))
    pipe.load_gralora_weights(adapter, adapter_name="default")
    with tmpfs(tmp_path / "ro", "size=1m") as mounted:
        folder = tmp_path / "ro"
        old = folder / WEIGHT_NAME
        old.write_bytes(b"old")
        if mounted is not None:
            subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        else:
            if os.geteuid() == 0:
                pytest.skip("root ignores folder permissions and mounting is not allowed here")
            folder.chmod(0o555)
        try:
            for call in (lambda: pipe.save_gralora_weights(folder), lambda: gd.export_lora(adapter, folder / "x.safetensors")):
                with pytest.raises(OutputError, match="read-only") as info:
                    call()
                assert str(folder) in str(info.value)
            assert sorted(p.name for p in folder.iterdir()) == [WEIGHT_NAME] and old.read_bytes() == b"old"
        finally:
            if mounted is None:
                folder.chmod(0o755)


def test_save_to_a_path_under_a_file_is_a_typed_error(adapter, tmp_path):
    (tmp_path / "file").write_text("x")
    pipe = gd.patch_pipeline(gd.tiny_sdxl_pipeline(seed=0))
    pipe.load_gralora_weights(adapter, adapter_name="default")
    with pytest.raises(OutputError, match=str(tmp_path / "file")):
        pipe.save_gralora_weights(tmp_path / "file" / "sub")


def test_save_with_non_string_metadata_is_a_typed_error(adapter, tmp_path):
    pipe = gd.patch_pipeline(gd.tiny_sdxl_pipeline(seed=0))
    pipe.load_gralora_weights(adapter, adapter_name="default")
    with pytest.raises(gd.AdapterFileError, match="must be strings"):
        pipe.save_gralora_weights(tmp_path, metadata={"steps": 500})
    assert list(tmp_path.iterdir()) == []
