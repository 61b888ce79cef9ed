"""Builds (never stores) broken adapter files from a good one, for the hardening tests.

Each case is (name, build(good_path, tmp_dir) -> path, expected message fragment).
"""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def split(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def join(header: dict | str | bytes, data: bytes) -> bytes:
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode()
    return struct.pack("<Q", len(header)) + header + data


def _first_tensor(header: dict, suffix: str = "gralora_A") -> str:
    return next(k for k in header if k != "__metadata__" and k.endswith(suffix))


def _rewrite_tensors(good: Path, out: Path, change) -> Path:
    """Load the good file, let `change(tensors, metadata)` edit it, save as a valid safetensors file."""
    from safetensors import safe_open

    with safe_open(str(good), "pt") as f:
        metadata = dict(f.metadata())
    tensors = load_file(str(good))
    change(tensors, metadata)
    save_file(tensors, str(out), metadata=metadata)
    return out


def _edit_configs(edit):
    def change(tensors, metadata):
        configs = json.loads(metadata["gralora_configs"])
        edit(configs)
        metadata["gralora_configs"] = json.dumps(configs)

    return change


class _SideEffect:
    """Unpickling this creates a file: proof that something unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def build_cases(good: Path, tmp: Path):
    header, data = split(good)
    raw = good.read_bytes()
    a_key = _first_tensor(header)
    cases = []

    def raw_case(name, content: bytes, expect):
        def build():
            path = tmp / f"{name}.safetensors"
            path.write_bytes(content)
            return path

        cases.append((name, build, expect))

    for fraction in (0.0, 0.3, 0.6, 0.99):
        cut = max(1, int(len(raw) * fraction)) if fraction else 4
        raw_case(f"truncated_{int(fraction * 100)}", raw[:cut], "")
    raw_case("empty", b"", "too short")
    raw_case("header_len_beyond_file", struct.pack("<Q", len(raw) * 4) + raw[8:], "truncated or not safetensors")
    raw_case("header_not_json", join(b"{not json at all" + b" " * 40, data), "")
    raw_case("header_json_list", join(json.dumps([1, 2, 3]), data), "")
    bad_dtype = {**header, a_key: {**header[a_key], "dtype": "F99"}}
    raw_case("wrong_dtype_string", join(bad_dtype, data), "")
    int_dtype = {**header, a_key: {**header[a_key], "dtype": "I32"}}
    raw_case("integer_dtype", join(int_dtype, data), "")
    keys = [k for k in header if k != "__metadata__"]
    overlap = dict(header)
    overlap[keys[1]] = {**header[keys[1]], "data_offsets": header[keys[0]]["data_offsets"]}
    raw_case("overlapping_offsets", join(overlap, data), "")
    out_of_range = {**header, a_key: {**header[a_key], "data_offsets": [len(data) - 4, len(data) + 400]}}
    raw_case("offsets_out_of_range", join(out_of_range, data), "")
    body = json.dumps(header)
    dup = body[:-1] + ", " + json.dumps(a_key) + ": " + json.dumps(header[a_key]) + "}"
    raw_case("duplicate_keys", join(dup, data), "")
    meta = header["__metadata__"]
    raw_case("configs_not_json", join({**header, "__metadata__": {**meta, "gralora_configs": "{oops"}}, data), "not JSON")
    raw_case("newer_format_version", join({**header, "__metadata__": {**meta, "format_version": "99"}}, data), "newer")
    raw_case("no_header_metadata", join({k: v for k, v in header.items() if k != "__metadata__"}, data), "no gralora-diffusion header")
    raw_case("metadata_not_strings", join({**header, "__metadata__": {**meta, "format_version": 1}}, data), "")
    # JSON nested deeper than Python's recursion limit: a RecursionError, not a ValueError
    raw_case("header_nested_deep", join(b"[" * 100_000 + b"]" * 100_000, data), "not valid JSON")
    deep_configs = {**meta, "gralora_configs": "[" * 100_000 + "]" * 100_000}
    raw_case("configs_nested_deep", join({**header, "__metadata__": deep_configs}, data), "not JSON")
    # a header that claims another shape for a tensor: refused from the header, before any read
    lying = {**header, a_key: {**header[a_key], "shape": header[a_key]["shape"][:-1] + [header[a_key]["shape"][-1] * 2],
                                "data_offsets": header[a_key]["data_offsets"]}}
    raw_case("header_shape_lies", join(lying, data), "")

    def tensor_case(name, change, expect):
        cases.append((name, lambda: _rewrite_tensors(good, tmp / f"{name}.safetensors", change), expect))

    def nan(tensors, _):
        tensors[a_key] = tensors[a_key].clone()
        tensors[a_key].view(-1)[0] = float("nan")

    def inf(tensors, _):
        tensors[a_key] = tensors[a_key].clone()
        tensors[a_key].view(-1)[-1] = float("inf")

    def transposed(tensors, _):
        tensors[a_key] = tensors[a_key].transpose(1, 2).contiguous()

    def unknown_module(tensors, _):
        # the same weights once more, under a module name no SDXL has
        module = a_key[: -len(".gralora_A")]
        for suffix in ("gralora_A", "gralora_B", "gralora_A_general.weight", "gralora_B_general.weight"):
            if f"{module}.{suffix}" in tensors:
                tensors[f"{module.rsplit('.', 1)[0]}.to_nowhere.{suffix}"] = tensors[f"{module}.{suffix}"].clone()

    def missing_B(tensors, _):
        del tensors[a_key[: -len("gralora_A")] + "gralora_B"]

    def stray_key(tensors, _):
        tensors["vae.decoder.weight"] = torch.zeros(2)

    tensor_case("nan_tensor", nan, "NaN or Inf")
    tensor_case("inf_tensor", inf, "NaN or Inf")
    tensor_case("shapes_transposed", transposed, "do not fit")
    tensor_case("module_not_in_pipeline", unknown_module, "to_nowhere")
    tensor_case("module_incomplete", missing_B, "needs")
    tensor_case("key_of_unknown_component", stray_key, "vae.decoder.weight")
    tensor_case("k_disagrees", _edit_configs(lambda c: c["unet"].update(gralora_k=4)), "do not fit")
    tensor_case("r_disagrees", _edit_configs(lambda c: c["unet"].update(r=16)), "do not fit")
    tensor_case("config_field_missing", _edit_configs(lambda c: c["unet"].pop("alpha")), "missing fields ['alpha']")
    tensor_case("config_field_unknown", _edit_configs(lambda c: c["unet"].update(use_dora=True)), "unknown fields ['use_dora']")
    tensor_case("config_wrong_shape", _edit_configs(lambda c: c.update(unet=[1, 2])), "expected a JSON object")
    # non-finite numbers in a header (Python's json reads NaN, Infinity, and 1e999 as inf)
    tensor_case("alpha_nan", _edit_configs(lambda c: c["unet"].update(alpha=float("nan"))), "finite")
    tensor_case("alpha_inf", _edit_configs(lambda c: c["unet"].update(alpha=float("inf"))), "finite")
    tensor_case("alpha_minus_inf", _edit_configs(lambda c: c["text_encoder"].update(alpha=float("-inf"))), "finite")
    tensor_case("alpha_string", _edit_configs(lambda c: c["unet"].update(alpha="16")), "must be a number")
    tensor_case("alpha_huge_int", _edit_configs(lambda c: c["unet"].update(alpha=10**400)), "finite")
    tensor_case("r_inf", _edit_configs(lambda c: c["unet"].update(r=float("inf"))), "integer")
    tensor_case("k_nan", _edit_configs(lambda c: c["unet"].update(gralora_k=float("nan"))), "integer")
    tensor_case("dropout_nan", _edit_configs(lambda c: c["unet"].update(gralora_dropout=float("nan"))), "finite")
    tensor_case("target_regex_invalid", _edit_configs(lambda c: c["unet"].update(target_modules="(to_q|")), "not a valid regex")

    def float8(tensors, _):
        tensors[a_key] = tensors[a_key].to(torch.float8_e4m3fn)

    def int_tensor(tensors, _):
        tensors[a_key] = tensors[a_key].to(torch.int32)

    tensor_case("float8_tensor", float8, "F8_E4M3")
    tensor_case("int32_tensor", int_tensor, "I32")

    def lora_file():
        path = tmp / "a_lora.safetensors"
        save_file({"unet.down_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 32), "unet.down_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(32, 4)}, str(path))
        return path

    cases.append(("lora_file", lora_file, "LoRA file"))

    def folder():
        path = tmp / "a_folder.safetensors"
        path.mkdir(exist_ok=True)
        return path

    cases.append(("directory", folder, ""))

    def pickle_renamed():
        path = tmp / "pickle.safetensors"
        path.write_bytes(pickle.dumps({"weights": _SideEffect(str(tmp / "UNPICKLED"))}))
        return path

    cases.append(("pickle_renamed", pickle_renamed, "pickle"))

    def torch_save_renamed():
        path = tmp / "torchsave.safetensors"
        torch.save({"w": torch.zeros(2)}, path)
        return path

    cases.append(("torch_save_renamed", torch_save_renamed, "pickle"))

    def pickle_bin():
        path = tmp / "adapter.bin"
        path.write_bytes(pickle.dumps(_SideEffect(str(tmp / "UNPICKLED"))))
        return path

    cases.append(("pickle_bin", pickle_bin, "refused"))
    return cases
