"""Issue 25's smaller items: each fixed where the rule lives."""

import pytest
from conftest import PROMPT, SAMPLES

from gralora_diffusion.cli import main as cli_main
from gralora_diffusion.evaluate import EvaluationResult, VariantResult, format_table
from gralora_diffusion.quiet import clip_words
from gralora_diffusion.train import TrainConfig
from gralora_diffusion.train.loop import TrainResult


def test_resume_path_is_never_doubled(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["train", "--pretrained_model_name_or_path", "tiny", "--instance_data_dir", str(SAMPLES), "--instance_prompt", PROMPT,
            "--output_dir", "run"]
    assert cli_main(args + ["--resume_from_checkpoint", "run/checkpoint-999"]) == 2
    err = capsys.readouterr().err
    assert "run/run" not in err and "run/checkpoint-999 is not a complete checkpoint" in err
    cfg = TrainConfig(output_dir="run")
    assert str(cfg.checkpoint_path("checkpoint-5")) == "run/checkpoint-5"  # a bare name: inside --output_dir


def test_metric_model_error_says_how_to_skip_and_is_not_cut_mid_word(tmp_path, capsys):
    assert cli_main(["evaluate", "--instance_data_dir", str(SAMPLES), "--dino_model", "someone/not-cached-dino",
                     "--output_dir", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "`--dino_model none` to skip DINO" in err
    assert clip_words("alpha beta gamma", 12) == "alpha beta ..." and clip_words("short", 12) == "short"


def test_results_table_columns_line_up_with_long_metric_names():
    variants = [VariantResult("base", None, None, {"dino": 0.5, "world_subject_fidelity": 0.25}, []),
                VariantResult("a-long-adapter-name", "x", "gralora", {"dino": 0.75, "world_subject_fidelity": 0.125}, [])]
    lines = format_table(EvaluationResult("tiny", [PROMPT], [0], 1, variants, {})).splitlines()
    assert len({len(line) for line in lines}) == 1  # every row as wide as the header
    assert lines[0].index("world_subject_fidelity") + len("world_subject_fidelity") == lines[0].rstrip().__len__()


def test_printing_a_train_result_is_short():
    import gralora_diffusion as gd

    result = TrainResult("out", "out/a.safetensors", 10, losses=[0.1] * 1000, pipeline=gd.tiny_sdxl_pipeline(seed=0))
    assert len(repr(result)) < 300


def test_resolution_defaults_to_the_bases_own(tmp_path, capsys):
    """No --resolution: the base's sample size x VAE factor (64 for tiny), not SDXL's 1024."""
    import yaml

    from gralora_diffusion.train import train

    cfg = TrainConfig(pretrained_model_name_or_path="tiny", instance_data_dir=str(SAMPLES), instance_prompt=PROMPT,
                      output_dir=str(tmp_path / "run"), train_batch_size=1, max_train_steps=1, rank=4, seed=0,
                      report_to="none", checkpointing_steps=100)
    assert cfg.resolution is None
    train(cfg)
    assert cfg.resolution == 64
    assert "Resolution: 64 px, the base's own" in capsys.readouterr().out
    saved = yaml.safe_load((tmp_path / "run" / "training_config.yaml").read_text())
    assert saved["resolution"] == 64


def test_a_local_base_is_recorded_absolute_and_used_when_no_base_is_given(tmp_path, monkeypatch, capsys):
    """Bases remembered: trained on a relative folder, the adapter records its absolute path, and
    generate from another folder finds it without --base."""
    from gralora_diffusion.bases import save_tiny
    from gralora_diffusion.recorded_base import recorded_base
    from gralora_diffusion.train import train

    monkeypatch.chdir(tmp_path)
    save_tiny("sdxl", "models/tiny-sdxl")
    train(TrainConfig(pretrained_model_name_or_path="models/tiny-sdxl", instance_data_dir=str(SAMPLES), instance_prompt=PROMPT,
                      output_dir="run", train_batch_size=1, max_train_steps=1, rank=4, seed=0, report_to="none",
                      checkpointing_steps=100))
    adapter = tmp_path / "run" / "pytorch_gralora_weights.safetensors"
    assert recorded_base(adapter) == str((tmp_path / "models" / "tiny-sdxl").resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert cli_main(["generate", "--adapter", str(adapter), "--prompt", PROMPT, "--steps", "1", "--output_dir", "gen"]) == 0
    assert f"Base model: {(tmp_path / 'models' / 'tiny-sdxl').resolve()} (recorded in" in capsys.readouterr().out


def test_world_scores_itself_when_dino_and_clip_are_not_cached(tmp_path, capsys):
    """Offline defaults: on `world`, the default DINO/CLIP models that are not in the cache are left out,
    said in one line; an explicitly named one that is missing is still an error."""
    args = ["evaluate", "--base", "world", "--instance_data_dir", str(SAMPLES), "--steps", "1", "--seeds", "0",
            "--prompt", PROMPT]
    assert cli_main(args + ["--output_dir", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    said = [line for line in out.splitlines() if line.startswith("Scoring with world's own evaluator")]
    assert len(said) == 1 and "--dino_model facebook/dino-vits16" in said[0] and "world_fidelity" in out
    assert cli_main(args + ["--dino_model", "someone/not-cached-dino", "--output_dir", str(tmp_path / "b")]) == 2


@pytest.mark.slow
def test_base_load_failures_are_one_line_naming_what_was_tried(tmp_path):
    """A missing folder is not taken for a Hub id; a Hub id neither cached nor reachable (online, the
    endpoint refusing) says both; the library's own lines stay quiet; nothing is created."""
    import subprocess
    import sys

    from conftest import SUBPROCESS_ENV

    env = {**SUBPROCESS_ENV, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    cases = [("./no_such_folder/tiny-sdxl", "no such folder"),
             ("someone/not-cached", "not in the local Hugging Face cache and not downloadable here (no network or no such repo)")]
    for base, text in cases:
        out = tmp_path / "gen"
        result = subprocess.run([sys.executable, "-m", "gralora_diffusion.cli", "generate", "--base", base, "--prompt", "x",
                                 "--output_dir", str(out)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        ours = [line for line in result.stderr.splitlines() if line.startswith("gralora-diffusion generate: error:")]
        assert result.returncode == 2 and len(ours) == 1 and text in ours[0] and base in ours[0], result.stderr
        assert "Couldn't connect" not in result.stderr and "stacktrace" not in result.stderr
        assert not out.exists()
