"""`memory` benchmark: one GraLoRA training step over the full-size SDXL UNet with its base in bf16, int8,
nf4 and fp8 (`--quantize_base`), each in a fresh process: peak memory and the base's weight bytes, and
their ratios to the bf16 base measured in the same invocation.

The UNet is diffusers' `UNet2DConditionModel` with SDXL base 1.0's config (below, as data) and random
weights, no download: one process builds it on the meta device, materializes it in bf16 (5.1 GB, never
fp32) and writes it with `save_pretrained` in small shards; every measured process then loads that folder
through diffusers' `from_pretrained` with the option's quantization config (gralora_diffusion.quantize),
the path a Hub base takes. The step: GraLoRA r32 k2 on attention (fp32 adapters), gradient
checkpointing, cached text embeddings (random [1, 77, 2048] tensors stand in for them: no text encoder is
loaded), bf16 autocast, forward + backward + AdamW step at batch 1.

Every mode runs twice: the AdamW step after backward, and fused into it (`train --fused_backward_pass`:
each weight steps as its gradient completes and drops it). CPU: 256 px, peak RSS (`ru_maxrss`, and after
load / forward / backward), each child with a fixed glibc mmap threshold (see `_child`) and shards read
without mmap. CUDA (`--device cuda`): 1024 px, peak CUDA memory allocated.

    python scripts/benchmark.py memory [--threads 1] [--device cuda] [--optimizer adamw|adamw8bit] [--json out.json] [--quick]
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("none", "int8", "nf4", "fp8")
SDXL_UNET = {  # stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (the fields that are not defaults)
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280], "attention_head_dim": [5, 10, 20],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10], "cross_attention_dim": 2048, "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816, "flip_sin_to_cos": True, "freq_shift": 0, "norm_num_groups": 32,
}
QUICK_UNET = {**SDXL_UNET, "block_out_channels": [32, 64, 128], "attention_head_dim": [2, 2, 4],
              "transformer_layers_per_block": [1, 1, 2], "cross_attention_dim": 64, "addition_time_embed_dim": 8,
              "projection_class_embeddings_input_dim": 32 + 6 * 8}


def build(folder: str, quick: bool) -> None:
    """SDXL's UNet with random weights, bf16 from the start (meta, then materialized), saved in shards."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**(QUICK_UNET if quick else SDXL_UNET)).to(torch.bfloat16)
    unet.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in unet.named_parameters():
            p.zero_() if name.endswith("bias") else p.normal_(0, 0.02)
    unet.save_pretrained(folder, max_shard_size="200MB")


def step(folder: str, mode: str, device: str, resolution: int, quick: bool, fused: bool = False, optimizer_name: str = "adamw") -> dict:
    """Load the saved UNet with `mode`'s quantization, add GraLoRA, run one training step; the numbers.
    `fused`: the AdamW step runs inside backward, one weight at a time (train --fused_backward_pass);
    `optimizer_name`: the trainer's --optimizer (adamw8bit: bitsandbytes' 8-bit AdamW, --use_8bit_adam)."""
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import cast_training_params

    from gralora_diffusion.inject import add_gralora
    from gralora_diffusion.quantize import check_quantize_base, load_quantized_model, pipeline_quantization, weight_bytes
    from gralora_diffusion.train import TrainConfig
    from gralora_diffusion.train.fused_backward import fuse_optimizer_into_backward
    from gralora_diffusion.train.model import make_optimizer

    try:
        check_quantize_base(mode, "--quantize_base", device=device)
    except ValueError as err:
        return {"mode": mode, "skipped": str(err)}
    quantization = pipeline_quantization(mode, ("unet",))
    config = quantization.quant_mapping["unet"] if quantization else None
    start = time.perf_counter()
    # disable_mmap: the bf16 shards are read and freed, not mapped (mapped pages of shards whose tensors were
    # quantized stay in RSS as long as any tensor of the shard lives)
    unet = load_quantized_model(UNet2DConditionModel, folder, config, torch.bfloat16, disable_mmap=True)
    unet.to(device)
    load_s = time.perf_counter() - start
    stages = {"loaded": _peak(device)}
    base_bytes = weight_bytes(unet)
    unet.requires_grad_(False)
    add_gralora(unet, r=4 if quick else 32, gralora_k=2, unet_targets="attn")
    cast_training_params(unet, dtype=torch.float32)
    unet.enable_gradient_checkpointing()
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = make_optimizer(TrainConfig(optimizer=optimizer_name), [{"params": params, "lr": 1e-4}])  # the trainer's rule
    if fused:
        fuse_optimizer_into_backward(optimizer)
    g = torch.Generator().manual_seed(0)
    side, ctx = resolution // 8, unet.config.cross_attention_dim
    text_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    latents = torch.randn(1, 4, side, side, generator=g).to(device, torch.bfloat16)
    noise = torch.randn(latents.shape, generator=g).to(device, torch.bfloat16)
    embeds = torch.randn(1, 77, ctx, generator=g).to(device, torch.bfloat16)  # the cached text embeddings
    added = {"text_embeds": torch.randn(1, text_dim, generator=g).to(device, torch.bfloat16),
             "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], device=device, dtype=torch.bfloat16)}
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        pred = unet(latents + noise, torch.tensor([500], device=device), embeds, added_cond_kwargs=added).sample
    loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
    stages["forward"] = _peak(device)
    loss.backward()
    stages["backward"] = _peak(device)
    optimizer.step()  # nothing left to do when fused: every weight stepped in backward and dropped its gradient
    optimizer.zero_grad(set_to_none=True)
    step_s = time.perf_counter() - start
    record = {"mode": mode, "fused_backward": fused, "optimizer": optimizer_name, "base_weight_bytes": base_bytes, "adapter_params": sum(p.numel() for p in params),
              "load_s": round(load_s, 1), "step_s": round(step_s, 1), "loss": float(loss), "peak_after": stages,
              "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.startswith("cuda"):
        record["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
    return record


def _peak(device: str) -> int:
    """The process's peak so far: RSS on CPU, CUDA memory allocated on a GPU (bytes)."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child(args: list[str]) -> dict:
    # A fixed glibc mmap threshold: every allocation over 128 KiB is its own mapping, returned to the system
    # when freed. With glibc's default (a threshold that grows to 32 MiB as large blocks are freed), the
    # per-layer bf16 temporaries of quantizing at load fragment the heap: the int8 load then peaked at
    # 7.4 GB of RSS for a 2.9 GB model. The same setting for every mode.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.memory", *args], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"exit {proc.returncode}: {tail}"}
    return json.loads(lines[-1])


def run(args) -> dict:
    device = args.device
    resolution = 64 if args.quick else 1024 if device.startswith("cuda") else 256
    threads = ["--threads", str(args.threads)] if args.threads else []
    folder = tempfile.mkdtemp(prefix="gralora-memory-unet-")
    quick = ["--quick"] if args.quick else []
    try:
        built = _child(["build", folder, *quick, *threads])
        if "error" in built:
            raise SystemExit(f"memory: building the UNet failed: {built['error']}")
        fusing = (False, True) if args.optimizer == "adamw" else (False,)  # the trainer fuses AdamW only
        rows = [{"mode": m, "fused_backward": fused,
                 **_child(["step", folder, m, device, str(resolution), *quick, *threads, "--optimizer", args.optimizer,
                           *(["--fused_backward_pass"] if fused else [])])}
                for fused in fusing for m in MODES]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    peak_key = "peak_cuda_bytes" if device.startswith("cuda") else "peak_rss_bytes"
    print(f"\nOne GraLoRA r32 k2 (attn) training step, SDXL UNet {'(quick: a small UNet) ' if args.quick else ''}"
          f"at {resolution} px batch 1, gradient checkpointing, bf16 autocast, on {device}; {peak_key}. {args.optimizer} step after "
          "backward (plain) or inside it, one weight at a time (fused: train --fused_backward_pass); x bf16: against the "
          "bf16 base with the same step")
    print(f"{'base':6} {'step':6} {'peak GiB':>9} {'x bf16':>7} {'base GiB':>9} {'x bf16':>7} {'step s':>7}")
    for r in rows:
        kind = "fused" if r["fused_backward"] else "plain"
        if peak_key not in r:
            print(f"{r['mode']:6} {kind:6} {r.get('skipped') or r.get('error')}")
            continue
        base = next((b for b in rows if b["mode"] == "none" and b["fused_backward"] == r["fused_backward"] and peak_key in b), None)
        if base:
            r["peak_ratio"] = r[peak_key] / base[peak_key]
            r["base_bytes_ratio"] = r["base_weight_bytes"] / base["base_weight_bytes"]
        print(f"{r['mode']:6} {kind:6} {r[peak_key] / 2**30:9.2f} {r.get('peak_ratio', float('nan')):7.2f} "
              f"{r['base_weight_bytes'] / 2**30:9.2f} {r.get('base_bytes_ratio', float('nan')):7.2f} {r['step_s']:7.1f}")
    return {"benchmark": "memory", "device": device, "resolution": resolution, "quick": bool(args.quick), "optimizer": args.optimizer,
            "rows": rows}


def main(argv: list[str]) -> None:
    import torch

    if "--threads" in argv:
        i = argv.index("--threads")
        torch.set_num_threads(int(argv[i + 1]))
        del argv[i:i + 2]
    quick, fused = "--quick" in argv, "--fused_backward_pass" in argv
    argv = [a for a in argv if a not in ("--quick", "--fused_backward_pass")]
    optimizer_name = "adamw"
    if "--optimizer" in argv:
        i = argv.index("--optimizer")
        optimizer_name = argv[i + 1]
        del argv[i:i + 2]
    if argv[0] == "build":
        build(argv[1], quick)
        print(json.dumps({"built": argv[1]}))
    else:
        _, folder, mode, device, resolution = argv
        print(json.dumps(step(folder, mode, device, int(resolution), quick, fused, optimizer_name)))


if __name__ == "__main__":
    main(sys.argv[1:])
