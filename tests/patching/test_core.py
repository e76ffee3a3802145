"""The VCON layer, every registered compression, patching and merge on tiny BERT, ViT, GPT-2 and Llama models.

The generic properties are checked against each compression's own definition of C (so a plugin is tested the moment
it registers); the built-in compressions' definitions are checked against naive numpy references.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageClassification, AutoModelForSequenceClassification
from transformers.pytorch_utils import Conv1D

from conftest import (FLOAT32, METHOD_CASES, SETTING_CASES, SOLO_SETTING_CASES, build, logits, merged_shapes, tiny_bert,
                      vcon_config)
from hf_vcon import (
    VConConfig,
    VConError,
    VConLinear,
    apply_vcon,
    get_vcon_state,
    merge_and_unload,
    set_beta,
    unload,
    vcon_summary,
)
from reference import REFERENCE_METHODS, reference_compressed

KINDS = ["bert", "vit", "gpt2", "llama"]
AUTO_CLASSES = {
    "bert": AutoModelForSequenceClassification,
    "vit": AutoModelForImageClassification,
    "gpt2": AutoModelForCausalLM,
    "llama": AutoModelForCausalLM,
}


def patched(kind: str, method: str, setting: dict, **overrides):
    original = build(kind)
    model = apply_vcon(copy.deepcopy(original), vcon_config(method, setting, **overrides))
    return original, model


def as_linear_weight(module: nn.Module) -> torch.Tensor:
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


# ------------------------------------------------------------------------------------------ 1. β = 1
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method, setting", METHOD_CASES)
def test_beta_one_is_the_original_model(kind, method, setting):
    original, model = patched(kind, method, setting)
    assert get_vcon_state(model).targeted_module_names
    assert isinstance(model, type(original))
    torch.testing.assert_close(logits(model, kind), logits(original, kind), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------ 2. β = 0
def has_naive_reference(setting) -> bool:
    """The numpy references cover the built-in methods; quant's float formats (FP8, NVFP4, MXFP4) are defined by
    compressed-tensors and checked bit for bit against its quantize-dequantize (tests/export/test_export_ct_formats.py)."""
    return setting.method in REFERENCE_METHODS and getattr(setting.options, "format", "int") == "int"


def expected_compressed(layer: VConLinear, setting) -> torch.Tensor:
    """C of a layer: the naive numpy reference for the built-in methods, the compression's definition otherwise."""
    if has_naive_reference(setting):
        return reference_compressed(layer.latent_weight(), setting)
    return layer.compressed_weight()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method, setting", SETTING_CASES)
def test_beta_zero_equals_merged_model_and_the_definition(kind, method, setting):
    original, model = patched(kind, method, setting)
    state = get_vcon_state(model)
    set_beta(model, 0.0)
    blended = logits(model, kind)

    reference = copy.deepcopy(original)
    for name, layer, layer_setting in state.named_layers():
        module = reference.get_submodule(name)
        compressed = expected_compressed(layer, layer_setting)
        with torch.no_grad():
            module.weight.copy_(compressed.t() if isinstance(module, Conv1D) else compressed)
    merged = merge_and_unload(copy.deepcopy(model))

    torch.testing.assert_close(blended, logits(merged, kind), atol=1e-5, rtol=0)
    torch.testing.assert_close(blended, logits(reference, kind), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method, setting", [case for case in SETTING_CASES if case.values[0] in REFERENCE_METHODS
                                             and case.values[1].get("format", "int") == "int"])
def test_built_in_definitions_match_the_naive_references(method, setting):
    _, model = patched("bert", method, setting)
    for _, layer, layer_setting in get_vcon_state(model).named_layers():
        reference = reference_compressed(layer.latent_weight(), layer_setting)
        torch.testing.assert_close(layer.compressed_weight(), reference, atol=1e-5, rtol=1e-5)


# -------------------------------------------------------------------------------------- 3. 0 < β < 1
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method, setting", SETTING_CASES)
def test_intermediate_beta_blends_two_plain_linears(kind, method, setting):
    _, model = patched(kind, method, setting)
    set_beta(model, 0.3)
    for layer in get_vcon_state(model).layers:
        x = torch.randn(5, layer.in_features)
        dense = nn.Linear(layer.in_features, layer.out_features)
        compressed = nn.Linear(layer.in_features, layer.out_features)
        with torch.no_grad():
            dense.weight.copy_(layer.latent_weight())
            compressed.weight.copy_(layer.compressed_weight())  # the definition (test 2 checks it)
            bias = layer.bias if layer.bias is not None else torch.zeros(layer.out_features)
            dense.bias.copy_(bias)
            compressed.bias.copy_(bias)
            expected = 0.3 * dense(x) + 0.7 * compressed(x)
            torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------- 4. gradients
def _one_layer(method: str, setting: dict, conv1d: bool) -> VConLinear:
    torch.manual_seed(0)
    base = Conv1D(12, 32) if conv1d else nn.Linear(32, 12)  # both map 32 inputs (one MXFP4 group) to 12 outputs
    model = nn.Sequential(base)
    apply_vcon(model, vcon_config(method, setting, target_modules=["0"]))
    return model[0]


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("method, setting", SOLO_SETTING_CASES)
@pytest.mark.parametrize("beta", [1.0, 0.4, 0.0])
def test_gradients_match_the_method(method, setting, conv1d, beta):
    layer = _one_layer(method, setting, conv1d).train()
    layer.set_beta(beta)
    x = torch.randn(6, 32, requires_grad=True)
    upstream = torch.randn(6, 12)
    (layer(x) * upstream).sum().backward()

    if layer.compressor.trains_straight_through:
        # Straight-through: W receives exactly the gradient of the effective weight.
        latent = layer.latent_weight().detach()
        w_eff = (beta * latent + (1 - beta) * layer.compressed_weight()).requires_grad_(True)
        x_ref = x.detach().requires_grad_(True)
        (F.linear(x_ref, w_eff, layer.bias.detach()) * upstream).sum().backward()
        torch.testing.assert_close(_oriented_grad(layer), w_eff.grad)
        torch.testing.assert_close(x.grad, x_ref.grad)
        return
    # Tensors of its own (low-rank): autograd through a naive two-path reference β·f(x) + (1−β)·g(x), g = C·x + b.
    w = layer.latent_weight().detach().clone().requires_grad_(True)
    params = {key: value.detach().clone().requires_grad_(True) for key, value in layer.compressed_params().items()}
    bias = layer.bias.detach().clone().requires_grad_(True)
    x_ref = x.detach().requires_grad_(True)
    out = beta * F.linear(x_ref, w, bias) + (1 - beta) * F.linear(x_ref, layer.compressor.compose(params), bias)
    (out * upstream).sum().backward()
    torch.testing.assert_close(_oriented_grad(layer), w.grad, atol=1e-5, rtol=1e-5)
    for key, value in layer.compressed_params().items():
        torch.testing.assert_close(value.grad, params[key].grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.bias.grad, bias.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)


def _oriented_grad(layer: VConLinear) -> torch.Tensor:
    grad = layer.weight.grad
    return grad.t() if layer.is_conv1d else grad


# ---------------------------------------------------------------------------------- 5. after merge
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method, setting", SETTING_CASES)
def test_merged_model_is_compressed_and_reloads(kind, method, setting, tmp_path):
    original, model = patched(kind, method, setting)
    state = get_vcon_state(model)
    # C, or its kept rows and columns where the compression changes shapes (the merged layer is smaller)
    compressed = {name: (layer.merged_tensors()[0], layer_setting) for name, layer, layer_setting in state.named_layers()}
    shapes = merged_shapes(original, model)  # the base architecture's keys, at the shapes the units declare
    set_beta(model, 0.0)
    expected = logits(model, kind)
    merged = merge_and_unload(model)

    assert merged is model and get_vcon_state(merged) is None
    assert not any(isinstance(m, VConLinear) for m in merged.modules())
    assert {key: value.shape for key, value in merged.state_dict().items()} == shapes
    for name, (weight, layer_setting) in compressed.items():
        merged_weight = as_linear_weight(merged.get_submodule(name)).detach()
        assert torch.equal(merged_weight, weight)
        if layer_setting.method in REFERENCE_METHODS:
            _assert_compressed(merged_weight, layer_setting)

    merged.save_pretrained(tmp_path)
    reloaded = AUTO_CLASSES[kind].from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded, kind), expected, atol=1e-5, rtol=0)


def _assert_compressed(weight: torch.Tensor, setting) -> None:
    """The structure a built-in method promises: exact sparsity, one magnitude, rank ≤ r."""
    out_features, in_features = weight.shape
    config = setting.options
    if setting.method == "prune":
        if config.prune_pattern == "layer":
            assert int((weight == 0).sum()) == round(weight.numel() * config.sparsity)
        elif config.prune_pattern == "row":
            assert ((weight == 0).sum(dim=1) == round(in_features * config.sparsity)).all()
        else:
            n, m = (int(x) for x in config.prune_pattern.split(":"))
            assert ((weight.view(out_features, -1, m) != 0).sum(dim=-1) == n).all()
    elif setting.method == "binary":
        rows = weight if config.binary_scale == "channel" else weight.reshape(1, -1)
        for row in rows:
            magnitudes = row.abs().unique()
            assert magnitudes.numel() == 1 and magnitudes.item() > 0
            assert set(row.sign().unique().tolist()) == {-1.0, 1.0}
    elif setting.method == "quant":  # at most 2^bits values in each block sharing a scale
        size = {"tensor": weight.numel(), "channel": in_features}.get(config.strategy, config.group_size)
        for block in weight.reshape(-1, size):
            assert block.unique().numel() <= 2 ** config.bits
    else:
        rank = config.rank or max(1, round(config.rank_ratio * min(weight.shape)))
        singular = torch.linalg.svdvals(weight.double())
        assert rank < min(weight.shape)
        assert (singular[rank:] <= 1e-5 * singular[0]).all()  # rank ≤ r up to fp32 rounding of B·A


@pytest.mark.parametrize("method, setting", METHOD_CASES)
def test_unload_returns_the_latent_dense_model(method, setting):
    original, model = patched("bert", method, setting)
    set_beta(model, 0.0)
    dense = unload(model)
    assert get_vcon_state(dense) is None
    assert dense.state_dict().keys() == original.state_dict().keys()
    for key, value in original.state_dict().items():
        assert torch.equal(dense.state_dict()[key], value), key


def test_summary_counts_bytes_per_method():
    _, model = patched("bert", "lowrank", {"rank": 4})
    summary = vcon_summary(model)
    layers = get_vcon_state(model).layers
    assert summary.params_before == sum(l.weight.numel() for l in layers)
    assert summary.params_after == sum(4 * (l.in_features + l.out_features) for l in layers)
    assert summary.bytes_after == 4 * summary.params_after
    assert "lowrank" in str(summary) and "rank 4" in str(summary)

    _, model = patched("bert", "binary", {})
    summary = vcon_summary(model)
    assert summary.bytes_after == sum(l.weight.numel() // 8 + 4 for l in get_vcon_state(model).layers)

    _, model = patched("bert", "prune", {"sparsity": 0.5})
    summary = vcon_summary(model)
    assert summary.params_after == sum(l.weight.numel() - round(l.weight.numel() * 0.5) for l in get_vcon_state(model).layers)


# ------------------------------------------------------------------------------------- targets
def test_all_linear_leaves_out_heads_and_keeps_everything_else():
    model = apply_vcon(build("bert"), vcon_config("binary", {}))
    names = get_vcon_state(model).targeted_module_names
    linear = [n for n, m in build("bert").named_modules() if isinstance(m, nn.Linear)]
    assert "classifier" not in names and set(linear) - set(names) == {"classifier"}

    gpt2 = apply_vcon(build("gpt2"), vcon_config("binary", {}))
    assert "lm_head" not in get_vcon_state(gpt2).targeted_module_names
    assert any(isinstance(m.base_layer, Conv1D) for m in get_vcon_state(gpt2).layers)


def test_exclude_modules_and_regex_targets():
    model = apply_vcon(build("llama"), vcon_config("binary", {}, target_modules=r".*layers\.1\..*_proj",
                                                   exclude_modules=["o_proj"]))
    names = get_vcon_state(model).targeted_module_names
    assert names and all(".layers.1." in n and not n.endswith("o_proj") for n in names)


# ------------------------------------------------------------------------------------- lifecycle errors
def test_wrapping_twice_is_an_error():
    model = apply_vcon(build("bert"), vcon_config("binary", {}))
    with pytest.raises(VConError, match="already has VCON"):
        apply_vcon(model, vcon_config("binary", {}))


def test_merge_and_unload_need_a_patched_model():
    for verb in (merge_and_unload, unload, vcon_summary):
        with pytest.raises(VConError, match="apply_vcon"):
            verb(build("bert"))
    with pytest.raises(VConError, match="apply_vcon"):
        set_beta(build("bert"), 0.5)


def test_merge_refuses_nan_weights_and_leaves_model_untouched():
    model = apply_vcon(build("bert"), vcon_config("prune", {"sparsity": 0.5}))
    layer = get_vcon_state(model).layers[1]
    with torch.no_grad():
        layer.weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(VConError, match="NaN or Inf"):
        merge_and_unload(model)
    assert get_vcon_state(model) is not None
    after = model.state_dict()
    assert all(torch.equal(after[k], v) or torch.isnan(v).any() for k, v in before.items())


def test_set_beta_range():
    model = apply_vcon(build("bert"), vcon_config("binary", {}))
    for bad in (-0.1, 1.5, float("nan"), "0.5"):
        with pytest.raises(ValueError, match="beta"):
            set_beta(model, bad)


def test_base_model_without_head_all_linear():
    model = AutoModel.from_config(tiny_bert().config)
    apply_vcon(model, vcon_config("lowrank", {"rank": 2}))
    assert "pooler.dense" in get_vcon_state(model).targeted_module_names


# ------------------------------------------------------------------------------------------- tied heads
def _tied(kind: str) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            tie_word_embeddings=True)).eval()
    if kind == "gpt2":
        return build("gpt2")
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, tie_word_embeddings=True)).eval()


@pytest.mark.parametrize("kind, shared", [("llama", "model.embed_tokens.weight"), ("gpt2", "transformer.wte.weight"),
                                          ("t5", "shared.weight")])
@pytest.mark.parametrize("method", ["prune", "binary", "quant"])
def test_a_tied_output_head_targeted_on_purpose_is_refused_untouched(kind, shared, method):
    model = _tied(kind)
    head = model.get_output_embeddings()
    assert head.weight is model.get_parameter(shared)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    targets = ["lm_head", {"llama": "q_proj", "gpt2": "c_attn", "t5": "q"}[kind]]
    with pytest.raises(VConError, match=rf"The targeted layer 'lm_head' shares its weight with '{shared}'.*"
                                        r"exclude_modules=\['lm_head'\]"):
        apply_vcon(model, VConConfig(method=method, target_modules=targets))
    assert get_vcon_state(model) is None and model.get_output_embeddings() is head
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())


def test_an_untied_head_compresses_alone_in_every_export(tmp_path):
    import transformers
    from hf_vcon import load_compressed, save_compressed, save_merged

    model = _tied("llama")
    model.config.tie_word_embeddings = False  # the documented way: a head of its own
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    embeddings = model.model.embed_tokens.weight.detach().clone()
    model = apply_vcon(model, VConConfig(method="quant", bits=4, target_modules=["lm_head", "q_proj"],
                                         transition_steps=0))
    set_beta(model, 0.0)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    save_merged(model, str(tmp_path / "dense"), format="dense")
    save_merged(model, str(tmp_path / "ct"), format="compressed-tensors")
    save_compressed(model, str(tmp_path / "compact"))
    for loaded in (transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "dense"), **FLOAT32),
                   transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct"), **FLOAT32),
                   load_compressed(str(tmp_path / "compact"))):
        assert torch.equal(loaded.model.embed_tokens.weight, embeddings)
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval()(input_ids=ids).logits, trained, atol=1e-5, rtol=0)


def test_a_group_size_that_does_not_divide_a_layer_errs_when_named_and_stays_dense_under_all_linear():
    from hf_vcon import UnsupportedLayerError, VConWarning

    setting = dict(method="quant", bits=4, strategy="group", group_size=64)  # BERT: in_features 32 and 64
    model = build("bert")
    with pytest.raises(UnsupportedLayerError, match=r"group_size=64 do(es)? not divide in_features=32 of layer "
                                                     r"'bert.encoder.layer.0.attention.self.query'"):
        apply_vcon(model, VConConfig(target_modules=["query", "output.dense"], **setting))
    assert get_vcon_state(model) is None
    with pytest.warns(VConWarning, match=r"all-linear': \d+ layer\(s\) cannot take their compression and stay "
                                         r"dense \(bert.encoder.layer.0.attention.self.query: quant: .*group_size=64 "
                                         r"do(es)? not"):
        apply_vcon(model, VConConfig(**setting))
    targeted = get_vcon_state(model).targeted_module_names
    assert targeted and all(model.get_submodule(name).in_features % 64 == 0 for name in targeted)
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, nn.Linear)
