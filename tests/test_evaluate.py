"""`evaluate` end to end on the tiny pipeline with tiny random DINO/CLIP models, offline: a GraLoRA
adapter and its exact LoRA exports (diffusers and kohya keys, loaded by diffusers' own
`load_lora_weights`) score the same; the kind of adapter is read from the file; loading and
unloading leave the pipeline as it was; the table, JSON and grid are written; extra scorers plug in."""

import json

import numpy as np
import pytest
import torch
from conftest import randomize_gralora_B
pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py
from PIL import Image

import gralora_diffusion as gd
from gralora_diffusion.any_adapter import GRALORA, HUB, LORA, adapter_kind, load_any_adapter, loaded_adapter
from gralora_diffusion.cli import main as cli_main
from gralora_diffusion.errors import GraloraConfigError
from gralora_diffusion.evaluate import evaluate_adapter, format_table
from gralora_diffusion.grids import adapter_label
from gralora_diffusion.metrics import EmbeddingScorer
from gralora_diffusion.tiny_scorers import save_tiny_scorers

PROMPTS = ["a photo of sks teapot", "a sks teapot in the snow"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A GraLoRA adapter (UNet and both text encoders, random B), its exact LoRA exports, tiny
    scorer models and a folder of instance images."""
    root = tmp_path_factory.mktemp("evaluate")
    pipe = gd.patch_pipeline(gd.tiny_sdxl_pipeline(seed=0))
    gd.add_gralora(pipe, r=4, gralora_k=2, text_encoder_targets="attn")
    for component in ("unet", "text_encoder", "text_encoder_2"):
        randomize_gralora_B(getattr(pipe, component), std=0.3)
    gralora = pipe.save_gralora_weights(root / "gralora")
    gd.export_lora(gralora, root / "lora" / "pytorch_lora_weights.safetensors")
    gd.export_lora(gralora, root / "kohya.safetensors", format="kohya")
    dino, clip = save_tiny_scorers(root / "scorers")
    (root / "instance").mkdir()
    for i, colour in enumerate(["red", "teal", "orange"]):
        Image.new("RGB", (64, 64), colour).save(root / "instance" / f"{i}.png")
    return {"root": root, "gralora": root / "gralora", "lora": root / "lora", "kohya": root / "kohya.safetensors",
            "dino": str(dino), "clip": str(clip), "instance": root / "instance"}


@pytest.fixture(scope="module")
def result(files):
    adapters = [str(files["gralora"]), ("lora", str(files["lora"])), str(files["kohya"])]
    return evaluate_adapter("tiny", adapters, instance_data_dir=files["instance"], prompts=PROMPTS, seeds=[0, 1],
                            steps=1, dino_model=files["dino"], clip_model=files["clip"],
                            output_dir=files["root"] / "out", progress=False)


def test_adapter_kind_read_from_the_file(files):
    assert adapter_kind(files["gralora"])[0] == GRALORA  # folder with our file
    assert adapter_kind(files["gralora"] / gd.WEIGHT_NAME)[0] == GRALORA
    assert adapter_kind(files["lora"]) == (LORA, str(files["lora"] / "pytorch_lora_weights.safetensors"))
    assert adapter_kind(files["kohya"])[0] == LORA
    renamed = files["root"] / "renamed.safetensors"  # the name says nothing: the keys decide
    renamed.write_bytes((files["gralora"] / gd.WEIGHT_NAME).read_bytes())
    assert adapter_kind(renamed)[0] == GRALORA
    assert adapter_kind("someone/some-adapter")[0] == HUB


@pytest.mark.parametrize("which", ["gralora", "lora", "kohya"])
def test_load_and_unload_any_adapter_leaves_the_pipeline_as_it_was(files, which):
    pipe = gd.patch_pipeline(gd.tiny_sdxl_pipeline(seed=0))

    def image():
        return pipe("a sks teapot", num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="np").images

    before = image()
    with loaded_adapter(pipe, files[which], "a") as kind:
        assert kind == (GRALORA if which == "gralora" else LORA)
        assert np.abs(image() - before).max() > 0.01  # the adapter acts
    assert np.abs(image() - before).max() == 0
    assert load_any_adapter(pipe, files[which], "again") == kind  # the name is free again


def test_evaluate_scores_base_and_every_adapter(result):
    assert [v.name for v in result.variants] == ["base", "gralora", "lora", "kohya"]
    assert [v.kind for v in result.variants] == [None, GRALORA, LORA, LORA]
    for v in result.variants:
        assert set(v.metrics) == {"dino", "clip_i", "clip_t"}
        assert all(-1.0 <= x <= 1.0 for x in v.metrics.values())
        assert len(v.images) == len(PROMPTS) and all(len(row) == 2 for row in v.images)
    base, gralora, lora, kohya = result.variants
    assert np.abs(np.asarray(gralora.images[0][0], float) - np.asarray(base.images[0][0], float)).max() > 2
    for exported in (lora, kohya):  # an exact export: the same images, so the same scores
        for name, value in gralora.metrics.items():
            assert exported.metrics[name] == pytest.approx(value, abs=1e-4)


def test_evaluate_writes_json_grid_and_table(result, files):
    data = json.loads((files["root"] / "out" / "results.json").read_text())
    assert data["prompts"] == PROMPTS and data["seeds"] == [0, 1] and data["instance_images"] == 3
    assert data["identifier"] == "sks" and data["dino_model"] == files["dino"]
    assert [v["metrics"]["dino"] for v in data["variants"]] == pytest.approx([v.metrics["dino"] for v in result.variants])
    grid = Image.open(result.grid)
    cell_w = 2 * 64  # two seeds side by side
    assert grid.size[0] > 4 * cell_w and grid.size[1] > 2 * 64
    table = format_table(result).splitlines()
    assert table[0].split() == ["variant", "kind", "dino", "clip_i", "clip_t"]
    assert table[2].split()[:2] == ["gralora", "gralora"] and len(table) == 5


def test_extra_scorers_replace_or_join_the_default_ones(files):
    def mean_colour(batch):
        return torch.stack([torch.tensor(np.asarray(im, dtype=np.float32).mean((0, 1))) for im in batch])

    seen = []

    def counting(images, prompts):
        seen.append((len(images), list(prompts)))
        return {"count": len(images)}

    instance = [Image.new("RGB", (64, 64), "red")]
    res = evaluate_adapter("tiny", [], instance_images=instance, prompts=PROMPTS[:1], seeds=[3], steps=1,
                           scorers=[EmbeddingScorer(mean_colour, instance, "world_fidelity"), counting], progress=False)
    assert set(res.variants[0].metrics) == {"world_fidelity", "count"}
    assert 0 < res.variants[0].metrics["world_fidelity"] < 1
    assert seen == [(1, PROMPTS[:1])]


def test_labels():
    assert adapter_label("runs/gralora/pytorch_gralora_weights.safetensors") == "gralora"
    assert adapter_label("runs/lora/pytorch_lora_weights.safetensors") == "lora"
    assert adapter_label("x/lora_r8.safetensors") == "lora_r8"
    assert adapter_label("runs/k4") == "k4"


def test_cli_evaluate(files, tmp_path, capsys):
    rc = cli_main(["evaluate", "--adapter", f"mine={files['gralora']}", "--instance_data_dir", str(files["instance"]),
                   "--prompt", "a sks teapot", "--seeds", "0", "--steps", "1", "--dino_model", files["dino"],
                   "--clip_model", "none", "--output_dir", str(tmp_path / "out"), "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert rc == 0
    table = [line for line in out.splitlines() if not line.startswith(("CPU threads:", "Loading base model"))]
    assert table[0].split() == ["variant", "kind", "dino"] and "mine" in out
    data = json.loads((tmp_path / "r.json").read_text())
    assert [v["name"] for v in data["variants"]] == ["base", "mine"] and data["clip_model"] is None
    assert (tmp_path / "out" / "grid.png").is_file() and (tmp_path / "out" / "results.json").is_file()


@pytest.mark.parametrize("argv, message", [
    (["--instance_data_dir", "nowhere"], "--instance_data_dir nowhere: no such folder"),
    (["--seeds", "a,b"], "--seeds 'a,b': give integers"),
    (["--resolution", "60"], "--resolution 60: a positive multiple of 8"),
    (["--adapter", "./missing.safetensors"], "no such adapter file"),
    (["--dino_model", "./no/dino"], "--dino_model ./no/dino: no such folder"),
])
def test_cli_errors_are_one_line(files, tmp_path, capsys, argv, message):
    args = ["evaluate", "--instance_data_dir", str(files["instance"]), "--steps", "1", "--output_dir", str(tmp_path)]
    assert cli_main(args + argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_no_instance_images_is_an_error():
    with pytest.raises(GraloraConfigError, match="instance images"):
        evaluate_adapter("tiny", [], prompts=PROMPTS, steps=1, progress=False)
