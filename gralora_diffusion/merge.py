"""`merge`: an adapter fused into its base at a chosen scale, saved as a full pipeline folder that
stock diffusers loads with `from_pretrained` (no gralora-diffusion needed to use it).

GraLoRA adapters fuse through `fuse_gralora` (exact ΔW), then the GraLoRA layers give their place back
to their base Linear, which keeps the fused weight; a plain LoRA through diffusers' documented
`fuse_lora` + `unload_lora_weights`. The adapter is checked against the base (any_adapter.py) and the
folder claimed (outputs.py) before anything is written."""

from __future__ import annotations

from pathlib import Path

from .errors import GraloraConfigError

COMMAND = "merge"


def merge_adapter(adapter, base: str = "tiny", output_dir="merged", scale: float = 1.0, family: str | None = None,
                  device=None, dtype=None, say=print) -> Path:
    """Fuse `adapter` (GraLoRA or plain LoRA, anything `load_any_adapter` takes) into `base` at `scale`
    and `save_pretrained` the pipeline into `output_dir`; returns the folder."""
    from .any_adapter import GRALORA, check_adapter_fits, load_any_adapter
    from .bases import load_base
    from .model_ops import remove_gralora_adapter
    from .numbers import limited
    from .outputs import claim_folder, mark_folder
    from .quiet import quiet_libraries
    from .sources import check_adapter_paths

    scale = limited("scales", scale, "--scale", GraloraConfigError)
    check_adapter_paths([adapter])
    output_dir = claim_folder(output_dir, COMMAND, "--output_dir", write=False)  # before the base loads
    pipe, _ = load_base(base, family, device, dtype, say=say)
    check_adapter_fits(pipe, adapter, base)
    with quiet_libraries():
        kind = load_any_adapter(pipe, adapter, "merged")
        if kind == GRALORA:
            pipe.fuse_gralora(gralora_scale=scale)
            for model in pipe._gralora_components().values():
                remove_gralora_adapter(model, "merged")  # the base Linear keeps the fused weight
        else:
            pipe.fuse_lora(lora_scale=scale)
            pipe.unload_lora_weights()  # diffusers keeps fused weights when unloading
        pipe.save_pretrained(output_dir)
    mark_folder(output_dir, COMMAND)
    return Path(output_dir)
