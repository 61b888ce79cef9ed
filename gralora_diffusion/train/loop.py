"""The DreamBooth training loop for SDXL, read top to bottom: settings and data are checked, the base
model loads, class images are generated if needed, adapters go in, then the loop runs; checkpoints,
samples and the final adapter are written on the way. Distribution is Accelerate's.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import TrainConfigError, TrainingError
from .config import TrainConfig
from .data import DreamBoothDataset, EpochBatches, collate, ensure_class_images, logger, scan_images
from .sampling import generate_images, generate_samples, latent_stats, save_samples
from .save import (
    all_finite,
    complete_checkpoints,
    load_adapter_weights,
    read_training_state,
    save_adapter_weights,
    save_config,
    save_final_adapter,
    training_summary,
    write_checkpoint,
)


@dataclass
class TrainResult:
    output_dir: Path
    weights_path: Path | None  # written by the main process
    global_step: int
    losses: list[float] = field(default_factory=list)  # mean over processes, one per update
    components: dict = field(default_factory=dict)  # trained models (unwrapped) by component name
    pipeline: Any = None  # the trained pipeline, adapters active
    grid_path: Path | None = None


def find_resume_checkpoint(cfg: TrainConfig) -> Path | None:
    if not cfg.resume_from_checkpoint:
        return None
    if cfg.resume_from_checkpoint == "latest":
        found = complete_checkpoints(Path(cfg.output_dir))
        return found[-1] if found else None
    return cfg.checkpoint_path(cfg.resume_from_checkpoint)


def load_pipeline(cfg: TrainConfig):
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

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


def add_adapters(cfg: TrainConfig, pipe) -> dict:
    """GraLoRA through our `add_gralora`, or plain LoRA through PEFT with the same rank and alpha."""
    from ..inject import TEXT_ENCODER_PRESETS, UNET_PRESETS, add_gralora, resolve_targets

    components = {"unet": pipe.unet}
    if cfg.train_text_encoder:
        components |= {"text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    for name, model in components.items():
        targets = cfg.targets(cfg.unet_targets if name == "unet" else cfg.text_encoder_targets)
        if cfg.adapter == "gralora":
            add_gralora(model, r=cfg.rank, gralora_k=cfg.gralora_k, alpha=cfg.resolved_alpha, hybrid_r=cfg.hybrid_r,
                        dropout=cfg.dropout, unet_targets=targets, text_encoder_targets=targets)
        else:
            from peft import LoraConfig

            presets = UNET_PRESETS if name == "unet" else TEXT_ENCODER_PRESETS
            try:
                model.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.resolved_alpha, lora_dropout=cfg.dropout,
                                             init_lora_weights="gaussian", target_modules=resolve_targets(targets, presets)))
            except ValueError as err:  # PEFT: the targets match no module (NoMatchingPeftModuleError from 0.20)
                flag = "unet_targets" if name == "unet" else "text_encoder_targets"
                raise TrainConfigError(f"--{flag} {getattr(cfg, flag)!r} ({name}): {str(err).splitlines()[0]}") from None
    return components


def make_optimizer(cfg: TrainConfig, groups: list[dict]):
    kwargs = {"betas": (cfg.adam_beta1, cfg.adam_beta2), "weight_decay": cfg.adam_weight_decay, "eps": cfg.adam_epsilon}
    if cfg.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **kwargs)
    if cfg.optimizer == "prodigy":
        import prodigyopt

        return prodigyopt.Prodigy(groups, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def encode_prompts(tokenizers, text_encoders, prompts: list[str], device):
    """SDXL's conditioning: both encoders' penultimate hidden states side by side, and the second
    encoder's pooled projection (as diffusers' pipeline and training scripts compute them)."""
    hidden = []
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        out = encoder(ids.to(device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]
    return torch.cat(hidden, dim=-1), pooled


def normalize_latents(latents: torch.Tensor, vae_config) -> torch.Tensor:
    """scaling_factor, and latents_mean/std when the VAE declares them (the pipeline undoes the same)."""
    stats = latent_stats(vae_config, latents)
    if stats is None:
        return latents * vae_config.scaling_factor
    return (latents - stats[0]) * vae_config.scaling_factor / stats[1]


def diffusion_loss(pred, target, timesteps, noise_scheduler, snr_gamma=None, with_prior=False, prior_loss_weight=1.0):
    """MSE (Min-SNR weighted with `snr_gamma`); with prior preservation the batch's second half is the class half."""
    from diffusers.training_utils import compute_snr

    parts = {}
    if with_prior:
        pred, pred_prior = pred.chunk(2)
        target, target_prior = target.chunk(2)
        timesteps = timesteps.chunk(2)[0]
        parts["prior_loss"] = F.mse_loss(pred_prior.float(), target_prior.float())
    if snr_gamma is None:
        loss = F.mse_loss(pred.float(), target.float())
    else:
        snr = compute_snr(noise_scheduler, timesteps)
        weights = torch.clamp(snr, max=snr_gamma)
        weights = weights / (snr + 1) if noise_scheduler.config.prediction_type == "v_prediction" else weights / snr
        loss = (F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3)) * weights).mean()
    parts["instance_loss"] = loss
    if with_prior:
        loss = loss + prior_loss_weight * parts["prior_loss"]
    return loss, parts


def train(cfg: TrainConfig, pipeline=None, on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train an adapter as `cfg` says. `pipeline`: an SDXL pipeline already in memory (then
    `--pretrained_model_name_or_path` only names it in the outputs). `on_step(step, loss)` runs
    after every update on every process."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration

    cfg.validate(need_model=pipeline is None)
    instances = scan_images(cfg.instance_data_dir, cfg.instance_prompt, "instance")  # before any model loads
    resume_from = find_resume_checkpoint(cfg)
    if cfg.seed is None:
        cfg.seed = read_training_state(resume_from)["seed"] if resume_from else random.SystemRandom().randrange(2**31)
    out = Path(cfg.output_dir)
    accelerator = Accelerator(
        # Accelerate only starts gloo for several CPU processes (torchrun) when told it runs on CPU.
        cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
        mixed_precision=cfg.mixed_precision,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / cfg.logging_dir)),
    )
    if not accelerator.is_main_process:
        logger.setLevel(logging.ERROR)
    try:
        return _train(cfg, accelerator, instances, resume_from, pipeline, on_step)
    finally:
        accelerator.end_training()
        AcceleratorState._reset_state()  # so a later train() in this process may pick other settings


def share(cfg: TrainConfig, out: Path, grid: Path | None, images: list[Path], say) -> None:
    """The model card (README.md) beside the adapter, then the push with --push_to_hub."""
    from ..hub import push_to_hub, save_model_card

    prompts = [p for p in cfg.validation_prompts for _ in range(cfg.num_validation_images)]
    rel = [str(p.relative_to(out)) for p in images]
    card = save_model_card(out, repo_id=cfg.hub_model_id, images=rel + ([str(grid.relative_to(out))] if grid else []),
                           prompts=prompts or None, training=training_summary(cfg),
                           grid=str(grid.relative_to(out)) if grid else None)
    say(f"Wrote the model card {card}")
    if cfg.push_to_hub:
        repo_id = cfg.hub_model_id or out.resolve().name
        push_to_hub(out, repo_id)
        say(f"Pushed {out} to the Hub as {repo_id}")


def _place(model, device, dtype) -> None:
    """Move, and cast only when needed (diffusers warns on every dtype cast of a loaded model)."""
    model.to(device) if model.dtype == dtype else model.to(device, dtype=dtype)


def _train(cfg, accelerator, instances, resume_from, pipe, on_step) -> TrainResult:
    from accelerate.utils import set_seed
    from diffusers import DDPMScheduler
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel, cast_training_params

    main = accelerator.is_main_process
    say = tqdm.write if main else (lambda *_: None)
    out, device = Path(cfg.output_dir), accelerator.device
    if main:
        out.mkdir(parents=True, exist_ok=True)
        for stale in [*out.glob(".tmp-checkpoint-*"), *out.glob(".old-checkpoint-*")]:  # left by a run killed while saving
            shutil.rmtree(stale, ignore_errors=True)
    if cfg.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    # ---- base model: frozen, UNet and text encoders in the weight dtype, VAE in fp32 ------------
    pipe = pipe if pipe is not None else load_pipeline(cfg)
    pipe.set_progress_bar_config(disable=True)
    for model in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        model.requires_grad_(False)
    for model in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
        _place(model, device, weight_dtype)
    # fp32 VAE: SDXL's own VAE overflows in fp16; a user-given one (fp16-fix) runs in the weight dtype.
    _place(pipe.vae, device, weight_dtype if cfg.pretrained_vae_model_name_or_path else torch.float32)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    # ---- class images for prior preservation (base model, before any adapter) -------------------
    classes = None
    if cfg.with_prior_preservation:
        if main:
            def generate(prompts, generators):
                return generate_images(pipe, prompts, generators, cfg.resolution, cfg.num_inference_steps, accelerator.autocast)

            ensure_class_images(cfg.class_data_dir, cfg.class_prompt, cfg.num_class_images, generate,
                                cfg.sample_batch_size, cfg.seed, log=say)
        accelerator.wait_for_everyone()
        classes = scan_images(cfg.class_data_dir, cfg.class_prompt, "class")[: cfg.num_class_images]

    # ---- adapters; trainable weights in fp32 under mixed precision -------------------------------
    set_seed(cfg.seed)  # the same initial adapter on every process
    components = add_adapters(cfg, pipe)
    if weight_dtype != torch.float32:
        cast_training_params(list(components.values()), dtype=torch.float32)
    if cfg.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        if cfg.train_text_encoder:
            pipe.text_encoder.gradient_checkpointing_enable()
            pipe.text_encoder_2.gradient_checkpointing_enable()
    for model in components.values():
        model.train()
    params = {name: [p for p in m.parameters() if p.requires_grad] for name, m in components.items()}
    all_params = [p for ps in params.values() for p in ps]

    # ---- data ------------------------------------------------------------------------------------
    dataset = DreamBoothDataset(instances, cfg.resolution, cfg.center_crop, cfg.random_flip, cfg.bucket_list(),
                                cfg.repeats, cfg.seed, classes)
    batches = EpochBatches(dataset, cfg.train_batch_size, cfg.seed, accelerator.num_processes, accelerator.process_index)
    ga = cfg.gradient_accumulation_steps
    updates_per_epoch = math.ceil(len(batches) / ga)
    max_steps = cfg.max_train_steps or cfg.num_train_epochs * updates_per_epoch
    num_epochs = math.ceil(max_steps / updates_per_epoch)

    # ---- optimizer, schedule, EMA ----------------------------------------------------------------
    scale = ga * cfg.train_batch_size * accelerator.num_processes if cfg.scale_lr else 1
    groups = [{"params": params["unet"], "lr": cfg.learning_rate * scale}]
    if cfg.train_text_encoder:
        groups.append({"params": params["text_encoder"] + params["text_encoder_2"], "lr": cfg.text_encoder_lr * scale})
    optimizer = make_optimizer(cfg, groups)
    # Not passed to prepare(): we step it once per update ourselves (Accelerate would step it once
    # per process), so the schedule is the same with 1 or N processes.
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=max_steps, num_cycles=cfg.lr_num_cycles, power=cfg.lr_power)
    accelerator.register_for_checkpointing(lr_scheduler)
    ema = EMAModel(all_params, decay=cfg.ema_decay) if cfg.use_ema else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    names = list(components)
    prepared = accelerator.prepare(*components.values(), optimizer)
    wrapped, optimizer = dict(zip(names, prepared[:-1])), prepared[-1]

    def save_hook(models, weights, folder):  # checkpoints hold adapter weights only, not the base model
        if main:
            save_adapter_weights(components, Path(folder))
        weights.clear()

    def load_hook(models, folder):
        load_adapter_weights(components, Path(folder))
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

    if main:
        save_config(cfg, out)
        tracked = {k: v for k, v in cfg.to_dict().items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("gralora-dreambooth", config=tracked)

    # ---- resume: adapter, optimizer, schedule, EMA and every process's RNG -----------------------
    set_seed(cfg.seed, device_specific=True)  # different noise on each process
    global_step = 0
    if cfg.resume_from_checkpoint and resume_from is None:
        say(f"No complete checkpoint in {out}; starting a new run.")
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        global_step = read_training_state(resume_from)["global_step"]
        say(f"Resumed from {resume_from} at step {global_step}.")
    first_epoch, skip = global_step // updates_per_epoch, (global_step % updates_per_epoch) * ga

    # ---- caches: VAE latent distributions per augmented item, text embeddings per prompt ----------
    latent_cache: dict = {}
    text_cache: dict = {}
    tokenizers = (pipe.tokenizer, pipe.tokenizer_2)
    text_encoders = (wrapped.get("text_encoder", pipe.text_encoder), wrapped.get("text_encoder_2", pipe.text_encoder_2))
    cache_text = cfg.cache_text_embeddings and not cfg.train_text_encoder

    def latent_params(batch):
        def encode(pixels):
            with torch.no_grad():
                return pipe.vae.encode(pixels.to(device, pipe.vae.dtype)).latent_dist.parameters
        if not cfg.cache_latents:
            return encode(batch["pixel_values"])
        if any(k not in latent_cache for k in batch["keys"]):
            for key, p in zip(batch["keys"], encode(batch["pixel_values"])):
                latent_cache[key] = p.detach()
        return torch.stack([latent_cache[k] for k in batch["keys"]])

    def text_conditioning(prompts):
        if not cache_text:
            with torch.no_grad() if not cfg.train_text_encoder else contextlib.nullcontext():
                return encode_prompts(tokenizers, text_encoders, prompts, device)
        missing = sorted({p for p in prompts if p not in text_cache})
        if missing:
            with torch.no_grad():
                embeds, pooled = encode_prompts(tokenizers, text_encoders, missing, device)
            text_cache.update({p: (e, q) for p, e, q in zip(missing, embeds, pooled)})
        return torch.stack([text_cache[p][0] for p in prompts]), torch.stack([text_cache[p][1] for p in prompts])

    def batch_loss(batch):
        latents = DiagonalGaussianDistribution(latent_params(batch)).sample()
        latents = normalize_latents(latents, pipe.vae.config).to(weight_dtype)
        noise = torch.randn_like(latents)
        if cfg.noise_offset:
            noise = noise + cfg.noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), device=device, dtype=latents.dtype)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=device).long()
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        embeds, pooled = text_conditioning(batch["prompts"])
        pred = wrapped["unet"](noisy, timesteps, embeds.to(weight_dtype), return_dict=False,
                               added_cond_kwargs={"time_ids": batch["time_ids"].to(device, weight_dtype), "text_embeds": pooled.to(weight_dtype)})[0]
        target = noise if noise_scheduler.config.prediction_type == "epsilon" else noise_scheduler.get_velocity(latents, noise, timesteps)
        return diffusion_loss(pred, target, timesteps, noise_scheduler, cfg.snr_gamma, batch["with_prior"], cfg.prior_loss_weight)

    def sample(tag: str) -> tuple[Path | None, list[Path]]:
        if not (main and cfg.validation_prompts):
            return None, []
        for model in components.values():
            model.eval()
        rows = generate_samples(pipe, cfg.validation_prompts, cfg.num_validation_images, cfg.resolution,
                                cfg.num_inference_steps, cfg.seed, accelerator.autocast)
        for model in components.values():
            model.train()
        grid, images = save_samples(rows, out / "samples", tag)
        say(f"step {global_step}: wrote samples {grid}")
        return grid, images

    # ---- the loop --------------------------------------------------------------------------------
    losses: list[float] = []
    last_checkpoint = resume_from
    progress = tqdm(total=max_steps, initial=global_step, desc="train", disable=not main)
    done = global_step >= max_steps
    for epoch in range(first_epoch, num_epochs):
        if done:
            break
        epoch_batches = batches.for_epoch(epoch)
        start = skip if epoch == first_epoch else 0
        # Own generator: a DataLoader draws a seed when iterated, which must not move the global RNG
        # (a resumed run creates its loader at another moment than the uninterrupted one did).
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=epoch_batches[start:], collate_fn=collate,
                                             num_workers=cfg.dataloader_num_workers,
                                             generator=torch.Generator().manual_seed(cfg.seed + epoch))
        group_losses = []
        for micro, batch in enumerate(loader, start=start):
            group_start = micro // ga * ga
            group_size = min(ga, len(epoch_batches) - group_start)
            is_update = micro + 1 == group_start + group_size
            # Accumulation by hand (not accelerator.accumulate): updates end exactly at epoch ends,
            # so a resumed run restarts at the same micro-batch.
            with contextlib.ExitStack() as stack:
                if not is_update:
                    for model in wrapped.values():
                        stack.enter_context(accelerator.no_sync(model))
                loss, parts = batch_loss(batch)
                accelerator.backward(loss / group_size)
            group_losses.append(loss.detach())
            if not is_update:
                continue
            # every process sees every process's loss, so all stop together, before the update
            step_loss = accelerator.gather(torch.stack(group_losses).mean().reshape(1)).float().mean().item()
            group_losses = []
            if not math.isfinite(step_loss):
                hint = f"The last good checkpoint is {last_checkpoint}: resume with --resume_from_checkpoint {last_checkpoint}" if last_checkpoint else "No checkpoint was written before it"
                raise TrainingError(
                    f"the loss is {step_loss} at step {global_step + 1}. {hint}, with a lower --learning_rate "
                    f"(now {cfg.learning_rate}), --max_grad_norm, or --mixed_precision bf16 instead of fp16."
                )
            if cfg.max_grad_norm:
                accelerator.clip_grad_norm_(all_params, cfg.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
            if ema is not None:
                ema.step(all_params)
            losses.append(step_loss)
            lr = lr_scheduler.get_last_lr()[0]
            logs = {"loss": step_loss, "lr": lr} | {k: v.item() for k, v in parts.items()}
            accelerator.log(logs, step=global_step)
            progress.update(1)
            progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
            if global_step % cfg.checkpointing_steps == 0:
                if not all_finite(all_params):
                    raise TrainingError(f"the adapter weights became NaN/Inf at step {global_step}; last good checkpoint: {last_checkpoint or 'none'}.")
                last_checkpoint = write_checkpoint(accelerator, out, global_step, {"global_step": global_step, "seed": cfg.seed}, cfg.checkpoints_total_limit)
                say(f"step {global_step}: saved checkpoint {last_checkpoint}")
            if cfg.validation_steps and global_step % cfg.validation_steps == 0 and global_step < max_steps:
                sample(f"step-{global_step}")
            if on_step is not None:
                on_step(global_step, step_loss)
            if global_step >= max_steps:
                done = True
                break
    progress.close()

    # ---- outputs ---------------------------------------------------------------------------------
    accelerator.wait_for_everyone()
    if ema is not None:
        ema.copy_to(all_params)
    weights_path = grid = None
    if main:
        weights_path = save_final_adapter(cfg, components, out)
        say(f"Saved the {cfg.adapter} adapter to {weights_path}")
        grid, images = sample("final")
        if cfg.adapter == "gralora":
            share(cfg, out, grid, images, say)
    accelerator.wait_for_everyone()
    return TrainResult(out, weights_path, global_step, losses, components, pipe, grid)
