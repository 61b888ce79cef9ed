"""Hardening: a corpus of broken adapter files built from a good one. Every reader of adapter
files answers each with our typed error naming the file, and nothing is unpickled."""

import pytest

import gralora_diffusion as gd
from conftest import randomize_gralora_B
from corrupt_corpus import build_cases
from gralora_diffusion.adapter_file import collect_adapter, read_adapter_file, save_adapter_file

# Valid files whose problem only shows against a pipeline.
READABLE = {"module_not_in_pipeline"}


@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    pipe = gd.tiny_sdxl_pipeline(seed=0)
    configs = gd.add_gralora(pipe, r=4, gralora_k=2, hybrid_r=2, text_encoder_targets="attn")
    for c in configs:
        randomize_gralora_B(getattr(pipe, c))
    path = tmp_path_factory.mktemp("good") / "adapter.safetensors"
    save_adapter_file(path, *collect_adapter({c: getattr(pipe, c) for c in configs}), base_model="tiny")
    return path


def corpus(good_file, tmp_path):
    return build_cases(good_file, tmp_path)


def test_corpus_is_large_enough(good_file, tmp_path):
    assert len(corpus(good_file, tmp_path)) >= 20


def test_read_adapter_file_answers_every_case_with_our_error(good_file, tmp_path):
    failures = []
    for name, build, expect in corpus(good_file, tmp_path):
        path = build()
        if name in READABLE:
            read_adapter_file(path)
            continue
        try:
            read_adapter_file(path)
        except gd.GraloraError as err:
            message = str(err)
            if str(path) not in message or expect not in message:
                failures.append(f"{name}: message {message!r} lacks the path or {expect!r}")
        except Exception as err:  # noqa: BLE001 - the point is to catch any other type
            failures.append(f"{name}: {type(err).__name__}: {err}")
        else:
            failures.append(f"{name}: read without error")
    assert not failures, "\n".join(failures)
    assert not (tmp_path / "UNPICKLED").exists()


def _expect_our_error(call, path, failures, name):
    try:
        call()
    except gd.GraloraError as err:
        if str(path) not in str(err) and path.name not in str(err):
            failures.append(f"{name}: {str(err)!r} does not name the file")
    except Exception as err:  # noqa: BLE001 - any other type is a failure
        failures.append(f"{name}: {type(err).__name__}: {err}")
    else:
        failures.append(f"{name}: no error")


def test_loader_export_and_info_refuse_every_case_and_change_nothing(good_file, tmp_path):
    from conftest import generate

    pipe = gd.patch_pipeline(gd.tiny_sdxl_pipeline(seed=0))
    before = generate(pipe)
    out_dir = tmp_path / "exports"
    out_dir.mkdir()
    cases = corpus(good_file, tmp_path)
    # a GraLoRA file given to export twice: the second input is already a LoRA
    exported = tmp_path / "exported_lora.safetensors"
    gd.export_lora(good_file, exported)
    cases.append(("exported_twice", lambda: exported, "LoRA"))
    failures = []
    for name, build, _ in cases:
        path = build()
        _expect_our_error(lambda: pipe.load_gralora_weights(path), path, failures, f"load {name}")
        if name in READABLE:
            continue
        if name in ("lora_file", "exported_twice"):
            # a plain LoRA is no corrupt GraLoRA: info shows it (issue 13), export re-keys it (issue 24)
            assert gd.adapter_info(path)["kind"] == "lora", name
            again = tmp_path / f"{name}_rekeyed.safetensors"
            gd.export_lora(path, again)
            assert gd.adapter_info(again)["kind"] == "lora", name
            continue
        _expect_our_error(lambda: gd.export_lora(path, out_dir / f"{name}.safetensors"), path, failures, f"export {name}")
        _expect_our_error(lambda: gd.adapter_info(path), path, failures, f"info {name}")
    assert not failures, "\n".join(failures)
    assert list(out_dir.iterdir()) == []  # no partial export left behind
    assert not any(pipe.list_gralora_adapters().values())
    assert (generate(pipe) == before).all()
    assert not (tmp_path / "UNPICKLED").exists()
