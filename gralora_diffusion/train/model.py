"""The models a run trains: the base pipeline loaded, frozen and placed, the adapters added, the
optimizer built over their weights."""

from __future__ import annotations

import torch

from ..constants import TEXT_ENCODER_PRESETS, UNET_PRESETS
from ..errors import TrainConfigError


def load_pipeline(cfg):
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    from ..threads import announce

    announce()

    kwargs = {"revision": cfg.revision, "variant": cfg.variant}
    try:
        if cfg.pretrained_vae_model_name_or_path:
            kwargs["vae"] = AutoencoderKL.from_pretrained(cfg.pretrained_vae_model_name_or_path, revision=cfg.revision)
        return StableDiffusionXLPipeline.from_pretrained(cfg.pretrained_model_name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        raise TrainConfigError(
            f"cannot load the base model {cfg.pretrained_model_name_or_path!r}: {str(err).splitlines()[0]} "
            "Give a Hub id (online or in the local cache) or a folder written by save_pretrained."
        ) from None


def place(model, device, dtype) -> None:
    """Move, and cast only when needed (diffusers warns on every dtype cast of a loaded model)."""
    model.to(device) if model.dtype == dtype else model.to(device, dtype=dtype)


def freeze_and_place(cfg, pipe, device, weight_dtype) -> None:
    """Base model frozen; UNet and text encoders in the weight dtype, the VAE in fp32 (SDXL's own VAE
    overflows in fp16; a user-given one, such as the fp16-fix, runs in the weight dtype)."""
    pipe.set_progress_bar_config(disable=True)
    for model in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        model.requires_grad_(False)
    for model in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
        place(model, device, weight_dtype)
    place(pipe.vae, device, weight_dtype if cfg.pretrained_vae_model_name_or_path else torch.float32)


def add_adapters(cfg, pipe) -> dict:
    """GraLoRA through our `add_gralora`, or plain LoRA through PEFT with the same rank and alpha."""
    from ..inject import add_gralora, resolve_targets

    components = {"unet": pipe.unet}
    if cfg.train_text_encoder:
        components |= {"text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    for name, model in components.items():
        targets = cfg.targets(cfg.unet_targets if name == "unet" else cfg.text_encoder_targets)
        if cfg.adapter == "gralora":
            add_gralora(model, r=cfg.rank, gralora_k=cfg.gralora_k, alpha=cfg.resolved_alpha, hybrid_r=cfg.hybrid_r,
                        dropout=cfg.dropout, unet_targets=targets, text_encoder_targets=targets)
            continue
        from peft import LoraConfig

        presets = UNET_PRESETS if name == "unet" else TEXT_ENCODER_PRESETS
        try:
            model.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.resolved_alpha, lora_dropout=cfg.dropout, use_dora=cfg.use_dora,
                                         init_lora_weights="gaussian", target_modules=resolve_targets(targets, presets)))
        except ValueError as err:  # PEFT: the targets match no module (NoMatchingPeftModuleError from 0.20)
            flag = "unet_targets" if name == "unet" else "text_encoder_targets"
            raise TrainConfigError(f"--{flag} {getattr(cfg, flag)!r} ({name}): {str(err).splitlines()[0]}") from None
    return components


def make_optimizer(cfg, groups: list[dict]):
    kwargs = {"betas": (cfg.adam_beta1, cfg.adam_beta2), "weight_decay": cfg.adam_weight_decay, "eps": cfg.adam_epsilon}
    if cfg.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **kwargs)
    if cfg.optimizer == "prodigy":  # with diffusers' defaults: decoupled decay, bias correction, safeguarded warm-up
        import prodigyopt

        return prodigyopt.Prodigy(groups, **kwargs, beta3=cfg.prodigy_beta3, decouple=cfg.prodigy_decouple,
                                  use_bias_correction=cfg.prodigy_use_bias_correction,
                                  safeguard_warmup=cfg.prodigy_safeguard_warmup)
    return torch.optim.AdamW(groups, **kwargs)


def param_groups(cfg, params: dict, num_processes: int) -> list[dict]:
    """UNet adapters at --learning_rate, text-encoder adapters at --text_encoder_lr (x batch with --scale_lr)
    and --adam_weight_decay_text_encoder when given."""
    scale = cfg.gradient_accumulation_steps * cfg.train_batch_size * num_processes if cfg.scale_lr else 1
    groups = [{"params": params["unet"], "lr": cfg.learning_rate * scale}]
    if cfg.train_text_encoder:
        decay = {} if cfg.adam_weight_decay_text_encoder is None else {"weight_decay": cfg.adam_weight_decay_text_encoder}
        groups.append({"params": params["text_encoder"] + params["text_encoder_2"], "lr": cfg.text_encoder_lr * scale, **decay})
    return groups
