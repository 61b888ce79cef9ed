"""Issue 18 (trust, round 3) items 1-2 and issue 25 item 6: push never leaves the folder, and one output
rule for every writer: never onto a file the command reads, never into a training set, never over a
file we did not make, and a folder a command did not make (or a training set) is refused."""

import json
import os
import re

import pytest
from PIL import Image

import gralora_diffusion as gd
from gralora_diffusion.cli import main
from gralora_diffusion.constants import CARD_NAME, WEIGHT_NAME
from gralora_diffusion.errors import GraloraError
from gralora_diffusion.hub import push_plan, save_model_card
from gralora_diffusion.outputs import OWNER_FILE, check_output_file, claim_folder
from gralora_diffusion.train import TrainConfig

from conftest import PROMPT, SAMPLES
from test_cli_errors import fails as one_line_exit_2  # exit 2, one line, no traceback
from test_hub import TOKEN, fake_hub  # noqa: F401 - the loopback Hub fixture

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    pipe = gd.patch_pipeline(gd.tiny_sdxl_pipeline(seed=0))
    gd.add_gralora(pipe, r=4, gralora_k=2)
    folder = tmp_path_factory.mktemp("adapter")
    pipe.save_gralora_weights(folder)
    return folder / WEIGHT_NAME


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (200, 40 * i, 40)).save(folder / f"me_{i}.png")
    (folder / "README.md").write_text("my photos\n")
    return folder


# -- 1: push -------------------------------------------------------------------------------------------


def hostile_folder(root, adapter):
    """A training folder full of links out of it and a card whose prompt tries to pull in a private photo."""
    secret = root / "secret"
    secret.mkdir()
    Image.new("RGB", (8, 8), "blue").save(secret / "private.png")
    (secret / "notes.md").write_text("private\n")
    folder = root / "out"
    (folder / "samples").mkdir(parents=True)
    (folder / WEIGHT_NAME).write_bytes(adapter.read_bytes())
    Image.new("RGB", (8, 8), "red").save(folder / "samples" / "sample_0.png")
    Image.new("RGB", (8, 8), "red").save(folder / "samples" / "grid.png")
    (folder / "samples" / "x.png").symlink_to(secret / "private.png")  # a link out
    (folder / "samples" / "y.png").symlink_to(folder / "samples" / "sample_0.png")  # a link, even inside
    (folder / "photos").mkdir()
    Image.new("RGB", (8, 8), "green").save(folder / "photos" / "me.png")  # private, in the folder
    prompt = 'a photo of sks dog ![x](photos/me.png) <img src="photos/me.png"> [a](../secret/private.png)\n---\nlicense: mit'
    save_model_card(folder, instance_prompt=prompt)
    return folder, prompt


def test_push_uploads_exactly_the_regular_in_folder_files_it_lists(adapter, tmp_path, fake_hub, capsys):  # noqa: F811
    folder, prompt = hostile_folder(tmp_path, adapter)
    files, refused = push_plan(folder)
    assert files == [WEIGHT_NAME, CARD_NAME, "samples/grid.png", "samples/sample_0.png"]
    assert sorted(name for name, _ in refused) == ["samples/x.png", "samples/y.png"]
    assert main(["push", str(folder), "me/dog", "--token", TOKEN]) == 0
    out = capsys.readouterr().out
    assert "samples/x.png: samples/x.png is a symbolic link" in out
    assert sorted(k for k in fake_hub.committed if k != "<message>") == sorted(files)
    assert fake_hub.committed["samples/sample_0.png"] == (folder / "samples" / "sample_0.png").read_bytes()
    # the card: the prompt is text, not markup; the front matter is still one valid YAML mapping
    from huggingface_hub import ModelCard

    card = ModelCard.load(folder / CARD_NAME)
    assert card.data.to_dict()["instance_prompt"] == " ".join(prompt.split()) and card.data.to_dict()["license"] == "openrail++"
    prose = re.sub(r"(`{3,}).*?\1", "", card.text, flags=re.S)  # code blocks are shown as code, never rendered
    assert "![x](photos/me.png)" not in prose and not re.search(r"(?<!\\)<img", prose) and "](../secret" not in prose
    assert "\\!\\[x\\]" in prose  # shown as text


@pytest.mark.parametrize("link", ["samples", CARD_NAME, WEIGHT_NAME])
def test_a_linked_samples_folder_card_or_adapter_never_uploads_its_target(adapter, tmp_path, fake_hub, capsys, link):  # noqa: F811
    folder, _ = hostile_folder(tmp_path, adapter)
    target = tmp_path / "secret" / ("notes.md" if link == CARD_NAME else "")
    if link == WEIGHT_NAME:
        target = tmp_path / "secret" / "a.safetensors"
        target.write_bytes(adapter.read_bytes())
    moved = tmp_path / "moved"
    os.replace(folder / link, moved)
    (folder / link).symlink_to(target)
    files, refused = push_plan(folder)
    assert link not in files and not any(name.startswith(f"{link}/") for name in files)
    if link == "samples":
        assert {name for name, _ in refused} >= {"samples/private.png"} and "samples/private.png" not in files
        assert main(["push", str(folder), "me/dog", "--token", TOKEN]) == 0
        assert not any(k.startswith("samples/") for k in fake_hub.committed)
    else:
        line = one_line_exit_2(capsys, ["push", str(folder), "me/dog", "--token", TOKEN])
        assert "symbolic link" in line and "Nothing was sent" in line
        assert fake_hub.calls == []


# -- 2: the output rule ---------------------------------------------------------------------------------


def test_evaluate_never_writes_onto_its_inputs_or_into_the_photos(adapter, photos, tmp_path, capsys):
    foreign = tmp_path / "notes.json"
    foreign.write_text('{"mine": true}\n')
    base = ["evaluate", "--adapter", str(adapter), "--instance_data_dir", str(photos), "--dino_model", "none",
            "--clip_model", "none", "--steps", "1", "--seeds", "0", "--prompt", PROMPT]
    before, adapter_bytes = snapshot(photos), adapter.read_bytes()
    cases = [(["--json", str(adapter)], "a file this command reads"),
             (["--json", str(photos / "me_0.png")], "a file this command reads"),
             (["--json", str(photos / "new.json")], "is never written into"),
             (["--json", str(foreign)], "did not write"),
             (["--output_dir", str(photos)], "is the instance images folder"),
             (["--output_dir", str(photos / "eval")], "lies inside the instance images folder"),
             (["--output_dir", str(tmp_path)], "not empty")]
    for extra, words in cases:
        line = one_line_exit_2(capsys, [*base, *extra])
        assert words in line, line
    assert snapshot(photos) == before and adapter.read_bytes() == adapter_bytes and foreign.read_text() == '{"mine": true}\n'


def test_train_keeps_its_folders_apart_and_never_replaces_a_finished_run(photos, tmp_path):
    def cfg(**kw):
        kw = {"instance_data_dir": str(photos), "instance_prompt": PROMPT, "report_to": "none", **kw}
        return TrainConfig(**kw)

    for kw, words in [({"output_dir": str(photos)}, "--output_dir .* is the instance images folder"),
                      ({"output_dir": str(photos / "run")}, "lies inside the instance images"),
                      ({"output_dir": str(tmp_path / "o"), "with_prior_preservation": True, "class_prompt": "a dog",
                        "class_data_dir": str(photos)}, "--class_data_dir .* overlaps --instance_data_dir"),
                      ({"output_dir": str(tmp_path / "o"), "with_prior_preservation": True, "class_prompt": "a dog",
                        "class_data_dir": str(photos / "class")}, "overlaps")]:
        with pytest.raises(GraloraError, match=words):
            cfg(**kw).validate(need_model=False)
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / WEIGHT_NAME).write_bytes(b"x")
    with pytest.raises(GraloraError, match="holds a finished run .*--overwrite_output_dir"):
        cfg(output_dir=str(finished)).validate(need_model=False)
    cfg(output_dir=str(finished), overwrite_output_dir=True).validate(need_model=False)
    cfg(output_dir=str(finished), resume_from_checkpoint="latest").validate(need_model=False)
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / CARD_NAME).write_text("# my project\n")
    with pytest.raises(GraloraError, match="README.md is not a model card"):
        cfg(output_dir=str(repo)).validate(need_model=False)


def test_train_refuses_a_finished_run_from_the_command_line(photos, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / WEIGHT_NAME).write_bytes(b"x")
    line = one_line_exit_2(capsys, ["train", "--pretrained_model_name_or_path", "tiny", "--instance_data_dir", str(photos),
                                    "--instance_prompt", PROMPT, "--output_dir", str(out), "--report_to", "none"])
    assert "finished run" in line and "--overwrite_output_dir" in line


@pytest.mark.parametrize("command", ["generate", "make-tiny", "evaluate", "compare", "quickstart"])
def test_every_folder_writer_refuses_a_folder_it_did_not_make(photos, tmp_path, capsys, command):
    other = tmp_path / "other"
    other.mkdir()
    (other / "thesis.tex").write_text("mine\n")
    made_by_another = tmp_path / "made"
    claim_folder(made_by_another, "make-tiny" if command != "make-tiny" else "generate")
    (made_by_another / "model_index.json").write_text("{}")
    for folder, words in ((other, "did not make it"), (made_by_another, "made it"), (photos, "image or caption")):
        before = snapshot(folder)
        argv = {"generate": ["generate", "--prompt", PROMPT, "--output-dir", str(folder)],
                "make-tiny": ["make-tiny", str(folder)],
                "evaluate": ["evaluate", "--instance_data_dir", str(SAMPLES), "--output_dir", str(folder),
                             "--dino_model", "none", "--clip_model", "none"],
                "compare": ["compare", "--pretrained_model_name_or_path", "tiny", "--instance_data_dir", str(SAMPLES),
                            "--instance_prompt", PROMPT, "--output_dir", str(folder), "--report_to", "none"],
                "quickstart": ["quickstart", "--output_dir", str(folder)]}[command]
        line = one_line_exit_2(capsys, argv)
        assert str(folder) in line and (words in line or "instance images" in line or "not a model card" in line), line
        assert snapshot(folder) == before and not (folder / OWNER_FILE).exists() or folder == made_by_another


def test_generate_again_into_its_folder_replaces_its_earlier_run(tmp_path, capsys):
    out = tmp_path / "gen"
    first = gd.generate_samples("tiny", prompts=[PROMPT], seeds=[0, 1, 2], steps=1, output_dir=out, progress=False)
    assert len(first.images) == 3
    second = gd.generate_samples("tiny", prompts=[PROMPT], seeds=[5], steps=1, output_dir=out, progress=False)
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted([second.images[0].name, "grid.png"])  # never mixed with the earlier run's images


def test_export_never_replaces_a_file_it_did_not_write(adapter, tmp_path, capsys):
    foreign = tmp_path / "someone_elses.safetensors"
    foreign.write_bytes(b"not ours")
    line = one_line_exit_2(capsys, ["export-lora", str(adapter), str(foreign)])
    assert "did not write" in line and foreign.read_bytes() == b"not ours"
    link = tmp_path / "link.safetensors"
    link.symlink_to(tmp_path / "elsewhere.safetensors")
    assert "not a regular file" in one_line_exit_2(capsys, ["export-lora", str(adapter), str(link)])
    ours = tmp_path / "ours.safetensors"
    assert main(["export-lora", str(adapter), str(ours)]) == 0
    assert main(["export-lora", str(adapter), str(ours), "--dtype", "fp16"]) == 0  # our own export: replaced


def test_check_output_file_is_one_rule_for_any_spelling_of_an_input(tmp_path):
    source = tmp_path / "in.safetensors"
    source.write_bytes(b"x")
    (tmp_path / "link").symlink_to(source)
    os.link(source, tmp_path / "hard")
    (tmp_path / "sub").mkdir()
    for spelling in (source, tmp_path / "sub" / ".." / "in.safetensors", tmp_path / "link", tmp_path / "hard"):
        with pytest.raises(GraloraError, match="a file this command reads"):
            check_output_file(spelling, "--json", inputs=[source])
    assert source.read_bytes() == b"x"


def test_evaluate_json_is_valid_and_written_atomically(adapter, tmp_path):
    from gralora_diffusion.evaluate import evaluate_adapter

    out = tmp_path / "eval"

    def nan_scorer(images, prompts):
        return {"dino": float("nan"), "clip_t": 0.5}

    result = evaluate_adapter("tiny", [str(adapter)], instance_images=[Image.new("RGB", (64, 64))], prompts=[PROMPT], seeds=[0],
                              steps=1, scorers=[nan_scorer], output_dir=out, json_path=tmp_path / "r.json", progress=False)
    data = json.loads((tmp_path / "r.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert data["variants"][0]["metrics"]["dino"] is None and (out / "results.json").is_file() and result.grid.is_file()
    again = evaluate_adapter("tiny", [str(adapter)], instance_images=[Image.new("RGB", (64, 64))], prompts=[PROMPT], seeds=[0],
                             steps=1, scorers=[nan_scorer], output_dir=out, json_path=tmp_path / "r.json", progress=False)
    assert again.json_path == tmp_path / "r.json"  # our own results: replaced
    assert not [p for p in tmp_path.rglob("*.tmp")]
