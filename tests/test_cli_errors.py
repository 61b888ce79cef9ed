"""Every command given nonsense exits with code 2 and one readable line on stderr that names the
argument; with --debug the traceback comes instead. Checks run in-process through `cli.main`, plus
the real console entry in a subprocess (exit code, stderr exactly one line)."""

import subprocess
import sys

import pytest

import gralora_diffusion as gd
from gralora_diffusion.cli import main
from gralora_diffusion.errors import GraloraError

PROMPT = "a photo of sks teapot"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A plain file, a folder with one image, a real adapter file and a real (tiny) model folder."""
    from PIL import Image

    root = tmp_path_factory.mktemp("cli-errors")
    (root / "a_file.txt").write_text("not a folder, not an adapter")
    (root / "latin1_prompts.txt").write_bytes("a photo of sks teapot\n# comment\na caf\xe9 teapot\n".encode("latin-1"))
    (root / "images").mkdir()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(root / "images" / "a.png")
    pipe = gd.patch_pipeline(gd.tiny_sdxl_pipeline(seed=0))
    gd.add_gralora(pipe, r=4, gralora_k=2)
    pipe.save_gralora_weights(root / "adapter")
    gd.save_tiny_sdxl(root / "tiny")
    return root


def train_args(files, *extra):
    return ["train", "--pretrained_model_name_or_path", "some/model", "--instance_data_dir", str(files / "images"),
            "--instance_prompt", PROMPT, "--report_to", "none", "--output_dir", str(files / "out"), *extra]


def fails(capsys, argv, after_load: bool = False) -> str:
    """Run the command; it must exit 2 with one line `gralora-diffusion CMD: error: ...` (after a model
    load, diffusers' loading bars come before it on stderr: then the error is the last line)."""
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()[-1:] if after_load else err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err and err.count(": error: ") == 1, err
    command = next(a for a in argv if not a.startswith("-"))
    assert lines[0].startswith(f"gralora-diffusion {command}: error: "), lines[0]
    return lines[0]


# (case id, argv builder, words the one line must contain)
CASES = [
    ("train-negative-steps", lambda f: train_args(f, "--max_train_steps", "-5"), ["--max_train_steps=-5", "must be in [1, 2147483647]"]),
    ("train-rank-0", lambda f: train_args(f, "--rank", "0"), ["--rank=0", "must be in [1, 1024]"]),
    ("train-negative-lr", lambda f: train_args(f, "--learning_rate", "-1"), ["--learning_rate", "must be in (0, 100]"]),
    ("train-data-dir-is-a-file", lambda f: train_args(f, "--instance_data_dir", str(f / "a_file.txt")),
     ["--instance_data_dir", "is a file"]),
    ("train-output-dir-is-a-file", lambda f: train_args(f, "--output_dir", str(f / "a_file.txt")), ["--output_dir", "is a file"]),
    ("train-class-dir-is-a-file", lambda f: train_args(f, "--with_prior_preservation", "--class_prompt", "a teapot",
                                                      "--class_data_dir", str(f / "a_file.txt")), ["--class_data_dir", "is a file"]),
    ("train-unknown-preset", lambda f: train_args(f, "--unet_targets", "nope"), ["--unet_targets", "'nope'", "unknown preset", "attn+ff"]),
    ("train-preset-typo", lambda f: train_args(f, "--unet_targets", "attn+fff"), ["unknown preset", "Did you mean attn+ff"]),
    ("train-text-preset-on-unet", lambda f: train_args(f, "--text_encoder_targets", "attn+ff"),
     ["--text_encoder_targets", "unknown preset", "attn+mlp"]),
    ("train-bad-regex", lambda f: train_args(f, "--unet_targets", ".*to_q("), ["--unet_targets", "regex"]),
    ("train-missing-model-folder", lambda f: train_args(f, "--pretrained_model_name_or_path", "/no/such/dir"),
     ["--pretrained_model_name_or_path /no/such/dir", "no such folder", "make-tiny"]),
    ("train-missing-relative-model-folder", lambda f: train_args(f, "--pretrained_model_name_or_path", "./no-such-model"),
     ["./no-such-model", "no such folder"]),
    ("train-model-is-a-file", lambda f: train_args(f, "--pretrained_model_name_or_path", str(f / "a_file.txt")),
     ["--pretrained_model_name_or_path", "is a file"]),
    ("train-model-folder-without-model", lambda f: train_args(f, "--pretrained_model_name_or_path", str(f / "images")),
     ["no model_index.json"]),
    ("train-missing-vae-folder", lambda f: train_args(f, "--pretrained_vae_model_name_or_path", "/no/such/vae"),
     ["--pretrained_vae_model_name_or_path", "no such folder"]),
    ("train-missing-config", lambda f: train_args(f, "--config", "/no/such/config.toml"), ["--config", "no such file"]),
    ("quickstart-negative-steps", lambda f: ["quickstart", "--output_dir", str(f / "qs"), "--max_train_steps", "-5"],
     ["--max_train_steps=-5"]),
    ("quickstart-output-is-a-file", lambda f: ["quickstart", "--output_dir", str(f / "a_file.txt")], ["--output_dir", "is a file"]),
    ("quickstart-missing-images", lambda f: ["quickstart", "--output_dir", str(f / "qs"), "--instance_data_dir", "/no/such/images"],
     ["--instance_data_dir", "no such folder"]),
    ("generate-missing-base", lambda f: ["generate", "--base", "/no/such/dir", "--prompt", PROMPT], ["--base /no/such/dir", "no such folder"]),
    ("generate-missing-adapter", lambda f: ["generate", "--adapter", "/no/such/adapter.safetensors", "--prompt", PROMPT],
     ["/no/such/adapter.safetensors", "no such"]),
    ("generate-missing-adapter-with-weight", lambda f: ["generate", "--adapter", "missing.safetensors:0.5", "--prompt", PROMPT],
     ["missing.safetensors", "no such"]),
    ("generate-bad-scales", lambda f: ["generate", "--scales", "0,half,1", "--prompt", PROMPT], ["--scales", "numbers"]),
    ("generate-empty-scales", lambda f: ["generate", "--scales", ",", "--prompt", PROMPT], ["--scales is empty"]),
    ("generate-bad-seeds", lambda f: ["generate", "--seeds", "1,two", "--prompt", PROMPT], ["--seeds", "integers"]),
    ("generate-zero-steps", lambda f: ["generate", "--steps", "0", "--prompt", PROMPT], ["steps=0"]),
    ("generate-odd-height", lambda f: ["generate", "--height", "30", "--prompt", PROMPT], ["height=30", "multiple of 8"]),
    ("generate-output-is-a-file", lambda f: ["generate", "--output-dir", str(f / "a_file.txt"), "--prompt", PROMPT],
     ["output_dir", "is a file"]),
    ("generate-missing-prompts-file", lambda f: ["generate", "--prompts-file", "/no/such/prompts.txt"], ["--prompts-file", "no such file"]),
    ("generate-no-prompt", lambda f: ["generate"], ["No prompts"]),
    ("generate-prompts-file-not-utf8", lambda f: ["generate", "--prompts-file", str(f / "latin1_prompts.txt")],
     ["--prompts-file", "latin1_prompts.txt, line 3", "UTF-8"]),
    ("generate-repeated-scales", lambda f: ["generate", "--prompt", PROMPT, "--scales", "0.5,1,0.5"], ["--scales lists 0.5"]),
    ("generate-repeated-seeds", lambda f: ["generate", "--prompt", PROMPT, "--seeds", "3,3"], ["--seeds lists 3"]),
    ("generate-into-a-training-set", lambda f: ["generate", "--prompt", PROMPT, "--output-dir", str(f / "images")],
     ["images: holds 1 image", "a.png", "generate did not write", "new or empty folder"]),
    ("generate-base-not-cached-offline", lambda f: ["generate", "--base", "someone/not-cached-anywhere", "--prompt", PROMPT],
     ["--base someone/not-cached-anywhere", "not in the local Hugging Face cache", "hf download someone/not-cached-anywhere"]),
    ("export-missing-adapter", lambda f: ["export-lora", "/no/such/adapter.safetensors", str(f / "x.safetensors")],
     ["/no/such/adapter.safetensors", "no such file"]),
    ("export-rank-0", lambda f: ["export-lora", str(f / "adapter"), str(f / "x.safetensors"), "--rank", "0"], ["rank=0", ">= 1"]),
    ("export-rank-too-large", lambda f: ["export-lora", str(f / "adapter"), str(f / "x.safetensors"), "--rank", "100000"],
     ["rank=100000", "at most"]),
    ("export-negative-max-size", lambda f: ["export-lora", str(f / "adapter"), str(f / "x.safetensors"), "--max-size", "-1"],
     ["--max-size", "positive"]),
    ("export-into-a-file", lambda f: ["export-lora", str(f / "adapter"), str(f / "a_file.txt" / "x.safetensors")], ["is a file"]),
    ("export-not-an-adapter", lambda f: ["export-lora", str(f / "a_file.txt"), str(f / "x.safetensors")], ["a_file.txt"]),
    ("info-missing-adapter", lambda f: ["info", "/no/such/adapter.safetensors"], ["/no/such/adapter.safetensors", "no such file"]),
    ("info-not-an-adapter", lambda f: ["info", str(f / "a_file.txt")], ["a_file.txt"]),
    ("info-folder-without-adapter", lambda f: ["info", str(f / "images")], ["images"]),
    ("push-missing-folder", lambda f: ["push", "/no/such/folder", "me/repo"], ["/no/such/folder", "no such folder"]),
    ("push-a-file", lambda f: ["push", str(f / "a_file.txt"), "me/repo"], ["a_file.txt", "is a file, not a folder"]),
    ("push-folder-without-adapter", lambda f: ["push", str(f / "images"), "me/repo"], ["pytorch_gralora_weights.safetensors"]),
    ("make-tiny-a-file", lambda f: ["make-tiny", str(f / "a_file.txt")], ["a_file.txt", "not a folder"]),
    ("make-tiny-under-a-file", lambda f: ["make-tiny", str(f / "a_file.txt" / "tiny")], ["a_file.txt", "not a folder"]),
]


@pytest.mark.parametrize("build, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_nonsense_is_one_line_and_exit_2(files, capsys, build, words):
    line = fails(capsys, build(files))
    for word in words:
        assert word in line, line


@pytest.mark.parametrize("adapter, words", [("gralora", ["match no module", "to_q"]),
                                             ("lora", ["--unet_targets 'to_qq,to_vv' (unet)", "not found"])])
def test_module_names_that_match_nothing_fail_after_the_model_loads(files, capsys, adapter, words):
    line = fails(capsys, train_args(files, "--pretrained_model_name_or_path", str(files / "tiny"), "--adapter", adapter,
                                    "--unet_targets", "to_qq,to_vv"), after_load=True)
    assert all(word in line for word in words), line


def test_nothing_is_written_or_loaded_on_bad_arguments(files, capsys, monkeypatch):
    """Bad flags fail before work starts: quickstart writes no model, train creates no output folder."""
    fails(capsys, ["quickstart", "--output_dir", str(files / "qs-none"), "--max_train_steps", "0"])
    assert not (files / "qs-none").exists()
    fails(capsys, train_args(files, "--output_dir", str(files / "train-none"), "--rank", "0"))
    assert not (files / "train-none").exists()


def test_export_checks_the_rank_before_reading_the_adapter(files, capsys):
    line = fails(capsys, ["export-lora", "/no/such/adapter.safetensors", str(files / "x.safetensors"), "--rank", "0"])
    assert "rank=0" in line


@pytest.mark.parametrize("argv", [
    ["train", "--rank", "abc"],
    ["export-lora", "a", "b", "--format", "onnx"],
    ["generate", "--steps", "1.5"],
    ["make-tiny"],
])
def test_argparse_errors_are_one_line_with_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(lines) == 1 and "error:" in lines[0] and "--help" in lines[0]


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_raises_the_error_with_its_traceback(files, capsys, where):
    argv = train_args(files, "--rank", "0")
    argv = ["--debug", *argv] if where == "before" else [argv[0], "--debug", *argv[1:]]
    with pytest.raises(GraloraError, match="--rank=0"):
        main(argv)


def _console(*argv):
    return subprocess.run([sys.executable, "-m", "gralora_diffusion.cli", *argv], capture_output=True, text=True, timeout=120)


def test_console_entry_exit_code_and_exactly_one_stderr_line(tmp_path):
    result = _console("train", "--pretrained_model_name_or_path", "/no/such/dir", "--instance_data_dir", str(tmp_path),
                      "--instance_prompt", PROMPT, "--report_to", "none", "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.endswith("\n"), repr(result.stderr)
    assert result.stderr.startswith("gralora-diffusion train: error: --pretrained_model_name_or_path /no/such/dir: no such folder")
    assert result.stdout == ""


def test_console_entry_with_debug_shows_the_traceback(tmp_path):
    result = _console("--debug", "export-lora", str(tmp_path / "missing.safetensors"), str(tmp_path / "x.safetensors"))
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr and "missing.safetensors" in result.stderr
