"""`compare --benchmark world-bench`: subjects drawn deterministically and never a world scene; the
metrics on known answers (drift 0 for the base against itself, a variant against an identical one:
paired difference exactly 0); a 2-subject run writes results.json with intervals and resumes without
retraining; the command line's benchmark errors are one line, exit 2."""

import json

import pytest
import torch

from gralora_diffusion.benchmark_world import WorldBenchScorer
from gralora_diffusion.cli import main as cli_main
from gralora_diffusion.metrics import drift
from gralora_diffusion.stats import excludes_zero, interval, paired_difference
from gralora_diffusion.world.draw import BACKGROUNDS, COLOURS, OBJECTS, render
from gralora_diffusion.world.subjects import SUBJECTS

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def test_subjects_are_drawn_the_same_every_time_and_are_not_world_scenes():
    assert len(SUBJECTS) >= 10 and len({s.name for s in SUBJECTS}) == len(SUBJECTS)
    for subject in SUBJECTS:
        images = subject.instance_images()
        assert 4 <= len(images) <= 6
        assert [im.tobytes() for im in images] == [im.tobytes() for im in subject.instance_images()]
        assert subject.obj in OBJECTS and subject.colour in COLOURS and not subject.is_world_scene
        # the world's own picture of the class in the subject's colour looks different from the subject
        if subject.obj != "teapot" or subject.colour != "red":
            world, _, _ = render(0, 0, subject.obj, subject.colour, "plain")
            assert all(im.tobytes() != world.tobytes() for im in images)
        prompts = subject.prompts()
        assert len(prompts["recontext"]) == len(BACKGROUNDS) and prompts["subject"] == [subject.instance_prompt]
        assert all(subject.colour not in p and subject.obj in p for p in prompts["prior"])
        assert prompts["unrelated"] and all(subject.obj not in p and "sks" not in p for p in prompts["unrelated"])


def test_drift_and_intervals_on_known_answers():
    x = torch.randn(6, 16)
    assert drift(x, x) == pytest.approx(0, abs=1e-6) and drift(x, -x) == pytest.approx(1, abs=1e-6)
    assert interval([0.5] * 8) == {"mean": 0.5, "low": 0.5, "high": 0.5, "n": 8}
    values = {("a", 0): 0.3, ("b", 0): 0.7, ("c", 0): 0.5}
    same = paired_difference(values, dict(values))
    assert (same["low"], same["high"]) == (0.0, 0.0) and not excludes_zero(same)
    shifted = paired_difference({k: v + 0.1 for k, v in values.items()}, values)
    assert shifted["mean"] == pytest.approx(0.1) and excludes_zero(shifted)
    spread = interval([0.1, 0.9, 0.4, 0.6, 0.5])
    assert spread["low"] < spread["mean"] < spread["high"] and spread == interval([0.1, 0.9, 0.4, 0.6, 0.5])  # seeded


def test_base_model_against_itself_drifts_zero():
    from gralora_diffusion.evaluate import generate_grid, score_images
    from gralora_diffusion.world.evaluator import WorldEvaluator
    from gralora_diffusion.world.model import tiny_world_pipeline

    subject, pipe = SUBJECTS[0], tiny_world_pipeline()
    pipe.set_progress_bar_config(disable=True)
    prompts = [p for ps in subject.prompts().values() for p in ps]
    first = generate_grid(pipe, prompts, [0], steps=2, resolution=64)
    again = generate_grid(pipe, prompts, [0], steps=2, resolution=64)
    unrelated = subject.prompts()["unrelated"]
    base = {p: first[prompts.index(p)] for p in unrelated}
    scores = score_images([WorldBenchScorer(subject, WorldEvaluator.load(), base)], again, prompts)
    assert scores["drift"] == pytest.approx(0, abs=1e-6)
    assert set(scores) == {"fidelity", "recontext", "prior", "drift"} and 0 <= scores["recontext"] <= 1


VARIANTS = ["lora:r=4", "gralora:r=4,k=2", "lora:r=4,alpha=8"]  # the last is the first again (alpha 2r is the default)


def bench_flags(out):
    return ["compare", "--benchmark", "world-bench", "--subjects", "2", "--max_train_steps", "2", "--checkpointing_steps", "2",
            "--num_inference_steps", "2", "--eval_seeds", "0", "--output_dir", str(out), "--num_threads", "1", "--variants", *VARIANTS]


@pytest.mark.slow
def test_two_subjects_write_results_with_intervals_and_resume(tmp_path, capsys):
    out = tmp_path / "bench"
    assert cli_main(bench_flags(out)) == 0
    printed = capsys.readouterr().out
    assert "paired difference against lora_r4" in printed and "[" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["subjects"] == [s.name for s in SUBJECTS[:2]] and results["baseline"] == "lora_r4"
    assert len(results["runs"]) == 2 * len(VARIANTS)
    for variant in results["variants"]:
        assert variant["runs"] == 2 and variant["parameters"] > 0
        for metric in ("fidelity", "recontext", "prior", "drift"):
            stat = variant["metrics"][metric]
            assert stat["n"] == 2 and stat["low"] <= stat["mean"] <= stat["high"]
    itself = results["variants"][2]["vs_baseline"]
    assert all(itself[m] == {"mean": 0.0, "low": 0.0, "high": 0.0, "n": 2} for m in results["metrics"])  # same runs, same numbers
    assert all(0 <= r["metrics"]["drift"] <= 1 for r in results["runs"])
    done = out / SUBJECTS[0].name / "lora_r4" / "seed0"
    before = {p: p.stat().st_mtime_ns for p in done.rglob("*") if p.is_file()}
    assert cli_main(bench_flags(out)) == 0  # run again, as after a kill: nothing is retrained
    assert {p: p.stat().st_mtime_ns for p in done.rglob("*") if p.is_file()} == before
    assert json.loads((out / "results.json").read_text())["runs"] == results["runs"]


@pytest.mark.parametrize("argv, words", [
    (["--subjects", "2"], "--benchmark"),
    (["--benchmark", "world-bench", "--instance_data_dir", "samples"], "leave out --instance_data_dir"),
    (["--benchmark", "world-bench", "--pretrained_model_name_or_path", "tiny"], "world base"),
    (["--benchmark", "world-bench", "--subjects", "99"], "1 to"),
    (["--benchmark", "dreambench"], "--benchmark_dir"),
])
def test_benchmark_flag_errors_are_one_line_exit_2(tmp_path, capsys, argv, words):
    assert cli_main(["compare", *argv, "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1


def test_a_setting_added_later_keeps_finished_runs():
    from gralora_diffusion.compare import changed_settings, comparable
    from gralora_diffusion.train import TrainConfig

    cfg = TrainConfig(instance_data_dir="x", rank=8)
    older = {k: v for k, v in comparable(cfg).items() if k != "early_stop_patience"}  # written before that flag existed
    assert changed_settings(older, cfg) == []
    assert changed_settings({**older, "rank": 4}, cfg) == ["rank"]
    assert changed_settings(older, TrainConfig(instance_data_dir="x", rank=8, early_stop_patience=2)) == ["early_stop_patience"]


def test_a_path_spelled_another_way_is_the_same_run(tmp_path, monkeypatch):
    """A folder given relative from one directory and absolute (or through a link) from another is one setting;
    a different folder, or a Hub id, still counts as changed."""
    from gralora_diffusion.compare import changed_settings, comparable
    from gralora_diffusion.train import TrainConfig

    (tmp_path / "study" / "subjects" / "ball").mkdir(parents=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "study")
    monkeypatch.chdir(tmp_path)
    saved = comparable(TrainConfig(instance_data_dir="study/subjects/ball", pretrained_model_name_or_path="world"))
    for spelling in (str(tmp_path / "study/subjects/ball"), "link/subjects/ball", "./study/subjects/../subjects/ball"):
        assert changed_settings(saved, TrainConfig(instance_data_dir=spelling, pretrained_model_name_or_path="world")) == []
    monkeypatch.chdir(tmp_path / "other")  # an older record that kept the relative spelling, read from elsewhere
    relative = {**saved, "instance_data_dir": "study/subjects/ball"}
    assert changed_settings(relative, TrainConfig(instance_data_dir=str(tmp_path / "study/subjects/ball"),
                                                  pretrained_model_name_or_path="world")) == ["instance_data_dir"]
    monkeypatch.chdir(tmp_path)
    assert changed_settings(relative, TrainConfig(instance_data_dir=str(tmp_path / "study/subjects/ball"),
                                                  pretrained_model_name_or_path="world")) == []
    assert changed_settings(saved, TrainConfig(instance_data_dir="other", pretrained_model_name_or_path="world")) == ["instance_data_dir"]
    assert changed_settings(saved, TrainConfig(instance_data_dir="study/subjects/ball",
                                               pretrained_model_name_or_path="tiny")) == ["pretrained_model_name_or_path"]


def test_a_variant_with_its_own_quantized_base_is_scored_on_that_base(tmp_path, capsys, monkeypatch):
    """`--benchmark` with `quantize_base=int8` in one variant: it trains over an int8 base and is scored on
    the base quantized the same way, loaded once for every subject; the base images stay unquantized."""
    import gralora_diffusion.bases as bases

    loads, real = [], bases.load_base

    def counting(*args, **kwargs):
        loads.append(kwargs.get("quantize_base", "none"))
        return real(*args, **kwargs)

    monkeypatch.setattr(bases, "load_base", counting)
    out = tmp_path / "bench"
    argv = ["compare", "--benchmark", "world-bench", "--subjects", "2", "--max_train_steps", "1", "--checkpointing_steps", "1",
            "--num_inference_steps", "2", "--eval_seeds", "0", "--output_dir", str(out), "--num_threads", "1",
            "--variants", "gralora:r=4,k=2", "gralora:r=4,k=2,quantize_base=int8"]
    assert cli_main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert [v["name"] for v in results["variants"]] == ["gralora_r4_k2", "gralora_r4_k2_qint8"] and len(results["runs"]) == 4
    # two trainings over int8 (the trainer loads its own base) and one int8 base scoring both subjects
    assert loads.count("int8") == 3 and loads[0] == "none"
    from gralora_diffusion.compare import read_record

    record = read_record(out / SUBJECTS[0].name / "gralora_r4_k2_qint8" / "seed0")
    assert record["config"]["quantize_base"] == "int8"
