"""The pipeline loader: save -> load round trips, PEFT interop, names, scales, fuse/unfuse/unload,
GraLoRA beside a diffusers LoRA, and every bad input refused with the pipeline left as it was."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline
from peft import GraloraConfig, LoraConfig, get_peft_model, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.gralora.layer import Linear as PeftGraloraLinear
from safetensors.torch import load_file, save_file

import gralora_diffusion as gd
import gralora_diffusion.model_ops as model_ops
from corrupt_corpus import build_cases
from conftest import COMPONENTS, adapted_pipeline, assert_unchanged, capture, fresh, generate, outputs

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

UNET_ATTN = ["to_q", "to_k", "to_v", "to_out.0"]


def to_q(pipe):
    return pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A pipeline with a GraLoRA adapter on the UNet and both text encoders (hybrid_r > 0), saved."""
    pipe = adapted_pipeline(r=8, gralora_k=2, hybrid_r=4)
    folder = tmp_path_factory.mktemp("adapter")
    path = pipe.save_gralora_weights(folder)
    return pipe, folder, path


@pytest.fixture(scope="module")
def second(tmp_path_factory):
    """Another adapter (UNet only, k=4), to weigh against the first."""
    pipe = adapted_pipeline(r=8, gralora_k=4, hybrid_r=0, text_encoder_targets=None, seed=7)
    return pipe.save_gralora_weights(tmp_path_factory.mktemp("second"))


def test_round_trip_gives_the_same_images(source):
    src, folder, path = source
    assert path.name == gd.WEIGHT_NAME
    dst = fresh()
    name = dst.load_gralora_weights(folder)
    assert name == "default_0"
    assert dst.list_gralora_adapters() == {c: ["default_0"] for c in COMPONENTS}
    image = generate(dst)
    assert np.array_equal(image, generate(src))
    assert np.abs(image - generate(gd.tiny_sdxl_pipeline(seed=0))).max() > 1e-2  # the adapter acts


def test_every_input_form_loads_the_same_adapter(source):
    src, folder, path = source
    expected = outputs(src)
    adapter = gd.read_adapter_file(path)
    flat = load_file(str(path))
    forms = [
        (path, {}),
        (folder, {"weight_name": gd.WEIGHT_NAME}),
        (adapter, {}),
        (flat, {"gralora_configs": adapter.configs}),
        (adapter.state_dicts, {"gralora_configs": {c: GraloraConfig(**cfg) for c, cfg in adapter.configs.items()}}),
        ({f"{k.split('.', 1)[0]}.base_model.model.{k.split('.', 1)[1]}": v for k, v in flat.items()},
         {"gralora_configs": json_configs(path)}),
    ]
    for form, kwargs in forms:
        pipe = fresh()
        pipe.load_gralora_weights(form, adapter_name="x", **kwargs)
        assert torch.equal(outputs(pipe), expected), type(form)


def json_configs(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()["gralora_configs"]  # the header's JSON string works as gralora_configs too


def test_fp16_save_and_base_model_in_header(source, tmp_path):
    src, _, _ = source
    path = src.save_gralora_weights(tmp_path, dtype="fp16", base_model="stabilityai/stable-diffusion-xl-base-1.0",
                                    weight_name="small.safetensors")
    adapter = gd.read_adapter_file(path)
    assert adapter.base_model == "stabilityai/stable-diffusion-xl-base-1.0"
    assert {t.dtype for sd in adapter.state_dicts.values() for t in sd.values()} == {torch.float16}
    assert adapter.configs["unet"]["hybrid_r"] == 4 and adapter.configs["text_encoder"]["target_modules"]
    pipe = fresh()
    pipe.load_gralora_weights(tmp_path, weight_name="small.safetensors")
    assert pipe.unet.peft_config["default_0"].base_model_name_or_path == "stabilityai/stable-diffusion-xl-base-1.0"
    with pytest.raises(gd.GraloraConfigError, match="safetensors only"):
        src.save_gralora_weights(tmp_path, weight_name="adapter.bin")
    with pytest.raises(gd.GraloraConfigError, match="No GraLoRA adapter named 'nope'"):
        src.save_gralora_weights(tmp_path, adapter_name="nope")


# --- PEFT interop ---------------------------------------------------------------------------------


def test_our_file_loads_into_a_peft_injected_model(source):
    src, _, path = source
    adapter = gd.read_adapter_file(path)
    pipe = gd.tiny_sdxl_pipeline(seed=0)
    for component, cfg in adapter.configs.items():
        model = getattr(pipe, component)
        inject_adapter_in_model(GraloraConfig(**cfg), model, "default")
        result = set_peft_model_state_dict(model, adapter.state_dicts[component], adapter_name="default")
        assert not result.unexpected_keys
    assert type(to_q(pipe)) is PeftGraloraLinear  # PEFT's own layer, not ours
    torch.testing.assert_close(outputs(pipe), outputs(src), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["per_component", "unet_alone"])
def test_peft_save_pretrained_folder_loads(tmp_path, layout):
    src = gd.tiny_sdxl_pipeline(seed=0)
    targets = {"unet": UNET_ATTN, "text_encoder": ["q_proj", "k_proj", "v_proj", "out_proj"]}
    if layout == "unet_alone":
        targets.pop("text_encoder")
    for component, target_modules in targets.items():
        config = GraloraConfig(r=8, gralora_k=2, hybrid_r=2, alpha=16, target_modules=target_modules, init_weights=False)
        peft_model = get_peft_model(getattr(src, component), config)
        peft_model.save_pretrained(tmp_path / component if layout == "per_component" else tmp_path)
    keys = load_file(str(next(tmp_path.rglob("adapter_model.safetensors"))))
    assert all(k.startswith("base_model.model.") for k in keys)  # PEFT's prefix, handled on load
    pipe = fresh()
    pipe.load_gralora_weights(tmp_path, adapter_name="peft")
    assert pipe.list_gralora_adapters() == {c: ["peft"] for c in targets}
    torch.testing.assert_close(outputs(pipe), outputs(src), atol=1e-5, rtol=1e-5)


# --- pipelines ------------------------------------------------------------------------------------


def test_patch_pipeline_and_the_sdxl_class(source):
    _, folder, _ = source
    base = gd.tiny_sdxl_pipeline(seed=0)
    for cls in (StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline):
        pipe = cls(**base.components)
        patched = gd.patch_pipeline(pipe)
        assert patched is pipe and isinstance(pipe, cls) and isinstance(pipe, gd.GraloraLoaderMixin)
        assert type(pipe).__name__ == cls.__name__  # save_pretrained's model_index.json keeps loading in diffusers
        assert gd.patch_pipeline(pipe) is pipe
    one, two = (gd.patch_pipeline(StableDiffusionXLPipeline(**base.components)) for _ in range(2))
    assert type(one) is type(two)  # the dynamic subclass is cached
    sdxl = gd.GraloraStableDiffusionXLPipeline(**gd.tiny_sdxl_pipeline(seed=0).components)
    assert isinstance(sdxl, StableDiffusionXLPipeline)
    sdxl.load_gralora_weights(folder)
    assert sdxl.get_active_gralora_adapters() == ["default_0"]
    with pytest.raises(gd.GraloraConfigError, match="no unet"):
        gd.patch_pipeline(object())


def test_load_into_a_pipeline_with_model_cpu_offload(source):
    """Accelerate's offload hooks come off for the injection and back on after, as in diffusers."""
    src, folder, _ = source
    pipe = fresh()
    pipe.enable_model_cpu_offload(device="cpu")  # the hooks work on a CPU-only machine too
    pipe.load_gralora_weights(folder)
    assert all(hasattr(getattr(pipe, c), "_hf_hook") for c in COMPONENTS)
    assert torch.equal(outputs(pipe), outputs(src))


# --- names, activity, deletion --------------------------------------------------------------------


def test_names_active_adapters_and_deletion(source, second):
    _, folder, _ = source
    pipe = fresh()
    base = outputs(pipe)
    assert pipe.load_gralora_weights(folder) == "default_0"
    assert pipe.load_gralora_weights(second) == "default_1"
    # the last loaded is active where it has layers, as in diffusers; the text encoders keep default_0
    assert to_q(pipe).active_adapters == ["default_1"]
    assert pipe.get_active_gralora_adapters() == ["default_1", "default_0"]
    assert pipe.list_gralora_adapters() == {"unet": ["default_0", "default_1"], "text_encoder": ["default_0"],
                                            "text_encoder_2": ["default_0"]}
    pipe.set_gralora_adapters(["default_0", "default_1"], [0.5, 0.5])
    assert pipe.get_active_gralora_adapters() == ["default_0", "default_1"]
    with pytest.raises(gd.GraloraConfigError, match="nope"):
        pipe.set_gralora_adapters(["nope"])
    pipe.delete_gralora_adapters("default_1")
    assert pipe.list_gralora_adapters() == {c: ["default_0"] for c in COMPONENTS}
    pipe.disable_gralora()
    assert torch.equal(outputs(pipe), base)
    pipe.enable_gralora()
    assert not torch.equal(outputs(pipe), base)
    pipe.delete_gralora_adapters(["default_0"])
    assert pipe.list_gralora_adapters() == {}
    assert type(to_q(pipe)) is torch.nn.Linear  # empty GraLoRA layers give their place back
    assert torch.equal(outputs(pipe), base)


# --- scales, fuse, unfuse, unload ---------------------------------------------------------------


def test_per_call_scale_equals_fused_at_that_scale_with_two_weighted_adapters(source, second):
    _, folder, _ = source
    pipe = fresh()
    pipe.load_gralora_weights(folder, adapter_name="a")
    pipe.load_gralora_weights(second, adapter_name="b")
    wa, wb, s = 0.8, -0.6, 0.7
    pipe.set_gralora_adapters(["a", "b"], [wa, wb])

    # weighted: each layer adds wa·ΔW_a + wb·ΔW_b, ΔW at strength 1
    layer = to_q(pipe)
    x = torch.randn(2, 16, layer.in_features)
    with torch.no_grad():
        got = layer(x) - layer.get_base_layer()(x)
        layer.set_scale("a", 1.0)
        layer.set_scale("b", 1.0)
        unit = x @ (wa * layer.get_delta_weight("a") + wb * layer.get_delta_weight("b")).T
    torch.testing.assert_close(got, unit, atol=1e-5, rtol=1e-4)
    pipe.set_gralora_adapters(["a", "b"], [wa, wb])

    scales_before = {id(m): dict(m.scaling) for m in pipe.unet.modules() if isinstance(m, gd.GraloraLinear)}
    per_call = generate(pipe, cross_attention_kwargs={"scale": s})
    pipe.fuse_gralora(gralora_scale=s)
    assert pipe.num_fused_loras == 2
    fused = generate(pipe)
    assert np.abs(fused - per_call).max() <= 1e-4
    pipe.unfuse_gralora()
    assert pipe.num_fused_loras == 0
    # unlike diffusers' fuse_lora, the scales are back where they were
    assert {id(m): dict(m.scaling) for m in pipe.unet.modules() if isinstance(m, gd.GraloraLinear)} == scales_before


def test_per_component_weights(source):
    _, folder, _ = source
    pipe = fresh()
    pipe.load_gralora_weights(folder, adapter_name="a")
    pipe.set_gralora_adapters("a", {"unet": 0.5, "text_encoder": 0.0})
    unet_layer = to_q(pipe)
    te_layer = pipe.text_encoder.get_submodule("encoder.layers.0.self_attn.q_proj")
    te2_layer = pipe.text_encoder_2.get_submodule("text_model.encoder.layers.0.self_attn.q_proj")
    assert unet_layer.scaling["a"] == pytest.approx(0.5 * unet_layer.base_scaling("a"))
    assert te_layer.scaling["a"] == 0.0
    assert te2_layer.scaling["a"] == pytest.approx(te2_layer.base_scaling("a"))  # not named: weight 1
    pipe.set_gralora_adapters(["a"], [{"unet": {"down": 0.25, "mid": 0.0, "up": 1.0}}])  # diffusers' block weights
    mid_layer = pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn1.to_q
    assert unet_layer.scaling["a"] == pytest.approx(0.25 * unet_layer.base_scaling("a"))
    assert mid_layer.scaling["a"] == 0.0


@pytest.mark.parametrize("exact", [True, False])
def test_unfuse_and_unload_restore_the_base_weights(source, exact):
    _, folder, _ = source
    pipe = fresh()
    pristine = capture(pipe)
    base_out = outputs(pipe)
    modules = {c: dict(getattr(pipe, c).named_modules()) for c in COMPONENTS}
    pipe.load_gralora_weights(folder)
    adapted = outputs(pipe)
    loaded = capture(pipe)
    weight = to_q(pipe).get_base_layer().weight
    unfused_weight = weight.detach().clone()
    pipe.fuse_gralora(gralora_scale=1.3, exact_unfuse=exact)
    assert not torch.equal(weight, unfused_weight)
    pipe.unfuse_gralora()
    if exact:
        assert_unchanged(pipe, loaded, adapted)  # bit for bit
    else:
        torch.testing.assert_close(outputs(pipe), adapted, atol=1e-5, rtol=1e-5)
    pipe.fuse_gralora(gralora_scale=0.5)
    pipe.unload_gralora_weights()  # unfuses first
    if exact:
        # PEFT's injection froze the base parameters (requires_grad); unloading does not undo that
        assert_unchanged(pipe, pristine, base_out, parts=("modules", "active", "configs"))
    for c in COMPONENTS:  # the very module objects of the base pipeline are back
        now = dict(getattr(pipe, c).named_modules())
        assert now.keys() == modules[c].keys() and all(now[n] is m for n, m in modules[c].items())


def test_safe_fusing_refuses_nan_before_changing_anything(source):
    _, folder, _ = source
    pipe = fresh()
    pipe.load_gralora_weights(folder, adapter_name="a")
    with torch.no_grad():
        to_q(pipe).gralora_B["a"].view(-1)[0] = float("nan")
    before = capture(pipe)
    with pytest.raises(gd.AdapterFileError, match=r"NaN/Inf.*Nothing was fused"):
        pipe.fuse_gralora(safe_fusing=True)
    after = capture(pipe)
    for c in COMPONENTS:  # NaN != NaN: compare the base weights only
        for k, v in before[c]["weights"].items():
            if "gralora" not in k:
                assert torch.equal(after[c]["weights"][k], v), k
    assert not any(m.merged for m in pipe.unet.modules() if isinstance(m, gd.GraloraLinear))


def test_fused_state_refuses_changes_that_would_unfuse_inexactly(source):
    _, folder, _ = source
    pipe = fresh()
    pipe.load_gralora_weights(folder, adapter_name="a")
    pipe.fuse_gralora()
    with pytest.raises(gd.GraloraConfigError, match="unfuse_gralora"):
        pipe.load_gralora_weights(folder, adapter_name="b")
    with pytest.raises(gd.GraloraConfigError, match="unfuse_gralora"):
        pipe.set_gralora_adapters("a", 0.5)
    with pytest.raises(gd.GraloraConfigError, match="unfuse_gralora"):
        pipe.delete_gralora_adapters("a")


# --- beside a diffusers LoRA --------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_folder(tmp_path_factory):
    """A rank-8 LoRA on the same UNet modules, built offline and saved the diffusers way."""
    pipe = gd.tiny_sdxl_pipeline(seed=0)
    inject_adapter_in_model(LoraConfig(r=8, lora_alpha=8, target_modules=UNET_ATTN, init_lora_weights=False), pipe.unet, "x")
    folder = tmp_path_factory.mktemp("lora")
    StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(pipe.unet, adapter_name="x"))
    return folder


@pytest.mark.parametrize("gralora_first", [False, True])
def test_gralora_beside_a_diffusers_lora(source, lora_folder, gralora_first):
    _, folder, _ = source
    pipe = fresh()
    base = outputs(pipe)
    if gralora_first:
        pipe.load_gralora_weights(folder, adapter_name="g")
        pipe.load_lora_weights(lora_folder, adapter_name="lora")
    else:
        pipe.load_lora_weights(lora_folder, adapter_name="lora")
        pipe.load_gralora_weights(folder, adapter_name="g")
    both = outputs(pipe)
    pipe.disable_gralora()
    lora_only = outputs(pipe)
    pipe.enable_gralora()
    assert not torch.equal(lora_only, base) and not torch.equal(both, lora_only)  # both act
    # the layer adds both deltas
    layer = to_q(pipe)
    lora_layer = layer if "lora" in getattr(layer, "lora_A", {}) else layer.base_layer
    gra_layer = layer if isinstance(layer, gd.GraloraLinear) else layer.base_layer
    x = torch.randn(1, 4, layer.in_features)
    with torch.no_grad():
        delta = lora_layer.get_delta_weight("lora") + gra_layer.get_delta_weight("g")
        torch.testing.assert_close(layer(x), layer.get_base_layer()(x) + x @ delta.T, atol=1e-5, rtol=1e-4)
    pipe.set_gralora_adapters("g", 0.5)  # GraLoRA weights only: the LoRA stays active
    assert "lora" in lora_layer.active_adapters
    pipe.fuse_gralora()
    pipe.unfuse_gralora()
    pipe.set_gralora_adapters("g", 1.0)
    torch.testing.assert_close(outputs(pipe), both, atol=1e-6, rtol=0)
    # the LoRA fused after the GraLoRA: unfusing the GraLoRA must not take the LoRA's delta with it
    weight = layer.get_base_layer().weight
    unfused = weight.detach().clone()
    pipe.fuse_gralora()
    pipe.fuse_lora(components=["unet"], adapter_names=["lora"])
    pipe.unfuse_gralora()
    torch.testing.assert_close(weight - unfused, lora_layer.get_delta_weight("lora"), atol=1e-6, rtol=1e-5)
    pipe.unfuse_lora(components=["unet"])
    torch.testing.assert_close(weight, unfused, atol=1e-6, rtol=0)  # diffusers' unfuse subtracts: rounding
    pipe.disable_gralora()
    lora_only = outputs(pipe)
    pipe.enable_gralora()
    pipe.unload_gralora_weights()
    assert torch.equal(outputs(pipe), lora_only)
    assert pipe.get_list_adapters() == {"unet": ["lora"]}


# --- bad input: a typed error, and the pipeline exactly as it was ------------------------------


@pytest.fixture(scope="module")
def loaded(source):
    """A pipeline that already carries an adapter ('existing'), to check rollbacks leave it alone."""
    _, folder, _ = source
    pipe = fresh()
    pipe.load_gralora_weights(folder, adapter_name="existing")
    return pipe


def test_every_corrupt_file_is_refused_and_the_pipeline_unchanged(loaded, source, tmp_path):
    _, _, path = source
    before, before_out = capture(loaded), outputs(loaded)
    failures = []
    for name, build, expect in build_cases(path, tmp_path):
        if name == "module_not_in_pipeline":
            continue  # with this fixture the corpus's renaming hits no key; see BAD["module_not_in_pipeline"]
        bad = build()
        try:
            loaded.load_gralora_weights(bad)
        except gd.GraloraError as err:
            if str(bad) not in str(err) or expect not in str(err):
                failures.append(f"{name}: {err}")
        else:
            failures.append(f"{name}: loaded")
        assert_unchanged(loaded, before)
    assert not failures, "\n".join(failures)
    assert torch.equal(outputs(loaded), before_out)
    assert not (tmp_path / "UNPICKLED").exists()


def _edit(path, tmp_path, change):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(tensors, metadata)
    out = tmp_path / "edited.safetensors"
    save_file(tensors, str(out), metadata=metadata)
    return out


def _other_width(tensors, _):
    """One module's input twice as wide: an adapter for another base model, consistent in itself."""
    key = next(k for k in tensors if k.startswith("unet.") and k.endswith("attn1.to_q.gralora_A"))
    A = tensors[key]
    tensors[key] = torch.randn(A.shape[0], A.shape[1] * 2, A.shape[2])
    general = key.replace("gralora_A", "gralora_A_general.weight")
    tensors[general] = torch.randn(tensors[general].shape[0], tensors[general].shape[1] * 2)


def _unknown_module(tensors, _):
    for key in [k for k in tensors if k.startswith("unet.down_blocks.0.") and ".attn1.to_q." in k]:
        tensors[key.replace(".attn1.to_q.", ".attn1.to_nowhere.")] = tensors[key].clone()


def _drop_module(tensors, _):
    for k in [k for k in tensors if ".attn1.to_q." in k and k.startswith("unet.down_blocks.0")]:
        del tensors[k]


BAD = {
    "other_base_model": (lambda p, t: _edit(p, t, _other_width), gd.AdapterFileError, "trained on another base model: here it is Linear"),
    "module_not_in_pipeline": (lambda p, t: _edit(p, t, _unknown_module), gd.AdapterFileError, r"has no module '.*attn1\.to_nowhere'"),
    "targets_without_weights": (lambda p, t: _edit(p, t, _drop_module), gd.AdapterFileError, "targeted modules have no weights"),
    "missing_path": (lambda p, t: t / "nothing.safetensors", gd.AdapterFileError, "no such file or folder"),
    "state_dict_without_configs": (lambda p, t: load_file(str(p)), gd.AdapterFileError, "gralora_configs"),
    "folder_without_adapter": (lambda p, t: t, gd.AdapterFileError, "weight_name="),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_against_the_pipeline(loaded, source, tmp_path, case):
    _, _, path = source
    build, error, message = BAD[case]
    bad = build(path, tmp_path)
    before = capture(loaded)
    with pytest.raises(error, match=message):
        loaded.load_gralora_weights(bad)
    assert_unchanged(loaded, before)


def test_existing_name_and_bad_names_are_refused(loaded, source):
    _, folder, _ = source
    before = capture(loaded)
    with pytest.raises(gd.GraloraConfigError, match="'existing' already exists"):
        loaded.load_gralora_weights(folder, adapter_name="existing")
    with pytest.raises(gd.GraloraConfigError, match="without dots"):
        loaded.load_gralora_weights(folder, adapter_name="a.b")
    with pytest.raises(gd.GraloraConfigError, match="torch Module attribute"):
        loaded.load_gralora_weights(folder, adapter_name="half")
    with pytest.raises(TypeError, match="unexpected keyword"):
        loaded.load_gralora_weights(folder, revison="main")
    assert_unchanged(loaded, before)


def test_a_failure_during_injection_removes_the_half_injected_adapter(loaded, source, monkeypatch):
    _, folder, _ = source
    before, before_out = capture(loaded), outputs(loaded)
    real = model_ops.set_peft_model_state_dict
    calls = []

    def fail_on_second_component(model, *args, **kwargs):
        calls.append(model)
        if len(calls) == 2:
            raise RuntimeError("disk on fire")
        return real(model, *args, **kwargs)

    monkeypatch.setattr(model_ops, "set_peft_model_state_dict", fail_on_second_component)
    with pytest.raises(gd.AdapterFileError, match="disk on fire.*pipeline is unchanged"):
        loaded.load_gralora_weights(folder, adapter_name="partial")
    assert_unchanged(loaded, before, before_out)
