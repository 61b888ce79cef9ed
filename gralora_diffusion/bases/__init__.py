"""The registry of base-model families: every command asks it what a base model is.

A family is one module `bases/<name>.py` (name with `_` for `-`) holding data plus small functions:

    PIPELINE_CLASS   diffusers pipeline class name (also how a model folder's model_index.json names it)
    DENOISER         "unet" | "transformer"
    PRESETS          {component: {preset: [module suffixes]}} for each adapter-bearing component
    TRAINABLE_TEXT_ENCODERS  the text encoders DreamBooth may train (CLIP ones, not T5 / LLM encoders)
    OBJECTIVE        "ddpm" | "flow"
    build_tiny(seed=0)                          -> pipeline, offline, random weights
    encode_prompts(pipe, prompts, device)       -> {name: batch-first tensor} (the pipeline's encode_prompt)
    vae_encode(pipe, pixels)                    -> latent distribution parameters
    normalize_latents(pipe, latents)            -> latents as the family's training script scales them
    predict(pipe, denoiser, noisy, timesteps, cond) -> the prediction, same (unpacked) layout as `noisy`
    optional: EMBEDDED {name: "module:function"} (more embedded bases, e.g. sdxl's `world`),
              KOHYA (kohya/ComfyUI key rules), DECODE_OUTSIDE_AUTOCAST (bool), WEIGHTING_SCHEME (flow),
              concat_cond(rows) (join cached conditioning rows of different lengths),
              default_resolution(pipe)

Adding a family is adding its module and its name to FAMILY_NAMES; the loader, the trainer loop and
the CLI read it through `Family`. This module imports no torch (the CLI's parser reads FAMILY_NAMES);
a family's module is imported on first use.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import cached_property
from importlib import import_module
from types import ModuleType

from ..errors import GraloraConfigError

FAMILY_NAMES = ("sd15", "sdxl", "sd3", "flux", "flux2-klein", "qwen-image")
DEFAULT_FAMILY = "sdxl"  # what `tiny` means without --family, and what an SDXL file without a family field is
TINY = "tiny"  # every family's random tiny pipeline; other embedded names come from the families (EMBEDDED)
# The per-call adapter scale, by the keyword each pipeline's __call__ takes it in.
SCALE_KWARGS = ("cross_attention_kwargs", "joint_attention_kwargs", "attention_kwargs")


def add_family_argument(parser, help_text: str = "base family (default: read from the model's model_index.json; "
                                                   "`tiny` is sdxl)") -> None:
    """`--family NAME` on a command's parser (checked by argparse against FAMILY_NAMES, no import)."""
    parser.add_argument("--family", choices=FAMILY_NAMES, default=None, help=help_text)


def module_name(name: str) -> str:
    return name.replace("-", "_")


@dataclass(frozen=True, eq=False)
class Family:
    """One family, read from its module. Attribute access falls through to the module (its functions)."""

    name: str
    module: ModuleType

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return getattr(self.module, attr)

    def __repr__(self) -> str:
        return f"Family({self.name!r})"

    @property
    def pipeline_class_name(self) -> str:
        return self.module.PIPELINE_CLASS

    @cached_property
    def pipeline_class(self) -> type:
        import diffusers

        return getattr(diffusers, self.module.PIPELINE_CLASS)

    @property
    def denoiser(self) -> str:
        return self.module.DENOISER

    @property
    def objective(self) -> str:
        return self.module.OBJECTIVE

    @cached_property
    def components(self) -> tuple[str, ...]:
        """The adapter-bearing components, in the pipeline's own order (`_lora_loadable_modules`)."""
        return tuple(getattr(self.pipeline_class, "_lora_loadable_modules", None) or self.module.PRESETS)

    @property
    def text_encoders(self) -> tuple[str, ...]:
        return tuple(c for c in self.components if c != self.denoiser)

    @property
    def trainable_text_encoders(self) -> tuple[str, ...]:
        return tuple(self.module.TRAINABLE_TEXT_ENCODERS)

    def presets(self, component: str) -> dict[str, list[str]]:
        return self.module.PRESETS[component]

    @property
    def embedded(self) -> dict[str, str]:
        """Embedded base names this family builds in memory, besides `tiny`: {name: "module:function"}."""
        return dict(getattr(self.module, "EMBEDDED", {}))

    @property
    def decode_outside_autocast(self) -> bool:
        """Sampling decodes latents in the VAE's own dtype outside autocast (SD/SDXL VAEs overflow in fp16)."""
        return bool(getattr(self.module, "DECODE_OUTSIDE_AUTOCAST", self.denoiser == "unet"))

    @property
    def kohya(self):
        """The family's kohya/ComfyUI key rules, or None where those tools define none."""
        return getattr(self.module, "KOHYA", None)

    def build(self, embedded_name: str = TINY, seed: int = 0):
        """`tiny` (random weights) or one of `embedded`, built in memory."""
        if embedded_name == TINY:
            return self.module.build_tiny(seed=seed)
        target = self.embedded[embedded_name]
        module, _, function = target.partition(":")
        return getattr(import_module(module), function)()

    def component_class(self, component: str):
        """The class the pipeline's __init__ declares for `component` (e.g. UNet2DConditionModel)."""
        annotation = inspect.signature(self.pipeline_class.__init__).parameters[component].annotation
        return annotation if isinstance(annotation, type) else None

    def default_resolution(self, pipe) -> int:
        """The denoiser's sample size (a DiT's: the pipeline's `default_sample_size`) times the VAE's scale
        factor: what the pipeline renders when no height/width is given."""
        if hasattr(self.module, "default_resolution"):
            return self.module.default_resolution(pipe)
        size = getattr(getattr(pipe, self.denoiser).config, "sample_size", None)
        if size is None:
            from .vae import default_resolution

            return default_resolution(pipe)
        size = size[0] if isinstance(size, (list, tuple)) else size
        factor = getattr(pipe, "vae_scale_factor", None) or 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        return int(size) * int(factor)


_CACHE: dict[str, Family] = {}


def get_family(name) -> Family:
    """The family called `name` (a Family passes through). One-line error naming the known ones."""
    if isinstance(name, Family):
        return name
    if name not in FAMILY_NAMES:
        raise GraloraConfigError(f"--family {name!r}: unknown; pick one of {', '.join(FAMILY_NAMES)}.")
    if name not in _CACHE:
        try:
            module = import_module(f"{__name__}.{module_name(name)}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{module_name(name)}":
                raise
            raise GraloraConfigError(f"--family {name}: this build of gralora-diffusion has no module for it yet "
                                     f"(available: {', '.join(available_families())}).") from None
        _CACHE[name] = Family(name, module)
    return _CACHE[name]


def available_families() -> list[str]:
    """The registered names whose module is present."""
    from importlib.util import find_spec

    return [n for n in FAMILY_NAMES if find_spec(f"{__name__}.{module_name(n)}") is not None]


def families() -> list[Family]:
    return [get_family(n) for n in available_families()]


def family_of_class_name(class_name: str | None) -> Family | None:
    """The family whose pipeline class is `class_name` (model_index.json's `_class_name`), or None."""
    return next((f for f in families() if f.pipeline_class_name == class_name), None)


def family_of_pipeline(pipe) -> Family | None:
    """The family of a pipeline object (by its class or a base class, so patched pipelines count), or None."""
    for cls in type(pipe).__mro__:
        if (family := family_of_class_name(cls.__name__)) is not None:
            return family
    return None


def family_of_model(model) -> Family | None:
    """The first family whose pipeline declares a component of `model`'s class (a bare UNet / transformer /
    text encoder), or None."""
    for family in families():
        for component in family.components:
            cls = family.component_class(component)
            if cls is not None and isinstance(model, cls):
                return family
    return None


def component_of_model(family: Family, model) -> str | None:
    for component in family.components:
        cls = family.component_class(component)
        if cls is not None and isinstance(model, cls):
            return component
    return None


def embedded_names() -> tuple[str, ...]:
    """`tiny` and every family's other embedded names (sdxl's `world`)."""
    return (TINY, *(n for f in families() for n in f.embedded))


def call_parameters(pipe) -> dict:
    """The parameters of the diffusers pipeline's own __call__ (a patched pipeline's mixin wraps it with *args, **kwargs)."""
    cls = pipe if isinstance(pipe, type) else type(pipe)
    call = next(k.__dict__["__call__"] for k in cls.__mro__
                if "__call__" in k.__dict__ and not k.__module__.startswith("gralora_diffusion"))
    return inspect.signature(call).parameters


def scale_kwargs(pipe, scale: float) -> dict:
    """The per-call adapter scale as this pipeline (or pipeline class) takes it in __call__ (diffusers names it per pipeline)."""
    params = call_parameters(pipe)
    name = next((n for n in SCALE_KWARGS if n in params), None)
    if name is None:
        raise GraloraConfigError(f"{type(pipe).__name__} takes no per-call adapter scale; use fuse or set_adapters.")
    return {name: {"scale": scale}}


def call_kwargs(pipe, **kwargs) -> dict:
    """`kwargs` without those this pipeline's __call__ does not take (FLUX has no negative_prompt)."""
    params = call_parameters(pipe)
    return {k: v for k, v in kwargs.items() if k in params}


def render(pipe, prompt: str, seed: int, steps: int, guidance: float, height=None, width=None, negative_prompt=None,
           scale: float | None = None, **extra):
    """One image of `prompt` with a CPU generator seeded `seed` (the same noise on any device), the
    adapters at `scale` (None: as set) through the pipeline's own per-call scale keyword. `extra`: more
    of the pipeline's call arguments (an image-to-image pipeline's `image` and `strength`)."""
    import torch

    from ..schedulers import check_steps

    check_steps(pipe, steps)
    kwargs = call_kwargs(pipe, negative_prompt=negative_prompt, num_inference_steps=steps, guidance_scale=guidance,
                         height=height, width=width) | extra
    if negative_prompt is not None and "negative_prompt" not in kwargs:
        raise GraloraConfigError(f"{type(pipe).__name__} takes no negative prompt; leave --negative-prompt out.")
    if scale is not None:
        kwargs |= scale_kwargs(pipe, scale)
    return pipe(prompt=prompt, generator=torch.Generator(device="cpu").manual_seed(seed), **kwargs).images[0]


from .load import base_family, default_device_dtype, load_base, save_tiny, tiny_pipeline  # noqa: E402
