"""The float formats and activation quantization of ``method="quant"`` (FP8, NVFP4, MXFP4, W8A8; FP8 with static input
scales, NVFP4 and MXFP4 W4A4) and compressed-tensors' preset names: C equals the library's own quantize-dequantize
bit for bit, Q(x) the library's quantization of a Linear's input bit for bit, β = 1 is the original model and β = 0
the merged one, and the exported checkpoint loaded by plain ``from_pretrained`` gives the logits of the merged model
(weight-only) or of the VCON model at β = 0 (activations quantized: the loader quantizes them as VCON did, with the
static scales VCON observed) on BERT, ViT, Llama, Qwen2 and a MoE model; bad settings fail before a model is
touched."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import transformers
from architectures import by_key
from conftest import DTYPE_KEY, build, logits, tiny_inputs
from test_export_ct import load, model_of, tensors
from transformers import AutoModelForCausalLM

from hf_vcon import (
    VConConfig,
    VConError,
    VConWarning,
    apply_vcon,
    get_vcon_state,
    merge_and_unload,
    save_merged,
    set_beta,
)

pytest.importorskip("compressed_tensors")
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from compressed_tensors.quantization.quant_args import FP4_E2M1_DATA
from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

from hf_vcon.compressors import quant_formats

WEIGHT_ONLY = [dict(format="fp8"), dict(format="fp8", strategy="tensor"), dict(format="nvfp4"), dict(format="mxfp4"),
               dict(scheme="NVFP4A16"), dict(scheme="MXFP4A16"), dict(scheme="W4A16", group_size=16)]
WITH_INPUTS = [dict(scheme="W8A8"), dict(scheme="FP8_DYNAMIC"), dict(scheme="W4A8", group_size=16)]
# W4A4 and static FP8 inputs: the layer observes max|x| for FP8's input scale and NVFP4's global input scale
STATIC_OR_FP4_INPUTS = [dict(scheme="FP8"), dict(scheme="NVFP4"), dict(scheme="MXFP4")]
FORMAT_OF = {"fp8": "naive-quantized", "nvfp4": "nvfp4-pack-quantized", "mxfp4": "mxfp4-pack-quantized",
             "W8A8": "int-quantized", "FP8_DYNAMIC": "float-quantized", "W4A16": "pack-quantized",
             "NVFP4A16": "nvfp4-pack-quantized", "MXFP4A16": "mxfp4-pack-quantized", "W4A8": "int-quantized",
             "FP8": "float-quantized", "NVFP4": "nvfp4-pack-quantized", "MXFP4": "mxfp4-pack-quantized"}


STORED_DTYPE = {"naive-quantized": torch.float8_e4m3fn, "float-quantized": torch.float8_e4m3fn,
                "int-quantized": torch.int8, "pack-quantized": torch.int32, "nvfp4-pack-quantized": torch.uint8,
                "mxfp4-pack-quantized": torch.uint8}


def _id(setting: dict) -> str:
    return "-".join(str(value) for value in setting.values())


def compressor_of(**setting):
    return VConConfig(method="quant", **setting).setting.compressor()


def quantization_config(folder) -> dict:
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as handle:
        return json.load(handle)["quantization_config"]


# ---------------------------------------------------------------------------------------------- the maths
def test_e2m1_rounding_is_the_librarys_cast_to_fp4():
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    values = torch.cat([torch.linspace(-6, 6, 240_001), ties, -ties, ties.nextafter(torch.zeros(7)),
                        ties.nextafter(torch.full((7,), 9.0))])
    assert torch.equal(quant_formats.round_e2m1(values.clone()), FP4_E2M1_DATA.cast_to_fp4(values.clone()))


def test_global_scale_is_the_librarys_rounded_down_to_a_power_of_two():
    from compressed_tensors.quantization.utils.helpers import generate_gparam
    for scale in (1e-3, 0.02, 1.0, 300.0, 0.0):
        weight = torch.randn(8, 32, generator=torch.Generator().manual_seed(0)) * scale
        absmax = weight.reshape(8, 2, 16).abs().amax(-1, keepdim=True)
        library = generate_gparam(weight.min().reshape(1), weight.max().reshape(1))
        ours = quant_formats.global_scale(absmax).reshape(1)
        assert ours <= library < 2 * ours and torch.equal(torch.exp2(torch.log2(ours).round()), ours)


@pytest.mark.parametrize("setting", [dict(format="fp8"), dict(format="nvfp4"), dict(format="mxfp4"), dict(scheme="W8A8")],
                         ids=_id)
def test_a_leading_expert_dimension_compresses_each_expert_on_its_own(setting):
    compressor = compressor_of(**setting)
    assert compressor.accepts_leading_dims
    stacked = torch.randn(3, 12, 64, generator=torch.Generator().manual_seed(0))
    stacked[1] *= 100  # another range: its own global scale
    states = compressor.compression_state(stacked, {})
    for index, weight in enumerate(stacked):
        assert torch.equal(compressor.blend(stacked, states, 0.0)[index], compressor.compress(weight))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("setting", WEIGHT_ONLY + WITH_INPUTS + STATIC_OR_FP4_INPUTS, ids=_id)
def test_c_is_the_librarys_quantize_dequantize(setting, dtype):
    """C(W) = compressed-tensors' fake_quantize(W) with the scales VCON stores, bit for bit."""
    compressor = compressor_of(**setting)
    weight = (torch.randn(48, 64, generator=torch.Generator().manual_seed(0)) * 0.05).to(dtype)
    weight[3, :32] = 0  # an all-zero group
    weights_args = quant_formats.weight_arguments(compressor.options.format, compressor.options.bits,
                                                  compressor.options.strategy, compressor.options.group_size)
    if compressor.is_float:
        tensors = compressor.float_form(weight)
        scale, global_scale = tensors["weight_scale"], tensors.get("weight_global_scale")
    else:
        scale, global_scale = compressor.integer_form(weight, {}).scale, None
    expected = fake_quantize(weight.float(), scale.to(dtype), None, weights_args, global_scale=global_scale)
    assert torch.equal(compressor.compress(weight), expected.to(dtype))


def loaders_q(x: torch.Tensor, args, dtype: torch.dtype, observed: torch.Tensor) -> torch.Tensor:
    """Q(x) as compressed-tensors' quantized forward computes it (``forward_quantize``) on a Linear of ``dtype`` whose
    static input tensors the library's ``static_minmax`` rule derived from ``observed`` (max|x|): ``input_scale``
    (``calculate_qparams``, held in the layer's dtype as the loader initialises it) or ``input_global_scale``
    (``generate_gparam``, float32, rounded down to a power of two)."""
    from compressed_tensors.quantization import QuantizationStatus
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam
    module = torch.nn.Linear(x.shape[-1], 4).to(dtype)
    module.quantization_status = QuantizationStatus.FROZEN
    bound = observed.reshape(1)
    if not args.dynamic:  # FP8: a static per-tensor scale
        module.input_scale = torch.nn.Parameter(calculate_qparams(-bound, bound, args)[0].to(dtype), requires_grad=False)
    elif args.strategy == "tensor_group":  # NVFP4: dynamic group scales under a static global scale
        library_scale = generate_gparam(-bound, bound)
        power_of_two = torch.exp2(torch.floor(torch.log2(library_scale)))
        assert power_of_two <= library_scale < 2 * power_of_two
        module.input_global_scale = torch.nn.Parameter(power_of_two, requires_grad=False)
    return forward_quantize(module, x, "input", args), module


ACTIVATION_SETTINGS = [dict(scheme="W8A8"), dict(scheme="FP8_DYNAMIC"), *STATIC_OR_FP4_INPUTS]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("setting", ACTIVATION_SETTINGS, ids=_id)
def test_q_is_the_loaders_input_quantization(setting, dtype):
    """Q(x) = the library's quantized forward of a Linear's input, bit for bit: its scales, and (FP4) its E2M1 rounding,
    which hf_vcon computes without the library's boolean masks; on inputs with an all-zero group, E2M1 ties and values
    beyond the observed max (clamped, as a static scale clamps them)."""
    compressor = compressor_of(**setting)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1)) * 2
    x[0, 0, :32] = 0  # an all-zero group
    x[1, 1, :8] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.75])  # ties at a group scale of 1
    x[1, 1, 8:16] = 6.0
    x = x.to(dtype)
    observed = x.abs().amax().float() * 0.75  # part of x lies beyond the observed range
    expected, module = loaders_q(x, quant_formats.input_arguments(compressor.options.activations), dtype, observed)
    assert torch.equal(compressor.quantize_inputs(x, module, observed), expected)
    assert not torch.equal(expected, x)


@pytest.mark.parametrize("name", quant_formats.accepted_presets())
def test_presets_keep_the_librarys_definitions(name):
    """The arguments hf_vcon writes for a preset are the library's preset arguments."""
    compressor = compressor_of(scheme=name)
    preset = PRESET_SCHEMES[name]
    options = compressor.options
    weights = quant_formats.weight_arguments(options.format, options.bits, options.strategy, options.group_size)
    assert weights == preset["weights"]
    assert quant_formats.input_arguments(options.activations) == preset.get("input_activations")


def test_sizes_of_the_float_formats():
    weight = torch.randn(256, 512)
    ratios = {fmt: compressor_of(format=fmt).stats(weight, {}).bytes_after / (weight.numel() * 4)
              for fmt in ("fp8", "nvfp4", "mxfp4")}
    assert ratios["fp8"] == pytest.approx(0.25 + 1 / 512)  # one byte per weight, a float32 scale per row
    assert ratios["nvfp4"] == pytest.approx((0.5 + 1 / 16 + 4 / weight.numel()) / 4)  # ≈ 0.14
    assert ratios["mxfp4"] == pytest.approx((0.5 + 1 / 32) / 4)  # ≈ 0.133


# -------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("setting, words", [
    (dict(scheme="W4A16_ASYM"), ["scheme='W4A16_ASYM'", "cannot train", "W8A8"]),
    (dict(scheme="INT3"), ["scheme='INT3'", "not a compressed-tensors preset", "FP8_DYNAMIC"]),
    (dict(format="fp4"), ["format='fp4'", "int, fp8, nvfp4, mxfp4"]),
    (dict(format="nvfp4", group_size=32), ["group_size=32", "nvfp4", "16"]),
    (dict(format="mxfp4", strategy="channel"), ["strategy='channel'", "mxfp4", "32"]),
    (dict(format="fp8", strategy="group"), ["strategy='group'", "channel, tensor"]),
    (dict(format="fp8", bits=4), ["bits=4", "fp8", "8 bits"]),
    (dict(activations="int4"), ["activations='int4'", "none, int8, fp8, fp8_static, nvfp4, mxfp4"]),
    (dict(format="int", activations="nvfp4"), ["activations='nvfp4'", "format='nvfp4'", "none, int8, fp8"]),
    (dict(format="nvfp4", activations="mxfp4"), ["activations='mxfp4'", "format='mxfp4'", "none, nvfp4"]),
    (dict(format="mxfp4", activations="fp8_static"), ["activations='fp8_static'", "format='fp8'", "none, mxfp4"]),
    (dict(scheme="NVFP4", activations="fp8"), ["activations='fp8'", "scheme='NVFP4'", "activations='nvfp4'"]),
    (dict(format="fp8", activations="int8"), ["activations='int8'", "format='int'"]),
    (dict(format="nvfp4", activations="fp8"), ["activations='fp8'", "nvfp4"]),
    (dict(scheme="W8A8", bits=4), ["bits=4", "scheme='W8A8'", "bits=8"]),
])
def test_bad_settings_name_the_field_and_accepted_values(setting, words):
    with pytest.raises(ValueError) as error:
        VConConfig(method="quant", **setting)
    for word in words:
        assert word in str(error.value)


def test_activation_quantization_needs_a_method_that_has_it():
    with pytest.raises(ValueError, match="activations='int8' only applies to method='quant'"):
        VConConfig(method="prune", activations="int8")


def test_a_group_that_does_not_divide_a_layer_fails_before_the_model_is_touched():
    model = build("llama")  # hidden 32: no group of 64
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="group_size=64 do not divide in_features=32"):
        apply_vcon(model, VConConfig(method="quant", scheme="W4A16", group_size=64, target_modules=["q_proj"]))
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


# ---------------------------------------------------------------------------------------- β = 1, β = 0
@pytest.mark.parametrize("setting", WEIGHT_ONLY[:4] + WITH_INPUTS[:2] + STATIC_OR_FP4_INPUTS, ids=_id)
def test_beta_one_is_the_original_and_beta_zero_the_compressed_model(setting):
    original = build("llama")
    model = apply_vcon(copy.deepcopy(original), VConConfig(method="quant", **setting))
    set_beta(model, 1.0)
    torch.testing.assert_close(logits(model, "llama"), logits(original, "llama"), atol=0, rtol=0)
    set_beta(model, 0.0)
    at_zero = logits(model, "llama")
    merged = merge_and_unload(copy.deepcopy(model))
    if compressor_of(**setting).quantizes_inputs:
        assert not torch.allclose(at_zero, logits(merged, "llama"), atol=1e-4)  # the inputs are quantized too
    else:
        torch.testing.assert_close(at_zero, logits(merged, "llama"), atol=1e-6, rtol=0)


def test_quantized_inputs_train_straight_through():
    """W and x both get gradients through C(W)·Q(x) at β = 0, and β between blends the outputs."""
    layer_model = apply_vcon(build("llama"), VConConfig(method="quant", scheme="W8A8"))
    set_beta(layer_model, 0.5)
    layer_model.train()
    loss = layer_model(**tiny_inputs("llama")).logits.square().mean()
    loss.backward()
    state = get_vcon_state(layer_model)
    assert all(layer.latent_weight().grad is not None or layer.base_layer.weight.grad is not None
               for layer in state.layers)


# ------------------------------------------------------------------------------------------ the input observer
def _inputs_seen(model, run) -> dict[str, list[torch.Tensor]]:
    """The inputs each VCON layer's forward received while ``run()`` ran."""
    state = get_vcon_state(model)
    seen = {name: [] for name in state.targeted_module_names}
    hooks = [layer.register_forward_pre_hook(lambda module, args, name=name: seen[name].append(args[0].detach()))
             for name, layer in zip(state.targeted_module_names, state.layers)]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return seen


@pytest.mark.parametrize("setting", [dict(scheme="FP8"), dict(scheme="NVFP4")], ids=_id)
def test_the_observer_is_the_running_max_of_training_inputs(setting):
    """Training forwards fold max|x| into the observer at every β (f alone included); an evaluation forward leaves a
    set observer alone and sets an empty one; the observer stays float32 through a cast, is in the state dict and a
    model loading it quantizes as the one that saved it."""
    model = apply_vcon(build("llama"), VConConfig(method="quant", transition_steps=4, **setting))
    state = get_vcon_state(model)
    assert all(float(layer.input_observer) == 0.0 for layer in state.layers)
    model.train()
    set_beta(model, 0.0)
    model.eval()
    first = _inputs_seen(model, lambda: logits(model, "llama", seed=5))  # evaluation: sets the empty observers
    for (name, inputs), layer in zip(first.items(), state.layers):
        assert float(layer.input_observer) == float(inputs[0].abs().max()), name
    model.train()
    seen = {name: [inputs[0]] for name, inputs in first.items()}
    for seed, beta in [(1, 1.0), (2, 0.5), (3, 0.0)]:
        set_beta(model, beta)
        for name, inputs in _inputs_seen(model, lambda: model(**tiny_inputs("llama", seed=seed))).items():
            seen[name].extend(inputs)
    for (name, inputs), layer in zip(seen.items(), state.layers):
        assert float(layer.input_observer) == max(float(x.abs().max()) for x in inputs), name
    model.eval()
    before = [layer.input_observer.clone() for layer in state.layers]
    logits(model, "llama", seed=6)
    assert all(torch.equal(layer.input_observer, value) for layer, value in zip(state.layers, before))
    key = f"{state.targeted_module_names[0]}.vcon_input_absmax"
    assert torch.equal(model.state_dict()[key], before[0])
    other = apply_vcon(build("llama"), VConConfig(method="quant", transition_steps=4, **setting))
    set_beta(other, 0.0)
    other.load_state_dict(model.state_dict())
    assert torch.equal(logits(other, "llama"), logits(model, "llama"))
    model.to(torch.bfloat16)
    assert all(layer.input_observer.dtype == torch.float32 and torch.equal(layer.input_observer, value)
               for layer, value in zip(state.layers, before))


def test_export_needs_observed_inputs(tmp_path):
    """A static input scale needs observed inputs: without any, the explicit format names the layers and what to do;
    auto writes the merged model dense."""
    model = apply_vcon(build("llama"), VConConfig(method="quant", scheme="FP8", transition_steps=0))
    set_beta(model, 0.0)
    with pytest.raises(VConError, match=r"quantize their inputs with a static scale .* observed no input"):
        save_merged(model, str(tmp_path / "explicit"), format="compressed-tensors")
    assert not (tmp_path / "explicit").exists()
    with pytest.warns(VConWarning, match="observed no input"):
        save_merged(model, str(tmp_path / "auto"))
    assert "quantization_config" not in json.loads((tmp_path / "auto" / "config.json").read_text())


@pytest.mark.parametrize("export_format", ["compressed-tensors", "auto"])
def test_trainer_accepts_static_scales_before_training_observes_them(tmp_path, export_format):
    """At construction no input has been observed yet, and training observes them: neither an error nor a "saved
    dense" warning then, and the trained model is written with its input scales."""
    import warnings

    from transformers import TrainingArguments

    from hf_vcon import VConTrainer

    batch = tiny_inputs("llama", batch=8)["input_ids"]
    dataset = [{"input_ids": row, "labels": row} for row in batch]
    args = TrainingArguments(str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", VConWarning)
        trainer = VConTrainer(model=build("llama"), args=args, train_dataset=dataset, export_format=export_format,
                              vcon_config=VConConfig(method="quant", scheme="FP8", transition_steps=1))
    assert trainer.export_format == "compressed-tensors"
    trainer.train()
    trainer.save_model()
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["quantization_config"]["config_groups"]["group_0"]["input_activations"]["dynamic"] is False
    assert any(key.endswith("input_scale") for key in tensors(tmp_path / "run"))


# ------------------------------------------------------------------------------------------ round trips
ARCHITECTURES = ["llama", "qwen2", "bert", "vit"]


def is_fp4(setting: dict) -> bool:
    return "fp4" in str(setting.get("format", setting.get("scheme", ""))).lower()


def observe(model, kind: str, seed: int = 1) -> None:
    """A training-mode forward on other inputs than the tests': the static input scales (FP8, NVFP4) come from it."""
    model.train()
    with torch.no_grad():
        model(**tiny_inputs(kind, seed=seed))
    model.eval()


def as_loaded(model, dtype: torch.dtype):
    """``model`` in ``dtype`` as ``from_pretrained(dtype=…)`` builds it: RoPE's frequencies stay float32, where
    ``Module.to`` would round them (a difference of bf16 units that an input's FP4 rounding can turn into a flipped
    code)."""
    frequencies = {name: buffer.clone() for name, buffer in model.named_buffers() if name.endswith("inv_freq")}
    model = model.to(dtype)
    for name, buffer in frequencies.items():
        owner, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(owner), attribute, buffer)
    return model


def exported(kind: str, folder, dtype=torch.float32, **setting):
    model = apply_vcon(as_loaded(model_of(kind), dtype), VConConfig(transition_steps=0, method="quant", **setting))
    set_beta(model, 0.0)
    observe(model, kind)
    save_merged(model, str(folder), format="compressed-tensors")
    return model, merge_and_unload(copy.deepcopy(model))


CASES = [(kind, setting) for kind in ARCHITECTURES
         for setting in WEIGHT_ONLY[:4] + WITH_INPUTS[:2] + STATIC_OR_FP4_INPUTS]


@pytest.mark.parametrize("kind, setting", CASES, ids=[f"{kind}-{_id(setting)}" for kind, setting in CASES])
def test_from_pretrained_gives_the_vcon_models_logits(kind, setting, tmp_path):
    """Weight-only: the merged model's logits (≤ 1e-5, float32). Activations quantized: the VCON model's at β = 0, within
    the same bound, since the loader quantizes each Linear's input with the same functions on the same values (and,
    for FP8 and NVFP4, the static scales written from the max|x| VCON observed), so each layer's Q(x) and C(W) are
    bit for bit the same and only the order of float operations outside them could differ (measured: equal); the
    merged dense model, which does not quantize its inputs, differs by the activation rounding."""
    dtype = torch.bfloat16 if is_fp4(setting) else torch.float32  # FP4 decodes in bf16 (see the refusal below)
    model, merged = exported(kind, tmp_path, dtype, **setting)
    config = quantization_config(tmp_path)
    expected_format = FORMAT_OF[setting.get("scheme", setting.get("format"))]
    assert config["format"] == expected_format and "sparsity_config" not in config
    stored = tensors(tmp_path)
    for name in get_vcon_state(model).targeted_module_names:  # the codes in the format's own type, not upcast
        codes = stored.get(f"{name}.weight_packed", stored.get(f"{name}.weight"))
        assert codes.dtype == STORED_DTYPE[expected_format], (name, codes.dtype)
    reloaded = load(kind, tmp_path, dtype)
    reference = model if compressor_of(**setting).quantizes_inputs else merged
    assert_logits_match(logits(reloaded, kind), logits(reference, kind))


@pytest.mark.skipif(int(transformers.__version__.split(".")[0]) < 5, reason="block-wise VCON needs transformers >= 5")
@pytest.mark.parametrize("setting", [dict(scheme="FP8"), dict(scheme="NVFP4")], ids=_id)
def test_block_wise_static_input_scales_round_trip(setting, tmp_path):
    """Block-wise, the compressed copy's layers observe their inputs and the export writes their scales."""
    dtype = torch.bfloat16 if is_fp4(setting) else torch.float32
    model = apply_vcon(as_loaded(model_of("llama"), dtype),
                       VConConfig(method="quant", transition_steps=0, granularity="block",
                                  target_blocks=r"model\.layers\.\d+", **setting))
    set_beta(model, 0.0)
    observe(model, "llama")
    assert all(float(layer.input_observer) > 0 for layer in get_vcon_state(model).layers)
    save_merged(model, str(tmp_path), format="compressed-tensors")
    assert_logits_match(logits(load("llama", tmp_path, dtype), "llama"), logits(model, "llama"))


def assert_logits_match(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """float32: within 1e-5. bfloat16 (FP4): the weights are C bit for bit (test_bf16_export_decodes_to_c_bit_for_bit)
    and only the order of bf16 operations differs, so within 4 bf16 units in the last place of the largest logit."""
    if expected.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
        return
    bound = 4 * torch.finfo(torch.bfloat16).eps * max(1.0, float(expected.float().abs().max()))
    torch.testing.assert_close(actual.float(), expected.float(), atol=bound, rtol=0)


@pytest.mark.parametrize("setting", [WEIGHT_ONLY[2], WEIGHT_ONLY[3]], ids=_id)
def test_fp4_of_a_float32_model_is_refused_or_written_dense(setting, tmp_path):
    """compressed-tensors decodes FP4 weights in bf16 whatever the model's dtype, and a float32 model's forward then
    fails: the load-back check refuses the explicit format and falls back to dense under auto."""
    model = apply_vcon(model_of("llama"), VConConfig(transition_steps=0, method="quant", **setting))
    set_beta(model, 0.0)
    with pytest.raises(VConError, match=r"decode to torch.bfloat16 .* not the model's torch.float32"):
        save_merged(model, str(tmp_path / "explicit"), format="compressed-tensors")
    assert not (tmp_path / "explicit").exists()
    with pytest.warns(VConWarning, match=r"Saving the merged model dense: .* decode to torch.bfloat16"):
        save_merged(model, str(tmp_path / "auto"))
    assert "quantization_config" not in json.loads((tmp_path / "auto" / "config.json").read_text())


@pytest.mark.parametrize("setting", [WEIGHT_ONLY[2], WITH_INPUTS[1]], ids=_id)
def test_bf16_export_decodes_to_c_bit_for_bit(setting, tmp_path):
    model, merged = exported("llama", tmp_path, torch.bfloat16, **setting)
    reloaded = load("llama", tmp_path, torch.bfloat16)
    logits(reloaded, "llama")  # the first forward decompresses
    expected = merged.state_dict()
    for name in get_vcon_state(model).targeted_module_names:
        weight = reloaded.get_submodule(name).weight
        if weight.dtype == torch.float8_e4m3fn:  # kept compressed: codes times scales
            weight = weight.to(torch.bfloat16) * reloaded.get_submodule(name).weight_scale
        assert torch.equal(weight.to(torch.bfloat16), expected[f"{name}.weight"]), name


def test_mixed_schemes_export_as_mixed_precision(tmp_path):
    """NVFP4 for the MLP, FP8 (W8A8 dynamic) for attention: one config group per scheme, format mixed-precision;
    loaded in bf16 (transformers' decompress-on-load does not take mixed-precision, and FP4 decodes in bf16), the
    weights are C bit for bit and the logits the VCON model's at β = 0 up to bf16 rounding of the two runs."""
    model = apply_vcon(build("llama").to(torch.bfloat16),
                       VConConfig(method="quant", scheme="FP8_DYNAMIC", transition_steps=0,
                                  module_overrides={r".*mlp.*": {"scheme": "NVFP4A16"}}))
    set_beta(model, 0.0)
    save_merged(model, str(tmp_path), format="compressed-tensors")
    config = quantization_config(tmp_path)
    assert config["format"] == "mixed-precision"
    formats = sorted(group["format"] for group in config["config_groups"].values())
    assert formats == ["float-quantized", "nvfp4-pack-quantized"]
    reloaded = load("llama", tmp_path, torch.bfloat16)
    torch.testing.assert_close(logits(reloaded, "llama"), logits(model, "llama"), atol=1e-2, rtol=0)
    expected = merge_and_unload(copy.deepcopy(model)).state_dict()
    for name in get_vcon_state(model).targeted_module_names:
        module = reloaded.get_submodule(name)
        weight = module.weight
        if weight.dtype == torch.float8_e4m3fn:  # kept compressed: codes times scales
            weight = weight.to(torch.bfloat16) * module.weight_scale
        assert torch.equal(weight.to(torch.bfloat16), expected[f"{name}.weight"]), name


@pytest.mark.parametrize("setting", [WEIGHT_ONLY[2], WITH_INPUTS[0], STATIC_OR_FP4_INPUTS[1]], ids=_id)
def test_moe_model_round_trip(setting, tmp_path):
    """A MoE model (Qwen2-MoE): the attention and shared-expert Linears are stored quantized; fused expert weights,
    no Linear of their own, are written dense with their quantized values (weight-only) or left out (their inputs
    cannot be quantized by a Linear's loader)."""
    case = by_key("qwen2_moe")
    exclude = {"exclude_modules": r".*\.experts\..*"} if compressor_of(**setting).quantizes_inputs else {}
    dtype = torch.bfloat16 if is_fp4(setting) else torch.float32
    model = apply_vcon(as_loaded(case.build(), dtype), VConConfig(method="quant", transition_steps=0, **exclude,
                                                                  **setting))
    set_beta(model, 0.0)
    inputs = case.inputs()
    model.train()
    with torch.no_grad():
        model(**inputs)  # the static input scales (NVFP4's global scale)
    model.eval()
    fused = int(transformers.__version__.split(".")[0]) >= 5  # transformers 4 keeps one Linear per expert
    with pytest.warns(Warning) if fused and not compressor_of(**setting).quantizes_inputs else _nothing():
        save_merged(model, str(tmp_path), format="compressed-tensors")
    merged = merge_and_unload(copy.deepcopy(model))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), **{DTYPE_KEY: dtype}).eval()
    reference = model if compressor_of(**setting).quantizes_inputs else merged
    with torch.no_grad():
        assert_logits_match(reloaded(**inputs).logits, reference(**inputs).logits)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_the_card_names_the_schemes_and_how_to_serve(tmp_path):
    from hf_vcon import model_card, vcon_summary
    from hf_vcon.export.card import CardDetails
    model = apply_vcon(build("llama"), VConConfig(method="quant", scheme="FP8_DYNAMIC", transition_steps=0,
                                                 module_overrides={r".*mlp.*": {"scheme": "NVFP4A16"}}))
    card = str(model_card(model, vcon_summary(model), details=CardDetails(export_format="compressed-tensors", repo_id="me/tiny")))
    assert "Quantization schemes: FP8_DYNAMIC, NVFP4A16." in card and "`vllm serve me/tiny`" in card
    assert "mixed-precision" in card and "`format: pack-quantized`" not in card

