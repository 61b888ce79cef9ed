"""The models a run trains: the base pipeline loaded, frozen and placed, the adapters added, the
optimizer built over their weights."""

from __future__ import annotations

import torch

from ..errors import TrainConfigError


def load_pipeline(cfg):
    """(pipeline, Family) for --pretrained_model_name_or_path: `tiny`, `world`, a folder or a Hub id (bases.load_base),
    its base quantized as it loads with --quantize_base."""
    import torch

    from ..bases import load_base
    from ..threads import announce

    announce()
    return load_base(cfg.pretrained_model_name_or_path, cfg.family, "cpu", torch.float32, say=None,
                     flag="--pretrained_model_name_or_path", revision=cfg.revision, variant=cfg.variant,
                     vae=cfg.pretrained_vae_model_name_or_path, error=TrainConfigError,
                     quantize_base=cfg.quantize_base, trained_text_encoders=cfg.train_text_encoder)


def place(model, device, dtype) -> None:
    """Move, and cast only when needed (diffusers warns on every dtype cast of a loaded model). A
    quantized model keeps the dtype it loaded in (diffusers refuses the cast; autocast computes in dtype)."""
    from ..quantize import is_quantized_model

    if model.dtype == dtype or is_quantized_model(model):
        model.to(device)
    else:
        model.to(device, dtype=dtype)


def freeze_and_place(cfg, pipe, device, weight_dtype) -> None:
    """Base model frozen; denoiser and text encoders in the weight dtype, the VAE in fp32 (SDXL's own VAE
    overflows in fp16; a user-given one, such as the fp16-fix, runs in the weight dtype)."""
    pipe.set_progress_bar_config(disable=True)
    models = {name: m for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    for model in models.values():
        model.requires_grad_(False)
    for name, model in models.items():
        if name != "vae":
            place(model, device, weight_dtype)
    place(pipe.vae, device, weight_dtype if cfg.pretrained_vae_model_name_or_path else torch.float32)


def add_adapters(cfg, pipe, family) -> dict:
    """GraLoRA through our `add_gralora`, or plain LoRA through PEFT with the same rank and alpha, on the
    family's denoiser (--unet_targets) and, with --train_text_encoder, its trainable text encoders."""
    from ..inject import add_gralora, resolve_targets

    components = {family.denoiser: getattr(pipe, family.denoiser)}
    if cfg.train_text_encoder:
        components |= {name: getattr(pipe, name) for name in family.trainable_text_encoders}
    for name, model in components.items():
        flag = "unet_targets" if name == family.denoiser else "text_encoder_targets"
        targets = resolve_targets(cfg.targets(getattr(cfg, flag)), family.presets(name))
        if cfg.adapter == "gralora":
            add_gralora(model, r=cfg.rank, gralora_k=cfg.gralora_k, alpha=cfg.resolved_alpha, hybrid_r=cfg.hybrid_r,
                        dropout=cfg.dropout, unet_targets=targets, text_encoder_targets=targets)
            continue
        from peft import LoraConfig

        try:
            model.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.resolved_alpha, lora_dropout=cfg.dropout, use_dora=cfg.use_dora,
                                         init_lora_weights="gaussian", target_modules=targets))
        except ValueError as err:  # PEFT: the targets match no module (NoMatchingPeftModuleError from 0.20)
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


def param_groups(cfg, params: dict, num_processes: int, denoiser: str = "unet") -> list[dict]:
    """Denoiser adapters at --learning_rate, text-encoder adapters at --text_encoder_lr (x batch with --scale_lr)
    and --adam_weight_decay_text_encoder when given."""
    scale = cfg.gradient_accumulation_steps * cfg.train_batch_size * num_processes if cfg.scale_lr else 1
    groups = [{"params": params[denoiser], "lr": cfg.learning_rate * scale}]
    text = [p for name, ps in params.items() if name != denoiser for p in ps]
    if cfg.train_text_encoder and text:
        decay = {} if cfg.adam_weight_decay_text_encoder is None else {"weight_decay": cfg.adam_weight_decay_text_encoder}
        groups.append({"params": text, "lr": cfg.text_encoder_lr * scale, **decay})
    return groups
