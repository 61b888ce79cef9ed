"""Issue 18 (trust, round 3), the number rule at the edge: every number from flags, configs, headers
and state files is finite and inside its stated range (numbers.LIMITS), with the bound in the one-line
message; library choices (LR schedulers) checked before any model loads; state files checked by type;
YAML configs bounded in size and alias expansion."""

import dataclasses
import json
import math
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import gralora_diffusion as gd
from gralora_diffusion.cli import main
from gralora_diffusion.errors import AdapterFileError, GraloraConfigError, TrainConfigError
from gralora_diffusion.numbers import LIMITS, limited
from gralora_diffusion.train import TrainConfig

from conftest import PROMPT, SAMPLES
from test_cli_errors import fails as one_line_exit_2  # exit 2, one line, no traceback

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


# -- the rule itself, for every named setting ---------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LIMITS))
def test_every_limit_refuses_just_outside_and_non_finite_and_takes_its_ends(name):
    low, high, *ends = LIMITS[name]
    if isinstance(low, int) and isinstance(high, int):
        assert limited(name, low) == low and limited(name, high) == high
        outside, bad = [low - 1, high + 1], [1.5, True, "3"]
    else:
        inside = [v for v in (low, high) if not (v == low and "low_open" in ends) and not (v == high and "high_open" in ends)]
        assert all(limited(name, v) == v for v in inside)
        outside, bad = [low - abs(low or 1) * 1e-3 - 1e-9, high + abs(high or 1) * 1e-3 + 1e-9], [math.nan, math.inf, 10**400, "1"]
        outside += [v for v in (low, high) if v not in inside]
    for value in outside:
        with pytest.raises(GraloraConfigError, match=rf"--{name}=.*must be in [\[(]"):
            limited(name, value)
    for value in bad:
        with pytest.raises(GraloraConfigError, match=f"--{name}="):
            limited(name, value)


def numeric_fields():
    return [f.name for f in dataclasses.fields(TrainConfig) if f.type in ("int", "float", "int | None", "float | None")]


@pytest.mark.parametrize("name", numeric_fields())
def test_every_numeric_training_setting_has_a_bound(name):
    """No number reaches torch unbounded: 2**64 (beyond C and numpy) and -2**64 fail in validate, named."""
    kind = next(f.type for f in dataclasses.fields(TrainConfig) if f.name == name)
    for value in (2**64, -(2**64)) if kind.startswith("int") else (1e300, -1e300, math.nan):
        cfg = TrainConfig(instance_data_dir=str(SAMPLES), instance_prompt=PROMPT, **{name: value})
        with pytest.raises(TrainConfigError, match=f"--{name}="):
            cfg.validate(need_model=False)


# -- at the command line: one line, exit 2, the bound in it, before any model loads ------------------

TRAIN = ["train", "--pretrained_model_name_or_path", "tiny", "--instance_data_dir", str(SAMPLES), "--instance_prompt", PROMPT,
         "--report_to", "none"]
CASES = [
    (["generate", "--prompt", PROMPT, "--scales", "nan"], "--scales=nan"),
    (["generate", "--prompt", PROMPT, "--scales", "0,1e30"], "[-1000, 1000]"),
    (["generate", "--prompt", PROMPT, "--guidance", "nan"], "--guidance=nan"),
    (["generate", "--prompt", PROMPT, "--guidance=-inf"], "--guidance=-inf"),
    (["generate", "--prompt", PROMPT, "--seeds", str(2**64)], "18446744073709551615]"),
    (["generate", "--prompt", PROMPT, "--height", str(2**20)], "[8, 4096]"),
    (["generate", "--prompt", PROMPT, "--steps", str(10**6)], "[1, 1000]"),
    (["generate", "--prompt", PROMPT, "--num_threads", str(2**40)], "[1, 1024]"),
    (["generate", "--prompt", PROMPT, "--adapter", "x.safetensors:1e300"], "[-1000, 1000]"),
    (["evaluate", "--instance_data_dir", str(SAMPLES), "--guidance", "nan"], "--guidance=nan"),
    (["evaluate", "--instance_data_dir", str(SAMPLES), "--resolution", str(2**20)], "[8, 4096]"),
    (["evaluate", "--instance_data_dir", str(SAMPLES), "--seeds", f"0,{2**64}"], "--seeds="),
    (["compare", *TRAIN[1:], "--eval_guidance", "nan"], "--eval_guidance=nan"),
    (["compare", *TRAIN[1:], "--seeds_per_variant", str(10**9)], "[1, 100]"),
    ([*TRAIN, "--ema_decay", "2"], "--ema_decay=2.0: must be in [0, 1]"),
    ([*TRAIN, "--adam_beta1", "2"], "--adam_beta1=2.0: must be in [0, 1)"),
    ([*TRAIN, "--adam_beta2=-0.5"], "--adam_beta2=-0.5"),
    ([*TRAIN, "--dropout", "1"], "--dropout=1.0"),
    ([*TRAIN, "--rank", str(2**20)], "[1, 1024]"),
    ([*TRAIN, "--resolution", str(2**20)], "[8, 4096]"),
    ([*TRAIN, "--seed=-1"], "--seed=-1: must be in [0, 4294967295]"),
    ([*TRAIN, "--seed", str(2**64)], "[0, 4294967295]"),
    ([*TRAIN, "--num_threads", str(2**40)], "[1, 1024]"),
    ([*TRAIN, "--lr_scheduler", "cosinee"], "did you mean cosine?"),
]


@pytest.mark.parametrize("argv, words", CASES, ids=[" ".join(c[0][-2:]) for c in CASES])
def test_numbers_out_of_range_are_one_line_before_anything_loads(capsys, tmp_path, argv, words):
    out = ["--output_dir", str(tmp_path / "out")] if argv[0] != "generate" else ["--output-dir", str(tmp_path / "out")]
    started = time.perf_counter()
    line = one_line_exit_2(capsys, [*argv, *out])
    assert words in line, line
    assert time.perf_counter() - started < 20 and not (tmp_path / "out").exists()  # nothing loaded, nothing written


def test_lr_scheduler_list_comes_from_diffusers_and_every_name_passes():
    from diffusers.optimization import SchedulerType

    for kind in SchedulerType:
        TrainConfig(instance_data_dir=str(SAMPLES), instance_prompt=PROMPT, lr_scheduler=kind.value).validate(need_model=False)


# -- headers and LoRA files ----------------------------------------------------------------------------


def rewrite_header(path, out, change):
    with safe_open(str(path), "pt") as f:
        metadata, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    change(metadata, tensors)
    save_file(tensors, str(out), metadata=metadata)
    return out


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    pipe = gd.patch_pipeline(gd.tiny_sdxl_pipeline(seed=0))
    gd.add_gralora(pipe, r=4, gralora_k=2)
    folder = tmp_path_factory.mktemp("adapter")
    pipe.save_gralora_weights(folder)
    return next(folder.glob("*.safetensors"))


@pytest.mark.parametrize("alpha", [1e300, -1e300, 1e6, "8"])
def test_a_header_alpha_beyond_its_range_is_refused_on_read(adapter, tmp_path, alpha):
    def change(metadata, tensors):
        configs = json.loads(metadata["gralora_configs"])
        for config in configs.values():
            config["alpha"] = alpha
        metadata["gralora_configs"] = json.dumps(configs)

    bad = rewrite_header(adapter, tmp_path / "bad.safetensors", change)
    with pytest.raises(AdapterFileError, match="alpha"):
        gd.read_adapter_file(bad) if hasattr(gd, "read_adapter_file") else gd.adapter_file.read_adapter_file(bad)


@pytest.mark.parametrize("how", ["nan-alpha", "huge-alpha", "vector-alpha", "0-dim-weight", "inf-weight"])
def test_a_kohya_lora_with_bad_numbers_is_refused_before_diffusers_reads_it(adapter, tmp_path, how):
    lora = gd.export_lora(adapter, tmp_path / "kohya.safetensors", format="kohya").path

    def change(metadata, tensors):
        alpha = next(k for k in tensors if k.endswith(".alpha"))
        weight = next(k for k in tensors if k.endswith("lora_down.weight"))
        if how == "nan-alpha":
            tensors[alpha] = torch.tensor(float("nan"))
        elif how == "huge-alpha":
            tensors[alpha] = torch.tensor(1e30)
        elif how == "vector-alpha":
            tensors[alpha] = torch.ones(3)
        elif how == "0-dim-weight":
            tensors[weight] = torch.tensor(1.0)
        else:
            tensors[weight] = torch.full_like(tensors[weight], float("inf"))

    bad = rewrite_header(lora, tmp_path / "bad.safetensors", change)
    from gralora_diffusion.any_adapter import load_any_adapter

    pipe = gd.patch_pipeline(gd.tiny_sdxl_pipeline(seed=0))
    with pytest.raises(AdapterFileError, match="bad.safetensors"):
        load_any_adapter(pipe, str(bad), "x")
    assert not pipe.unet.peft_config if hasattr(pipe.unet, "peft_config") else True  # nothing loaded


# -- state files by type ----------------------------------------------------------------------------------


@pytest.mark.parametrize("state", [
    {"global_step": -5, "settings": {}}, {"global_step": 2**40, "settings": {}}, {"global_step": "5", "settings": {}},
    {"global_step": 5, "settings": []}, {"global_step": 5, "settings": {}, "history": [1]},
    {"global_step": 5, "settings": {}, "seed": -1}, [], "x",
])
def test_a_tampered_training_state_is_damaged_not_a_traceback(tmp_path, state):
    from gralora_diffusion.train.checkpoint import check_checkpoint

    folder = tmp_path / "checkpoint-5"
    folder.mkdir()
    (folder / "training_state.json").write_text(json.dumps(state))
    cfg = TrainConfig(instance_data_dir=str(SAMPLES), instance_prompt=PROMPT)
    with pytest.raises(TrainConfigError, match="training_state.json is damaged"):
        check_checkpoint(folder, cfg)


@pytest.mark.parametrize("record", [
    {"train": {"weights": "a.safetensors", "steps": "x", "parameters": 1}},
    {"train": {"weights": "../../etc/passwd", "steps": 1, "parameters": 1}},
    {"train": {"weights": "a.safetensors", "steps": 1, "parameters": 1, "step_time_s": "fast"}},
    {"train": [], "metrics": {}}, {"metrics": {"dino": "high"}}, {"config": []}, [1, 2],
])
def test_a_tampered_compare_record_is_redone_not_trusted(tmp_path, record):
    from gralora_diffusion.compare import read_record

    (tmp_path / "run.json").write_text(json.dumps(record))
    assert read_record(tmp_path) == {}


def test_a_lock_with_an_impossible_pid_is_stale(tmp_path):
    from gralora_diffusion.train.lock import LOCK_NAME, output_dir_lock

    for pid in (2**40, -1, "x", True):
        (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": "here"}))
        with output_dir_lock(tmp_path):
            assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] > 0
        assert not (tmp_path / LOCK_NAME).exists()


# -- settings files: bounded reading -------------------------------------------------------------------


def test_a_billion_laughs_yaml_is_refused_fast(tmp_path):
    from gralora_diffusion.train.config import read_config_file

    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [{','.join([f'*{prev}'] * 9)}]")
    path = tmp_path / "laughs.yaml"
    lines[-1] = lines[-1].replace("i: &i", "validation_prompt: &i")  # a real setting: main hung printing it
    path.write_text("\n".join(lines) + "\n")
    started = time.perf_counter()
    with pytest.raises(TrainConfigError, match="expands to more than"):
        read_config_file(path)
    assert time.perf_counter() - started < 5


@pytest.mark.parametrize("suffix", [".yaml", ".toml", ".json"])
def test_settings_files_are_bounded_in_size_and_depth(tmp_path, suffix):
    from gralora_diffusion.train.config import read_config_file

    big = tmp_path / f"big{suffix}"
    big.write_text("# " + "x" * 1_000_001 + "\n" if suffix != ".json" else '{"a": "' + "x" * 1_000_001 + '"}')
    with pytest.raises(TrainConfigError, match="larger than 1,000,000 bytes"):
        read_config_file(big)
    if suffix == ".json":
        deep = tmp_path / "deep.json"
        deep.write_text('{"a": ' + "[" * 60 + "]" * 60 + "}")
        with pytest.raises(TrainConfigError, match="nested deeper"):
            read_config_file(deep)
