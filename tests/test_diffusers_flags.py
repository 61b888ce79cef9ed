"""diffusers' command lines run through our trainer's parser: the SDXL DreamBooth LoRA README's
commands (copied as data from huggingface/diffusers examples/dreambooth/README_sdxl.md, commit
58eb52c0, with the README's `export` values substituted), its spellings (`--use_8bit_adam`,
`--optimizer AdamW`), and its Prodigy defaults reaching the optimizer."""

import argparse
import shlex

import pytest
import torch

from gralora_diffusion.train import TrainConfig
from gralora_diffusion.train.config import add_arguments
from gralora_diffusion.train.model import make_optimizer, param_groups

pytestmark = pytest.mark.usefixtures("one_thread")

README_ENV = {"MODEL_NAME": "stabilityai/stable-diffusion-xl-base-1.0", "INSTANCE_DIR": "dog", "OUTPUT_DIR": "lora-trained-xl",
              "VAE_PATH": "madebyollin/sdxl-vae-fp16-fix"}

DOG = r"""accelerate launch train_dreambooth_lora_sdxl.py \
  --pretrained_model_name_or_path=$MODEL_NAME  \
  --instance_data_dir=$INSTANCE_DIR \
  --pretrained_vae_model_name_or_path=$VAE_PATH \
  --output_dir=$OUTPUT_DIR \
  --mixed_precision="fp16" \
  --instance_prompt="a photo of sks dog" \
  --resolution=1024 \
  --train_batch_size=1 \
  --gradient_accumulation_steps=4 \
  --learning_rate=1e-4 \
  --report_to="wandb" \
  --lr_scheduler="constant" \
  --lr_warmup_steps=0 \
  --max_train_steps=500 \
  --validation_prompt="A photo of sks dog in a bucket" \
  --validation_epochs=25 \
  --seed="0" \
  --push_to_hub"""

LOW_MEMORY = r"""
  --enable_xformers_memory_efficient_attention \
  --gradient_checkpointing \
  --use_8bit_adam \
  --mixed_precision="fp16" \
"""

PLAYGROUND = r"""accelerate launch train_dreambooth_lora_sdxl.py \
  --pretrained_model_name_or_path="playgroundai/playground-v2.5-1024px-aesthetic"  \
  --instance_data_dir="dog" \
  --output_dir="dog-playground-lora" \
  --mixed_precision="fp16" \
  --instance_prompt="a photo of sks dog" \
  --resolution=1024 \
  --train_batch_size=1 \
  --gradient_accumulation_steps=4 \
  --learning_rate=1e-4 \
  --use_8bit_adam \
  --report_to="wandb" \
  --lr_scheduler="constant" \
  --lr_warmup_steps=0 \
  --max_train_steps=500 \
  --validation_prompt="A photo of sks dog in a bucket" \
  --validation_epochs=25 \
  --seed="0" \
  --push_to_hub"""

EDM = r"""
  --do_edm_style_training \
"""

DORA = "--use_dora"


def argv(command: str) -> list[str]:
    """The flags of a README command line: continuation lines joined, $VARS filled, the launcher dropped."""
    words = shlex.split(command.replace("\\\n", " "))
    words = [w for w in words if w not in ("\\", "accelerate", "launch", "train_dreambooth_lora_sdxl.py")]
    for name, value in README_ENV.items():
        words = [w.replace(f"${name}", value) for w in words]
    return words


def parse(words: list[str]) -> TrainConfig:
    parser = argparse.ArgumentParser(prog="train", exit_on_error=False)
    add_arguments(parser)
    return TrainConfig.from_args(parser.parse_args(words))


def test_the_readme_dog_command_means_the_same_here():
    cfg = parse(argv(DOG))
    assert (cfg.pretrained_model_name_or_path, cfg.instance_data_dir, cfg.output_dir) == (
        "stabilityai/stable-diffusion-xl-base-1.0", "dog", "lora-trained-xl")
    assert cfg.pretrained_vae_model_name_or_path == "madebyollin/sdxl-vae-fp16-fix" and cfg.mixed_precision == "fp16"
    assert (cfg.resolution, cfg.train_batch_size, cfg.gradient_accumulation_steps, cfg.learning_rate) == (1024, 1, 4, 1e-4)
    assert (cfg.report_to, cfg.lr_scheduler, cfg.lr_warmup_steps, cfg.max_train_steps) == ("wandb", "constant", 0, 500)
    assert cfg.validation_prompt == "A photo of sks dog in a bucket" and cfg.validation_epochs == 25
    assert cfg.seed == 0 and cfg.push_to_hub is True


def test_the_readme_low_memory_flags_and_the_playground_command_parse():
    cfg = parse(argv(DOG) + argv(LOW_MEMORY))
    assert cfg.enable_xformers_memory_efficient_attention and cfg.gradient_checkpointing and cfg.optimizer == "adamw8bit"
    cfg = parse(argv(PLAYGROUND))
    assert cfg.pretrained_model_name_or_path == "playgroundai/playground-v2.5-1024px-aesthetic" and cfg.optimizer == "adamw8bit"


def test_the_readme_dora_flag_trains_the_lora_baseline_as_dora(tmp_path):
    cfg = parse(argv(DOG) + [DORA])
    assert cfg.use_dora and cfg.adapter == "gralora"
    with pytest.raises(Exception, match="--use_dora .* add --adapter lora"):
        cfg._check_adapter()
    parse(argv(DOG) + [DORA, "--adapter", "lora"])._check_adapter()


def test_edm_style_training_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(argv(PLAYGROUND) + argv(EDM))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--do_edm_style_training: EDM-style training" in err and "not supported" in err


@pytest.mark.parametrize("spelling", ["AdamW", "adamw", "ADAMW"])
def test_optimizer_names_are_case_insensitive_in_flags_and_files(spelling, tmp_path):
    assert parse(["--optimizer", spelling]).optimizer == "adamw"
    assert parse(["--optimizer", "Prodigy"]).optimizer == "prodigy"
    cfg = TrainConfig.from_dict({"optimizer": spelling, "use_8bit_adam": False})
    cfg._check_types()
    assert cfg.optimizer == "adamw"
    assert TrainConfig.from_dict({"use_8bit_adam": True}).optimizer == "adamw8bit"


def test_prodigy_gets_diffusers_defaults_and_text_encoders_their_decay():
    cfg = parse(["--optimizer", "prodigy", "--learning_rate", "1.0", "--train_text_encoder", "--adam_weight_decay_text_encoder", "1e-3"])
    params = {name: [torch.nn.Parameter(torch.zeros(2))] for name in ("unet", "text_encoder", "text_encoder_2")}
    optimizer = make_optimizer(cfg, param_groups(cfg, params, 1))
    assert type(optimizer).__module__.startswith("prodigyopt")
    unet, text = optimizer.param_groups
    # diffusers' train_dreambooth_lora_sdxl.py: decouple, bias correction and safeguard warm-up on, beta3 Prodigy's own
    assert unet["decouple"] and unet["use_bias_correction"] and unet["safeguard_warmup"] and unet["beta3"] is None
    assert unet["weight_decay"] == cfg.adam_weight_decay and text["weight_decay"] == 1e-3
    off = parse(["--optimizer", "prodigy", "--no-prodigy_use_bias_correction", "--prodigy_beta3", "0.99"])
    group = make_optimizer(off, param_groups(off, params, 1)).param_groups[0]
    assert not group["use_bias_correction"] and group["beta3"] == 0.99


def test_image_interpolation_mode_picks_the_resampling_filter(tmp_path):
    from PIL import Image

    from gralora_diffusion.train.data import DreamBoothDataset, scan_images

    Image.effect_noise((96, 96), 64).convert("RGB").save(tmp_path / "a.png")
    record = scan_images(tmp_path, "x")
    arrays = {mode: DreamBoothDataset.decode(record[0], (64, 64), DreamBoothDataset(record, 64, interpolation=mode).resample)[0]
              for mode in ("bilinear", "lanczos", "nearest_exact")}
    assert not (arrays["bilinear"] == arrays["lanczos"]).all() and not (arrays["lanczos"] == arrays["nearest_exact"]).all()
    with pytest.raises(argparse.ArgumentError, match="invalid choice: 'cubic-ish'"):
        parse(["--image_interpolation_mode", "cubic-ish"])
    assert parse(["--image_interpolation_mode", "LANCZOS"]).image_interpolation_mode == "lanczos"
