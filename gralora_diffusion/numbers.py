"""The one rule for numbers that come from users, flags, configs, file headers and state files:
`finite_number` for floats, `whole_number` for integers, and `LIMITS`, the stated range of every named
setting (plain data: the CLI's parser never imports anything for it).

A number is an int or a float (not a bool, not a string), finite (no NaN, no +-inf, no int too
large for a float), optionally within bounds. Everything that takes a number from outside
(alpha and dropout in configs and headers, export's max_size, adapter weights, fuse scales,
training flags) checks it here, so "NaN passes validation" cannot come back in one place only.
No torch import: the CLI checks flags before anything heavy loads.

An integer is an int (not a bool, not a float), inside C's and numpy's ranges and a sane upper bound
(a rank of 2**20 or a 2**20 px side would only run out of memory), with the bound in the message.
"""

from __future__ import annotations

import math


def finite_number(value, what: str, error: type[Exception] | None = None, low: float | None = None,
                  high: float | None = None, low_open: bool = False, high_open: bool = False) -> float:
    """`value` as a float, or `error` (default GraloraConfigError) naming `what`: not a number, NaN,
    inf, or outside [low, high] (an open bound with `low_open` / `high_open`)."""
    if error is None:
        from .errors import GraloraConfigError as error
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error(f"{what}={_show(value)}: must be a number, not {type(value).__name__}.")
    try:
        number = float(value)
    except OverflowError:  # an int beyond float's range
        number = math.inf
    if not math.isfinite(number):
        raise error(f"{what}={_show(value)}: must be a finite number (not NaN or infinite).")
    below = low is not None and (number <= low if low_open else number < low)
    above = high is not None and (number >= high if high_open else number > high)
    if below or above:
        if high is None:
            span = "positive (> 0)" if low == 0 and low_open else f"{'>' if low_open else '>='} {low:g}"
        elif low is None:
            span = f"{'<' if high_open else '<='} {high:g}"
        else:
            span = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise error(f"{what}={_show(value)}: must be {span}.")
    return number


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


SEED_MAX = 2**32 - 1  # numpy's seed range (accelerate's set_seed seeds numpy too)
GENERATOR_SEEDS = (-(2**63), 2**64 - 1)  # torch.Generator.manual_seed's range (generate, evaluate, compare's images)
INT_MAX = 2**31 - 1  # C int: the largest count any library here takes
FLOAT32_MAX = 3.4028234663852886e38
FLOAT16_MAX = 65504.0
# name -> (low, high[, "open" ends]): the stated range of every number a user can set, by the name of
# its flag (train/compare's settings, generate/evaluate's flags, adapter headers). Ints: inclusive.
LIMITS: dict[str, tuple] = {
    # counts and sizes
    "rank": (1, 1024), "r": (1, 1024), "gralora_k": (1, 64), "hybrid_r": (0, 1024),
    "resolution": (8, 4096), "height": (8, 4096), "width": (8, 4096),
    "repeats": (1, 10_000), "num_class_images": (1, 100_000), "sample_batch_size": (1, 1024),
    "train_batch_size": (1, 4096), "gradient_accumulation_steps": (1, 65_536), "dataloader_num_workers": (0, 256),
    "max_train_steps": (1, INT_MAX), "num_train_epochs": (1, 1_000_000), "lr_warmup_steps": (0, INT_MAX),
    "lr_num_cycles": (1, 1_000_000), "num_validation_images": (1, 64), "validation_steps": (1, INT_MAX),
    "num_inference_steps": (1, 1000), "steps": (1, 1000), "checkpointing_steps": (1, INT_MAX),
    "checkpoints_total_limit": (1, 1_000_000), "image_cache_mb": (0, 1_048_576),
    "embedding_cache_mb": (0, 1_048_576), "max_train_samples": (1, INT_MAX), "seeds_per_variant": (1, 100),
    "seed": (0, SEED_MAX), "seeds": GENERATOR_SEEDS, "eval_seeds": GENERATOR_SEEDS, "num_threads": (1, 1024),
    "global_step": (0, INT_MAX), "layers_per_block": (1, 64), "svd_rank": (1, 4096),
    # floats
    "alpha": (-FLOAT16_MAX, FLOAT16_MAX), "scales": (-1000.0, 1000.0), "weight": (-1000.0, 1000.0),
    "guidance": (0.0, 1000.0), "eval_guidance": (0.0, 1000.0),
    "learning_rate": (0.0, 100.0, "low_open"), "text_encoder_lr": (0.0, 100.0, "low_open"),
    "adam_beta1": (0.0, 1.0, "high_open"), "adam_beta2": (0.0, 1.0, "high_open"), "adam_epsilon": (0.0, 1.0, "low_open"),
    "adam_weight_decay": (0.0, 100.0), "ema_decay": (0.0, 1.0), "dropout": (0.0, 1.0, "high_open"),
    "caption_dropout": (0.0, 1.0, "high_open"),
    "prior_loss_weight": (0.0, 1e6), "max_grad_norm": (0.0, 1e6), "snr_gamma": (0.0, 1e6, "low_open"),
    "noise_offset": (0.0, 100.0), "lr_power": (0.0, 100.0),
    "validation_epochs": (1, 1_000_000), "adam_weight_decay_text_encoder": (0.0, 100.0), "prodigy_beta3": (0.0, 1.0, "high_open"),
}


def whole_number(value, what: str, error: type[Exception] | None = None, low: int | None = None,
                 high: int | None = None) -> int:
    """`value` as an int, or `error` (default GraloraConfigError) naming `what` and the range."""
    if error is None:
        from .errors import GraloraConfigError as error
    if isinstance(value, bool) or not isinstance(value, int):
        raise error(f"{what}={_show(value)}: must be a whole number, not {type(value).__name__}.")
    low = -INT_MAX - 1 if low is None else low
    high = INT_MAX if high is None else high
    if not low <= value <= high:
        raise error(f"{what}={_show(value)}: must be in [{low}, {high}].")
    return value


def limited(name: str, value, what: str | None = None, error: type[Exception] | None = None):
    """`value` checked against `LIMITS[name]`: an int field as `whole_number`, a float as `finite_number`.
    `what` (default `--name`) names it in the message. None passes (an unset optional setting)."""
    if value is None:
        return None
    what = what or f"--{name}"
    low, high, *ends = LIMITS[name]
    if isinstance(low, int) and isinstance(high, int):
        return whole_number(value, what, error, low, high)
    return finite_number(value, what, error, low, high, low_open="low_open" in ends, high_open="high_open" in ends)


def check_numbers(settings: dict, error: type[Exception] | None = None) -> None:
    """Every number of `settings` ({flag name: value}, e.g. a TrainConfig's) by the rule: a name in
    `LIMITS` within its range; any other float finite and within float32, any other int a C int.
    Strings, booleans and None are left to their own checks."""
    for name, value in settings.items():
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if name in LIMITS:
            limited(name, value, f"--{name}", error)
        elif isinstance(value, float):
            finite_number(value, f"--{name}", error, -FLOAT32_MAX, FLOAT32_MAX)
        else:
            whole_number(value, f"--{name}", error)
