"""`compare` end to end on the tiny SDXL with tiny random DINO/CLIP models, offline: two variants write
results.json (two entries with numeric metrics, step time, memory) and the grid; a killed comparison
resumes where it was, leaving finished runs alone; changed settings are refused. `train
--validation_metrics` logs the metrics to TensorBoard at every validation."""

import json
import shutil

import pytest
from PIL import Image

import gralora_diffusion as gd
from conftest import PROMPT, SAMPLES
from gralora_diffusion.cli import main as cli_main
from gralora_diffusion.compare import parse_variant, parse_variants
from gralora_diffusion.errors import GraloraConfigError, TrainConfigError
from gralora_diffusion.evaluate import subject_of
from gralora_diffusion.tiny_scorers import save_tiny_scorers
from gralora_diffusion.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py
VARIANTS = ["gralora:r=4,k=2", "lora:r=4"]
EVAL_PROMPTS = [PROMPT, "a red sks teapot"]


@pytest.fixture(scope="module")
def scorers(tmp_path_factory):
    dino, clip = save_tiny_scorers(tmp_path_factory.mktemp("scorers"))
    return str(dino), str(clip)


def flags(out, scorers, steps=4):
    return ["--pretrained_model_name_or_path", "tiny", "--instance_data_dir", str(SAMPLES), "--instance_prompt", PROMPT,
            "--resolution", "64", "--train_batch_size", "2", "--max_train_steps", str(steps), "--checkpointing_steps", "2",
            "--learning_rate", "3e-3", "--num_inference_steps", "2", "--report_to", "none", "--output_dir", str(out),
            "--dino_model", scorers[0], "--clip_model", scorers[1], "--eval_seeds", "0",
            *(a for p in EVAL_PROMPTS for a in ("--eval_prompt", p))]


@pytest.fixture(scope="module")
def compared(tmp_path_factory, scorers):
    out = tmp_path_factory.mktemp("compare") / "out"
    assert cli_main(["compare", *flags(out, scorers), "--variants", *VARIANTS, "--num_threads", "1"]) == 0
    return out


def test_results_json_has_one_entry_per_variant_with_numbers(compared):
    entries = json.loads((compared / "results.json").read_text())
    assert [e["name"] for e in entries] == ["gralora_r4_k2", "lora_r4"]
    assert [e["kind"] for e in entries] == ["gralora", "lora"]
    assert entries[0]["parameters"] == entries[1]["parameters"] > 0  # same r: same count, r * (in + out) per layer
    for e in entries:
        assert set(e["metrics"]) >= {"dino", "clip_i", "clip_t"}
        assert all(isinstance(m["mean"], float) and len(m["values"]) == 1 for m in e["metrics"].values())
        assert e["step_time_s"]["mean"] > 0 and e["peak_memory_mb"]["mean"] > 0
        assert e["settings"]["steps"] == 4 and e["seeds"] == [0]
    assert entries[0]["settings"]["gralora_k"] == 2 and entries[1]["settings"]["gralora_k"] is None


def test_grid_has_the_base_then_every_variant(compared):
    with Image.open(compared / "grid.png") as grid, Image.open(compared / "base" / "eval" / "p0-s0.png") as cell:
        assert grid.width >= 3 * cell.width and grid.height >= len(EVAL_PROMPTS) * cell.height
    for folder in ("base", "gralora_r4_k2/seed0", "lora_r4/seed0"):
        assert sorted(p.name for p in (compared / folder / "eval").iterdir()) == ["p0-s0.png", "p1-s0.png"]


def test_killed_comparison_resumes_where_it_was(compared, scorers, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(compared, out)
    done = out / "gralora_r4_k2" / "seed0"
    killed = out / "lora_r4" / "seed0"  # as if killed after its step-2 checkpoint
    for path in (killed / "run.json", killed / "pytorch_lora_weights.safetensors", out / "results.json"):
        path.unlink()
    shutil.rmtree(killed / "checkpoint-4")
    before = {p: p.stat().st_mtime_ns for p in done.rglob("*") if p.is_file()}
    assert cli_main(["compare", *flags(out, scorers), "--variants", *VARIANTS]) == 0  # run again, as after a kill
    assert {p: p.stat().st_mtime_ns for p in done.rglob("*") if p.is_file()} == before  # finished run untouched
    record = json.loads((killed / "run.json").read_text())
    assert record["train"]["resumed_at"] == 2 and record["train"]["steps"] == 4
    assert "Resumed from" in (killed / "train.log").read_text()
    assert [e["name"] for e in json.loads((out / "results.json").read_text())] == ["gralora_r4_k2", "lora_r4"]


def test_changed_settings_are_refused(compared, scorers, capsys):
    assert cli_main(["compare", *flags(compared, scorers, steps=6), "--variants", *VARIANTS]) == 2
    assert "max_train_steps" in capsys.readouterr().err


def test_parse_variants():
    assert parse_variant("gralora:r=32,k=4").name == "gralora_r32_k4"
    assert parse_variant("gralora:r=16,k=2,hybrid_r=8").name == "gralora_r16_k2_h8"
    assert dict(parse_variant("lora:r=32,lr=2e-4").settings) == {"adapter": "lora", "rank": 32, "learning_rate": 2e-4}
    assert dict(parse_variant("dora:r=8").settings) == {"adapter": "lora", "use_dora": True, "rank": 8}
    assert parse_variant("dora:r=8").name == "dora_r8"
    for bad, message in (("loha:r=8", "gralora:, lora: or dora:"), ("dora:r=8,k=2", "GraLoRA settings"),
                         ("gralora:rank8", "KEY=VALUE"), ("gralora:r=x", "not a int"),
                         ("lora:r=8,k=2", "GraLoRA settings")):
        with pytest.raises(GraloraConfigError, match=message):
            parse_variant(bad)
    with pytest.raises(GraloraConfigError, match="given twice"):
        parse_variants(["lora:r=8", "lora:r=8"])
    assert subject_of("a photo of sks teapot") == "sks teapot" and subject_of("An image of the sks dog") == "sks dog"


def test_compare_runs_a_dora_variant(scorers, tmp_path):
    out = tmp_path / "out"
    assert cli_main(["compare", *flags(out, scorers, steps=2), "--variants", "dora:r=8", "--num_threads", "1"]) == 0
    entries = json.loads((out / "results.json").read_text())
    assert [e["name"] for e in entries] == ["dora_r8"] and set(entries[0]["metrics"]) >= {"dino", "clip_i", "clip_t"}
    settings = (out / "dora_r8" / "seed0" / "training_config.yaml").read_text()
    assert "use_dora: true" in settings and "adapter: lora" in settings


def test_validation_metrics_are_logged_to_tensorboard(scorers, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = TrainConfig(pretrained_model_name_or_path="tiny", instance_data_dir=str(SAMPLES), instance_prompt=PROMPT,
                      resolution=64, train_batch_size=2, max_train_steps=2, checkpointing_steps=10, learning_rate=3e-3,
                      validation_prompt=PROMPT, num_validation_images=2, validation_steps=1, num_inference_steps=2,
                      validation_metrics=True, dino_model=scorers[0], clip_model=scorers[1], seed=0,
                      output_dir=str(tmp_path / "run"), report_to="tensorboard")
    train(cfg, pipeline=gd.tiny_sdxl_pipeline(seed=0))
    events = EventAccumulator(str(tmp_path / "run" / "logs" / "gralora-dreambooth")).Reload()  # Accelerate: logs/<project>
    for name in ("dino", "clip_i", "clip_t"):
        steps = [e.step for e in events.Scalars(f"validation/{name}")]
        assert steps == [1, 2] and all(-1 <= e.value <= 1 for e in events.Scalars(f"validation/{name}"))
    with pytest.raises(GraloraConfigError, match="nothing to score with"):
        train(TrainConfig(**{**cfg.to_dict(), "dino_model": "none", "clip_model": "none", "output_dir": str(tmp_path / "none")}),
              pipeline=gd.tiny_sdxl_pipeline(seed=0))
    with pytest.raises(TrainConfigError, match="--validation_prompt"):
        TrainConfig(instance_data_dir=str(SAMPLES), validation_metrics=True).validate(need_model=False)
