"""Loading by Hub repo id without a network: repos laid out in a temporary Hugging Face cache the
way huggingface_hub lays them out (blobs/, snapshots/<commit>/ symlinks, refs/<branch>), HF_HUB_OFFLINE=1."""

import hashlib
import json
import os

import huggingface_hub
import pytest
import torch
from peft import GraloraConfig, get_peft_model

import gralora_diffusion as gd
from conftest import adapted_pipeline, assert_unchanged, capture, fresh, outputs

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def lay_out_repo(cache, repo_id, files, commit=COMMIT, ref="main"):
    """Put `files` ({path in repo: bytes}) into `cache` as huggingface_hub's downloads leave them."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for rel, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return repo


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty HF cache, offline: the environment and huggingface_hub's constants (read at import)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    pipe = adapted_pipeline(r=4, gralora_k=2, hybrid_r=2)
    path = pipe.save_gralora_weights(tmp_path_factory.mktemp("adapter"))
    return outputs(pipe), path.read_bytes()


def test_load_by_repo_id_offline(cache, source):
    expected, data = source
    lay_out_repo(cache, "someone/teapot-gralora", {gd.WEIGHT_NAME: data, "README.md": b"# teapot"})
    pipe = fresh()
    assert pipe.load_gralora_weights("someone/teapot-gralora") == "default_0"
    assert torch.equal(outputs(pipe), expected)


def test_subfolder_weight_name_revision_and_cache_dir(cache, source, tmp_path, monkeypatch):
    expected, data = source
    other = tmp_path / "other-cache"
    lay_out_repo(other, "someone/many", {"v2/teapot.safetensors": data}, commit="f" * 40, ref="dev")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # the default cache lacks it
    pipe = fresh()
    pipe.load_gralora_weights("someone/many", weight_name="teapot.safetensors", subfolder="v2", revision="dev",
                              cache_dir=other, local_files_only=True, adapter_name="teapot")
    assert torch.equal(outputs(pipe), expected)


def test_peft_save_pretrained_repo(cache):
    src = gd.tiny_sdxl_pipeline(seed=0)
    folder = cache.parent / "peft"
    config = GraloraConfig(r=4, gralora_k=2, alpha=8, target_modules=["to_q", "to_v"], init_weights=False)
    get_peft_model(src.unet, config).save_pretrained(folder / "unet")
    lay_out_repo(cache, "someone/peft-gralora", {f"unet/{p.name}": p.read_bytes() for p in (folder / "unet").iterdir()})
    pipe = fresh()
    pipe.load_gralora_weights("someone/peft-gralora")
    assert pipe.list_gralora_adapters() == {"unet": ["default_0"]}
    torch.testing.assert_close(outputs(pipe), outputs(src), atol=1e-5, rtol=1e-5)


def test_repo_not_in_cache_says_what_to_do_and_changes_nothing(cache, source):
    _, data = source
    pipe = fresh()
    pipe.load_gralora_weights(data_file(cache, data), adapter_name="existing")
    before, before_out = capture(pipe), outputs(pipe)
    with pytest.raises(gd.AdapterFileError) as err:
        pipe.load_gralora_weights("someone/not-downloaded")
    message = str(err.value)
    assert "not in the local Hugging Face cache" in message and "HF_HUB_OFFLINE=1" in message
    assert "hf download someone/not-downloaded" in message and "[huggingface_hub: LocalEntryNotFoundError" in message
    lay_out_repo(cache, "someone/other-file", {"something.safetensors": data})
    with pytest.raises(gd.AdapterFileError, match="pytorch_gralora_weights.safetensors is not in the local"):
        pipe.load_gralora_weights("someone/other-file")
    with pytest.raises(gd.AdapterFileError, match="pickle files are refused"):
        pipe.load_gralora_weights("someone/other-file", weight_name="adapter.bin")
    assert_unchanged(pipe, before, before_out)


def data_file(cache, data):
    path = cache.parent / "local.safetensors"
    path.write_bytes(data)
    return path


def test_hub_file_is_checked_like_a_local_one(cache, source):
    _, data = source
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    header["__metadata__"]["format_version"] = "99"
    raw = json.dumps(header).encode()
    lay_out_repo(cache, "someone/future", {gd.WEIGHT_NAME: len(raw).to_bytes(8, "little") + raw + data[8 + header_len :]})
    with pytest.raises(gd.AdapterFileError, match="newer than this gralora-diffusion reads"):
        fresh().load_gralora_weights("someone/future")
