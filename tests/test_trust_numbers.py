"""Issue 10 (trust), numbers and threads: non-finite numbers refused where they enter, casts that
overflow refused, kohya alpha in float32, layers_per_block never guessed, concurrent loads."""

import math
import threading

import pytest
import torch
import torch.nn as nn
from conftest import randomize_gralora_B
from safetensors import safe_open

import gralora_diffusion as gd
from gralora_diffusion.adapter_file import collect_adapter, save_adapter_file
from gralora_diffusion.cli import main as cli_main
from gralora_diffusion.errors import ExportError, GraloraConfigError
from gralora_diffusion.export_names import to_kohya
from gralora_diffusion.numbers import finite_number

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py
ORIGINAL_REGISTER_PARAMETER = nn.Module.register_parameter


def adapter_file(path, std=0.1, base_model="tiny", unet_targets="attn"):
    pipe = gd.tiny_sdxl_pipeline(seed=0)
    configs = gd.add_gralora(pipe, r=4, gralora_k=2, unet_targets=unet_targets)
    for c in configs:
        randomize_gralora_B(getattr(pipe, c), std=std)
    return save_adapter_file(path, *collect_adapter({c: getattr(pipe, c) for c in configs}), base_model=base_model)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return adapter_file(tmp_path_factory.mktemp("good") / "a.safetensors")


@pytest.fixture(scope="module")
def huge(tmp_path_factory):
    """Finite in float32, but B holds 1e5: beyond float16's 65504."""
    return adapter_file(tmp_path_factory.mktemp("huge") / "a.safetensors", std=1e5)


def test_finite_number_is_the_one_rule():
    assert finite_number(3, "x") == 3.0 and finite_number(0.5, "x", low=0, high=1) == 0.5
    for bad in (float("nan"), float("inf"), -math.inf, 10**400, "1", None, True, [1]):
        with pytest.raises(GraloraConfigError, match="x="):
            finite_number(bad, "x")
    with pytest.raises(ExportError, match=r"must be positive"):
        finite_number(0, "x", ExportError, low=0, low_open=True)
    with pytest.raises(GraloraConfigError, match=r"must be in \[0, 1\)"):
        finite_number(1, "x", low=0, high=1, high_open=True)


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), "16", True])
def test_add_gralora_refuses_a_non_finite_or_non_number_alpha(alpha):
    with pytest.raises(GraloraConfigError, match="alpha"):
        gd.add_gralora(gd.tiny_sdxl_pipeline(seed=0), r=4, alpha=alpha)


# -- 7: export --max-size, adapter weights, fuse scale ------------------------------------------------


@pytest.mark.parametrize("size", ["nan", "inf", "-inf", "0", "-1"])
def test_cli_export_max_size_must_be_a_positive_finite_number(good, tmp_path, size, capsys):
    dst = tmp_path / "out.safetensors"
    assert cli_main(["export-lora", str(good), str(dst), f"--max-size={size}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--max_size" in err and not dst.exists()


@pytest.fixture
def loaded(good):
    pipe = gd.patch_pipeline(gd.tiny_sdxl_pipeline(seed=0))
    pipe.load_gralora_weights(good, adapter_name="a")
    return pipe


def scalings(pipe):
    return [dict(layer.scaling) for layer in pipe._all_gralora_layers()]


@pytest.mark.parametrize("weights, message", [
    (float("nan"), "finite"), (float("inf"), "finite"), ([float("-inf")], "finite"), ("0.5", "not str"),
    ({"unte": 0}, r"unknown component key\(s\) \['unte'\]; valid keys: \['unet', 'text_encoder', 'text_encoder_2'\]"),
    ({"unet": {"down": float("nan")}}, "finite"), ({"unet": {"up": {"block_0": [1.0, "x"]}}}, "not str"),
    ({"text_encoder": {"down": 1.0}}, "not dict"), ({"unet": {"sideways": 1.0}}, "adapter_weights for unet"),
])
def test_set_gralora_adapters_refuses_bad_weights_and_changes_nothing(loaded, weights, message):
    before = scalings(loaded)
    with pytest.raises(GraloraConfigError, match=message):
        loaded.set_gralora_adapters("a", weights)
    assert scalings(loaded) == before


def test_fuse_scale_must_be_finite(loaded):
    weight = loaded.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.get_base_layer().weight.clone()
    for scale in (float("nan"), float("inf"), "1"):
        with pytest.raises(GraloraConfigError, match="gralora_scale"):
            loaded.fuse_gralora(scale)
    assert torch.equal(loaded.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.get_base_layer().weight, weight)


# -- 8: casts that overflow ---------------------------------------------------------------------------


def test_fp16_export_that_overflows_is_refused_naming_the_module(huge, tmp_path):
    with pytest.raises(ExportError, match=r"unet\..*to_\w+ \(lora_B.*values up to .* do not fit float16") as info:
        gd.export_lora(huge, tmp_path / "x.safetensors", dtype="fp16")
    assert "65504" in str(info.value) and list(tmp_path.iterdir()) == []
    gd.export_lora(huge, tmp_path / "x.safetensors", dtype="bf16")  # bf16 holds it


def test_fp16_save_that_overflows_is_refused(huge, tmp_path):
    pipe = gd.patch_pipeline(gd.tiny_sdxl_pipeline(seed=0))
    pipe.load_gralora_weights(huge, adapter_name="default")
    with pytest.raises(gd.AdapterFileError, match="do not fit float16"):
        pipe.save_gralora_weights(tmp_path, dtype="fp16")
    assert list(tmp_path.iterdir()) == []


def test_loading_into_an_fp16_pipeline_that_overflows_is_refused_and_changes_nothing(huge, good):
    pipe = gd.patch_pipeline(gd.tiny_sdxl_pipeline(seed=0)).to(torch.float16)
    modules = [type(m) for m in pipe.unet.modules()]
    with pytest.raises(gd.AdapterFileError, match=r"unet\..*gralora_B: values up to .* do not fit this pipeline's float16"):
        pipe.load_gralora_weights(huge)
    assert [type(m) for m in pipe.unet.modules()] == modules and not pipe.list_gralora_adapters()
    pipe.load_gralora_weights(good)  # values that fit load
    assert all(torch.isfinite(p).all() for n, p in pipe.unet.named_parameters() if "gralora" in n)


# -- 9: kohya alpha in float32 ------------------------------------------------------------------------


def test_kohya_alpha_is_float32_whatever_the_weights_dtype(good, tmp_path):
    converted = to_kohya({"unet.mid_block.attentions.0.proj_in.lora_A.weight": torch.zeros(514, 4, dtype=torch.bfloat16),
                          "unet.mid_block.attentions.0.proj_in.lora_B.weight": torch.zeros(4, 514, dtype=torch.bfloat16)})
    alpha = next(t for k, t in converted.items() if k.endswith(".alpha"))
    assert alpha.dtype == torch.float32 and alpha.item() == 514  # bf16 would hold 512
    report = gd.export_lora(good, tmp_path / "k.safetensors", format="kohya", dtype="bf16")
    with safe_open(report.path, "pt") as f:
        alphas = {k: f.get_tensor(k) for k in f.keys() if k.endswith(".alpha")}
        downs = {k: f.get_tensor(k) for k in f.keys() if k.endswith(".lora_down.weight")}
    assert alphas and all(t.dtype == torch.float32 for t in alphas.values())
    assert all(alphas[k.removesuffix(".lora_down.weight") + ".alpha"].item() == t.shape[0] for k, t in downs.items())
    assert all(t.dtype == torch.bfloat16 for t in downs.values())
    from gralora_diffusion.export import estimate_size

    read = gd.read_adapter_file(good)
    assert estimate_size(read, dtype="bf16", format="kohya") - estimate_size(read, dtype="bf16") == 4 * len(alphas)


# -- 15: kohya layers_per_block never guessed ---------------------------------------------------------


def test_kohya_export_refuses_to_guess_layers_per_block(tmp_path, capsys):
    # targets that pick blocks, no base model recorded: the names cannot tell layers_per_block
    path = adapter_file(tmp_path / "picky.safetensors", base_model=None, unet_targets=r".*attentions\.0\..*to_q")
    dst = tmp_path / "k.safetensors"
    with pytest.raises(ExportError, match="--layers_per_block"):
        gd.export_lora(path, dst, format="kohya")
    assert not dst.exists()
    assert cli_main(["export-lora", str(path), str(dst), "--format", "kohya"]) == 2
    assert "--layers_per_block" in capsys.readouterr().err
    assert cli_main(["export-lora", str(path), str(dst), "--format", "kohya", "--layers-per-block", "1"]) == 0
    gd.export_lora(path, tmp_path / "d.safetensors")  # diffusers names need no layers_per_block
    # a preset without a base model: every attention adapted, the names tell (tiny: 1)
    preset = adapter_file(tmp_path / "preset.safetensors", base_model=None)
    gd.export_lora(preset, tmp_path / "p.safetensors", format="kohya")
    long_name = adapter_file(tmp_path / "long.safetensors", base_model="b" * 5000)  # no folder can have that name
    gd.export_lora(long_name, tmp_path / "l.safetensors", format="kohya")
    with pytest.raises(ExportError, match="layers_per_block=True"):
        gd.export_lora(preset, tmp_path / "p2.safetensors", format="kohya", layers_per_block=True)


# -- 14: threads --------------------------------------------------------------------------------------


def test_concurrent_loads_work_and_never_leave_the_process_patched(good, huge):
    """Four pipelines loading at once, two of them (fp16) failing after injection on purpose; meanwhile
    the main thread builds Linears. Every good load works, every failed one leaves its pipeline
    as it was, and nothing is left patched."""
    pipes = [gd.patch_pipeline(gd.tiny_sdxl_pipeline(seed=0)) for _ in range(2)]
    pipes += [gd.patch_pipeline(gd.tiny_sdxl_pipeline(seed=0)).to(torch.float16) for _ in range(2)]
    errors, outcomes = [], []

    def work(pipe, source, rounds=4):
        for _ in range(rounds):
            try:
                pipe.load_gralora_weights(source, adapter_name="x")
                outcomes.append("loaded")
                pipe.unload_gralora_weights()
            except gd.AdapterFileError:
                outcomes.append("refused")
            except Exception as err:  # noqa: BLE001 - anything else is the failure
                errors.append(err)

    threads = [threading.Thread(target=work, args=(p, good if i < 2 else huge)) for i, p in enumerate(pipes)]
    for t in threads:
        t.start()
    meta = 0
    while any(t.is_alive() for t in threads):
        meta += nn.Linear(4, 4).weight.is_meta
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(outcomes) == ["loaded"] * 8 + ["refused"] * 8
    assert meta == 0, "a Linear built during a load landed on the meta device"
    assert nn.Module.register_parameter is ORIGINAL_REGISTER_PARAMETER
    assert not nn.Linear(2, 2).weight.is_meta
    assert all(not p.list_gralora_adapters() for p in pipes)
