"""The DreamBooth training loop in named stages: `setup` (settings and data checked, base
model loaded, class images generated if needed, adapters added, optimizer, resume) returns a `Run`;
the loop in `train` then calls `accumulate` per micro-batch, `update` per optimizer step,
`checkpoint` and `sample` on their schedules, and `finish` at the end. Distribution is Accelerate's.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from ..constants import KOHYA_WEIGHT_NAME
from ..errors import TrainConfigError, TrainingError, UnreadableImageError
from ..schedulers import check_steps
from ..threads import announce
from .config import TrainConfig
from .fused_backward import check_fusable_backward, fuse_optimizer_into_backward
from .data import DreamBoothDataset, EpochBatches, collate, count_images, ensure_class_images, logger, scan_images
from .hf_dataset import StreamBatches, data_fingerprint, instance_records
from .checkpoint import check_checkpoint, load_training_state, run_history, save_training_state, shaping_settings
from .lock import output_dir_lock
from .loss import BatchLoss, training_scheduler
from .model import add_adapters, freeze_and_place, load_pipeline, make_optimizer, param_groups
from .sampling import generate_images, generate_samples, sample_metrics, sample_scorers, save_samples, step_bar
from .select import BEST_FOLDER, BestTracker
from .save import all_finite, complete_checkpoints, resume_hint, save_config, save_final_adapter, share, write_checkpoint


@dataclass
class TrainResult:
    output_dir: Path
    weights_path: Path | None  # written by the main process
    global_step: int
    losses: list[float] = field(default_factory=list, repr=False)  # mean over processes, one per update
    components: dict = field(default_factory=dict, repr=False)  # trained models (unwrapped) by component name
    pipeline: Any = field(default=None, repr=False)  # the trained pipeline, adapters active (kept out of print())
    grid_path: Path | None = None
    best: dict | None = None  # --select_best: the metric, the winning step and every validation's score


@dataclass
class Run:
    """Everything the stages share: built once by `setup`, advanced by `update`."""
    cfg: TrainConfig
    accelerator: Any
    pipe: Any
    family: Any  # bases.Family
    components: dict  # trained models (unwrapped) by component name
    wrapped: dict  # the same, as accelerator.prepare returned them
    params: list  # every trainable parameter
    optimizer: Any
    lr_scheduler: Any
    ema: Any
    dataset: DreamBoothDataset
    batches: EpochBatches
    max_steps: int
    updates_per_epoch: int
    batch_loss: BatchLoss | None = None
    history: list[dict] = field(default_factory=list)  # [{from_step, settings}] per stretch of a resumed run
    global_step: int = 0
    last_checkpoint: Path | None = None
    losses: list[float] = field(default_factory=list)
    group_losses: list = field(default_factory=list)  # this update's micro-batch losses so far
    parts: dict = field(default_factory=dict)  # the last micro-batch's loss terms, for the log
    progress: Any = None
    scorers: list | None = None  # --validation_metrics or --select_best (main process)
    best: BestTracker | None = None  # --select_best (main process)

    @property
    def out(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def done(self) -> bool:
        return self.global_step >= self.max_steps

    def say(self, text: str) -> None:
        if self.accelerator.is_main_process:
            tqdm.write(text)


def find_resume_checkpoint(cfg: TrainConfig) -> Path | None:
    if not cfg.resume_from_checkpoint:
        return None
    if cfg.resume_from_checkpoint == "latest":
        found = complete_checkpoints(Path(cfg.output_dir))
        return found[-1] if found else None
    return cfg.checkpoint_path(cfg.resume_from_checkpoint)


def train(cfg: TrainConfig, pipeline=None, on_step: Callable[[int, float], None] | None = None,
          command: str = "gralora-diffusion train") -> TrainResult:
    """Train an adapter as `cfg` says. `pipeline`: a pipeline of a registered family already in memory (then
    `--pretrained_model_name_or_path` only names it in the outputs). `on_step(step, loss)` runs
    after every update on every process. `command` starts the resume command that an interrupted
    run (Ctrl-C, an unreadable image) prints."""
    cfg.validate(need_model=pipeline is None)
    instances = instance_records(cfg)  # before any model loads
    resume_from = find_resume_checkpoint(cfg)
    resumed = check_checkpoint(resume_from, cfg) if resume_from else None  # also before any model loads
    if cfg.seed is None:
        cfg.seed = resumed["seed"] if resumed else random.SystemRandom().randrange(2**31)
    main = int(os.environ.get("RANK", "0")) == 0
    announce(print if main else None)  # the CPU thread rule, for Python callers too (a pipeline passed in loads nothing)
    with output_dir_lock(cfg.output_dir, enabled=main):
        try:
            return _train(cfg, instances, resume_from, resumed, pipeline, on_step)
        except KeyboardInterrupt:
            if main:
                print(f"\nTraining interrupted. {resume_hint(cfg, command)}", file=sys.stderr, flush=True)
            raise
        except UnreadableImageError as err:
            # a DataLoader worker's error arrives with its traceback in the message: keep its last line
            text = str(err).strip().splitlines()[-1].split("UnreadableImageError: ", 1)[-1]
            raise UnreadableImageError(f"{text} {resume_hint(cfg, command)}") from None


def _train(cfg, instances, resume_from, resumed, pipeline, on_step) -> TrainResult:
    from accelerate.state import AcceleratorState

    accelerator = make_accelerator(cfg)
    run = None
    try:
        run = setup(cfg, accelerator, instances, (resume_from, resumed), pipeline)
        for epoch in range(run.global_step // run.updates_per_epoch, math.ceil(run.max_steps / run.updates_per_epoch)):
            if run.done:
                break
            for batch, group_size, is_update in micro_batches(run, epoch):
                accumulate(run, batch, group_size, is_update)
                if not is_update:
                    continue
                step_loss = update(run)
                if run.global_step % cfg.checkpointing_steps == 0:
                    checkpoint(run)
                if cfg.validation_steps and run.global_step % cfg.validation_steps == 0 and not run.done:
                    sample(run, f"step-{run.global_step}")
                    if patience_out(run):
                        run.max_steps = run.global_step  # the run ends here: finish() saves this step's adapter
                if on_step is not None:
                    on_step(run.global_step, step_loss)
                if run.done:
                    break
            if cfg.validation_epochs and (epoch + 1) % cfg.validation_epochs == 0 and not run.done:
                sample(run, f"epoch-{epoch + 1}")
        return finish(run)
    except BaseException:
        if run is not None and run.progress is not None:
            run.progress.close()  # ends the bar's line, so what follows (the error) starts on its own
        raise
    finally:
        accelerator.end_training()
        AcceleratorState._reset_state()  # so a later train() in this process may pick other settings


def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    out = Path(cfg.output_dir)
    accelerator = Accelerator(
        # Accelerate only starts gloo for several CPU processes (torchrun) when told it runs on CPU.
        cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
        mixed_precision=cfg.mixed_precision,
        # prepare() then torch.compiles every model it is given: the UNet, and the text encoders when trained
        dynamo_backend="inductor" if cfg.torch_compile else None,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / cfg.logging_dir)),
    )
    check_fusable_backward(cfg, accelerator.num_processes, TrainConfigError)
    if not accelerator.is_main_process:
        logger.setLevel(logging.ERROR)
    return accelerator


# ---- setup -----------------------------------------------------------------------------------------
def setup(cfg: TrainConfig, accelerator, instances, resume_from: tuple, pipe=None) -> Run:
    """Base model, class images, adapters, data, optimizer and schedule, then the resumed state."""
    from accelerate.utils import set_seed
    from diffusers.training_utils import cast_training_params

    main, out, device = accelerator.is_main_process, Path(cfg.output_dir), accelerator.device
    if main:
        out.mkdir(parents=True, exist_ok=True)
        for stale in [*out.glob(".tmp-checkpoint-*"), *out.glob(".old-checkpoint-*")]:  # left by a run killed while saving
            shutil.rmtree(stale, ignore_errors=True)
    if cfg.enable_xformers_memory_efficient_attention:
        pipe.unet.enable_xformers_memory_efficient_attention()
    if cfg.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    if pipe is None:
        from transformers.utils import logging as transformers_logging

        # diffusers' "Loading pipeline components" bar is the loading bar; transformers' per-model
        # "Loading weights" bars inside it are noise
        shown = transformers_logging.is_progress_bar_enabled()
        transformers_logging.disable_progress_bar()
        try:
            pipe, family = load_pipeline(cfg)
        finally:
            if shown:
                transformers_logging.enable_progress_bar()
    else:
        from ..bases import family_of_pipeline, get_family
        from ..quantize import pipeline_quantization, quantize_loaded, quantized_components

        family = get_family(cfg.family) if cfg.family else family_of_pipeline(pipe)
        if family is None:
            raise TrainingError(f"train: a {type(pipe).__name__} belongs to no registered family; pass --family.")
        # a pipeline built by the caller: quantized here, by the same configs load_base uses
        quantize_loaded(pipe, pipeline_quantization(cfg.quantize_base, quantized_components(family, cfg.train_text_encoder)))
    if cfg.resolution is None:  # the base's own size (64 for tiny/world, 1024 for SDXL), said once
        cfg.resolution = family.default_resolution(pipe)
        if main:
            tqdm.write(f"Resolution: {cfg.resolution} px, the base's own (sample size x VAE factor); change with --resolution N")
    check_steps(pipe, cfg.num_inference_steps)  # class images and samples: refused before anything trains
    freeze_and_place(cfg, pipe, device, weight_dtype)
    with class_generation_precision(cfg, pipe, accelerator, weight_dtype) as autocast:
        classes = class_images(cfg, accelerator, pipe, autocast, resume_from[1])  # from the base model, before any adapter

    set_seed(cfg.seed)  # the same initial adapter on every process
    components = add_adapters(cfg, pipe, family)
    if cfg.init_adapter and not resume_from[0]:  # a resumed run's checkpoint holds the newer weights
        from .init_adapter import load_init_adapter

        load_init_adapter(cfg, components, family)
    if weight_dtype != torch.float32:  # trainable weights in fp32 under mixed precision
        cast_training_params(list(components.values()), dtype=torch.float32)
    if cfg.gradient_checkpointing:
        for name, model in components.items():  # diffusers' and transformers' names for the same switch
            (model.enable_gradient_checkpointing if name == family.denoiser else model.gradient_checkpointing_enable)()
    for model in components.values():
        model.train()
    params = {name: [p for p in m.parameters() if p.requires_grad] for name, m in components.items()}

    dataset = DreamBoothDataset(instances, cfg.resolution, cfg.center_crop, cfg.random_flip, cfg.bucket_list(),
                                cfg.repeats, cfg.seed, classes,
                                # worker processes get a fresh copy of the dataset every epoch: a cache there only costs memory
                                image_cache_mb=cfg.image_cache_mb if cfg.dataloader_num_workers == 0 else 0,
                                interpolation=cfg.image_interpolation_mode, caption_dropout=cfg.caption_dropout)
    shard = (cfg.train_batch_size, cfg.seed, accelerator.num_processes, accelerator.process_index)
    batches = StreamBatches(cfg, dataset, *shard) if cfg.streaming else EpochBatches(dataset, *shard)
    run = make_run(cfg, accelerator, pipe, family, components, params, dataset, batches)
    text_encoders = tuple(run.wrapped.get(name, getattr(pipe, name)) for name in family.trainable_text_encoders)
    run.batch_loss = BatchLoss(cfg, pipe, family, run.wrapped[family.denoiser], text_encoders, training_scheduler(pipe, family),
                               weight_dtype, device, data_fingerprint([*dataset.instances, *dataset.classes]))
    run.history = run_history(cfg, resume_from[1])
    if main:
        save_config(cfg, out, run.history)
        tracked = {k: v for k, v in cfg.to_dict().items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("gralora-dreambooth", config=tracked)
        run.scorers = sample_scorers(cfg, device) if cfg.validation_metrics or cfg.select_best else None
        if cfg.logging_note():
            tqdm.write(cfg.logging_note())
    set_seed(cfg.seed, device_specific=True)  # different noise on each process
    resume(run, resume_from)
    if main and cfg.select_best:
        run.best = BestTracker.resume(cfg.select_best, cfg.early_stop_patience, out, run.global_step)
    run.progress = tqdm(total=run.max_steps, initial=run.global_step, desc="train", disable=not main)
    return run


def class_image_count(cfg: TrainConfig, num_processes: int, existing: int, resumed: dict | None = None) -> int:
    """How many class images the run trains on. A resumed run: the checkpoint's count, so its epochs
    are the ones the interrupted run had. Else --num_class_images, but with --max_train_steps no more
    than the run's updates can reach (one class image per instance image of every batch), unless the
    folder already holds them: images are generated only to be trained on."""
    if resumed and resumed.get("class_images"):
        return resumed["class_images"]
    if not cfg.max_train_steps:
        return cfg.num_class_images
    reach = cfg.max_train_steps * cfg.train_batch_size * cfg.gradient_accumulation_steps * num_processes
    return min(cfg.num_class_images, max(existing, reach))


@contextlib.contextmanager
def class_generation_precision(cfg: TrainConfig, pipe, accelerator, weight_dtype):
    """The autocast class images are drawn under: --prior_generation_precision fp16/bf16 autocasts to
    it, fp32 (or no) draws in fp32 (UNet and text encoders put in fp32 meanwhile, if training keeps
    them in a half dtype); unset, the training's own mixed precision."""
    from .model import place

    mode = cfg.prior_generation_precision
    if mode is None:
        yield accelerator.autocast
        return
    if mode in ("fp16", "bf16"):
        dtype = torch.float16 if mode == "fp16" else torch.bfloat16
        yield lambda: torch.autocast(accelerator.device.type, dtype=dtype)
        return
    models = (pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    for model in models:
        place(model, accelerator.device, torch.float32)
    try:
        yield contextlib.nullcontext
    finally:
        for model in models:
            place(model, accelerator.device, weight_dtype)


def class_images(cfg: TrainConfig, accelerator, pipe, autocast=contextlib.nullcontext, resumed: dict | None = None):
    """The class images for prior preservation, the missing ones generated by the main process."""
    if not cfg.with_prior_preservation:
        return None
    count = class_image_count(cfg, accelerator.num_processes, count_images(cfg.class_data_dir), resumed)
    if accelerator.is_main_process:
        def generate(prompts, generators):
            return generate_images(pipe, prompts, generators, cfg.resolution, cfg.num_inference_steps, autocast)

        ensure_class_images(cfg.class_data_dir, cfg.class_prompt, count, generate,
                            cfg.sample_batch_size, cfg.seed, log=tqdm.write,
                            progress=lambda total: step_bar(total, "class images", unit="image", position=0))
    accelerator.wait_for_everyone()
    records = scan_images(cfg.class_data_dir, cfg.class_prompt, "class")[:count]
    if accelerator.is_main_process:
        why = (f" (of --num_class_images {cfg.num_class_images}: {cfg.max_train_steps} update(s) reach no more)"
               if count < cfg.num_class_images and not (resumed and resumed.get("class_images")) else "")
        tqdm.write(f"Prior preservation: training on {len(records)} class image(s) from {cfg.class_data_dir}{why}.")
    return records


def make_run(cfg, accelerator, pipe, family, components: dict, params: dict, dataset, batches) -> Run:
    """The run's length; optimizer, schedule and EMA over the adapter weights; models and optimizer
    through prepare()."""
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    updates_per_epoch = math.ceil(len(batches) / cfg.gradient_accumulation_steps)
    max_steps = cfg.max_train_steps or cfg.num_train_epochs * updates_per_epoch
    all_params = [p for ps in params.values() for p in ps]
    optimizer = make_optimizer(cfg, param_groups(cfg, params, accelerator.num_processes, family.denoiser))
    if cfg.fused_backward_pass:
        fuse_optimizer_into_backward(optimizer, cfg.max_grad_norm)
    # Not passed to prepare(): we step it once per update ourselves (Accelerate would step it once
    # per process), so the schedule is the same with 1 or N processes.
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=max_steps, num_cycles=cfg.lr_num_cycles, power=cfg.lr_power)
    ema = EMAModel(all_params, decay=cfg.ema_decay) if cfg.use_ema else None
    prepared = accelerator.prepare(*components.values(), optimizer)
    return Run(cfg, accelerator, pipe, family, components, dict(zip(components, prepared[:-1])), all_params, prepared[-1],
               lr_scheduler, ema, dataset, batches, max_steps, updates_per_epoch)


def resume(run: Run, checked: tuple) -> None:
    """Adapter, optimizer, schedule, EMA and every process's RNG as the (checked) checkpoint holds them."""
    folder, state = checked
    if run.cfg.resume_from_checkpoint and folder is None:
        run.say(f"No complete checkpoint in {run.out}; starting a new run.")
    if folder is None:
        return
    load_training_state(run, folder, state)
    run.global_step = state["global_step"]
    run.last_checkpoint = folder
    run.say(f"Resumed from {folder} at step {run.global_step}.")


# ---- the stages of the loop ------------------------------------------------------------------------
def micro_batches(run: Run, epoch: int):
    """(batch, group_size, is_update) for each micro-batch of `epoch` from where the run stands.

    Accumulation is ours, not `accelerator.accumulate`: an update's group of micro-batches ends
    exactly at the epoch's end (the last group may be shorter, its loss divided by its own size),
    so a run resumed at update N restarts at micro-batch N x accumulation of its epoch, whatever the
    batch count. Skipping is a slice of this epoch's batch list (what `skip_first_batches` does
    with a SkipBatchSampler), so the DataLoader keeps our per-epoch generator."""
    ga = run.cfg.gradient_accumulation_steps
    if isinstance(run.batches, StreamBatches):  # one endless epoch, read from its start, skipping what was trained on
        run.batches.start = run.global_step * ga
        loader = torch.utils.data.DataLoader(run.batches, batch_size=None, generator=torch.Generator().manual_seed(run.cfg.seed))
        for micro, batch in enumerate(loader, start=run.batches.start):
            yield batch, ga, (micro + 1) % ga == 0
        return
    epoch_batches = run.batches.for_epoch(epoch)
    start = (run.global_step % run.updates_per_epoch) * ga if epoch == run.global_step // run.updates_per_epoch else 0
    # Own generator: a DataLoader draws a seed when iterated, which must not move the global RNG
    # (a resumed run creates its loader at another moment than the uninterrupted one did).
    loader = torch.utils.data.DataLoader(run.dataset, batch_sampler=epoch_batches[start:], collate_fn=collate,
                                         num_workers=run.cfg.dataloader_num_workers,
                                         generator=torch.Generator().manual_seed(run.cfg.seed + epoch))
    for micro, batch in enumerate(loader, start=start):
        group_start = micro // ga * ga
        group_size = min(ga, len(epoch_batches) - group_start)
        yield batch, group_size, micro + 1 == group_start + group_size


def accumulate(run: Run, batch, group_size: int, is_update: bool) -> None:
    """Forward and backward of one micro-batch; gradients sync across processes only on the last."""
    with contextlib.ExitStack() as stack:
        if not is_update:
            for model in run.wrapped.values():
                stack.enter_context(run.accelerator.no_sync(model))
        loss, run.parts = run.batch_loss(batch)
        if run.cfg.fused_backward_pass:  # the weights step inside backward: a NaN must stop the run before it
            check_loss(run, loss.item())
        run.accelerator.backward(loss / group_size)
    run.group_losses.append(loss.detach())


def check_loss(run: Run, loss: float) -> None:
    """A NaN/Inf loss stops the run, naming the last good checkpoint and what to change."""
    if not math.isfinite(loss):
        last, cfg = run.last_checkpoint, run.cfg
        hint = f"The last good checkpoint is {last}: resume with --resume_from_checkpoint {last}" if last else "No checkpoint was written before it"
        raise TrainingError(
            f"the loss is {loss} at step {run.global_step + 1}. {hint}, with a lower --learning_rate "
            f"(now {cfg.learning_rate}), --max_grad_norm, or --mixed_precision bf16 instead of fp16."
        )


def update(run: Run) -> float:
    """One optimizer step: every process sees every process's loss (so all stop together on a NaN),
    clip, step (nothing left to step with --fused_backward_pass), schedule, EMA, log. Returns the update's loss."""
    cfg, accelerator = run.cfg, run.accelerator
    step_loss = accelerator.gather(torch.stack(run.group_losses).mean().reshape(1)).float().mean().item()
    run.group_losses = []
    check_loss(run, step_loss)
    if cfg.max_grad_norm and not cfg.fused_backward_pass:  # fused: each weight was clipped and stepped in backward
        accelerator.clip_grad_norm_(run.params, cfg.max_grad_norm)
    run.optimizer.step()
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.global_step += 1
    if run.ema is not None:
        run.ema.step(run.params)
    run.losses.append(step_loss)
    lr = run.lr_scheduler.get_last_lr()[0]
    accelerator.log({"loss": step_loss, "lr": lr} | {k: v.item() for k, v in run.parts.items()}, step=run.global_step)
    run.progress.update(1)
    run.progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
    return step_loss


def checkpoint(run: Run) -> None:
    if not all_finite(run.params):
        raise TrainingError(f"the adapter weights became NaN/Inf at step {run.global_step}; last good checkpoint: {run.last_checkpoint or 'none'}.")
    state = {"global_step": run.global_step, "seed": run.cfg.seed, "settings": shaping_settings(run.cfg), "history": run.history,
             "class_images": len(run.dataset.classes)}  # a resumed run trains on as many (class_image_count)
    run.last_checkpoint = write_checkpoint(run.accelerator, run.out, run.global_step, lambda folder: save_training_state(run, folder),
                                           state, run.cfg.checkpoints_total_limit)
    run.say(f"step {run.global_step}: saved checkpoint {run.last_checkpoint}")


def sample(run: Run, tag: str) -> tuple[Path | None, list[Path]]:
    """Sample images of every validation prompt (main process), saved one by one and as a grid."""
    cfg = run.cfg
    if not (run.accelerator.is_main_process and cfg.validation_prompts):
        return None, []
    for model in run.components.values():
        model.eval()
    below_training_bar = run.progress is not None and not run.progress.disable  # a closed bar is disabled
    rows = generate_samples(run.pipe, cfg.validation_prompts, cfg.num_validation_images, cfg.resolution,
                            cfg.num_inference_steps, cfg.seed, run.accelerator.autocast,
                            desc=f"samples ({tag})", position=1 if below_training_bar else 0)
    for model in run.components.values():
        model.train()
    grid, images = save_samples(rows, run.out / "samples", tag, cfg.validation_prompts,
                                [cfg.seed + i for i in range(cfg.num_validation_images)])
    run.say(f"step {run.global_step}: wrote samples {grid}")
    if run.scorers:
        metrics = sample_metrics(run.scorers, rows, cfg.validation_prompts)
        run.accelerator.log(metrics, step=run.global_step)
        run.say(f"step {run.global_step}: " + ", ".join(f"{k.split('/')[-1]} {v:.3f}" for k, v in metrics.items()))
        if run.best is not None:
            keep_best(run, metrics)
    return grid, images


def keep_best(run: Run, metrics: dict) -> None:
    """--select_best: score this validation; a new best step's adapter goes to best/, every score to best/scores.json."""
    folder = run.out / BEST_FOLDER
    if run.best.observe(run.global_step, metrics):
        folder.mkdir(parents=True, exist_ok=True)
        save_final_adapter(run.cfg, run.components, folder, run.history)
    run.best.write(folder)
    best = run.best.best
    run.say(f"step {run.global_step}: {run.best.metric} {run.best.history[-1]['score']:.4f} "
            f"(best so far: step {best['step']}, {best['score']:.4f})")


def patience_out(run: Run) -> bool:
    """--early_stop_patience: the main process decides, every process stops."""
    from accelerate.utils import broadcast_object_list

    flag = [bool(run.best is not None and run.best.patience_out())]
    stop = broadcast_object_list(flag)[0] if run.accelerator.num_processes > 1 else flag[0]
    if stop and run.best is not None:
        best = run.best.best
        run.say(f"Early stop at step {run.global_step}: {run.best.metric} has not improved for {run.best.patience} "
                f"validations (best: step {best['step']}, {best['score']:.4f}).")
    return stop


def finish(run: Run) -> TrainResult:
    """EMA weights in, then (main process) the adapter, the final samples, the model card and push."""
    run.progress.close()
    run.accelerator.wait_for_everyone()
    if run.ema is not None:
        run.ema.copy_to(run.params)
    weights_path = grid = None
    if run.accelerator.is_main_process:
        weights_path = save_final_adapter(run.cfg, run.components, run.out, run.history, run.family)
        run.say(f"Saved the {run.cfg.adapter} adapter to {weights_path}")
        if run.cfg.output_kohya_format:
            from ..export import export_lora

            kohya = export_lora(weights_path, run.out / KOHYA_WEIGHT_NAME, format="kohya")
            run.say(f"Wrote kohya-format LoRA {kohya.path} (--output_kohya_format)")
        grid, images = sample(run, "final")
        if run.best is not None and run.best.best is not None:
            best = run.best.best
            run.say(f"Best step by {run.best.metric}: {best['step']} ({best['score']:.4f}); its adapter and every "
                    f"validation's score: {run.out / BEST_FOLDER}")
        share(run.cfg, run.out, grid, images, run.say, run.history, family=run.family.name)
    run.accelerator.wait_for_everyone()
    best = run.best.to_dict() if run.best is not None else None
    return TrainResult(run.out, weights_path, run.global_step, run.losses, run.components, run.pipe, grid, best)

