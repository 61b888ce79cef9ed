"""A model card's `base_model` is a Hub model id or absent, never a local path or `tiny`: a base loaded
from a folder of the Hugging Face cache is named by its repo id (recorded in the adapter beside its path),
any other local folder leaves the field out."""

import pytest
import yaml
from conftest import PROMPT, SAMPLES
from safetensors import safe_open

import gralora_diffusion as gd
from gralora_diffusion.constants import WEIGHT_NAME
from gralora_diffusion.recorded_base import hub_id
from gralora_diffusion.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")


def test_hub_id_of_each_kind_of_base(tmp_path):
    snapshot = tmp_path / "hub" / "models--stabilityai--stable-diffusion-xl-base-1.0" / "snapshots" / "462165984030"
    (snapshot / "unet").mkdir(parents=True)
    (snapshot / "sd_xl_base_1.0.safetensors").write_bytes(b"")
    for inside in (snapshot, snapshot / "unet", snapshot / "sd_xl_base_1.0.safetensors"):
        assert hub_id(str(inside)) == "stabilityai/stable-diffusion-xl-base-1.0"
    assert hub_id("stabilityai/stable-diffusion-xl-base-1.0") == "stabilityai/stable-diffusion-xl-base-1.0"
    assert hub_id("gpt2") == "gpt2"
    for none in ("tiny", "world", str(tmp_path), str(tmp_path / "hub"), "/no/such/folder", "not an id", "a--b/c", None):
        assert hub_id(none) is None, none


def front_matter(card: str) -> dict:
    return yaml.safe_load(card.split("---")[1])


@pytest.mark.parametrize("cached", [True, False])
def test_the_card_names_the_hub_id_of_a_cached_base_and_no_local_path(tmp_path, cached):
    where = (tmp_path / "hub" / "models--me--tiny-sdxl" / "snapshots" / "abc") if cached else (tmp_path / "my-models" / "sdxl")
    gd.tiny_sdxl_pipeline(seed=0).save_pretrained(str(where))
    out = tmp_path / "out"
    train(TrainConfig(pretrained_model_name_or_path=str(where), instance_data_dir=str(SAMPLES), instance_prompt=PROMPT,
                      output_dir=str(out), resolution=64, train_batch_size=1, max_train_steps=1, rank=4, seed=0, report_to="none"))
    with safe_open(str(out / WEIGHT_NAME), "pt") as f:
        header = f.metadata()
    assert header["base_model"] == str(where.resolve())  # the path still finds the base on this machine
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    if cached:
        assert header["base_model_hub_id"] == "me/tiny-sdxl" and meta["base_model"] == "me/tiny-sdxl"
        assert 'from_pretrained("me/tiny-sdxl"' in card and str(where) not in card and "hub/models--" not in card
    else:
        assert "base_model_hub_id" not in header and "base_model" not in meta
        assert str(where.resolve()) in card  # the text still says which base it was trained on
