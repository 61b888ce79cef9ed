"""The training configuration: one dataclass, filled from a TOML/YAML file and/or command-line flags.

Flag names follow diffusers' `train_dreambooth_lora_sdxl.py` where the meaning is the same. Order of
precedence: dataclass defaults < `--config` file < flags given on the command line. `validate()`
checks everything that can be checked without loading a model, so bad input fails in seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib.util
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ..bases import FAMILY_NAMES, embedded_names
from ..constants import DEFAULT_CLIP_MODEL, DEFAULT_DINO_MODEL, QUANTIZE_CHOICES
from ..errors import GraloraConfigError, TrainConfigError
from ..choices import check_choices
from ..numbers import check_numbers
from ..outputs import check_train_output
from .fused_backward import check_fusable_backward
from .select import SELECT_METRICS


# PIL's resampling filters, by the names diffusers' --image_interpolation_mode takes (torchvision's
# InterpolationMode: nearest_exact is PIL's nearest; torchvision's own "nearest" is a different rounding)
INTERPOLATION_MODES = ("bilinear", "bicubic", "lanczos", "nearest", "nearest_exact", "box", "hamming")
# diffusers' spellings of a setting we name otherwise: flag -> (field, value)
FLAG_ALIASES = {"use_8bit_adam": ("optimizer", "adamw8bit")}
# diffusers' flags we do not support, with what to do instead
UNSUPPORTED_FLAGS = {
    "do_edm_style_training": "EDM-style training (Playground v2.5 and other EDM bases) is not supported; "
                             "train an SDXL-style (DDPM) base, or use diffusers' train_dreambooth_lora_sdxl.py.",
}


def _opt(help_text: str, **extra):
    return field(default=extra.pop("default", None), metadata={"help": help_text, **extra})


@dataclass
class TrainConfig:
    # model
    pretrained_model_name_or_path: str | None = _opt("base model: Hub id, local folder (e.g. from `gralora-diffusion make-tiny`), "
                                                     "`tiny` (random, offline) or `world` (the tiny SDXL pretrained on the drawn world)")
    family: str | None = _opt("base family (default: read from the model's model_index.json; `tiny` is sdxl)", choices=FAMILY_NAMES)
    pretrained_vae_model_name_or_path: str | None = _opt("a better VAE (e.g. madebyollin/sdxl-vae-fp16-fix); runs in the weight dtype")
    revision: str | None = _opt("revision of the base model on the Hub")
    variant: str | None = _opt("weights variant of the base model, e.g. fp16")
    # data
    instance_data_dir: str | None = _opt("folder of subject images; captions from <image>.txt or metadata.jsonl override --instance_prompt")
    instance_prompt: str | None = _opt('prompt with the identifier, e.g. "a photo of sks teapot"; with --dataset_name, '
                                       "the caption of rows that have none")
    dataset_name: str | None = _opt("🤗 datasets training set instead of --instance_data_dir: a Hub id, or a local imagefolder "
                                    "(metadata.jsonl/.csv), folder of parquet files, or save_to_disk folder")
    dataset_config_name: str | None = _opt("the dataset's configuration (subset) name")
    dataset_split: str = _opt("the dataset's split to train on", default="train")
    image_column: str | None = _opt("dataset column of the images (default: its first Image feature)")
    caption_column: str | None = _opt("dataset column of the captions (default: text, caption or prompt, or its only text column)")
    max_train_samples: int | None = _opt("train on the dataset's first N rows only")
    caption_dropout: float = _opt("share of instance captions replaced by the empty prompt (as the pipeline encodes it), "
                                  "for classifier-free guidance", default=0.0)
    streaming: bool = _opt("stream --dataset_name (datasets' IterableDataset) instead of loading it; needs --max_train_steps",
                           default=False)
    repeats: int = _opt("how many times the instance images repeat per epoch", default=1)
    with_prior_preservation: bool = _opt("add the prior-preservation loss on class images", default=False)
    class_data_dir: str | None = _opt("folder of class images; missing ones are generated with the base model")
    class_prompt: str | None = _opt('prompt of the class, e.g. "a photo of a teapot"')
    num_class_images: int = _opt("class images wanted for prior preservation", default=100)
    prior_loss_weight: float = _opt("weight of the prior-preservation loss", default=1.0)
    sample_batch_size: int = _opt("batch size when generating class images", default=4)
    prior_generation_precision: str | None = _opt("dtype class images are generated in: fp32 (or no), fp16, bf16 "
                                                  "(default: as training, --mixed_precision)", choices=("no", "fp32", "fp16", "bf16"))
    resolution: int | None = _opt("training resolution in pixels (square side, or pixel budget with buckets); default: the "
                                  "base's own (sample size x VAE factor: 1024 for SDXL, 64 for tiny and world)")
    center_crop: bool = _opt("center crop instead of random crop", default=False)
    random_flip: bool = _opt("flip images horizontally at random", default=False)
    image_interpolation_mode: str = _opt("resampling filter when images are resized (diffusers' script defaults to lanczos)",
                                         default="bilinear", choices=INTERPOLATION_MODES)
    aspect_buckets: str | None = _opt('aspect-ratio buckets: "auto", or "h,w;h,w;..." (diffusers\' parse_buckets_string)')
    dataloader_num_workers: int = _opt("data loading worker processes", default=0)
    # adapter
    adapter: str = _opt("adapter kind: GraLoRA, or plain LoRA through PEFT as a baseline", default="gralora", choices=("gralora", "lora"))
    rank: int = _opt("adapter rank r (GraLoRA: k blocks of rank r/k each)", default=4)
    gralora_k: int = _opt("GraLoRA blocks per side (2 for r <= 32, 4 for r >= 64)", default=2)
    hybrid_r: int = _opt("rank of GraLoRA's extra plain-LoRA branch", default=0)
    alpha: float | None = _opt("scaling numerator; default 2 * rank (scaling = alpha / (rank + hybrid_r)), for "
                               "--adapter lora too; diffusers' LoRA script uses alpha = rank: pass --alpha RANK to match it")
    dropout: float = _opt("adapter dropout", default=0.0)
    use_dora: bool = _opt("with --adapter lora: PEFT's DoRA (weight-decomposed LoRA) instead of plain LoRA", default=False)
    unet_targets: str = _opt("UNet targets: preset attn | attn+ff, comma-separated module names, or a regex", default="attn")
    text_encoder_targets: str = _opt("text-encoder targets with --train_text_encoder: attn | attn+mlp | names | regex", default="attn")
    train_text_encoder: bool = _opt("also train adapters on both text encoders", default=False)
    text_encoder_lr: float = _opt("learning rate of the text-encoder adapters", default=5e-6)
    # optimisation
    train_batch_size: int = _opt("batch size per device", default=4)
    gradient_accumulation_steps: int = _opt("micro-batches per update", default=1)
    max_train_steps: int | None = _opt("number of updates; overrides --num_train_epochs")
    num_train_epochs: int = _opt("epochs when --max_train_steps is not given", default=1)
    learning_rate: float = _opt("learning rate of the UNet adapters", default=1e-4)
    scale_lr: bool = _opt("multiply learning rates by batch size x accumulation x processes", default=False)
    lr_scheduler: str = _opt("diffusers get_scheduler name: constant, constant_with_warmup, linear, cosine, ...", default="constant")
    lr_warmup_steps: int = _opt("warm-up updates", default=0)
    lr_num_cycles: int = _opt("cycles of cosine_with_restarts", default=1)
    lr_power: float = _opt("power of the polynomial scheduler", default=1.0)
    optimizer: str = _opt("optimizer, any case (diffusers' AdamW too); --use_8bit_adam means adamw8bit", default="adamw",
                          choices=("adamw", "adamw8bit", "prodigy"))
    adam_beta1: float = _opt("Adam beta1", default=0.9)
    adam_beta2: float = _opt("Adam beta2", default=0.999)
    adam_weight_decay: float = _opt("weight decay", default=1e-4)
    adam_weight_decay_text_encoder: float | None = _opt("weight decay of the text-encoder adapters (default: --adam_weight_decay; "
                                                        "diffusers' script defaults to 1e-3)")
    adam_epsilon: float = _opt("Adam epsilon", default=1e-8)
    prodigy_beta3: float | None = _opt("Prodigy's beta3 (default: sqrt(beta2), Prodigy's own)")
    prodigy_decouple: bool = _opt("Prodigy: AdamW-style decoupled weight decay", default=True)
    prodigy_use_bias_correction: bool = _opt("Prodigy: Adam's bias correction", default=True)
    prodigy_safeguard_warmup: bool = _opt("Prodigy: keep the learning rate out of the D estimate's denominator during warm-up", default=True)
    max_grad_norm: float = _opt("gradient clipping norm (0 = off)", default=1.0)
    fused_backward_pass: bool = _opt("step each adapter weight inside backward and free its gradient at once: less memory "
                                     "(kohya's option; adamw, one process, no accumulation; --max_grad_norm clips per weight)",
                                     default=False)
    snr_gamma: float | None = _opt("Min-SNR weighting gamma (5.0 recommended); off by default")
    noise_offset: float = _opt("noise offset", default=0.0)
    use_ema: bool = _opt("keep an EMA of the adapter weights and save it", default=False)
    ema_decay: float = _opt("EMA decay", default=0.9999)
    # speed and memory
    mixed_precision: str | None = _opt("no | fp16 | bf16 (default: accelerate config)", choices=("no", "fp16", "bf16"))
    gradient_checkpointing: bool = _opt("trade compute for memory", default=False)
    cache_latents: bool = _opt("encode each training image once and reuse the VAE latents", default=False)
    cache_text_embeddings: bool = _opt("encode each prompt once when the text encoders are frozen", default=True)
    quantize_base: str = _opt("quantize the frozen base as it loads: int8 / fp8 (torchao, CPU and CUDA), nf4 (bitsandbytes, "
                              "GPU); the UNet, and the text encoders unless trained; adapters stay fp32", default="none",
                              choices=QUANTIZE_CHOICES)
    embedding_cache_mb: int = _opt("cached latents and text embeddings kept in memory up to this many MiB; the rest go "
                                   "to safetensors files under --cache_dir", default=4096)
    cache_dir: str | None = _opt("folder of the on-disk latent/text-embedding cache (default: OUTPUT_DIR/cache)")
    allow_tf32: bool = _opt("allow TF32 matmuls on Ampere+ GPUs", default=False)
    enable_xformers_memory_efficient_attention: bool = _opt("xformers attention in the UNet (needs xformers; PyTorch's "
                                                            "default attention is memory-efficient already)", default=False)
    # validation and outputs
    validation_prompt: str | None = _opt('prompt(s) for sample images; several separated by " | "')
    num_validation_images: int = _opt("images per validation prompt", default=4)
    validation_steps: int | None = _opt("sample every N updates (always at the end)")
    validation_epochs: int | None = _opt("sample after every N epochs (always at the end)")
    num_inference_steps: int = _opt("denoising steps for sample and class images", default=25)
    checkpointing_steps: int = _opt("save a resumable checkpoint every N updates", default=500)
    checkpoints_total_limit: int | None = _opt("keep at most N checkpoints")
    resume_from_checkpoint: str | None = _opt('a checkpoint folder, or "latest" in --output_dir')
    init_adapter: str | None = _opt("start from this GraLoRA adapter's weights (file, folder or Hub id; same rank, "
                                    "gralora_k, hybrid_r, alpha, targets and components, checked before training)")
    output_dir: str = _opt("where everything is written", default="gralora-dreambooth-model")
    overwrite_output_dir: bool = _opt("train again into an --output_dir that holds a finished run (else refused)", default=False)
    seed: int | None = _opt("seed for a reproducible run")
    push_to_hub: bool = _opt("upload the adapter, model card and samples to the Hub when done", default=False)
    hub_model_id: str | None = _opt("Hub repository for --push_to_hub (default: the --output_dir folder name)")
    save_precision: str = _opt("dtype of the final adapter file (checkpoints stay fp32)", default="fp32", choices=("fp32", "fp16", "bf16"))
    output_kohya_format: bool = _opt("also write the adapter as a kohya-keyed LoRA, lora_kohya.safetensors (ComfyUI, A1111)", default=False)
    report_to: str | None = _opt("tensorboard | wandb | none (default: tensorboard when the package is installed, else none)")
    logging_dir: str = _opt("TensorBoard log folder, relative to --output_dir", default="logs")
    # metrics (train --validation_metrics, and compare's evaluation)
    validation_metrics: bool = _opt("score every validation's samples against the instance images (DINO, CLIP-I, CLIP-T, "
                                    "plus the base's own scorers) and log them to --report_to", default=False)
    select_best: str | None = _opt("score every validation (as --validation_metrics) and keep the best step's adapter and "
                                   "scores in OUTPUT_DIR/best/: fidelity (DINO; the world evaluator's on the world), prompt "
                                   "(CLIP-T; background and prior recognized on the world) or fidelity_x_prompt",
                                   choices=SELECT_METRICS)
    early_stop_patience: int | None = _opt("with --select_best: stop when the score has not improved for N validations")
    dino_model: str = _opt("DINO model for the metrics: Hub id or folder; none skips DINO", default=DEFAULT_DINO_MODEL)
    clip_model: str = _opt("CLIP model for the metrics: Hub id or folder; none skips CLIP-I and CLIP-T", default=DEFAULT_CLIP_MODEL)
    torch_compile: bool = _opt("torch.compile the UNet (and the text encoders when trained) with inductor; "
                               "the first steps pay the compile time", default=False)
    image_cache_mb: int = _opt("keep decoded, resized training images in memory when they fit in this many MiB "
                               "(0 = decode every image at every step)", default=2048)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: dict, source: str = "settings") -> "TrainConfig":
        names = cls.field_names()
        clean = {}
        for key, value in data.items():
            key = key.replace("-", "_")
            if key in FLAG_ALIASES:  # diffusers' spelling, e.g. use_8bit_adam: true -> optimizer: adamw8bit
                if value:
                    clean[FLAG_ALIASES[key][0]] = FLAG_ALIASES[key][1]
                continue
            if key in UNSUPPORTED_FLAGS:
                raise TrainConfigError(f"{source}: {key}: {UNSUPPORTED_FLAGS[key]}")
            if key not in names:
                close = difflib.get_close_matches(key, names, n=3)
                hint = f" Did you mean {', '.join(close)}?" if close else ""
                raise TrainConfigError(f"{source}: unknown setting {key!r}.{hint}")
            clean[key] = value
        return cls(**clean)

    @classmethod
    def from_args(cls, args: argparse.Namespace, defaults: dict | None = None) -> "TrainConfig":
        """`defaults` (e.g. a benchmark's settings) first, then file values (`--config`), then the flags
        actually given on the command line."""
        given = {k: v for k, v in vars(args).items() if k in cls.field_names()}
        data = read_config_file(Path(args.config)) if getattr(args, "config", None) else {}
        return cls.from_dict({**(defaults or {}), **data, **given}, source=str(getattr(args, "config", None) or "flags"))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ---- derived values -----------------------------------------------------------------------
    @property
    def resolved_alpha(self) -> float:
        from ..adapter_config import default_alpha

        return float(default_alpha(self.rank, self.alpha))

    @property
    def hub_repo_id(self) -> str:
        return self.hub_model_id or Path(self.output_dir).expanduser().resolve().name

    def logging_note(self) -> str | None:
        """What the run logs where, once `validate` has chosen --report_to (None: nothing to say)."""
        logs = Path(self.output_dir) / self.logging_dir
        if self.report_to == "tensorboard":
            return f"TensorBoard logs: {logs} (view with `tensorboard --logdir {logs}`)"
        if self.report_to == "none" and getattr(self, "_report_to_chosen", False):
            return "No TensorBoard logs: the tensorboard package is not installed (`pip install tensorboard`, then --report_to tensorboard)."
        return None

    @property
    def metric_models(self) -> tuple[str | None, str | None]:
        """(dino_model, clip_model), `none` as None."""
        return tuple(None if str(m).lower() == "none" else m for m in (self.dino_model, self.clip_model))

    @property
    def validation_prompts(self) -> list[str]:
        return [p.strip() for p in (self.validation_prompt or "").split("|") if p.strip()]

    def targets(self, value: str):
        """A preset name or regex stays a string; "a,b,c" becomes a list of module names."""
        return [t.strip() for t in value.split(",") if t.strip()] if "," in value else value

    # ---- checks -------------------------------------------------------------------------------
    def validate(self, need_model: bool = True) -> "TrainConfig":
        self._check_types()
        self._check_finite_numbers()
        check_choices(self.to_dict(), TrainConfigError)  # library lists (LR schedulers), before any model loads
        if self.report_to is None:  # what is installed: a fresh install has no tensorboard
            self.report_to = "tensorboard" if importlib.util.find_spec("tensorboard") is not None else "none"
            self._report_to_chosen = True
        if need_model and not self.pretrained_model_name_or_path:
            raise TrainConfigError("--pretrained_model_name_or_path is required (a Hub id or a local folder, e.g. from `gralora-diffusion make-tiny DIR`).")
        self._check_data_source()
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise TrainConfigError(f"--resolution={self.resolution}: must be a positive multiple of 8 (the VAE downsamples by 8).")
        if self.with_prior_preservation and not (self.class_data_dir and self.class_prompt):
            raise TrainConfigError("--with_prior_preservation needs --class_data_dir and --class_prompt.")
        if self.validation_metrics and not self.validation_prompts:
            raise TrainConfigError("--validation_metrics scores the validation samples: give --validation_prompt too.")
        if self.select_best and not (self.validation_prompts and self.validation_steps):
            raise TrainConfigError(f"--select_best {self.select_best} scores every validation: give --validation_prompt "
                                   "(with the identifier, e.g. 'a photo of sks teapot on checks') and --validation_steps N.")
        if self.early_stop_patience is not None and not self.select_best:
            raise TrainConfigError("--early_stop_patience watches the --select_best score: give --select_best too.")
        if self.early_stop_patience is not None and self.early_stop_patience < 1:
            raise TrainConfigError(f"--early_stop_patience={self.early_stop_patience}: must be >= 1 (or left out).")
        if self.push_to_hub or self.hub_model_id:
            self._check_hub_repo_id()
        if self.aspect_buckets:
            self.bucket_list()
        from ..sources import check_model_path

        from ..bases.load import single_file

        if (need_model and self.pretrained_model_name_or_path not in embedded_names()
                and not single_file(self.pretrained_model_name_or_path, "--pretrained_model_name_or_path", TrainConfigError)):
            check_model_path("--pretrained_model_name_or_path", self.pretrained_model_name_or_path, "model_index.json")
        if self.pretrained_vae_model_name_or_path:
            check_model_path("--pretrained_vae_model_name_or_path", self.pretrained_vae_model_name_or_path, "config.json")
        for name in ("output_dir", "class_data_dir"):
            value = getattr(self, name)
            if value and Path(value).expanduser().exists() and not Path(value).expanduser().is_dir():
                raise TrainConfigError(f"--{name} {value}: is a file, not a folder. Give a folder path (it is created if missing).")
        check_train_output(self, TrainConfigError)  # the output rule (outputs.py): folders apart, no finished run replaced
        self._check_targets()
        self._check_adapter()
        if self.init_adapter:
            from .init_adapter import read_init_adapter

            read_init_adapter(self)
        self._check_packages()
        check_fusable_backward(self, 1, TrainConfigError)  # processes: checked again when the accelerator knows them
        if self.resume_from_checkpoint and self.resume_from_checkpoint != "latest":
            path = self.checkpoint_path(self.resume_from_checkpoint)
            if not (path / "training_state.json").is_file():
                raise TrainConfigError(
                    f"--resume_from_checkpoint {self.resume_from_checkpoint}: {path} is not a complete checkpoint "
                    "(no training_state.json). Give a checkpoint-N folder, or `latest`."
                )
        return self

    def _check_data_source(self) -> None:
        """--instance_data_dir (a folder) or --dataset_name (🤗 datasets), and the dataset flags' ranges."""
        if not self.instance_data_dir and not self.dataset_name:
            raise TrainConfigError("--instance_data_dir is required: the folder holding the images of your subject "
                                   "(or --dataset_name: a 🤗 datasets training set).")
        if self.instance_data_dir and self.dataset_name:
            raise TrainConfigError(f"--instance_data_dir {self.instance_data_dir} and --dataset_name {self.dataset_name}: give one of them.")
        if not self.dataset_name:
            given = [n for n in ("dataset_config_name", "image_column", "caption_column", "max_train_samples") if getattr(self, n) is not None]
            if self.streaming:
                given.append("streaming")
            if given:
                raise TrainConfigError(f"--{', --'.join(given)}: dataset settings; they need --dataset_name.")
        if self.streaming and not self.max_train_steps:
            raise TrainConfigError("--streaming: give --max_train_steps (a streamed dataset's length is not known in advance).")
        if self.streaming and self.aspect_buckets:
            raise TrainConfigError("--streaming trains at the square --resolution; leave out --aspect_buckets, or load the "
                                   "dataset without --streaming.")
        if self.streaming and self.dataloader_num_workers:
            # datasets splits a stream's shards among DataLoader workers, so the order would depend on the shards
            raise TrainConfigError("--streaming reads and decodes rows in the training process, in one fixed order; leave "
                                   "--dataloader_num_workers at 0, or load the dataset without --streaming.")

    def checkpoint_path(self, value: str) -> Path:
        """A checkpoint as given: a path that exists, or a bare name (`checkpoint-500`) inside --output_dir.
        A path with a folder part stays as written (`run/checkpoint-9`, never `run/run/checkpoint-9`)."""
        path = Path(value)
        inside = Path(self.output_dir) / path
        if path.is_absolute() or path.exists() or (len(path.parts) > 1 and not inside.exists()):
            return path
        return inside

    def bucket_list(self) -> list[tuple[int, int]] | None:
        from diffusers.training_utils import generate_aspect_ratio_buckets, parse_buckets_string

        if not self.aspect_buckets:
            return None
        if self.aspect_buckets == "auto" and self.resolution is None:
            return None  # decided once the base is loaded and --resolution is known (train.loop.setup)
        if self.aspect_buckets == "auto":
            # 32 px: SDXL's UNet halves the 8x latents twice more.
            return generate_aspect_ratio_buckets(self.resolution, divisibility=32)
        try:
            buckets = parse_buckets_string(self.aspect_buckets)
        except ValueError as err:
            raise TrainConfigError(f"--aspect_buckets {self.aspect_buckets!r}: {err} Example: \"1024,1024;832,1216\".") from None
        bad = [b for b in buckets if b[0] % 8 or b[1] % 8]
        if bad:
            raise TrainConfigError(f"--aspect_buckets: {bad} not divisible by 8 (the VAE downsamples by 8).")
        return buckets

    def _check_types(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), hints[f.name]
            allowed = typing.get_args(kind) or (kind,)
            if value is None and type(None) in allowed:
                continue
            base = next(t for t in allowed if t is not type(None))
            if base is float and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, f.name, float(value))
                continue
            if not isinstance(value, base) or (base is int and isinstance(value, bool)):
                raise TrainConfigError(f"{f.name}={value!r}: expected {base.__name__}.")
            choices = f.metadata.get("choices")
            if choices and isinstance(value, str) and value.lower() in choices:  # diffusers writes AdamW
                value = value.lower()
                setattr(self, f.name, value)
            if choices and value not in choices:
                raise TrainConfigError(f"--{f.name}={value!r}: choose one of {', '.join(choices)}.")

    def _check_finite_numbers(self) -> None:
        """Every number setting through the package's one number rule (`numbers`): finite, and inside
        its stated range (`numbers.LIMITS`; others: float32 / C int). argparse's float() and TOML/YAML
        files all accept nan, inf and 2**64."""
        check_numbers(self.to_dict(), TrainConfigError)

    def _check_hub_repo_id(self) -> None:
        """Before training, not after it: the push is the run's last step."""
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(self.hub_repo_id)
        except HFValidationError as err:
            flag = "--hub_model_id" if self.hub_model_id else "--push_to_hub (repo id from the --output_dir folder name)"
            raise TrainConfigError(f"{flag} {self.hub_repo_id!r} is not a valid Hub repo id: {err} "
                                   "Use `name` or `your-name/name` (letters, digits, -, _, .).") from None

    def _check_targets(self) -> None:
        """Presets, module-name lists and regexes as `add_adapters` will read them; a bare word that is
        no preset is a typo (as a regex it would only match a top-level module, never a Linear)."""
        from ..inject import resolve_targets

        family = self.base_family()
        if self.train_text_encoder and not family.trainable_text_encoders:
            raise TrainConfigError(f"--train_text_encoder: {family.name} has no text encoder DreamBooth trains here "
                                   "(its T5 / LLM encoders stay frozen); leave the flag out.")
        checks = [("unet_targets", family.presets(family.denoiser))]
        if family.trainable_text_encoders:
            checks.append(("text_encoder_targets", family.presets(family.trainable_text_encoders[0])))
        for name, presets in checks:
            value = getattr(self, name)
            if value not in presets and re.fullmatch(r"[\w+-]+", value):
                close = difflib.get_close_matches(value, list(presets), n=1)
                hint = f"Did you mean {close[0]}? " if close else ""
                raise TrainConfigError(
                    f"--{name} {value!r}: unknown preset. {hint}Use a preset ({', '.join(presets)}), module names "
                    f"separated by commas (e.g. {','.join(presets['attn'][:2])}), or a regex (e.g. '.*{presets['attn'][0]}')."
                )
            try:
                resolve_targets(self.targets(value), presets)
            except GraloraConfigError as err:
                raise TrainConfigError(f"--{name}: {err}") from None

    def base_family(self):
        """The base's family as far as it is known before loading (--family, the embedded name, model_index.json);
        sdxl when nothing says (a Hub id not cached yet: the loaded pipeline's class decides then)."""
        from ..bases import DEFAULT_FAMILY, base_family, get_family

        try:
            found = base_family(self.pretrained_model_name_or_path, self.family, "--pretrained_model_name_or_path") \
                if self.pretrained_model_name_or_path else None
            return found or get_family(self.family or DEFAULT_FAMILY)
        except GraloraConfigError as err:
            raise TrainConfigError(str(err)) from None

    def _check_adapter(self) -> None:
        from ..adapter_config import make_config

        if self.adapter == "lora" and self.hybrid_r:
            raise TrainConfigError("--hybrid_r is a GraLoRA option; leave it at 0 with --adapter lora.")
        if self.use_dora and self.adapter != "lora":
            raise TrainConfigError("--use_dora trains PEFT's DoRA as the LoRA baseline: add --adapter lora (GraLoRA has no DoRA variant).")
        try:
            k = self.gralora_k if self.adapter == "gralora" else 1
            make_config(r=self.rank, gralora_k=k, alpha=self.alpha, hybrid_r=self.hybrid_r, dropout=self.dropout)
        except GraloraConfigError as err:
            raise TrainConfigError(f"adapter settings: {err}") from None

    def _check_packages(self) -> None:
        needed = {"adamw8bit": ("bitsandbytes", "pip install bitsandbytes"), "prodigy": ("prodigyopt", "pip install prodigyopt")}
        if self.enable_xformers_memory_efficient_attention and importlib.util.find_spec("xformers") is None:
            raise TrainConfigError("--enable_xformers_memory_efficient_attention needs the xformers package (`pip install xformers`); "
                                   "without the flag the UNet uses PyTorch's scaled_dot_product_attention, memory-efficient already.")
        if self.optimizer in needed:
            module, cmd = needed[self.optimizer]
            if importlib.util.find_spec(module) is None:
                raise TrainConfigError(f"--optimizer {self.optimizer} needs the {module} package: `{cmd}`, or use --optimizer adamw.")
        if self.report_to in ("tensorboard", "wandb") and importlib.util.find_spec(self.report_to) is None:
            raise TrainConfigError(f"--report_to {self.report_to} needs the {self.report_to} package (`pip install {self.report_to}`), or pass --report_to none.")
        if self.quantize_base != "none":
            from ..quantize import check_quantize_base

            check_quantize_base(self.quantize_base, error=TrainConfigError)
        if self.mixed_precision == "fp16":
            import torch

            if not torch.cuda.is_available():
                raise TrainConfigError("--mixed_precision fp16 needs a CUDA GPU; on CPU use bf16 or no.")


def read_config_file(path: Path) -> dict:
    """A .toml, .yaml/.yml or .json file holding {flag name: value}."""
    if not path.is_file():
        raise TrainConfigError(f"--config {path}: no such file.")
    from ..settings_file import check_expansion, read_bounded

    suffix = path.suffix.lower()
    try:
        text = read_bounded(path, TrainConfigError)  # size-bounded; YAML aliases bounded below
        if suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise TrainConfigError(f"--config {path}: use a .toml, .yaml/.yml or .json file.")
        check_expansion(data, path, TrainConfigError)
    except (ValueError, ImportError) as err:  # tomllib/yaml/json parse errors derive from ValueError (yaml: YAMLError)
        if isinstance(err, TrainConfigError):
            raise
        raise TrainConfigError(f"--config {path}: cannot parse ({err}).") from None
    except Exception as err:  # yaml.YAMLError is not a ValueError
        raise TrainConfigError(f"--config {path}: cannot parse ({type(err).__name__}: {err}).") from None
    if not isinstance(data, dict):
        raise TrainConfigError(f"--config {path}: the top level must be a table of settings, got {type(data).__name__}.")
    return data


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field. Defaults are suppressed, so `from_args` can tell given flags from unset ones.

    Not transformers' `HfArgumentParser`: it fills every field with its default, so it cannot lay the
    flags actually given over a `--config` file (its `parse_yaml_file`/`parse_json_file` read a file
    alone, and it has no TOML); its booleans are `--flag [true|false]` / `--no_flag`, where our users'
    commands say `--flag` / `--no-flag` (argparse's BooleanOptionalAction); and unknown file keys get
    no "did you mean". The mapping itself is the 15 lines below."""
    hints = typing.get_type_hints(TrainConfig)
    parser.add_argument("--config", default=argparse.SUPPRESS, help="a .toml/.yaml/.json file of settings; flags override it")
    for flag, (name, value) in FLAG_ALIASES.items():
        parser.add_argument(f"--{flag}", dest=name, action="store_const", const=value, default=argparse.SUPPRESS,
                            help=f"diffusers' spelling of --{name} {value}")
    for flag, why in UNSUPPORTED_FLAGS.items():
        parser.add_argument(f"--{flag}", action=_Unsupported, nargs=0, help=argparse.SUPPRESS, default=argparse.SUPPRESS)
    for f in dataclasses.fields(TrainConfig):
        kind = next(t for t in (typing.get_args(hints[f.name]) or (hints[f.name],)) if t is not type(None))
        help_text = f.metadata["help"] + ("" if f.default is None else f" (default: {f.default})")
        kwargs = {"default": argparse.SUPPRESS, "help": help_text}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = kind
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
                kwargs["type"] = _lower  # diffusers' --optimizer AdamW, --mixed_precision BF16
        parser.add_argument(f"--{f.name}", **kwargs)


def _lower(value: str) -> str:
    return value.lower()


class _Unsupported(argparse.Action):
    """A diffusers flag we do not support: one line saying so and what to do, exit 2."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string}: {UNSUPPORTED_FLAGS[option_string.lstrip('-')]}")
