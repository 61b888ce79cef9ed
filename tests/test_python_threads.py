"""Python users get the command line's thread rule (threads.py), unless they chose: said once."""

import json
import os
import subprocess
import sys

import pytest

from conftest import SUBPROCESS_ENV

SCRIPT = """
import json, os, sys, contextlib, io
import torch
if sys.argv[1] == "torch_set":
    torch.set_num_threads(3)
default = torch.get_num_threads()
import gralora_diffusion as gd
from gralora_diffusion.threads import choose_num_threads
after_import = torch.get_num_threads()
out = io.StringIO()
with contextlib.redirect_stdout(out):
    pipe = gd.tiny_world_pipeline()
    gd.generate_samples("world", prompts=["a photo of a red ball"], steps=1, output_dir=sys.argv[2], progress=False)
    gd.tiny_world_pipeline()
print(json.dumps({"default": default, "after_import": after_import, "after": torch.get_num_threads(),
                  "rule": choose_num_threads()[0] if not os.environ.get("OMP_NUM_THREADS") else None,
                  "said": [l for l in out.getvalue().splitlines() if l.startswith("CPU threads")]}))
"""


def _run(mode, tmp_path, omp=None):
    env = {k: v for k, v in SUBPROCESS_ENV.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if omp:
        env["OMP_NUM_THREADS"] = omp
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode, str(tmp_path / mode)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_python_entry_points_use_the_cli_rule_and_say_it_once(tmp_path):
    r = _run("plain", tmp_path)
    assert r["after_import"] == r["default"]  # importing the package changes nothing
    assert r["after"] == r["rule"]
    if r["default"] != r["rule"]:
        assert len(r["said"]) == 1 and f"CPU threads: {r['rule']}" in r["said"][0] and "torch.set_num_threads" in r["said"][0]
    else:
        assert r["said"] == []


@pytest.mark.slow
@pytest.mark.parametrize("mode, omp", [("torch_set", None), ("plain", "1")])
def test_a_users_choice_is_kept(tmp_path, mode, omp):
    r = _run(mode, tmp_path, omp)
    assert r["after"] == r["default"] == (3 if mode == "torch_set" else 1)
    assert r["said"] == []
