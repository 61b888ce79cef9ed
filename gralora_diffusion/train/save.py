"""What training writes: the final adapter, the resolved config, the model card (and push), and
resumable checkpoints; and what to run to resume from them.

Checkpoints (what they hold: `checkpoint.py`) are written under a temporary name and renamed when
complete (a kill leaves a `.tmp-` folder that nothing reads). `training_state.json` is written last
and marks a checkpoint as complete. Only adapter weights are saved, never the frozen base model.
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import torch
import yaml
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from ..constants import CONFIG_NAME, LORA_WEIGHT_NAME, STATE_NAME, WEIGHT_NAME, torch_dtype
from ..adapter_file import atomic_write, cast_checked, collect_adapter, save_adapter_file
from ..errors import TrainingError


def save_final_adapter(cfg, components: dict, output_dir: Path, history: list[dict] | None = None, family=None) -> Path:
    """GraLoRA: our adapter file, base model id and instance prompt in the header.
    LoRA: diffusers' format through `save_lora_weights`, so stock `load_lora_weights` reads it.
    Tensors in `--save_precision` (fp32 as trained, or fp16/bf16 as kohya users expect)."""
    dtype = torch_dtype(cfg.save_precision, what="--save_precision")

    def cast(tensor, name):  # refused if a value overflows the dtype (the checkpoints keep fp32)
        return cast_checked(tensor.detach(), dtype, f"--save_precision {cfg.save_precision}: {name}", TrainingError)

    from ..bases import DEFAULT_FAMILY, get_family

    family = get_family(family or DEFAULT_FAMILY)
    if cfg.adapter == "lora":
        from diffusers.utils import convert_state_dict_to_diffusers

        kwargs = {}
        for name, model in components.items():
            layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
            kwargs[f"{name}_lora_layers"] = {k: cast(v, k) for k, v in layers.items()}
            # the LoraConfig (alpha = 2r by default) goes in the header; without it loaders assume alpha = r
            kwargs[f"{name}_lora_adapter_metadata"] = model.peft_config["default"].to_dict()
        family.pipeline_class.save_lora_weights(output_dir, safe_serialization=True, **kwargs)
        return output_dir / LORA_WEIGHT_NAME
    state_dicts, configs = collect_adapter(components, adapter_name="default")
    state_dicts = {c: {k: cast(v, f"{c}.{k}") for k, v in sd.items()} for c, sd in state_dicts.items()}
    metadata = {"instance_prompt": cfg.instance_prompt or "", "training": json.dumps(training_summary(cfg, history)),
                "family": family.name}
    from ..recorded_base import hub_id, record

    base, base_id = record(cfg.pretrained_model_name_or_path), hub_id(cfg.pretrained_model_name_or_path)
    if base_id and base_id != base:  # a local folder of the HF cache: its path finds it here, its id on the Hub
        metadata["base_model_hub_id"] = base_id
    return save_adapter_file(output_dir / WEIGHT_NAME, state_dicts, configs, base_model=base, metadata=metadata)


def training_summary(cfg, history: list[dict] | None = None) -> dict:
    """For the model card and the adapter header; the values are those of the last stretch of the run,
    and `resumed_with` says what a resumed run changed, from which step."""
    keys = ("adapter", "rank", "gralora_k", "hybrid_r", "resolution", "learning_rate", "max_train_steps", "train_batch_size", "seed",
            "save_precision")
    summary = {k: getattr(cfg, k) for k in keys} | {"alpha": cfg.resolved_alpha}
    changes = []
    for before, after in zip(history or [], (history or [])[1:]):
        changed = [f"{k} {before['settings'].get(k)!r} -> {v!r}" for k, v in after["settings"].items() if before["settings"].get(k) != v]
        changes.append(f"from step {after['from_step']}: {', '.join(changed)}")
    return summary | ({"resumed_with": "; ".join(changes)} if changes else {})


def save_config(cfg, output_dir: Path, history: list[dict] | None = None) -> Path:
    """The resolved settings, reusable as `--config training_config.yaml`; when a resumed run changed
    settings, comment lines above them say what the earlier steps ran with."""
    path = output_dir / CONFIG_NAME
    earlier = [f"# steps {h['from_step']}-{n['from_step']} ran with: {json.dumps(h['settings'])}"
               for h, n in zip(history or [], (history or [])[1:])]
    note = [f"# resumed; the settings below ran from step {history[-1]['from_step']}"] if earlier else []
    text = "\n".join(earlier + note + [yaml.safe_dump(cfg.to_dict(), sort_keys=False)])
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def share(cfg, out: Path, grid: Path | None, images: list[Path], say, history=None, family: str | None = None) -> None:
    """The model card (README.md) beside the adapter, then the push with --push_to_hub."""
    from ..hub import push_to_hub, save_model_card

    prompts = [p for p in cfg.validation_prompts for _ in range(cfg.num_validation_images)]
    rel = [str(p.relative_to(out)) for p in images]
    card = save_model_card(out, repo_id=cfg.hub_model_id, base_model=cfg.pretrained_model_name_or_path,
                           instance_prompt=cfg.instance_prompt, images=rel + ([str(grid.relative_to(out))] if grid else []),
                           prompts=prompts or None, training=training_summary(cfg, history),
                           grid=str(grid.relative_to(out)) if grid else None, family=family)
    say(f"Wrote the model card {card}")
    if cfg.push_to_hub:
        repo_id = cfg.hub_repo_id
        push_to_hub(out, repo_id)
        say(f"Pushed {out} to the Hub as {repo_id}")


# ---- checkpoints ---------------------------------------------------------------------------------
def save_adapter_weights(components: dict, folder: Path) -> None:
    for name, model in components.items():
        save_file({k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}, folder / f"adapter_{name}.safetensors")


def load_adapter_weights(components: dict, folder: Path) -> None:
    for name, model in components.items():
        result = set_peft_model_state_dict(model, load_file(folder / f"adapter_{name}.safetensors"))
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"adapter_{name}.safetensors has keys this model lacks: {result.unexpected_keys[:3]}")


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """checkpoint-N folders holding training_state.json, oldest first."""
    found = []
    for path in Path(output_dir).glob("checkpoint-*"):
        suffix = path.name.split("-", 1)[1]
        if suffix.isdigit() and (path / STATE_NAME).is_file():
            found.append((int(suffix), path))
    return [p for _, p in sorted(found)]


def write_checkpoint(accelerator, output_dir: Path, step: int, save, state: dict, limit: int | None) -> Path:
    """Every rank calls this: `save(folder)` into a temp folder (it returns the main process's part of
    training_state.json), then one rename."""
    final, tmp = output_dir / f"checkpoint-{step}", output_dir / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    state = {**state, **save(tmp)}
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_NAME).write_text(json.dumps(state))
        stale = output_dir / f".old-checkpoint-{step}"
        if final.exists():  # left by an earlier run that got further: move it aside whole, never half-delete it
            if stale.exists():
                shutil.rmtree(stale)
            final.rename(stale)
        tmp.rename(final)
        shutil.rmtree(stale, ignore_errors=True)
        if limit:
            for old in complete_checkpoints(output_dir)[:-limit]:
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resume_hint(cfg, command: str = "gralora-diffusion train") -> str:
    """Whether a checkpoint exists, and the exact command that resumes from it (`command` is how this
    run was started: the CLI, or `accelerate launch scripts/...`)."""
    out = Path(cfg.output_dir)
    found = complete_checkpoints(out)
    if not found:
        return "No checkpoint was written yet: run the same command again to start over."
    config = out / CONFIG_NAME
    how = (f"{command} --config {shlex.quote(str(config))} --resume_from_checkpoint latest" if config.is_file()
           else "the same command with --resume_from_checkpoint latest")
    return f"Last checkpoint: {found[-1]}. Resume with: {how}"


def all_finite(params) -> bool:
    return all(torch.isfinite(p).all() for p in params)
