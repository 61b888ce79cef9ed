"""Model card (parsed back by huggingface_hub.ModelCard) and push through the real huggingface_hub
client against a loopback HTTP endpoint that answers the calls create_repo and upload_folder make
(repos/create, preupload, commit) and records what was committed."""

import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
import yaml
from huggingface_hub import ModelCard, constants
from PIL import Image


import gralora_diffusion as gd
from gralora_diffusion.constants import WEIGHT_NAME
from gralora_diffusion.adapter_file import collect_adapter, read_adapter_file, save_adapter_file
from gralora_diffusion.cli import main as cli_main
from gralora_diffusion.hub import HubError, push_to_hub, save_model_card
from gralora_diffusion.tiny import TINY_MODEL_ID

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

TOKEN = "hf_loopback_write"
PROMPT = "a photo of sks teapot"


@pytest.fixture
def adapter_folder(tmp_path):
    """A training output folder: adapter, samples, a grid, and things that must not be uploaded."""
    pipe = gd.tiny_sdxl_pipeline(seed=0)
    gd.add_gralora(pipe, r=4, gralora_k=2, hybrid_r=2)
    state_dicts, configs = collect_adapter({"unet": pipe.unet})
    folder = tmp_path / "out"
    training = {"learning_rate": 1e-4, "max_train_steps": 500, "resolution": 1024, "seed": 0}
    save_adapter_file(folder / WEIGHT_NAME, state_dicts, configs, base_model=TINY_MODEL_ID,
                      metadata={"instance_prompt": PROMPT, "training": json.dumps(training)})
    (folder / "samples").mkdir()
    for name in ("sample_0.png", "sample_1.png", "grid.png"):
        Image.new("RGB", (8, 8), "red").save(folder / "samples" / name)
    (folder / "checkpoint-100").mkdir()
    torch.save({"step": 100}, folder / "checkpoint-100" / "optimizer.bin")
    Image.new("RGB", (8, 8)).save(folder / "checkpoint-100" / "sample.png")
    (folder / "train.log").write_text("log\n")
    for private in ("my_photos/me.png", "class_images/dog_0.jpg", "logs/run/grid.png", "holiday.png"):
        (folder / private).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), "blue").save(folder / private)
    return folder


def test_model_card_front_matter_and_body(adapter_folder):
    path = save_model_card(adapter_folder, repo_id="me/sks-teapot-gralora", license="openrail++")
    card = ModelCard.load(path)
    data = card.data.to_dict()
    assert data["base_model"] == TINY_MODEL_ID and data["library_name"] == "diffusers" and data["license"] == "openrail++"
    assert set(data["tags"]) >= {"gralora", "text-to-image", "stable-diffusion-xl", "diffusers", "template:sd-lora"}
    assert data["instance_prompt"] == PROMPT
    assert data["widget"] == [{"text": PROMPT, "output": {"url": f"samples/sample_{i}.png"}} for i in range(2)]
    for entry in data["widget"]:
        assert (adapter_folder / entry["output"]["url"]).is_file()
    body = card.text
    assert 'pipe.load_gralora_weights("me/sks-teapot-gralora")' in body and "![samples](samples/grid.png)" in body
    assert "gralora-diffusion export-lora" in body and "--format kohya" in body
    assert "| learning_rate | 0.0001 |" in body and "| unet (r / k / hybrid_r / alpha) | 4 / 2 / 2 / 8 |" in body


class FakeHub(BaseHTTPRequestHandler):
    """Answers the Hub API routes huggingface_hub uses for create_repo + upload_folder."""

    calls: list = []
    committed: dict = {}

    def log_message(self, *args):  # quiet
        pass

    def _reply(self, status, payload):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _authorized(self):
        return self.headers.get("Authorization") == f"Bearer {TOKEN}"

    def do_GET(self):
        self.calls.append(("GET", self.path))
        self._reply(401 if not self._authorized() else 404, {"error": "Invalid credentials in Authorization header"})

    def do_POST(self):
        data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        path = self.path.split("?")[0]
        self.calls.append(("POST", path))
        if not self._authorized():
            return self._reply(401, {"error": "Invalid credentials in Authorization header"})
        host = f"http://{self.headers['Host']}"
        if path == "/api/repos/create":
            request = json.loads(data)
            return self._reply(200, {"url": f"{host}/{request['organization']}/{request['name']}"})
        if path == "/api/validate-yaml":  # the Hub checks README.md's front matter before the upload
            content = json.loads(data)["content"]
            block = re.match(r"---\n(.*?)\n---\n", content, re.S)  # the front matter, as the Hub finds it
            front = yaml.safe_load(block.group(1)) if block else None
            ok = isinstance(front, dict) and front.get("library_name") == "diffusers"
            return self._reply(200 if ok else 400, {"warnings": []} if ok else {"errors": [{"message": "bad YAML"}]})
        if "/preupload/" in path:
            files = json.loads(data)["files"]
            return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
        if "/commit/" in path:
            repo = path.split("/api/models/")[1].split("/commit/")[0]
            for line in data.splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    self.committed[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                elif item["key"] == "header":
                    self.committed["<message>"] = item["value"]["summary"].encode()
            return self._reply(200, {"commitUrl": f"{host}/{repo}/commit/{'a' * 40}", "commitOid": "a" * 40})
        self._reply(404, {"error": f"not served by the test: {path}"})


@pytest.fixture
def fake_hub(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    FakeHub.calls, FakeHub.committed = [], {}
    # What HF_ENDPOINT=http://127.0.0.1:<port> does at import; conftest set HF_HUB_OFFLINE=1 for the rest.
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield FakeHub
    server.shutdown()
    server.server_close()


def test_push_commits_adapter_card_images_and_lora_export(adapter_folder, fake_hub, capsys):
    assert cli_main(["push", str(adapter_folder), "me/sks-teapot-gralora", "--token", TOKEN,
                     "--include-lora-export", "--commit-message", "first adapter"]) == 0
    assert "Pushed" in capsys.readouterr().out
    posts = [path for method, path in fake_hub.calls if method == "POST"]  # (huggingface_hub may GET its own registries)
    assert [p.split("/")[-2] if "/api/models/" in p else p for p in posts] == [
        "/api/repos/create", "/api/validate-yaml", "preupload", "commit"]
    assert sorted(fake_hub.committed) == sorted([
        "<message>", "README.md", WEIGHT_NAME, "pytorch_lora_weights.safetensors",
        "samples/grid.png", "samples/sample_0.png", "samples/sample_1.png"])
    assert fake_hub.committed["<message>"] == b"first adapter"
    assert fake_hub.committed[WEIGHT_NAME] == (adapter_folder / WEIGHT_NAME).read_bytes()
    assert b"load_gralora_weights" in fake_hub.committed["README.md"]  # written because the folder had none


def test_push_without_token_explains_and_keeps_files(adapter_folder, fake_hub, monkeypatch, tmp_path):
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))
    before = sorted(p.relative_to(adapter_folder) for p in adapter_folder.rglob("*"))
    with pytest.raises(HubError, match="hf auth login") as info:
        push_to_hub(adapter_folder, "me/sks-teapot-gralora", token=None)
    assert "401" in str(info.value) and "Nothing was deleted locally" in str(info.value)
    assert fake_hub.committed == {}
    after = sorted(p.relative_to(adapter_folder) for p in adapter_folder.rglob("*"))
    assert set(before) <= set(after) and read_adapter_file(adapter_folder / WEIGHT_NAME)


def test_push_offline_explains(adapter_folder, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        push_to_hub(adapter_folder, "me/sks-teapot-gralora", token=TOKEN)
    assert (adapter_folder / WEIGHT_NAME).is_file()


def test_push_refuses_folder_without_adapter(tmp_path, fake_hub):
    with pytest.raises(gd.GraloraError, match="no such file"):
        push_to_hub(tmp_path, "me/x", token=TOKEN)
    assert fake_hub.calls == []


def test_push_dry_run_lists_files_and_sends_nothing(adapter_folder, fake_hub, capsys):
    assert cli_main(["push", str(adapter_folder), "me/sks-teapot-gralora", "--token", TOKEN, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run" in out and "samples/sample_0.png" in out and WEIGHT_NAME in out
    assert "my_photos" not in out and "class_images" not in out and "holiday" not in out
    assert fake_hub.calls == [] and not (adapter_folder / "README.md").exists()


def test_push_uploads_only_the_listed_files(adapter_folder, fake_hub, capsys):
    """Photos and class images under the output folder, at any depth, never leave the machine."""
    assert cli_main(["push", str(adapter_folder), "me/sks-teapot-gralora", "--token", TOKEN]) == 0
    out = capsys.readouterr().out
    assert "Uploading 5 files" in out
    assert sorted(fake_hub.committed) == sorted(["<message>", "README.md", WEIGHT_NAME, "samples/grid.png",
                                                 "samples/sample_0.png", "samples/sample_1.png"])
    assert not any(p in out for p in ("my_photos", "class_images", "logs/", "holiday"))


def test_push_refuses_bad_repo_id_before_anything(adapter_folder, fake_hub):
    with pytest.raises(HubError, match="not valid"):
        push_to_hub(adapter_folder, "me/bad name!", token=TOKEN)
    assert fake_hub.calls == []


def test_card_code_is_valid_for_any_prompt_and_path(adapter_folder, tmp_path):
    """Quotes, backslashes and shell metacharacters in prompts and paths give valid Python and shell."""
    import ast
    import shlex
    import shutil

    folder = tmp_path / "it's a $(touch pwned) dir"
    shutil.copytree(adapter_folder, folder)
    prompt = 'a "sks" teapot\\"); import os; os.system("echo pwned"); ("'
    body = ModelCard.load(save_model_card(folder, instance_prompt=prompt)).text
    tree = ast.parse(body.split("```python")[1].split("```")[0])  # valid Python
    calls = [n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)]
    assert "system" not in calls
    constants_ = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)}
    assert prompt in constants_ and str(folder) in constants_
    for line in body.split("```bash")[1].split("```")[0].strip().splitlines():
        words = shlex.split(line, comments=True)
        assert words[:2] == ["gralora-diffusion", "export-lora"] and words[2] == str(folder)
