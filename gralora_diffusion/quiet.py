"""Our output only: the libraries' loading bars, load reports and known warnings kept quiet inside
our own progress, in one place every command reuses.

- `quiet_libraries()`: a context manager around a library call that loads or casts (a pipeline,
  a LoRA, a metric model, the imports that pull in transformers). Inside it transformers and
  diffusers log errors only and show no bars (huggingface_hub's neither), and the known noise
  below is dropped; everything is as before afterwards.
- `quiet_known_noise()`: only the known noise dropped (`QUIET_WARNINGS`, `QUIET_LOGS`): for calls
  whose other warnings a user should see, such as a pipeline call (a prompt cut at 77 tokens).
- `load_pretrained(loader, name, flag)`: `loader.from_pretrained(name)` quietly, any failure one
  line naming the flag (a Hub id not in the cache offline says how to get it).
- `progress_bar(progress, total, desc)`: our tqdm bar, or the caller's, or none.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from pathlib import Path

from .errors import GraloraConfigError

# (category, message regex) of warnings the libraries give that tell our users nothing they can act on.
QUIET_WARNINGS = (
    (FutureWarning, r".*`torch_dtype` is deprecated"),  # diffusers >= 0.36 renames it; older ones lack `dtype`
    (UserWarning, r".*Already found a `peft_config` attribute"),  # a LoRA loaded beside a GraLoRA adapter: meant
    (FutureWarning, r".*`upcast_vae` is deprecated"),  # said by diffusers' own fp16 pipeline call, not by our code
)
# logger name -> message regex: log records that say nothing to act on.
QUIET_LOGS = {
    "diffusers.models.modeling_utils": r"There are modules in \w+ that should be kept in float32: \[\]",  # none: nothing to keep
}
# logger name -> message regex: what the quantization backends log as they are imported (diffusers imports
# torchao whenever it is installed) about kernels a CPU build or this torch lacks; dropped for good by
# `drop_import_noise`, called when the package is imported.
IMPORT_NOISE = {
    "torchao": r"Failed to load .*\.so",
    "bitsandbytes.backends.cpu.ops": r"Failed to load CPU gemm_4bit_forward from kernels-community",
    # diffusers 0.42 registers torchao tensor classes that torchao 0.18 moved; only pre-quantized checkpoints need them
    "diffusers.quantizers.torchao.torchao_quantizer": r"Unable to import `torchao` Tensor objects",
    "torch.utils._pytree": r"<enum '\w+'> is an Enum subclass and is now natively supported by torch.compile",
}


class _DropMessages(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def drop_import_noise() -> None:
    """Filter `IMPORT_NOISE` out of those loggers, once per process (stdlib only: cheap at import)."""
    for name, pattern in IMPORT_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(_DropMessages(pattern))


@contextlib.contextmanager
def quiet_known_noise():
    """Drop the warnings in `QUIET_WARNINGS` and the log records in `QUIET_LOGS`, nothing else."""
    filters = [(logging.getLogger(name), _DropMessages(pattern)) for name, pattern in QUIET_LOGS.items()]
    for logger, log_filter in filters:
        logger.addFilter(log_filter)
    try:
        with warnings.catch_warnings():
            for category, message in QUIET_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        for logger, log_filter in filters:
            logger.removeFilter(log_filter)


@contextlib.contextmanager
def quiet_libraries():
    """No loading/shard/weight bars, load reports or known warnings from the libraries inside;
    errors still raise. Log levels, bar switches and warning filters come back as they were."""
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as transformers_logging

    saved = (transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled(),
             diffusers_logging.get_verbosity(), diffusers_logging.is_progress_bar_enabled(), are_progress_bars_disabled())
    transformers_logging.set_verbosity_error(), transformers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error(), diffusers_logging.disable_progress_bar(), disable_progress_bars()
    try:
        with quiet_known_noise():
            yield
    finally:
        transformers_logging.set_verbosity(saved[0])
        diffusers_logging.set_verbosity(saved[2])
        for enabled, module in ((saved[1], transformers_logging), (saved[3], diffusers_logging)):
            module.enable_progress_bar() if enabled else module.disable_progress_bar()
        if not saved[4]:
            enable_progress_bars()


def clip_words(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters at a word boundary, marked with "..." when cut."""
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0].rstrip(",;:") + " ..."


def load_pretrained(loader, name: str, flag: str, folder_hint: str = "a transformers save_pretrained folder", **kwargs):
    """`loader.from_pretrained(name, **kwargs)` inside `quiet_libraries`, any failure one line naming
    `flag`: a Hub id that is not cached (offline or no network) says how to get it, a folder says what
    is wrong with it and asks for `folder_hint`."""
    from huggingface_hub import constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    folder = Path(str(name)).expanduser()
    if not folder.exists():
        try:
            validate_repo_id(str(name))
        except HFValidationError:
            raise GraloraConfigError(f"{flag} {name}: no such folder, and not a Hub repo id (org/name).") from None
    try:
        with quiet_libraries():
            return loader.from_pretrained(str(folder) if folder.exists() else name, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if folder.exists():
            raise GraloraConfigError(f"{flag} {name}: cannot load a model from this folder ({first}); "
                                     f"give {folder_hint} or a Hub id.") from None
        offline = "HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else "no network or no such repo"
        raise GraloraConfigError(
            f"{flag} {name}: not in the local Hugging Face cache and not downloadable here ({offline}). "
            f"Run `hf download {name}` once with network access, or pass {folder_hint}. "
            f"[{type(err).__name__}: {clip_words(first, 200)}]"
        ) from None


def progress_bar(progress, total: int, desc: str, unit: str = "image"):
    """progress True: a new tqdm bar (the caller closes it); False/None: none; anything with
    `.update(n)`: the caller's own bar, used as it is."""
    if progress is True:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit)
    return progress or None
