"""Training from 🤗 datasets in every layout users keep them: an imagefolder with metadata.jsonl or
metadata.csv, parquet files, a save_to_disk folder, and a Hub dataset in huggingface_hub's cache
offline. Each image is one solid colour and its caption names it, so what the trainer sees (the
pixels and prompt of every item) is checked against the dataset, row by row."""

import csv
import hashlib
import json
import os
from pathlib import Path

import datasets
import huggingface_hub
import pytest
import torch
from PIL import Image

import gralora_diffusion as gd
from gralora_diffusion.errors import TrainConfigError
from gralora_diffusion.tiny import TINY_MODEL_ID
from gralora_diffusion.train import TrainConfig, loss, train
from gralora_diffusion.train.data import EMPTY_PROMPT
from gralora_diffusion.train.hf_dataset import dataset_records, instance_records, reference_images

pytestmark = pytest.mark.usefixtures("one_thread")

COLOURS = {"red": (230, 20, 20), "green": (20, 230, 20), "blue": (20, 20, 230), "yellow": (230, 230, 20)}
COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


def caption(name):
    return f"a {name} square"


def images():
    return {name: Image.new("RGB", (80, 64), rgb) for name, rgb in COLOURS.items()}


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """datasets prepares Arrow files in its cache: a temporary one, never the user's. A parquet stream
    left before its end sleeps 5 s (datasets' guard against apache/arrow#45214 at interpreter exit); this
    process goes on living, so the tests skip the wait."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


def imagefolder(folder: Path, metadata="jsonl", caption_key="text") -> Path:
    folder.mkdir(parents=True)
    rows = []
    for name, image in images().items():
        image.save(folder / f"{name}.png")
        rows.append({"file_name": f"{name}.png", caption_key: caption(name)})
    if metadata == "jsonl":
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        with open(folder / "metadata.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return folder


def in_memory(**extra) -> datasets.Dataset:
    named = images()
    data = {"picture": list(named.values()), "caption": [caption(n) for n in named], **extra}
    features = datasets.Features({"picture": datasets.Image(), "caption": datasets.Value("string"),
                                  **{k: datasets.Value("int32") for k in extra}})
    return datasets.Dataset.from_dict(data, features=features)


def parquet_folder(folder: Path) -> Path:
    (folder / "data").mkdir(parents=True)
    in_memory().to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    return folder


def run(tmp_path, seen=None, name="out", **kw):
    settings = dict(pretrained_model_name_or_path=TINY_MODEL_ID, output_dir=str(tmp_path / name), resolution=64,
                    train_batch_size=2, max_train_steps=2, learning_rate=1e-3, rank=4, seed=0, report_to="none",
                    checkpointing_steps=1000, image_cache_mb=0)
    return train(TrainConfig(**{**settings, **kw}), pipeline=gd.tiny_sdxl_pipeline(seed=0))


@pytest.fixture
def seen(monkeypatch):
    """Every (prompt, mean colour) the loss is given: the real BatchLoss, watched."""
    items = []
    real = loss.BatchLoss.__call__

    def watched(self, batch):
        means = ((batch["pixel_values"].mean(dim=(2, 3)) + 1) * 127.5).round()
        items.extend(zip(batch["prompts"], [tuple(int(v) for v in m) for m in means]))
        return real(self, batch)

    monkeypatch.setattr(loss.BatchLoss, "__call__", watched)
    return items


def assert_items_are_the_datasets(items, count):
    assert len(items) == count
    by_caption = {caption(n): rgb for n, rgb in COLOURS.items()}
    for prompt, mean in items:
        assert prompt in by_caption, prompt
        assert all(abs(a - b) <= 2 for a, b in zip(mean, by_caption[prompt])), (prompt, mean)


@pytest.mark.parametrize("layout", ["imagefolder-jsonl", "imagefolder-csv", "parquet", "save_to_disk", "hub-cache"])
def test_trains_from_each_layout_on_the_datasets_images_and_captions(tmp_path, monkeypatch, seen, layout):
    if layout.startswith("imagefolder"):
        name = str(imagefolder(tmp_path / "data", layout.split("-")[1], "text" if layout.endswith("jsonl") else "caption"))
    elif layout == "parquet":
        name = str(parquet_folder(tmp_path / "data"))
    elif layout == "save_to_disk":
        datasets.DatasetDict({"train": in_memory()}).save_to_disk(str(tmp_path / "data"))
        name = str(tmp_path / "data")
    else:  # huggingface_hub's cache layout, offline: blobs, snapshots/<commit>, refs/main
        hub = tmp_path / "hub"
        repo = hub / "datasets--someone--squares"
        parquet_folder(tmp_path / "files")
        data = (tmp_path / "files" / "data" / "train-00000-of-00001.parquet").read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / COMMIT / "data" / "train-00000-of-00001.parquet"
        link.parent.mkdir(parents=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(COMMIT)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        name = "someone/squares"
    result = run(tmp_path, dataset_name=name, random_flip=True)
    assert result.global_step == 2 and result.weights_path.is_file()
    assert_items_are_the_datasets(seen, 4)
    assert {p for p, _ in seen} <= {caption(n) for n in COLOURS}


def test_a_wrong_or_missing_column_is_one_line_naming_the_columns(tmp_path):
    folder = tmp_path / "saved"
    in_memory().save_to_disk(str(folder))
    cfg = TrainConfig(dataset_name=str(folder), image_column="image", output_dir=str(tmp_path / "o")).validate(need_model=False)
    with pytest.raises(TrainConfigError) as err:
        instance_records(cfg)
    assert "\n" not in str(err.value) and "'image' is not a column" in str(err.value) and "picture, caption" in str(err.value)
    cfg.image_column, cfg.caption_column = None, "text"
    with pytest.raises(TrainConfigError, match=r"--caption_column 'text' is not a column; its columns are picture, caption"):
        instance_records(cfg)


def test_defaults_from_features_and_uncaptioned_rows_take_the_instance_prompt(tmp_path):
    folder = tmp_path / "saved"
    named = images()
    datasets.Dataset.from_dict({"img": list(named.values()), "label": [None, "b", "", None]},
                               features=datasets.Features({"img": datasets.Image(), "label": datasets.Value("string")})
                               ).save_to_disk(str(folder))
    cfg = TrainConfig(dataset_name=str(folder), output_dir=str(tmp_path / "o"))
    with pytest.raises(TrainConfigError, match=r"3 row\(s\) \(row 0, row 2, row 3\) have no caption column \('label' is empty there\)"):
        instance_records(cfg)
    cfg.instance_prompt = "a photo of sks square"
    records = instance_records(cfg)
    assert [r.caption for r in records] == ["a photo of sks square", "b", "a photo of sks square", "a photo of sks square"]
    cfg.max_train_samples = 2
    assert len(instance_records(cfg)) == 2


def test_bucket_sizes_come_from_stored_columns_without_reading_images(tmp_path, monkeypatch):
    folder = tmp_path / "saved"
    in_memory(height=[64, 64, 128, 64], width=[64, 128, 64, 64]).save_to_disk(str(folder))
    cfg = TrainConfig(dataset_name=str(folder), output_dir=str(tmp_path / "o"), aspect_buckets="64,64;64,128;128,64")
    from gralora_diffusion.train import hf_dataset

    monkeypatch.setattr(hf_dataset, "image_size", lambda _: pytest.fail("an image header was read"))
    assert [r.size for r in dataset_records(cfg, need_sizes=True)] == [(64, 64), (64, 128), (128, 64), (64, 64)]
    monkeypatch.undo()
    in_memory().save_to_disk(str(tmp_path / "nosizes"))
    cfg.dataset_name = str(tmp_path / "nosizes")
    assert {r.size for r in dataset_records(cfg, need_sizes=True)} == {(64, 80)}  # from each header
    assert {r.size for r in dataset_records(cfg, need_sizes=False)} == {(0, 0)}  # not read without buckets


def test_reference_images_are_the_datasets(tmp_path):
    folder = tmp_path / "saved"
    in_memory().save_to_disk(str(folder))
    cfg = TrainConfig(dataset_name=str(folder), output_dir=str(tmp_path / "o"))
    refs = reference_images(cfg)
    assert [im.getpixel((3, 3)) for im in refs] == list(COLOURS.values())


def test_caption_dropout_trains_the_empty_prompt_as_the_pipeline_encodes_it(tmp_path, seen):
    folder = imagefolder(tmp_path / "data")
    run(tmp_path, dataset_name=str(folder), caption_dropout=0.5, max_train_steps=4)
    dropped = [p for p, _ in seen if p == EMPTY_PROMPT]
    assert 0 < len(dropped) < len(seen)
    pipe = gd.tiny_sdxl_pipeline(seed=0)
    cfg = TrainConfig(output_dir=str(tmp_path / "x"), dataset_name=str(folder))
    from gralora_diffusion.bases import get_family

    batch_loss = loss.BatchLoss(cfg, pipe, get_family("sdxl"), pipe.unet, (pipe.text_encoder, pipe.text_encoder_2), None,
                                torch.float32, "cpu")
    cond = batch_loss.text_conditioning([EMPTY_PROMPT, "a red square"])
    embeds, pooled = cond["prompt_embeds"], cond["pooled_prompt_embeds"]
    # SDXL's force_zeros_for_empty_prompt: the pipeline's unconditional embedding is zeros
    _, negative, _, negative_pooled = pipe.encode_prompt("a red square", do_classifier_free_guidance=True)
    assert torch.equal(embeds[0], negative[0]) and torch.equal(pooled[0], negative_pooled[0])
    assert embeds[1].abs().sum() > 0


def test_flags_need_a_dataset_and_one_source(tmp_path):
    with pytest.raises(TrainConfigError, match="give one of them"):
        TrainConfig(instance_data_dir="x", dataset_name="y").validate(need_model=False)
    with pytest.raises(TrainConfigError, match="--image_column, --streaming: dataset settings; they need --dataset_name"):
        TrainConfig(instance_data_dir="x", image_column="i", streaming=True).validate(need_model=False)
    with pytest.raises(TrainConfigError, match=r"--caption_dropout=1.0: must be in \[0, 1\)"):
        TrainConfig(dataset_name="y", caption_dropout=1.0).validate(need_model=False)
    with pytest.raises(TrainConfigError, match="leave --dataloader_num_workers at 0"):
        TrainConfig(dataset_name="y", streaming=True, max_train_steps=2, dataloader_num_workers=2).validate(need_model=False)
    with pytest.raises(TrainConfigError, match="--streaming: give --max_train_steps"):
        TrainConfig(dataset_name="y", streaming=True).validate(need_model=False)
    with pytest.raises(TrainConfigError, match="--dataset_name nowhere/none: cannot load it"):
        instance_records(TrainConfig(dataset_name="nowhere/none"))


class Interrupt(Exception):
    pass


def test_streaming_resumed_after_an_interruption_sees_each_row_as_often_as_an_uninterrupted_run(tmp_path, seen):
    """5 updates of 2 rows over 4 rows: data epochs 0, 1 and half of 2, reshuffled each; stopped after
    step 3 (checkpoint at 2), resumed from `latest`: the same rows, pixels, captions and losses."""
    folder = str(parquet_folder(tmp_path / "data"))
    classes = tmp_path / "classes"
    classes.mkdir()
    for i, grey in enumerate((100, 160, 200)):
        Image.new("RGB", (64, 64), (grey,) * 3).save(classes / f"class-{i:05d}.png")
    settings = dict(dataset_name=folder, streaming=True, max_train_steps=5, checkpointing_steps=2, random_flip=True,
                    caption_dropout=0.3, with_prior_preservation=True, class_data_dir=str(classes), class_prompt="a square",
                    num_class_images=3)
    whole = run(tmp_path, name="whole", **settings)
    uninterrupted = list(seen)
    assert len(uninterrupted) == 20 and sum(1 for p, _ in uninterrupted if p == "a square") == 10
    rows = [colour for prompt, colour in uninterrupted if prompt != "a square"]  # a row is known by its colour
    assert sorted(rows.count(rgb) for rgb in COLOURS.values()) == [2, 2, 3, 3]  # two passes, and half a third
    assert any(p == EMPTY_PROMPT for p, _ in uninterrupted)

    seen.clear()

    def stop(step, _):
        if step == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(TrainConfig(pretrained_model_name_or_path=TINY_MODEL_ID, output_dir=str(tmp_path / "cut"), resolution=64,
                          train_batch_size=2, learning_rate=1e-3, rank=4, seed=0, report_to="none", image_cache_mb=0, **settings),
              pipeline=gd.tiny_sdxl_pipeline(seed=0), on_step=stop)
    before = seen[:8]  # the 2 updates the checkpoint holds (2 rows and their 2 class images each)
    seen.clear()
    resumed = run(tmp_path, name="cut", resume_from_checkpoint="latest", **settings)
    assert before + seen == uninterrupted  # row by row: prompt and mean colour
    assert resumed.losses == whole.losses[2:]


@pytest.mark.slow
def test_a_killed_streaming_run_resumes_to_the_uninterrupted_adapter(tmp_path, tiny_dir, monkeypatch):
    """SIGKILL after checkpoint-4 of 8 (the project's kill/resume pattern, tests/test_kill_resume.py)."""
    import subprocess
    import sys

    from conftest import ROOT
    from conftest import SUBPROCESS_ENV
    from test_kill_resume import run_until, unet_weights

    env = {**SUBPROCESS_ENV, "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache")}
    folder = str(parquet_folder(tmp_path / "data"))

    def command(out, *extra):
        return [sys.executable, str(ROOT / "scripts" / "train_dreambooth_gralora_sdxl.py"), "--pretrained_model_name_or_path",
                str(tiny_dir), "--dataset_name", folder, "--streaming", "--output_dir", str(out), "--resolution", "64",
                "--train_batch_size", "2", "--max_train_steps", "8", "--checkpointing_steps", "2", "--learning_rate", "1e-3",
                "--rank", "4", "--seed", "0", "--report_to", "none", "--random_flip", "--caption_dropout", "0.2", *extra]

    whole = subprocess.run(command(tmp_path / "whole"), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-3000:]
    out = tmp_path / "cut"
    import test_kill_resume

    monkeypatch.setattr(test_kill_resume, "ENV", env)  # run_until's environment
    assert run_until(command(out), tmp_path, lambda: (out / "checkpoint-4" / "training_state.json").is_file())
    assert not (out / "pytorch_gralora_weights.safetensors").exists()
    resumed = subprocess.run(command(out, "--resume_from_checkpoint", "latest"), env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from" in resumed.stdout + resumed.stderr
    expected, got = unet_weights(tmp_path / "whole"), unet_weights(out)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_evaluate_scores_against_the_datasets_images_as_against_the_same_folder(tmp_path, capsys):
    from gralora_diffusion.cli import main as cli_main
    from gralora_diffusion.tiny_scorers import save_tiny_scorers

    dino, _ = save_tiny_scorers(tmp_path / "scorers")
    folder = imagefolder(tmp_path / "folder")
    in_memory().save_to_disk(str(tmp_path / "saved"))
    scores = {}
    for source in (["--instance_data_dir", str(folder)], ["--dataset_name", str(tmp_path / "saved")]):
        out = tmp_path / source[0].strip("-")
        assert cli_main(["evaluate", *source, "--prompt", "a red square", "--seeds", "0", "--steps", "1", "--dino_model",
                         str(dino), "--clip_model", "none", "--output_dir", str(out), "--json", str(out / "r.json")]) == 0
        scores[source[0]] = json.loads((out / "r.json").read_text())["variants"][0]["metrics"]
    assert scores["--instance_data_dir"] == scores["--dataset_name"] and "dino" in scores["--dataset_name"]
    assert cli_main(["evaluate", "--prompt", "x", "--output_dir", str(tmp_path / "none")]) == 2
    assert "--instance_data_dir FOLDER (the subject photos) or --dataset_name" in capsys.readouterr().err


def test_prior_preservation_with_a_dataset(tmp_path, seen):
    classes = tmp_path / "classes"
    classes.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (128, 128, 128)).save(classes / f"class-{i:05d}.png")
    run(tmp_path, dataset_name=str(imagefolder(tmp_path / "data")), with_prior_preservation=True,
        class_data_dir=str(classes), class_prompt="a square", num_class_images=2)
    instance = [s for s in seen if s[0] != "a square"]
    assert_items_are_the_datasets(instance, 4)
    assert [s for s in seen if s[0] == "a square"] == [("a square", (128, 128, 128))] * 4


def test_latents_and_text_embeddings_beyond_the_budget_go_to_disk_keyed_by_model_and_data(tmp_path):
    folder = str(imagefolder(tmp_path / "data"))
    in_memory_run = run(tmp_path, name="memory", dataset_name=folder, cache_latents=True, max_train_steps=4)
    cache = tmp_path / "cache"  # shared by the runs below (default: OUTPUT_DIR/cache)
    on_disk = run(tmp_path, name="disk", dataset_name=folder, cache_latents=True, max_train_steps=4, embedding_cache_mb=0,
                  cache_dir=str(cache))
    assert on_disk.losses == in_memory_run.losses
    latents, text = sorted(cache.glob("latents-*")), sorted(cache.glob("text-*"))
    assert len(latents) == 1 and len(text) == 1
    assert len(list(text[0].glob("*.safetensors"))) == len(COLOURS)  # one per caption
    assert len(list(latents[0].glob("*.safetensors"))) >= 4  # one per image and crop
    # a rerun over the same model and data reuses the files; a changed image gets a new namespace
    again = run(tmp_path, name="disk2", dataset_name=folder, cache_latents=True, max_train_steps=4, embedding_cache_mb=0,
                cache_dir=str(cache))
    assert again.losses == in_memory_run.losses and sorted(cache.glob("latents-*")) == latents
    Image.new("RGB", (80, 64), (1, 2, 3)).save(Path(folder) / "red.png")
    run(tmp_path, name="disk3", dataset_name=folder, cache_latents=True, max_train_steps=1, embedding_cache_mb=0,
        cache_dir=str(cache))
    assert len(list(cache.glob("latents-*"))) == 2 and sorted(cache.glob("text-*")) == text
    # and a changed model: another fingerprint
    from gralora_diffusion.train.tensor_cache import module_fingerprint

    vae = gd.tiny_sdxl_pipeline(seed=0).vae
    before = module_fingerprint(vae)
    with torch.no_grad():
        next(vae.parameters()).add_(1e-3)
    assert module_fingerprint(vae) != before


def test_compare_counts_the_datasets_rows(tmp_path):
    from gralora_diffusion.compare import estimated_steps

    in_memory().save_to_disk(str(tmp_path / "saved"))
    cfg = TrainConfig(dataset_name=str(tmp_path / "saved"), train_batch_size=2, num_train_epochs=3)
    assert estimated_steps(cfg) == 6


def test_a_streamed_run_resumes_only_with_the_same_stream_and_cut(tmp_path):
    from gralora_diffusion.train.checkpoint import shaping_settings

    cfg = TrainConfig(dataset_name="d", streaming=True, max_train_steps=3, train_batch_size=2)
    other = TrainConfig(dataset_name="d", streaming=True, max_train_steps=3, train_batch_size=4)
    assert shaping_settings(cfg)["stream"] != shaping_settings(other)["stream"]
    assert "stream" not in shaping_settings(TrainConfig(dataset_name="d"))  # loaded datasets resume by epoch and batch


def stream_prompts(cfg, replicas=1, rank=0, start=0, micro=6):
    from itertools import islice

    from gralora_diffusion.train.data import DreamBoothDataset
    from gralora_diffusion.train.hf_dataset import StreamBatches

    batches = StreamBatches(cfg, DreamBoothDataset([], 64), cfg.train_batch_size, 0, replicas, rank)
    batches.start = start
    return [b["prompts"] for b in islice(batches, micro)]


def test_stream_order_is_the_same_with_processes_and_a_late_start(tmp_path):
    folder = str(parquet_folder(tmp_path / "data"))
    cfg = TrainConfig(dataset_name=folder, streaming=True, max_train_steps=6, train_batch_size=2)
    alone = stream_prompts(cfg)
    assert stream_prompts(cfg, start=2, micro=4) == alone[2:]  # a resumed run continues where the first stopped
    # two processes of batch 1 split each micro-batch of an uninterrupted batch-2 run
    cfg.train_batch_size = 1
    halves = [stream_prompts(cfg, replicas=2, rank=r) for r in (0, 1)]
    assert [a + b for a, b in zip(*halves)] == alone
    cfg.max_train_samples, cfg.train_batch_size = 3, 3
    assert len({p for batch in stream_prompts(cfg, micro=4) for p in batch}) == 3  # the first 3 rows, reshuffled each pass


def test_dataset_config_name_picks_the_configuration(tmp_path):
    folder = tmp_path / "data"
    (folder / "few").mkdir(parents=True)
    (folder / "all").mkdir()
    datasets.Dataset.from_dict({"image": list(images().values())[:1], "text": ["a red square"]},
                               features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
                               ).to_parquet(str(folder / "few" / "train.parquet"))
    in_memory().rename_column("picture", "image").rename_column("caption", "text").to_parquet(str(folder / "all" / "train.parquet"))
    (folder / "README.md").write_text("---\nconfigs:\n- config_name: few\n  data_files: few/*.parquet\n"
                                      "- config_name: all\n  data_files: all/*.parquet\n  default: true\n---\n")
    cfg = TrainConfig(dataset_name=str(folder))
    assert len(instance_records(cfg)) == 4
    cfg.dataset_config_name = "few"
    assert [r.caption for r in instance_records(cfg)] == ["a red square"]
    cfg.dataset_config_name = "many"
    with pytest.raises(TrainConfigError, match="--dataset_name .*: cannot load it .*many"):
        instance_records(cfg)


def test_cli_train_with_a_wrong_column_exits_2_with_one_line(tmp_path, capsys):
    from gralora_diffusion.cli import main as cli_main

    in_memory().save_to_disk(str(tmp_path / "saved"))
    capsys.readouterr()  # datasets' saving bar
    assert cli_main(["train", "--pretrained_model_name_or_path", "tiny", "--dataset_name", str(tmp_path / "saved"),
                     "--caption_column", "prompt", "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--caption_column 'prompt' is not a column; its columns are picture, caption" in err
    assert not (tmp_path / "out").exists()  # nothing written


def test_compare_trains_and_scores_from_a_dataset(tmp_path, seen):
    from gralora_diffusion.cli import main as cli_main
    from gralora_diffusion.tiny_scorers import save_tiny_scorers

    dino, _ = save_tiny_scorers(tmp_path / "scorers")
    in_memory().save_to_disk(str(tmp_path / "saved"))
    out = tmp_path / "compare"
    assert cli_main(["compare", "--pretrained_model_name_or_path", "tiny", "--dataset_name", str(tmp_path / "saved"),
                     "--image_column", "picture", "--caption_column", "caption", "--resolution", "64", "--train_batch_size", "2",
                     "--max_train_steps", "2", "--num_inference_steps", "1", "--report_to", "none", "--output_dir", str(out),
                     "--dino_model", str(dino), "--clip_model", "none", "--eval_seeds", "0", "--eval_prompt", "a red square",
                     "--variants", "gralora:r=4,k=2", "--num_threads", "1"]) == 0
    assert_items_are_the_datasets(seen, 4)
    results = json.loads((out / "results.json").read_text())
    assert "dino" in json.dumps(results) and (out / "grid.png").is_file()
