"""`compare --benchmark dreambench`: DreamBooth's dataset layout read from a tiny folder (a folder per
subject, prompts_and_classes.txt as the dataset ships it), the paper's 25 prompts per subject (live or
object list), and a run on the tiny SDXL scored with tiny random DINO/CLIP models (offline; their
numbers mean nothing, the code paths are the real ones). Not run on the real data here."""

import json
import shutil

import pytest

from conftest import SAMPLES
from gralora_diffusion.benchmark_dreambench import LIVE_PROMPTS, OBJECT_PROMPTS, read_classes, subject_prompts
from gralora_diffusion.cli import main as cli_main
from gralora_diffusion.errors import GraloraConfigError
from gralora_diffusion.tiny_scorers import save_tiny_scorers

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

CLASSES_TEXT = """Classes
subject_name,class
dog,dog
teapot,teapot
bear_plushie,stuffed animal

Prompts
Object Prompts
prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a {0} {1} in the snow'.format(unique_token, class_token),
]
"""


@pytest.fixture
def dataset(tmp_path):
    folder = tmp_path / "dataset"
    for name in ("dog", "teapot", "bear_plushie"):
        (folder / name).mkdir(parents=True)
        for i, path in enumerate(sorted(SAMPLES.glob("*.png"))[:2]):
            shutil.copy(path, folder / name / f"0{i}.png")
    (folder / "prompts_and_classes.txt").write_text(CLASSES_TEXT)
    return folder


def test_reader_takes_the_classes_and_the_papers_prompts(dataset):
    assert read_classes(dataset) == {"dog": "dog", "teapot": "teapot", "bear_plushie": "stuffed animal"}
    assert len(OBJECT_PROMPTS) == len(LIVE_PROMPTS) == 25
    dog, teapot = subject_prompts("dog"), subject_prompts("teapot")
    assert "a sks dog wearing a santa hat" in dog["subject"] and len(dog["subject"]) == 25
    assert "a sks teapot floating in an ocean of milk" in teapot["subject"] and len(teapot["subject"]) == 25
    assert all("sks" not in p for p in teapot["unrelated"])


def test_reader_errors_name_the_folder_and_what_to_do(dataset):
    from gralora_diffusion.benchmark_dreambench import dreambench
    from gralora_diffusion.train import TrainConfig

    shutil.rmtree(dataset / "teapot")
    with pytest.raises(GraloraConfigError, match="names teapot but there is no such subject folder"):
        dreambench(dataset, TrainConfig())
    (dataset / "prompts_and_classes.txt").unlink()
    with pytest.raises(GraloraConfigError, match="no prompts_and_classes.txt"):
        read_classes(dataset)


@pytest.mark.slow
def test_one_subject_run_scores_dino_clip_and_drift(dataset, tiny_dir, tmp_path):
    dino, clip = save_tiny_scorers(tmp_path / "scorers")
    out = tmp_path / "out"
    argv = ["compare", "--benchmark", "dreambench", "--benchmark_dir", str(dataset), "--subjects", "1",
            "--pretrained_model_name_or_path", str(tiny_dir), "--resolution", "64", "--train_batch_size", "2",
            "--max_train_steps", "2", "--checkpointing_steps", "2", "--num_inference_steps", "1", "--eval_seeds", "0",
            "--dino_model", str(dino), "--clip_model", str(clip), "--report_to", "none", "--output_dir", str(out),
            "--variants", "lora:r=4", "--num_threads", "1"]
    assert cli_main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["benchmark"] == "dreambench" and results["subjects"] == ["bear_plushie"]
    (run,) = results["runs"]
    assert set(run["metrics"]) == {"dino", "clip_i", "clip_t", "drift"} and 0 <= run["metrics"]["drift"] <= 1
    assert len(list((out / "bear_plushie" / "lora_r4" / "seed0" / "eval").glob("*.png"))) == 25 + 2
    assert results["base"]["dino"]["n"] == 1 and results["base"]["drift"]["n"] == 0  # the base is the drift's reference
