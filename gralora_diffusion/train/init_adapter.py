"""`train --init_adapter FILE`: continue from an existing GraLoRA adapter. Its settings must be the
run's (r, k, hybrid_r, alpha per component, and the components trained), checked before any model
loads (`check_init_adapter`); after the adapters are added, its tensors replace their initial values,
module names and shapes checked first (`model_ops.check_fits`, the loader's check)."""

from __future__ import annotations

from ..errors import TrainConfigError

SETTINGS = (("r", "rank"), ("gralora_k", "gralora_k"), ("hybrid_r", "hybrid_r"), ("alpha", "resolved_alpha"))


def read_init_adapter(cfg, trained: list[str] | None = None):
    """The adapter file, read and checked against the run's settings (no model needed); `trained`: the
    components this run adds adapters to (None: not checked yet)."""
    from ..errors import AdapterFileError, GraloraConfigError
    from ..sources import resolve_adapter

    flag = f"--init_adapter {cfg.init_adapter}"
    if cfg.adapter != "gralora":
        raise TrainConfigError(f"{flag}: continues a GraLoRA adapter; leave it out with --adapter lora.")
    try:
        adapter = resolve_adapter(cfg.init_adapter)
    except (AdapterFileError, GraloraConfigError) as err:
        raise TrainConfigError(f"{flag}: {err}") from None
    if trained is not None and sorted(adapter.configs) != sorted(trained):
        raise TrainConfigError(f"{flag}: has adapters on {sorted(adapter.configs)}, this run trains {sorted(trained)} "
                               "(--train_text_encoder decides the text encoders).")
    for component, header in adapter.configs.items():
        for key, setting in SETTINGS:
            ours = getattr(cfg, setting)
            if float(header[key]) != float(ours):
                flag_name = "alpha" if key == "alpha" else setting
                raise TrainConfigError(f"{flag}: {component} has {key}={header[key]:g}, this run --{flag_name} {ours:g}; "
                                       f"give --{flag_name} {header[key]:g} to continue it.")
    return adapter


def load_init_adapter(cfg, components: dict, family) -> None:
    """Copy the adapter's tensors into the freshly added adapters ('default') of `components`."""
    from peft.utils import set_peft_model_state_dict

    from ..adapter_config import config_from_header
    from ..model_ops import check_fits

    adapter = read_init_adapter(cfg, list(components))
    for component, model in components.items():
        config = config_from_header(adapter.configs[component], adapter.source, component, base_model=adapter.base_model)
        check_fits(model, component, config, adapter.state_dicts[component], adapter.source)
        result = set_peft_model_state_dict(model, adapter.state_dicts[component], adapter_name="default")
        missing = [k for k in result.missing_keys if "gralora_" in k]
        if result.unexpected_keys or missing:
            raise TrainConfigError(f"--init_adapter {cfg.init_adapter}: {component}: targets differ from this run's "
                                   f"(e.g. {(result.unexpected_keys or missing)[0]}); give the same --unet_targets/--text_encoder_targets.")
