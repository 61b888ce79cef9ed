"""scripts/benchmark.py layer --quick runs and writes the JSON the README's tables come from (no timing assertions)."""

import importlib.util
import json
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"


def load_script():
    spec = importlib.util.spec_from_file_location("benchmark_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_layer_quick_writes_json(tmp_path):
    out = tmp_path / "layer.json"
    threads = torch.get_num_threads()
    try:
        load_script().main(["layer", "--quick", "--threads", "1", "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    result = json.loads(out.read_text())
    assert result["benchmark"] == "layer" and result["quick"] and result["device"] == "cpu"
    assert {"torch", "cpu", "threads"} <= set(result["machine"])
    variants = {r["variant"] for r in result["records"]}
    assert variants == {"frozen", "lora r32", "peft-gralora r32 k2", "ours r32 k2", "peft-gralora r32 k4", "ours r32 k4"}
    for record in result["records"]:
        assert record["whole"]["median_ms"] > 0 and record["whole"]["n"] == 3
        assert record["saved_bytes"] >= 0 if record["variant"] == "frozen" else record["saved_bytes"] > 0
        assert (record["variant"] == "frozen") != ("branch" in record)
        if "branch" in record:
            assert record["branch"]["median_ms"] > 0
    assert len(result["rows"]) == 2
    for row in result["rows"]:
        for key in ("ours_vs_peft_gralora", "ours_vs_lora", "branch_ours_vs_peft_gralora", "branch_ours_vs_lora"):
            assert row[key]["median"] > 0
        assert row["saved_mb"]["ours"] <= row["saved_mb"]["peft_gralora"]


def test_the_scripts_take_kebab_case_flags_like_the_cli():
    args = load_script().parse(["step", "--mixed-precision", "bf16", "--torch-compile", "--size-gib", "0.5"])
    assert args.mixed_precision == "bf16" and args.torch_compile and args.size_gib == 0.5
