"""`layer` benchmark: one SDXL Linear, frozen and with PEFT LoRA, PEFT GraLoRA and our GraLoRA
layer at the same rank, forward+backward of the whole layer and of the adapter branch alone,
and the bytes autograd saves for backward. With `--autocast bf16|fp16`, as mixed-precision
training runs it: frozen weights and input in that dtype, adapters in fp32, forward under
`torch.autocast`, backward outside it."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
from peft import GraloraConfig, LoraConfig, inject_adapter_in_model

from gralora_diffusion.inject import upgrade_gralora_layers
from .common import DTYPES, machine, paired_ratio, saved_bytes, summarize, table, time_interleaved


@dataclass(frozen=True)
class Shape:
    name: str
    in_features: int
    out_features: int
    tokens: tuple[int, ...]  # batch 2 × sequence length, the smaller first


# Every distinct SDXL Linear shape with the token counts it sees at 1024² (batch 2,
# classifier-free guidance): 64² latents = 4096 tokens at width 640, 32² = 1024 at 1280, and the
# 77-token text context for the cross-attention k/v projections and the text encoders.
SHAPES = (
    Shape("attn 640", 640, 640, (2 * 1024, 2 * 4096)),
    Shape("attn 1280", 1280, 1280, (2 * 256, 2 * 1024)),
    Shape("cross k/v 640", 2048, 640, (2 * 77,)),
    Shape("cross k/v 1280", 2048, 1280, (2 * 77,)),
    Shape("ff in 640", 640, 5120, (2 * 1024, 2 * 4096)),
    Shape("ff out 640", 2560, 640, (2 * 1024, 2 * 4096)),
    Shape("ff in 1280", 1280, 10240, (2 * 256, 2 * 1024)),
    Shape("ff out 1280", 5120, 1280, (2 * 256, 2 * 1024)),
    Shape("text 768", 768, 768, (2 * 77,)),
    Shape("text 1280", 1280, 1280, (2 * 77,)),
)
QUICK_SHAPES = (Shape("quick", 128, 256, (2 * 32,)),)
CONFIGS = {  # (r, k)
    "paper": ((32, 2), (128, 4)),  # the paper's rule: k = 2 for r <= 32, k = 4 for r >= 64
    "all": ((32, 2), (32, 4), (128, 2), (128, 4)),
}
QUICK_CONFIGS = ((32, 2), (32, 4))


class ZeroBase(nn.Module):
    """Stands in for the frozen Linear when timing the adapter branch alone."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features

    def forward(self, x):
        return x.new_zeros(*x.shape[:-1], self.out_features)


def adapted(base: nn.Linear, kind: str, r: int, k: int) -> nn.Module:
    """A copy of `base` inside a one-module model, adapted through PEFT's own injection."""
    model = nn.Sequential()
    model.add_module("proj", copy.deepcopy(base))
    if kind == "lora":
        inject_adapter_in_model(LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"]), model)
    elif kind in ("peft-gralora", "ours"):
        inject_adapter_in_model(GraloraConfig(r=r, gralora_k=k, alpha=2 * r, target_modules=["proj"]), model)
        if kind == "ours":
            upgrade_gralora_layers(model)
    for p in model.parameters():  # adapters start as a no-op (B = 0); timing does not care, but be realistic
        if p.requires_grad:
            nn.init.normal_(p, std=0.02)
    return model


def variants(shape: Shape, configs, device, dtype, adapter_dtype=None) -> dict[str, tuple[nn.Module, nn.Module | None]]:
    """name -> (whole layer, adapter branch alone); every variant adapts the same frozen weights,
    in `dtype`, and keeps its adapter in `adapter_dtype` (default `dtype`)."""
    torch.manual_seed(0)
    base = nn.Linear(shape.in_features, shape.out_features).requires_grad_(False)
    out = {"frozen": nn.Sequential()}
    out["frozen"].add_module("proj", base)
    for r in sorted({r for r, _ in configs}):
        out[f"lora r{r}"] = adapted(base, "lora", r, 1)
    for r, k in configs:
        out[f"peft-gralora r{r} k{k}"] = adapted(base, "peft-gralora", r, k)
        out[f"ours r{r} k{k}"] = adapted(base, "ours", r, k)
    result = {}
    for name, model in out.items():
        model.to(device=device, dtype=dtype)
        for p in model.parameters():
            if p.requires_grad and adapter_dtype is not None:
                p.data = p.data.to(adapter_dtype)
        branch = None
        if name != "frozen":
            branch = copy.deepcopy(model)
            branch.proj.base_layer = ZeroBase(shape.out_features)
        result[name] = (model, branch)
    return result


def bench_shape(shape: Shape, tokens: int, configs, device, dtype, reps: int, warmup: int, clock: str = "wall",
                autocast: torch.dtype | None = None) -> list[dict]:
    """`autocast`: frozen weights and input in that dtype, adapters in fp32, forward under autocast."""
    if autocast is not None:
        dtype = autocast
    models = variants(shape, configs, device, dtype, torch.float32 if autocast is not None else None)

    def forward(model):
        with torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext():
            return model(x)

    x = torch.randn(tokens, shape.in_features, device=device, dtype=dtype).view(2, tokens // 2, -1)
    x.requires_grad_(True)  # a layer inside the UNet passes its gradient on
    grad_out = torch.randn(2, tokens // 2, shape.out_features, device=device, dtype=dtype)

    def step(model):
        return lambda: forward(model).backward(grad_out)

    def clear():
        x.grad = None
        for model, branch in models.values():
            model.zero_grad(set_to_none=True)
            if branch is not None:
                branch.zero_grad(set_to_none=True)

    cases = {}
    for name, (model, branch) in models.items():
        cases[("whole", name)] = step(model)
        if branch is not None:
            cases[("branch", name)] = step(branch)
    samples = time_interleaved(cases, reps, warmup, device, before=clear, clock=clock)
    records = []
    for name, (model, _) in models.items():
        params = list(model.parameters())
        record = {"shape": shape.name, "in": shape.in_features, "out": shape.out_features, "tokens": tokens,
                  "variant": name, "whole": summarize(samples[("whole", name)]),
                  "saved_bytes": saved_bytes(lambda: forward(model), params)}
        if ("branch", name) in samples:
            record["branch"] = summarize(samples[("branch", name)])
        records.append(record)
    clear()
    return records


def ratios(records: list[dict]) -> list[dict]:
    """One row per (shape, tokens, r, k): ours against PEFT GraLoRA and PEFT LoRA of the same rank,
    as medians of per-repetition ratios (see `paired_ratio`)."""
    by = {(r["shape"], r["tokens"], r["variant"]): r for r in records}
    rows = []
    for (shape, tokens, variant), ours in by.items():
        if not variant.startswith("ours "):
            continue
        rk = variant.removeprefix("ours ")
        peft, lora = by[(shape, tokens, f"peft-gralora {rk}")], by[(shape, tokens, f"lora {rk.split()[0]}")]
        frozen = by[(shape, tokens, "frozen")]
        rows.append({
            "shape": shape, "in": ours["in"], "out": ours["out"], "tokens": tokens, "config": rk,
            **{f"{name}_ms": rec["whole"]["median_ms"] for name, rec in
               (("frozen", frozen), ("lora", lora), ("peft_gralora", peft), ("ours", ours))},
            "ours_vs_peft_gralora": paired_ratio(ours["whole"], peft["whole"]),
            "ours_vs_lora": paired_ratio(ours["whole"], lora["whole"]),
            "peft_gralora_vs_lora": paired_ratio(peft["whole"], lora["whole"]),
            "branch_ours_vs_peft_gralora": paired_ratio(ours["branch"], peft["branch"]),
            "branch_ours_vs_lora": paired_ratio(ours["branch"], lora["branch"]),
            "saved_mb": {"lora": lora["saved_bytes"] / 2**20, "peft_gralora": peft["saved_bytes"] / 2**20,
                         "ours": ours["saved_bytes"] / 2**20},
        })
    return rows


def run(args) -> dict:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    autocast = DTYPES[args.autocast] if getattr(args, "autocast", None) else None
    if args.quick:
        shapes, configs, reps, warmup = QUICK_SHAPES, QUICK_CONFIGS, 3, 1
    else:
        shapes, configs, reps, warmup = SHAPES, CONFIGS[args.configs], args.reps, 2
    records = []
    for shape in shapes:
        for tokens in shape.tokens if args.full or args.quick else shape.tokens[:1]:
            records += bench_shape(shape, tokens, configs, device, dtype, reps, warmup, args.clock, autocast)
            print(f"  {shape.name} {shape.in_features}->{shape.out_features} × {tokens} tokens done", flush=True)
    rows = ratios(records)
    ratio = lambda q: f"{q['median']:.2f}× ±{100 * q['spread'] / 2:.0f}%"  # noqa: E731
    header = ["shape", "in→out", "tokens", "r/k", "frozen ms", "LoRA ms", "PEFT-G ms", "ours ms", "ours/PEFT-G",
              "ours/LoRA", "branch ours/PEFT-G", "branch ours/LoRA", "saved MB LoRA/PEFT-G/ours"]
    print(table(header, [[
        r["shape"], f"{r['in']}→{r['out']}", r["tokens"], r["config"].replace(" ", "/"), f"{r['frozen_ms']:.1f}",
        f"{r['lora_ms']:.1f}", f"{r['peft_gralora_ms']:.1f}", f"{r['ours_ms']:.1f}", ratio(r["ours_vs_peft_gralora"]),
        ratio(r["ours_vs_lora"]), ratio(r["branch_ours_vs_peft_gralora"]), ratio(r["branch_ours_vs_lora"]),
        "/".join(f"{v:.1f}" for v in r["saved_mb"].values())] for r in rows]))
    print("ms: median forward+backward of the whole layer (input gradient on, base frozen). Ratios: median of "
          "per-repetition ratios, ± half their interquartile range; branch: the adapter alone on a zero base output. "
          "saved MB: distinct storages kept for backward, parameters left out.")
    return {"benchmark": "layer", "device": str(device), "dtype": args.dtype, "autocast": getattr(args, "autocast", None), "reps": reps, "warmup": warmup,
            "configs": [list(c) for c in configs], "full": bool(args.full), "quick": bool(args.quick), "machine": machine(device), "records": records, "rows": rows}
