"""A new user's first minutes with `train` (issue 13) and the trainer's inputs (issue 10): non-finite
numbers and bad Hub ids refused before any model loads, captions that are not UTF-8 or are
null/empty, --report_to following what is installed, --save_precision, labelled sample grids, a bar
for every long step, and Ctrl-C / an unreadable image saying where the last checkpoint is and the
exact command that resumes from it."""

import importlib.util
import io
import json
import re
import shlex
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from conftest import PROMPT, SAMPLES, SUBPROCESS_ENV
from PIL import Image
from safetensors import safe_open

import gralora_diffusion as gd
from gralora_diffusion.cli import main
from gralora_diffusion.constants import CONFIG_NAME, LORA_WEIGHT_NAME, WEIGHT_NAME
from gralora_diffusion.errors import UnreadableImageError
from gralora_diffusion.grids import HEADER_HEIGHT, LABEL_WIDTH
from gralora_diffusion.tiny import TINY_MODEL_ID
from gralora_diffusion.train import TrainConfig, TrainConfigError, TrainingError, loop, train
from gralora_diffusion.train.data import scan_images
from gralora_diffusion.train.sampling import save_samples
from gralora_diffusion.train.save import complete_checkpoints

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(cfg):
        raise AssertionError("the base model was loaded before the input was checked")
    monkeypatch.setattr(loop, "load_pipeline", refuse)


def _images(folder, *names):
    folder.mkdir(exist_ok=True)
    for name in names:
        Image.new("RGB", (64, 64), (200, 40, 40)).save(folder / name)
    return folder


def _cfg(tmp_path, **kw):
    base = dict(pretrained_model_name_or_path=TINY_MODEL_ID, instance_data_dir=str(SAMPLES), instance_prompt=PROMPT,
                output_dir=str(tmp_path / "out"), resolution=64, train_batch_size=1, max_train_steps=2,
                learning_rate=1e-3, rank=8, seed=0, report_to="none", checkpointing_steps=1000)
    return TrainConfig(**{**base, **kw})


def _run(cfg, on_step=None):
    return train(cfg, pipeline=gd.tiny_sdxl_pipeline(seed=0), on_step=on_step)


# ---- numbers and ids refused before any model loads ---------------------------------------------
@pytest.mark.parametrize("flag, value", [("--alpha", "nan"), ("--learning_rate", "inf"), ("--max_grad_norm", "nan"),
                                         ("--prior_loss_weight", "-inf"), ("--adam_epsilon", "nan"), ("--snr_gamma", "inf")])
def test_non_finite_flags_are_one_line_exit_2_before_loading(tmp_path, capsys, no_model_load, flag, value):
    code = main(["train", "--pretrained_model_name_or_path", "some/model", "--instance_data_dir", str(SAMPLES),
                 "--instance_prompt", PROMPT, "--output_dir", str(tmp_path / "out"), f"{flag}={value}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert f"{flag}={float(value)}: must be a finite number" in err[0]
    assert not (tmp_path / "out").exists()


def test_non_finite_number_in_a_config_file_is_refused(tmp_path, no_model_load):
    (tmp_path / "c.toml").write_text("alpha = nan\n")
    import argparse

    cfg = TrainConfig.from_args(argparse.Namespace(config=str(tmp_path / "c.toml"), instance_data_dir=str(SAMPLES),
                                                   pretrained_model_name_or_path="x", instance_prompt=PROMPT))
    with pytest.raises(TrainConfigError, match=r"--alpha=nan: must be a finite number"):
        train(cfg)


@pytest.mark.parametrize("change, message", [
    (dict(push_to_hub=True, hub_model_id="me/bad name"), "--hub_model_id 'me/bad name' is not a valid Hub repo id"),
    (dict(hub_model_id="a/b/c"), "--hub_model_id 'a/b/c'"),
    (dict(push_to_hub=True, output_dir="my adapter!"), "repo id from the --output_dir folder name"),
])
def test_bad_hub_repo_id_is_refused_before_training(tmp_path, monkeypatch, no_model_load, change, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TrainConfigError, match=message):
        train(_cfg(tmp_path, pretrained_model_name_or_path="some/model", **change))


# ---- captions --------------------------------------------------------------------------------------
def test_caption_files_that_are_not_utf8_name_the_file(tmp_path):
    data = _images(tmp_path / "data", "a.png")
    (data / "a.txt").write_bytes(b"caf\xe9 teapot")  # Latin-1
    with pytest.raises(TrainConfigError, match=r"a\.txt: the caption file is not valid UTF-8 \(byte 3\)"):
        scan_images(data, PROMPT)
    (data / "a.txt").unlink()
    (data / "metadata.jsonl").write_bytes(b'{"file_name": "a.png", "text": "\xff"}\n')
    with pytest.raises(TrainConfigError, match=r"metadata\.jsonl: the caption file is not valid UTF-8"):
        scan_images(data, PROMPT)


def test_null_and_empty_captions_fall_back_to_the_prompt(tmp_path):
    data = _images(tmp_path / "data", "a.png", "b.png", "c.png", "d.png")
    (data / "a.txt").write_text("  \n")  # empty caption file
    (data / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in [
        {"file_name": "b.png", "text": None}, {"file_name": "c.png", "text": None, "caption": "from caption"},
        {"file_name": "d.png", "text": "from text"}]))
    captions = {r.path.name: r.caption for r in scan_images(data, "fallback")}
    assert captions == {"a.png": "fallback", "b.png": "fallback", "c.png": "from caption", "d.png": "from text"}
    with pytest.raises(TrainConfigError, match=r"2 image\(s\).*no caption \(a\.png, b\.png\)"):
        scan_images(data, None)  # null is no caption, never the string "None"


# ---- report_to follows what is installed ---------------------------------------------------------
def test_report_to_defaults_to_what_is_installed(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, report_to=None).validate(need_model=False)
    installed = importlib.util.find_spec("tensorboard") is not None
    assert cfg.report_to == ("tensorboard" if installed else "none")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    cfg = _cfg(tmp_path, report_to=None).validate(need_model=False)  # no "needs the tensorboard package" error
    assert cfg.report_to == "none" and "tensorboard package is not installed" in cfg.logging_note()
    assert _cfg(tmp_path, report_to="none").validate(need_model=False).logging_note() is None  # asked for: nothing to say


def test_run_without_tensorboard_writes_no_logs_and_records_none(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    result = _run(_cfg(tmp_path, report_to=None, max_train_steps=1))
    assert not (result.output_dir / "logs").exists()
    assert yaml.safe_load((result.output_dir / CONFIG_NAME).read_text())["report_to"] == "none"
    assert "No TensorBoard logs: the tensorboard package is not installed" in capsys.readouterr().out


# ---- --save_precision ------------------------------------------------------------------------------
@pytest.mark.parametrize("adapter, precision, dtype", [("gralora", "fp16", "F16"), ("lora", "bf16", "BF16")])
def test_save_precision_sets_the_final_adapter_dtype_and_is_recorded(tmp_path, adapter, precision, dtype):
    result = _run(_cfg(tmp_path, adapter=adapter, save_precision=precision, max_train_steps=1))
    with safe_open(result.output_dir / (WEIGHT_NAME if adapter == "gralora" else LORA_WEIGHT_NAME), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {dtype}
    assert yaml.safe_load((result.output_dir / CONFIG_NAME).read_text())["save_precision"] == precision
    if adapter == "gralora":  # and it loads
        pipe = gd.patch_pipeline(gd.tiny_sdxl_pipeline(seed=0))
        pipe.load_gralora_weights(result.weights_path)


def test_save_precision_refuses_a_cast_that_overflows(tmp_path):
    from gralora_diffusion.train.save import save_final_adapter

    unet = gd.tiny_sdxl_pipeline(seed=0).unet
    gd.add_gralora(unet, r=4, gralora_k=2)
    with torch.no_grad():
        next(p for n, p in unet.named_parameters() if "gralora_B" in n)[0, 0, 0] = 70000.0  # fp16 tops out at 65504
    assert save_final_adapter(_cfg(tmp_path, save_precision="bf16"), {"unet": unet}, tmp_path).is_file()
    with pytest.raises(TrainingError, match=r"--save_precision fp16: unet\..*gralora_B: values up to 70000 do not fit float16"):
        save_final_adapter(_cfg(tmp_path, save_precision="fp16"), {"unet": unet}, tmp_path / "fp16")
    assert not (tmp_path / "fp16" / WEIGHT_NAME).exists()


def test_bad_save_precision_is_refused(tmp_path, no_model_load):
    with pytest.raises(TrainConfigError, match="--save_precision='fp8'"):
        train(_cfg(tmp_path, save_precision="fp8"))


# ---- labelled grids, bars --------------------------------------------------------------------------
def test_sample_grid_is_labelled_with_prompts_and_seeds(tmp_path):
    rows = [[Image.new("RGB", (32, 32), (0, 0, 255))] * 3 for _ in range(2)]
    grid, images = save_samples(rows, tmp_path, "step-5", ["a red teapot", "a blue teapot"], [7, 8, 9])
    grid = Image.open(grid)
    header = grid.size[1] - 2 * 32  # a label wider than its 32 px cell wraps onto more header lines
    assert grid.size[0] == LABEL_WIDTH + 3 * 32 and header >= HEADER_HEIGHT and len(images) == 6
    pixels = np.asarray(grid)
    assert (pixels[header:, :LABEL_WIDTH] < 128).any()  # prompt text in the label column
    assert (pixels[:header, LABEL_WIDTH:] < 128).any()  # seed text in the header row


def test_class_images_and_sampling_get_their_own_bars(tmp_path, tiny_dir, capsys):
    cfg = _cfg(tmp_path, pretrained_model_name_or_path=str(tiny_dir), with_prior_preservation=True,
               class_data_dir=str(tmp_path / "class"), class_prompt="a teapot", num_class_images=2, sample_batch_size=1,
               validation_prompt="a | b", num_validation_images=1, validation_steps=1, num_inference_steps=2)
    train(cfg)
    err = capsys.readouterr().err
    # each bar's first draw (later draws depend on tqdm's redraw interval)
    assert re.search(r"class images:\s+0%\|\s+\| 0/2 ", err)
    assert re.search(r"samples \(step-1\):\s+0%\|\s+\| 0/4 ", err)  # 2 prompts x 2 denoising steps
    assert re.search(r"samples \(final\):\s+0%\|\s+\| 0/4 ", err)
    assert "train: 100%" in err
    assert "Loading weights" not in err  # transformers' per-model bars stay inside diffusers' loading bar


# ---- Ctrl-C and an unreadable image say how to resume ---------------------------------------------
def _interrupt_at(step):
    def on_step(global_step, loss):
        if global_step == step:
            raise KeyboardInterrupt
    return on_step


def test_ctrl_c_prints_the_last_checkpoint_and_the_resume_command(tmp_path, capsys):
    cfg = _cfg(tmp_path, max_train_steps=6, checkpointing_steps=2)
    with pytest.raises(KeyboardInterrupt):
        _run(cfg, on_step=_interrupt_at(3))
    err = capsys.readouterr().err
    out = tmp_path / "out"
    assert f"Training interrupted. Last checkpoint: {out / 'checkpoint-2'}. Resume with: gralora-diffusion train " \
           f"--config {out / CONFIG_NAME} --resume_from_checkpoint latest" in err
    assert not (out / ".lock").exists()


def test_ctrl_c_before_any_checkpoint_says_so(tmp_path, capsys):
    with pytest.raises(KeyboardInterrupt):
        _run(_cfg(tmp_path, max_train_steps=6, checkpointing_steps=5), on_step=_interrupt_at(1))
    assert "No checkpoint was written yet: run the same command again to start over." in capsys.readouterr().err


def _cut_jpeg(path):
    good = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good, format="JPEG")
    path.write_bytes(good.getvalue()[: len(good.getvalue()) // 2])  # header intact, pixels cut


@pytest.mark.parametrize("workers", [0, 1])
def test_an_unreadable_image_met_in_training_says_whether_a_checkpoint_exists(tmp_path, workers):
    data = _images(tmp_path / "data", "a.png", "b.png", "c.png")
    _cut_jpeg(data / "cut.jpg")
    cfg = _cfg(tmp_path, instance_data_dir=str(data), max_train_steps=8, checkpointing_steps=1, dataloader_num_workers=workers)
    with pytest.raises(UnreadableImageError) as caught:
        _run(cfg)
    message, found = str(caught.value), complete_checkpoints(tmp_path / "out")
    assert len(message.splitlines()) == 1 and message.startswith(f"{data / 'cut.jpg'}: cannot decode the image"), message
    assert "Remove or replace it." in message
    if found:
        assert f"Last checkpoint: {found[-1]}. Resume with: gralora-diffusion train --config" in message
    else:
        assert "No checkpoint was written yet" in message


def test_cli_error_for_an_unreadable_image_is_on_its_own_line(tmp_path, tiny_dir, capsys):
    data = _images(tmp_path / "data", "a.png")
    _cut_jpeg(data / "cut.jpg")
    code = main(["train", "--pretrained_model_name_or_path", str(tiny_dir), "--instance_data_dir", str(data),
                 "--instance_prompt", PROMPT, "--output_dir", str(tmp_path / "out"), "--resolution", "64",
                 "--train_batch_size", "2", "--max_train_steps", "3", "--report_to", "none", "--num_threads", "1"])
    err = capsys.readouterr().err
    assert code == 2
    last = err.rstrip("\n").split("\n")[-1]
    assert last.startswith("gralora-diffusion train: error: ") and "cut.jpg" in last, repr(err[-400:])  # not after a bar's \r


@pytest.mark.slow
def test_sigint_exits_130_and_the_printed_command_resumes(tmp_path, tiny_dir):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "gralora_diffusion.cli", "train", "--pretrained_model_name_or_path", str(tiny_dir),
           "--instance_data_dir", str(SAMPLES), "--instance_prompt", PROMPT, "--output_dir", str(out),
           "--resolution", "64", "--train_batch_size", "1", "--max_train_steps", "100000", "--checkpointing_steps", "2",
           "--report_to", "none", "--seed", "0"]
    process = subprocess.Popen(cmd, env={**SUBPROCESS_ENV, "PYTHONUNBUFFERED": "1"}, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:  # tqdm.write: one line per checkpoint
        if "saved checkpoint" in line:
            break
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    assert "Traceback" not in err and err.rstrip().endswith("gralora-diffusion train: interrupted")
    resume = next(line for line in err.splitlines() if "Resume with: " in line).split("Resume with: ", 1)[1]
    step = int(complete_checkpoints(out)[-1].name.split("-")[1])
    assert resume.startswith("gralora-diffusion train --config ")
    argv = [sys.executable, "-m", "gralora_diffusion.cli", *shlex.split(resume)[1:], "--max_train_steps", str(step + 1)]
    done = subprocess.run(argv, env=SUBPROCESS_ENV, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"Resumed from {out / f'checkpoint-{step}'} at step {step}." in done.stdout
    assert (out / WEIGHT_NAME).is_file()


# ---- the accelerate script chooses threads like the CLI --------------------------------------------
def _script():
    import importlib.util as iu
    from conftest import ROOT

    spec = iu.spec_from_file_location("train_script", ROOT / "scripts" / "train_dreambooth_gralora_sdxl.py")
    module = iu.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_accelerate_script_takes_num_threads(tmp_path, capsys, no_model_load):
    script = _script()
    base = ["--pretrained_model_name_or_path", "some/model", "--instance_data_dir", str(SAMPLES),
            "--instance_prompt", PROMPT, "--output_dir", str(tmp_path / "out")]
    assert script.main([*base, "--num_threads", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --num_threads=0: must be in [1, 1024]."
    try:
        assert script.main([*base, "--num_threads", "2", "--alpha", "nan"]) == 2  # chosen, then the settings refused
        assert torch.get_num_threads() == 2 and "--alpha=nan" in capsys.readouterr().err
    finally:
        torch.set_num_threads(1)
