"""Resume safety: checkpoints are safetensors and JSON only and a pickle planted in any of their files is
never run; damaged files and changed state-shaping settings are one-line errors (exit 2 from the CLI)
before any model loads; settings a user may change on resume take effect and are recorded; one
live run per --output_dir."""

import json
import pickle
import shutil
import subprocess
import sys

import pytest
from conftest import PROMPT, SAMPLES
from corrupt_corpus import _SideEffect

import gralora_diffusion as gd
from gralora_diffusion.adapter_file import read_adapter_file
from gralora_diffusion.cli import main
from gralora_diffusion.constants import CONFIG_NAME, PICKLE_SUFFIXES, STATE_NAME
from gralora_diffusion.train import TrainConfig, loop, train

pytestmark = pytest.mark.usefixtures("one_thread")
SETTINGS = dict(pretrained_model_name_or_path="tiny", instance_data_dir=str(SAMPLES), instance_prompt=PROMPT,
                resolution=64, train_batch_size=1, learning_rate=1e-3, rank=8, seed=0, report_to="none", use_ema=True)


def run(out, pipeline=None, **kw):
    cfg = TrainConfig(**{**SETTINGS, "output_dir": str(out), **kw})
    return train(cfg, pipeline=pipeline or gd.tiny_sdxl_pipeline(seed=0))


def cli(out, *extra):
    flags = [f"--{k}={v}" for k, v in {**SETTINGS, "output_dir": str(out)}.items() if not isinstance(v, bool)] + ["--use_ema"]
    return main(["train", *flags, *extra])


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """A run of 2 steps that wrote checkpoint-2 (adapter, optimizer, EMA, RNG, state)."""
    out = tmp_path_factory.mktemp("ck") / "out"
    run(out, max_train_steps=2, checkpointing_steps=2)
    return out / "checkpoint-2"


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_a_checkpoint_is_safetensors_and_json_only(checkpointed):
    names = sorted(p.name for p in checkpointed.iterdir())
    assert names == ["adapter_unet.safetensors", "ema.safetensors", "optimizer.safetensors", "rng_0.json",
                     "rng_0.safetensors", STATE_NAME]
    state = json.loads((checkpointed / STATE_NAME).read_text())
    assert state["global_step"] == 2 and state["settings"]["rank"] == 8 and state["scheduler"]["last_epoch"] == 2


def test_a_pickle_planted_in_any_checkpoint_file_never_runs(tmp_path, checkpointed, capsys):
    marker = tmp_path / "UNPICKLED"
    payload = pickle.dumps({"w": _SideEffect(str(marker))})
    names = [p.name for p in checkpointed.iterdir()] + ["random_states_0.pkl", "optimizer.bin", "custom_checkpoint_0.pkl"]
    for name in names:
        folder = tmp_path / name / "checkpoint-2"
        shutil.copytree(checkpointed, folder)
        (folder / name).write_bytes(payload)
        assert cli(folder.parent, "--resume_from_checkpoint", str(folder), "--max_train_steps=3") == 2, name
        err = one_line(capsys)
        assert str(folder) in err and ("damaged" in err or "pickle" in err), err
        if name.endswith(PICKLE_SUFFIXES):
            assert name in err
        assert not marker.exists(), f"{name}: unpickled"
        assert not (folder.parent / "pytorch_gralora_weights.safetensors").exists()
    pickle.loads(payload)  # sanity: the payload does run when unpickled
    assert marker.exists()


@pytest.mark.parametrize("damage", ["truncated optimizer", "garbled state", "garbled rng"])
def test_damaged_checkpoint_files_are_one_line_errors(tmp_path, checkpointed, capsys, damage):
    folder = tmp_path / "out" / "checkpoint-2"
    shutil.copytree(checkpointed, folder)
    if damage == "truncated optimizer":
        data = (folder / "optimizer.safetensors").read_bytes()
        (folder / "optimizer.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "garbled state":
        (folder / STATE_NAME).write_text('{"global_step": 2, "seed"')
    else:
        (folder / "rng_0.json").write_text("not json")
    assert cli(folder.parent, "--resume_from_checkpoint", "latest", "--max_train_steps=3") == 2
    err = one_line(capsys)
    name = {"truncated optimizer": "optimizer.safetensors", "garbled state": STATE_NAME, "garbled rng": "rng_0.json"}[damage]
    assert name in err and "damaged" in err


def test_changed_state_shaping_settings_are_refused_before_any_model_loads(tmp_path, checkpointed, capsys, monkeypatch):
    monkeypatch.setattr(loop, "load_pipeline", lambda cfg: pytest.fail("the model loaded before the check"))
    folder = tmp_path / "out" / "checkpoint-2"
    shutil.copytree(checkpointed, folder)
    assert cli(folder.parent, "--resume_from_checkpoint", "latest", "--rank=16", "--gralora_k=4", "--train_text_encoder") == 2
    err = one_line(capsys)
    assert str(folder) in err and "rank 8 -> 16" in err and "gralora_k 2 -> 4" in err and "train_text_encoder False -> True" in err
    assert "learning_rate" not in err


def test_a_new_learning_rate_and_max_steps_take_effect_and_are_recorded(tmp_path, checkpointed, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(checkpointed, out / "checkpoint-2")
    seen = []
    real = loop.update

    def spy(r):
        seen.append([g["lr"] for g in r.optimizer.param_groups])
        return real(r)

    monkeypatch.setattr(loop, "update", spy)
    result = run(out, max_train_steps=4, learning_rate=5e-4, resume_from_checkpoint="latest")
    assert result.global_step == 4 and seen == [[5e-4], [5e-4]]
    config = (out / CONFIG_NAME).read_text()
    assert "learning_rate: 0.0005" in config and '# steps 0-2 ran with: {"learning_rate": 0.001' in config
    assert TrainConfig.from_args(__import__("argparse").Namespace(config=str(out / CONFIG_NAME))).learning_rate == 5e-4
    training = json.loads(read_adapter_file(result.weights_path).metadata["training"])
    assert training["learning_rate"] == 5e-4 and "from step 2: learning_rate 0.001 -> 0.0005" in training["resumed_with"]
    assert "0.001 -> 0.0005" in (out / "README.md").read_text()


def test_a_live_run_holds_the_output_dir_and_a_dead_ones_lock_does_not_block(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(json.dumps({"pid": live.pid, "host": __import__("socket").gethostname()}))
        assert cli(out, "--max_train_steps=1") == 2
        err = one_line(capsys)
        assert f"pid {live.pid}" in err and str(out) in err
        assert not (out / "pytorch_gralora_weights.safetensors").exists()
    finally:
        live.kill()
        live.wait()
    result = run(out, max_train_steps=1)  # the lock's pid is dead now
    assert result.global_step == 1 and result.weights_path.is_file()
    assert not (out / ".lock").exists()  # released when the run ends


def test_the_lock_is_released_when_a_run_fails(tmp_path):
    with pytest.raises(gd.GraloraError):
        run(tmp_path / "out", max_train_steps=1, unet_targets="nothing_matches_this_regex.*")
    run(tmp_path / "out", max_train_steps=1)
    assert not (tmp_path / "out" / ".lock").exists()
