"""No code path of ours unpickles a user file: checked in the source, and by a pickle whose
loading would leave a marker file."""

import ast
from pathlib import Path

import pytest

import gralora_diffusion as gd
from corrupt_corpus import _SideEffect

PACKAGE = Path(gd.__file__).parent


def unsafe_calls(source: str, filename: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
        if name.endswith("torch.load"):
            if keywords.get("weights_only") != "True":
                found.append(f"{filename}:{node.lineno}: {name} without weights_only=True")
        if name in {"pickle.load", "pickle.loads", "cloudpickle.load", "dill.load", "pickle.Unpickler"}:
            found.append(f"{filename}:{node.lineno}: {name}")
        if name.endswith("np.load") and keywords.get("allow_pickle") == "True":
            found.append(f"{filename}:{node.lineno}: {name}(allow_pickle=True)")
    return found


def test_the_scanner_finds_unsafe_calls():
    bad = "import torch, pickle\ntorch.load('x')\npickle.loads(b'')\ntorch.load('y', weights_only=False)\n"
    assert len(unsafe_calls(bad, "bad.py")) == 3
    assert unsafe_calls("import torch\ntorch.load('x', weights_only=True)\n", "ok.py") == []


def test_package_source_never_unpickles():
    found = []
    for path in PACKAGE.rglob("*.py"):
        found += unsafe_calls(path.read_text(), str(path.relative_to(PACKAGE)))
    assert not found, "\n".join(found)


@pytest.mark.parametrize("name", ["adapter.safetensors", "adapter.bin", "adapter.pt", "adapter.ckpt"])
def test_a_pickle_with_a_side_effect_is_never_loaded(tmp_path, name):
    import pickle

    marker = tmp_path / "UNPICKLED"
    path = tmp_path / name
    path.write_bytes(pickle.dumps({"w": _SideEffect(str(marker))}))
    with pytest.raises(gd.GraloraError, match="pickle|refused"):
        gd.adapter_file.read_adapter_file(path)
    assert not marker.exists()
    # sanity: the payload really has the side effect when unpickled
    pickle.loads(path.read_bytes())
    assert marker.exists()
