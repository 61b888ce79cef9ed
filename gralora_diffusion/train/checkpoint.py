"""Resumable training state in safetensors and JSON only, never a pickle.

Accelerate's `save_state`/`load_state` pickle (`random_states_N.pkl`, `custom_checkpoint_N.pkl`,
`optimizer.bin`/`scheduler.bin` through `torch.save`, loaded with `weights_only=False`), so a
checkpoint from elsewhere could run code on resume. A checkpoint here is:

    adapter_<component>.safetensors   trained adapter weights (never the base model)
    optimizer.safetensors             the optimizer's per-parameter tensors (Adam moments, step)
    ema.safetensors                   the EMA's shadow weights, with --use_ema
    rng_<process>.safetensors/.json   each process's torch (CPU, CUDA), numpy and Python RNG states
    training_state.json               step, seed, the settings that shape the state, scheduler
                                      position, optimizer/EMA/grad-scaler scalars; written last

`check_checkpoint` reads only JSON and safetensors headers, before any model loads: a pickle-named
file, a damaged file, or settings that shape the state differently are one-line errors.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..constants import PICKLE_SUFFIXES, STATE_NAME
from ..errors import TrainConfigError
from ..numbers import limited
from .save import load_adapter_weights, save_adapter_weights

OPTIMIZER_FILE, EMA_FILE = "optimizer.safetensors", "ema.safetensors"


def shaping_settings(cfg) -> dict:
    """The settings that decide the shape of the saved state; a resumed run must match them."""
    gralora = cfg.adapter == "gralora"
    return {"adapter": cfg.adapter, "rank": cfg.rank, "gralora_k": cfg.gralora_k if gralora else None,
            "hybrid_r": cfg.hybrid_r, "alpha": cfg.resolved_alpha, "unet_targets": cfg.unet_targets,
            "train_text_encoder": cfg.train_text_encoder,
            "text_encoder_targets": cfg.text_encoder_targets if cfg.train_text_encoder else None,
            "optimizer": cfg.optimizer, "use_ema": cfg.use_ema,
            **({"use_dora": True} if cfg.use_dora else {}),  # only when on: older checkpoints, without the key, still resume
            # a streamed run resumes by position in the stream: the stream and its cut must be the same
            **({"stream": [cfg.dataset_name, cfg.dataset_config_name, cfg.dataset_split, cfg.max_train_samples,
                           cfg.train_batch_size, cfg.gradient_accumulation_steps]} if cfg.streaming else {})}


# Settings a resumed run may change; each stretch of a run records them (training_config.yaml, card).
CHANGEABLE = ("learning_rate", "text_encoder_lr", "max_train_steps", "num_train_epochs", "lr_scheduler", "lr_warmup_steps",
              "max_grad_norm", "adam_weight_decay", "snr_gamma", "noise_offset", "validation_prompt", "validation_steps")


def run_history(cfg, state: dict | None) -> list[dict]:
    """[{from_step, settings}] per stretch of the run: the checkpoint's stretches, then this one if it differs."""
    now = {k: getattr(cfg, k) for k in CHANGEABLE}
    history = list(state.get("history", [])) if state else []
    if not history or history[-1]["settings"] != now:
        history.append({"from_step": state["global_step"] if state else 0, "settings": now})
    return history


def _damaged(folder: Path, name: str, why: str) -> TrainConfigError:
    return TrainConfigError(f"--resume_from_checkpoint {folder}: {name} is damaged ({why}); resume from an "
                            "earlier checkpoint, or start a new run in another --output_dir.")


def check_checkpoint(folder: Path, cfg) -> dict:
    """training_state.json of `folder`, after checking the folder without loading any tensor."""
    folder = Path(folder)
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise TrainConfigError(f"--resume_from_checkpoint {folder}: holds {', '.join(pickles)}, pickle files, which are never "
                               "loaded (code could run). Resume only from checkpoints of safetensors and JSON, as this trainer writes.")
    try:
        state = json.loads((folder / STATE_NAME).read_text(encoding="utf-8"))
        if not isinstance(state, dict) or not isinstance(state.get("settings"), dict):
            raise ValueError("no settings table")
        limited("global_step", state.get("global_step"), "global_step", ValueError)  # the number rule: a C int >= 0
        history = state.get("history", [])
        if not isinstance(history, list) or not all(isinstance(h, dict) and isinstance(h.get("settings"), dict)
                                                    and isinstance(h.get("from_step"), int) for h in history):
            raise ValueError("history is not a list of {from_step, settings}")
        if state.get("seed") is not None:
            limited("seed", state["seed"], "seed", ValueError)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise _damaged(folder, STATE_NAME, str(err).splitlines()[0][:120]) from None
    differ = {k: (state["settings"].get(k), v) for k, v in shaping_settings(cfg).items() if state["settings"].get(k) != v}
    if differ:
        listed = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in differ.items())
        raise TrainConfigError(f"--resume_from_checkpoint {folder}: this run's settings differ from the checkpoint's: {listed}. "
                               "Resume with the checkpoint's settings, or start a new run in another --output_dir.")
    for path in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("rng_*.json")):
        try:
            if path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
                continue
            with safe_open(str(path), "pt") as f:  # the header, and that the file holds all it declares
                f.keys()
        except (SafetensorError, OSError, ValueError) as err:
            raise _damaged(folder, path.name, str(err).splitlines()[0][:120]) from None
    return state


# ---- writing ---------------------------------------------------------------------------------------
def split_tensors(prefix: str, values: dict, tensors: dict) -> dict:
    """Tensors of `values` into `tensors` under prefix.key; the rest (JSON-able scalars) returned."""
    rest = {}
    for key, value in values.items():
        if torch.is_tensor(value):
            tensors[f"{prefix}{key}"] = value.detach().cpu().contiguous()
        else:
            rest[key] = value
    return rest


def save_training_state(run, folder: Path) -> dict:
    """Every process writes its RNG; the main process the adapter, optimizer and EMA. Returns the
    JSON part for training_state.json."""
    accelerator, folder = run.accelerator, Path(folder)
    save_rng(folder, accelerator.process_index)
    if not accelerator.is_main_process:
        return {}
    save_adapter_weights(run.components, folder)
    tensors, scalars = {}, {}
    for index, values in run.optimizer.state_dict()["state"].items():
        scalars[str(index)] = split_tensors(f"{index}.", values, tensors)
    save_file(tensors, folder / OPTIMIZER_FILE)
    state = {"scheduler": {k: run.lr_scheduler.state_dict()[k] for k in ("last_epoch", "_step_count")},
             "optimizer": scalars, "num_processes": accelerator.num_processes}
    if run.ema is not None:
        ema = run.ema.state_dict()
        save_file({f"shadow.{i}": t.detach().cpu().contiguous() for i, t in enumerate(ema.pop("shadow_params"))}, folder / EMA_FILE)
        state["ema"] = ema
    if accelerator.scaler is not None:
        state["grad_scaler"] = accelerator.scaler.state_dict()
    return state


def save_rng(folder: Path, process: int) -> None:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors |= {f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    save_file(tensors, folder / f"rng_{process}.safetensors")
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    (folder / f"rng_{process}.json").write_text(json.dumps({
        "numpy": [kind, keys.tolist(), pos, has_gauss, gauss], "python": [version, list(internal), gauss_next]}))


# ---- reading ---------------------------------------------------------------------------------------
def load_training_state(run, folder: Path, state: dict) -> None:
    """Put a checked checkpoint's state into the run. Settings a resumed run may change win: the
    optimizer keeps this run's parameter groups (learning rates, betas, decay) and only takes the
    checkpoint's per-parameter tensors; the schedule, built for this run's --max_train_steps, is moved
    to the checkpoint's step and recomputes the learning rate from this run's --learning_rate."""
    folder = Path(folder)
    try:
        load_adapter_weights(run.components, folder)
        tensors = load_file(folder / OPTIMIZER_FILE)
        per_param = {int(i): dict(v) for i, v in state["optimizer"].items()}
        for key, value in tensors.items():
            index, name = key.split(".", 1)
            per_param.setdefault(int(index), {})[name] = value
        run.optimizer.load_state_dict({"state": per_param, "param_groups": run.optimizer.state_dict()["param_groups"]})
        scheduler = run.lr_scheduler  # diffusers' get_scheduler: a LambdaLR; its lambdas are this run's
        saved = state["scheduler"]
        scheduler.load_state_dict({**scheduler.state_dict(), "last_epoch": saved["last_epoch"] - 1, "_step_count": saved["_step_count"] - 1})
        scheduler.step()  # torch's own path sets every group's lr for the step reached
        if run.ema is not None:
            shadow = load_file(folder / EMA_FILE)
            run.ema.load_state_dict({**state["ema"], "shadow_params": [shadow[f"shadow.{i}"] for i in range(len(shadow))]})
        if run.accelerator.scaler is not None and "grad_scaler" in state:
            run.accelerator.scaler.load_state_dict(state["grad_scaler"])
        load_rng(folder, run.accelerator.process_index, run.say)
    except (SafetensorError, OSError, KeyError, IndexError, TypeError, ValueError, RuntimeError) as err:
        raise _damaged(folder, "its training state", f"{type(err).__name__}: {str(err).splitlines()[0][:160]}") from None


def load_rng(folder: Path, process: int, say) -> None:
    path = folder / f"rng_{process}.json"
    if not path.is_file():
        say(f"{folder} holds no RNG state of process {process} (written by fewer processes): its noise will differ.")
        return
    tensors = load_file(folder / f"rng_{process}.safetensors")
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available() and "cuda.0" in tensors:
        torch.cuda.set_rng_state_all([tensors[f"cuda.{i}"] for i in range(torch.cuda.device_count()) if f"cuda.{i}" in tensors])
    saved = json.loads(path.read_text(encoding="utf-8"))
    kind, keys, pos, has_gauss, gauss = saved["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = saved["python"]
    random.setstate((version, tuple(internal), gauss_next))
