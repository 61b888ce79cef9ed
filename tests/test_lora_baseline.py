"""The `--adapter lora` baseline goes where GraLoRA goes: `--output_kohya_format` and `export-lora`
write kohya keys that stock diffusers loads to the same images, `export-lora --rank` truncates it,
`info` reads it, `push` uploads its folder (loopback Hub, as test_hub.py), and a DoRA baseline trains
but is not exported as a plain LoRA."""

import json

import pytest
import torch
from conftest import PROMPT, SAMPLES
from test_hub import TOKEN, fake_hub  # noqa: F401 - the loopback Hub fixture

import gralora_diffusion as gd
from gralora_diffusion.cli import main as cli_main
from gralora_diffusion.constants import KOHYA_WEIGHT_NAME, LORA_WEIGHT_NAME
from gralora_diffusion.tiny import TINY_MODEL_ID
from gralora_diffusion.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("lora") / "out"
    cfg = TrainConfig(pretrained_model_name_or_path=TINY_MODEL_ID, instance_data_dir=str(SAMPLES), instance_prompt=PROMPT,
                      output_dir=str(out), resolution=64, train_batch_size=1, max_train_steps=3, learning_rate=3e-2,
                      adapter="lora", rank=4, train_text_encoder=True, text_encoder_lr=3e-2, seed=0, report_to="none",
                      output_kohya_format=True, validation_prompt=PROMPT, num_validation_images=1, num_inference_steps=1)
    train(cfg, pipeline=gd.tiny_sdxl_pipeline(seed=0))
    return out


def image(path=None):
    pipe = gd.tiny_sdxl_pipeline(seed=0)
    if path is not None:
        pipe.load_lora_weights(str(path))  # stock diffusers
    return pipe(PROMPT, num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(0),
                output_type="pt").images


def test_kohya_output_loads_in_stock_diffusers_to_the_same_images(lora_run, tmp_path):
    kohya = lora_run / KOHYA_WEIGHT_NAME
    assert kohya.is_file()  # --output_kohya_format
    from safetensors import safe_open

    with safe_open(str(kohya), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("lora_unet_") for k in keys) and any(k.startswith("lora_te1_") for k in keys)
    trained, base = image(lora_run / LORA_WEIGHT_NAME), image()
    assert (trained - base).abs().max() > 1e-3  # the adapter does something
    assert (image(kohya) - trained).abs().max() <= 1e-5
    assert cli_main(["export-lora", str(lora_run), str(tmp_path / "again.safetensors"), "--format", "diffusers"]) == 0
    assert (image(tmp_path / "again.safetensors") - trained).abs().max() <= 1e-5


def test_export_lora_truncates_the_baseline_and_info_reads_it(lora_run, tmp_path, capsys):
    assert cli_main(["export-lora", str(lora_run / LORA_WEIGHT_NAME), str(tmp_path / "r2.safetensors"), "--rank", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert not report["exact"] and 0 < report["overall_energy"] < 1 and {m["rank"] for m in report["modules"]} == {2}
    assert cli_main(["info", str(lora_run)]) == 0
    out = capsys.readouterr().out
    assert "plain LoRA" in out and "text_encoder_2" in out


def test_push_uploads_the_lora_baseline_folder(lora_run, fake_hub, capsys):  # noqa: F811
    assert cli_main(["push", str(lora_run), "me/sks-teapot-lora", "--token", TOKEN]) == 0
    assert "Pushed" in capsys.readouterr().out
    committed = sorted(fake_hub.committed)
    assert LORA_WEIGHT_NAME in committed and "README.md" in committed and "pytorch_gralora_weights.safetensors" not in committed
    assert not any("checkpoint" in name or name.endswith(".yaml") for name in committed)
    assert fake_hub.committed[LORA_WEIGHT_NAME] == (lora_run / LORA_WEIGHT_NAME).read_bytes()
    card = fake_hub.committed["README.md"].decode()
    assert "pipe.load_lora_weights" in card and "load_gralora_weights" not in card and f"base_model: {TINY_MODEL_ID}" in card
    from gralora_diffusion.outputs import is_our_card

    assert is_our_card(lora_run / "README.md")  # so a resumed or compared run may replace it


def test_push_to_hub_is_accepted_for_the_baseline(tmp_path):
    cfg = TrainConfig(pretrained_model_name_or_path=TINY_MODEL_ID, instance_data_dir=str(SAMPLES), instance_prompt=PROMPT,
                      output_dir=str(tmp_path / "out"), adapter="lora", push_to_hub=True, report_to="none")
    cfg.validate(need_model=False)  # it was refused: "the --adapter lora baseline stays local"


def test_a_dora_baseline_trains_and_is_not_exported_as_plain_lora(tmp_path, capsys):
    out = tmp_path / "dora"
    cfg = TrainConfig(pretrained_model_name_or_path=TINY_MODEL_ID, instance_data_dir=str(SAMPLES), instance_prompt=PROMPT,
                      output_dir=str(out), resolution=64, train_batch_size=1, max_train_steps=1, adapter="lora", use_dora=True,
                      rank=4, seed=0, report_to="none")
    result = train(cfg, pipeline=gd.tiny_sdxl_pipeline(seed=0))
    assert any("lora_magnitude_vector" in name for name, _ in result.components["unet"].named_parameters())
    assert cli_main(["export-lora", str(out), str(tmp_path / "x.safetensors"), "--format", "kohya"]) == 2
    assert "DoRA" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()


def test_the_baseline_card_names_its_familys_pipeline(tmp_path):
    """A LoRA baseline trained on a FLUX base: its card loads it with FluxPipeline in bf16, not SDXL's pipeline."""
    from gralora_diffusion.hub import save_model_card

    cfg = TrainConfig(pretrained_model_name_or_path="tiny", family="flux", instance_data_dir=str(SAMPLES), instance_prompt=PROMPT,
                      output_dir=str(tmp_path / "flux"), resolution=64, train_batch_size=1, max_train_steps=1, adapter="lora",
                      rank=4, seed=0, report_to="none")
    train(cfg)
    card = (tmp_path / "flux" / "README.md").read_text()  # the trainer's card
    assert "from diffusers import FluxPipeline" in card and "torch.bfloat16" in card and "pipe.load_lora_weights" in card
    assert "StableDiffusionXLPipeline" not in card and "float16)" not in card.replace("bfloat16)", "")
    again = save_model_card(tmp_path / "flux", family="flux").read_text()  # rewritten by hand: the family is given
    assert "from diffusers import FluxPipeline" in again
