"""Property-based fuzzing of the adapter reader: any mutation of a valid file is either read
cleanly or refused with our typed error; never another exception, never a hang."""

import time

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gralora_diffusion as gd
from gralora_diffusion.adapter_file import collect_adapter, read_adapter_file, save_adapter_file


def small_adapter_bytes(tmp_path_factory) -> bytes:
    model = nn.Sequential()
    model.add_module("to_q", nn.Linear(16, 8))
    model.add_module("to_v", nn.Linear(8, 16))
    gd.add_gralora(model, r=2, gralora_k=2, hybrid_r=1, unet_targets=["to_q", "to_v"])
    path = tmp_path_factory.mktemp("fuzz") / "small.safetensors"
    save_adapter_file(path, *collect_adapter({"unet": model}))
    return path.read_bytes()


@pytest.fixture(scope="module")
def good_bytes(tmp_path_factory):
    return small_adapter_bytes(tmp_path_factory)


mutation = st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=8)


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=mutation, cut=st.one_of(st.none(), st.floats(0, 1)))
def test_mutated_files_are_read_or_refused(tmp_path, good_bytes, mutations, cut):
    data = bytearray(good_bytes)
    for where, value in mutations:
        data[int(where * len(data))] = value
    if cut is not None:
        data = data[: int(cut * len(data))]
    path = tmp_path / "mutated.safetensors"
    path.write_bytes(bytes(data))
    start = time.monotonic()
    try:
        adapter = read_adapter_file(path)
    except gd.GraloraError as err:
        assert str(path) in str(err)
    else:
        assert all(torch.isfinite(t).all() for sd in adapter.state_dicts.values() for t in sd.values())
    assert time.monotonic() - start < 2.0


@pytest.fixture(scope="module")
def pipe_and_adapter(tmp_path_factory):
    pipe = gd.patch_pipeline(gd.tiny_sdxl_pipeline(seed=0))
    source = gd.tiny_sdxl_pipeline(seed=0)
    gd.add_gralora(source, r=2, gralora_k=2, hybrid_r=1, unet_targets=r".*mid_block.*attn1\.(to_q|to_v)")
    folder = tmp_path_factory.mktemp("fuzz_pipe")
    path = gd.patch_pipeline(source).save_gralora_weights(folder)
    return pipe, path.read_bytes()


def unet_fingerprint(pipe):
    return {k: v.clone() for k, v in pipe.unet.state_dict().items()}


@settings(max_examples=60, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=mutation)
def test_mutated_files_load_cleanly_or_leave_the_pipeline_unchanged(tmp_path, pipe_and_adapter, mutations):
    pipe, good = pipe_and_adapter
    data = bytearray(good)
    for where, value in mutations:
        data[int(where * len(data))] = value
    path = tmp_path / "mutated.safetensors"
    path.write_bytes(bytes(data))
    before = unet_fingerprint(pipe)
    try:
        name = pipe.load_gralora_weights(path, adapter_name="fuzz")
    except gd.GraloraError:
        after = unet_fingerprint(pipe)
        assert after.keys() == before.keys()
        assert all(torch.equal(after[k], before[k]) for k in before)
    else:
        pipe.unload_gralora_weights()
        assert name == "fuzz"
    assert not any(pipe.list_gralora_adapters().values())
