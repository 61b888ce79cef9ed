#!/usr/bin/env bash
# PEFT's image-generation benchmark (huggingface/peft, method_comparison/image-gen, results/
# gralora--flux2-klein-default.json) on FLUX.2 [klein] base 4B, as ONE `gralora-diffusion compare`:
# GraLoRA r=32 k=2 against LoRA r=32 at alpha 32, on PEFT's target list, 512 px, batch 2, 750 steps,
# AdamW lr 1e-4, weight decay 1e-4, gradient clip 1, constant schedule, bf16, gradient checkpointing,
# seed 0, 20 sampling steps at guidance 3.5, scored with DINOv2-base against the instance images.
# PEFT measured (one L40S): DINOv2 0.701 GraLoRA / 0.697 LoRA, 728 s / 759 s of training.
# NOT RUN HERE (no GPU, no Hub access on the machines this was written on). Needs a CUDA GPU with
# ~24 GB, `hf auth login` with access to black-forest-labs/FLUX.2-klein-base-4B, and `pip install datasets`.
# Usage: bash scripts/peft_image_gen_flux2_klein.sh [OUTPUT_DIR]
set -euo pipefail
OUT=${1:-peft_image_gen_flux2_klein}
DATA="$OUT/instance_images"
# PEFT's data: peft-internal-testing/cat-image-dataset (train split), one caption per image, written as
# image files + metadata.jsonl, which the trainer reads (captions override --instance_prompt).
if [ ! -f "$DATA/metadata.jsonl" ]; then
  python - "$DATA" <<'PY'
import json, sys
from pathlib import Path
from datasets import load_dataset
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
ds = load_dataset("peft-internal-testing/cat-image-dataset", split="train")
caption = next((c for c in ("prompt", "caption", "text") if c in ds.column_names), None)
with open(out / "metadata.jsonl", "w") as meta:
    for i, row in enumerate(ds):
        row["image"].convert("RGB").save(out / f"{i:03d}.png")
        meta.write(json.dumps({"file_name": f"{i:03d}.png", "text": row[caption] if caption else "a photo of sks cat"}) + "\n")
PY
fi
TARGETS='.*\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out|to_qkv_mlp_proj|linear_in|linear_out)$'
gralora-diffusion compare \
  --pretrained_model_name_or_path black-forest-labs/FLUX.2-klein-base-4B --family flux2-klein \
  --instance_data_dir "$DATA" --instance_prompt "a photo of sks cat" \
  --resolution 512 --train_batch_size 2 --max_train_steps 750 --learning_rate 1e-4 --adam_weight_decay 1e-4 \
  --max_grad_norm 1.0 --lr_scheduler constant --lr_warmup_steps 0 --mixed_precision bf16 --gradient_checkpointing \
  --seed 0 --seeds_per_variant 1 --checkpointing_steps 250 --num_inference_steps 20 --eval_guidance 3.5 \
  --dino_model facebook/dinov2-base --clip_model none --eval_seeds 0,1,2 \
  --eval_prompt "a photo of sks cat" --eval_prompt "a color drawing of sks cat" --eval_prompt "sks cat at the beach" \
  --variants "gralora:r=32,k=2,alpha=32,unet_targets=$TARGETS" "lora:r=32,alpha=32,unet_targets=$TARGETS" \
  --output_dir "$OUT/comparison"
