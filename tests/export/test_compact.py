"""Compact checkpoints: save_compressed → load_compressed round trip, sizes, and mismatches that must raise."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification
from transformers.pytorch_utils import Conv1D

from conftest import SHAPE_KEEPING_SETTING_CASES, build, logits, vcon_config
from hf_vcon import (
    IncompatibleCheckpointError,
    LowRankLinear,
    VConError,
    VConLinear,
    apply_vcon,
    get_vcon_state,
    load_compressed,
    merge_and_unload,
    save_compressed,
    set_beta,
)
from hf_vcon.export.compact_save import COMPACT_CONFIG_NAME, COMPACT_WEIGHTS_NAME

KINDS = ["bert", "gpt2", "llama", "vit"]


def _saved(kind, method, setting, folder):
    torch.manual_seed(1)
    model = apply_vcon(build(kind), vcon_config(method, setting))
    with torch.no_grad():  # move away from the SVD / initial weights, as training would
        for layer in get_vcon_state(model).layers:
            for param in [layer.weight, *layer.compressed_params().values()]:
                param.add_(0.01 * torch.randn_like(param))
    save_compressed(model, folder)
    return model


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method, setting", SHAPE_KEEPING_SETTING_CASES)
def test_round_trip_equals_merged_model(kind, method, setting, tmp_path):
    model = _saved(kind, method, setting, tmp_path)
    names = list(get_vcon_state(model).targeted_module_names)
    set_beta(model, 0.3)  # save_compressed folds at β = 0 whatever β the model is at, and leaves β alone
    assert get_vcon_state(model).layers[0].beta == 0.3
    merged = merge_and_unload(copy.deepcopy(model))
    loaded = load_compressed(tmp_path)

    assert type(loaded) is type(merged) and not loaded.training
    assert not any(isinstance(m, VConLinear) for m in loaded.modules())
    torch.testing.assert_close(logits(loaded, kind), logits(merged, kind), atol=1e-5, rtol=0)
    for name in names:
        module = loaded.get_submodule(name)
        if method == "lowrank":
            assert isinstance(module, LowRankLinear)
        else:
            assert type(module) is type(merged.get_submodule(name))
            torch.testing.assert_close(module.weight, merged.get_submodule(name).weight, atol=0, rtol=0)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in config
    manifest = json.loads((tmp_path / COMPACT_CONFIG_NAME).read_text())
    assert manifest["format_version"] == 2
    assert {entry["method"] for entry in manifest["layers"].values()} == {method}


def _packed_bytes(folder) -> int:
    with safe_open(os.path.join(folder, COMPACT_WEIGHTS_NAME), framework="pt") as handle:
        return sum(handle.get_tensor(key).nbytes for key in handle.keys() if ".vcon." in key)


@pytest.mark.parametrize("method, setting", [("binary", {}), ("lowrank", {"rank": 4}), ("prune", {"sparsity": 0.9})])
def test_compact_sizes(method, setting, tmp_path):
    model = _saved("bert", method, setting, tmp_path)
    layers = get_vcon_state(model).layers
    fp32 = sum(4 * layer.weight.numel() for layer in layers)
    packed = _packed_bytes(tmp_path)
    if method == "binary":
        assert packed == sum(layer.weight.numel() // 8 + 4 for layer in layers)
        assert packed / fp32 <= 1 / 28
    elif method == "lowrank":
        assert packed == sum(4 * 4 * (layer.in_features + layer.out_features) for layer in layers)
    else:  # 10 % of the values + 1 bit per weight
        assert packed == sum(4 * (layer.weight.numel() - round(0.9 * layer.weight.numel())) + layer.weight.numel() // 8
                             for layer in layers)


def test_binary_keeps_exact_zeros(tmp_path):
    model = apply_vcon(build("bert"), vcon_config("binary", {"binary_scale": "channel"}))
    layer = get_vcon_state(model).layers[0]
    with torch.no_grad():
        layer.weight[0, :3] = 0.0
    save_compressed(model, tmp_path)
    merged = merge_and_unload(copy.deepcopy(model))
    loaded = load_compressed(tmp_path)
    name = get_vcon_state(model).targeted_module_names[0]
    assert torch.equal(loaded.get_submodule(name).weight, merged.get_submodule(name).weight)
    assert (loaded.get_submodule(name).weight[0, :3] == 0).all()


def test_tied_embeddings_are_stored_once_and_tied_again(tmp_path):
    model = _saved("gpt2", "binary", {}, tmp_path)
    manifest = json.loads((tmp_path / COMPACT_CONFIG_NAME).read_text())
    assert manifest["aliases"] == {"lm_head.weight": "transformer.wte.weight"}
    loaded = load_compressed(tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    assert isinstance(loaded.transformer.h[0].attn.c_attn, Conv1D)


def test_plain_from_pretrained_refuses_the_folder(tmp_path):
    _saved("bert", "lowrank", {"rank": 3}, tmp_path)
    with pytest.raises(OSError):  # no model.safetensors: never random weights for the compressed layers
        AutoModelForSequenceClassification.from_pretrained(tmp_path)


def test_save_needs_a_patched_model(tmp_path):
    with pytest.raises(VConError, match="apply_vcon"):
        save_compressed(build("bert"), tmp_path)


# ------------------------------------------------------------------------------------------ mismatches
def _edit_manifest(folder, edit):
    path = folder / COMPACT_CONFIG_NAME
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def _edit_tensors(folder, edit):
    path = os.path.join(folder, COMPACT_WEIGHTS_NAME)
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _first_layer(manifest):
    return next(iter(manifest["layers"]))


def _edit_options(folder, **changes):
    """Change the options every layer of the manifest records."""
    _edit_manifest(folder, lambda m: [entry["options"].update(changes) for entry in m["layers"].values()])


MISMATCHES = {
    "newer format": ("binary", {}, lambda f: _edit_manifest(f, lambda m: m.update(format_version=99)), "format_version 99"),
    "not a manifest": ("binary", {}, lambda f: _edit_manifest(f, lambda m: m.update(format="other")), "manifest"),
    "config rank differs": ("lowrank", {"rank": 3}, lambda f: _edit_options(f, rank=2), "shape"),
    "config scale differs": ("binary", {}, lambda f: _edit_options(f, binary_scale="channel"), "scale"),
    "config sparsity differs": ("prune", {"sparsity": 0.5}, lambda f: _edit_options(f, sparsity=0.75), "keep"),
    "unknown option": ("binary", {}, lambda f: _edit_options(f, levels=3), "not an option"),
    "missing packed tensor": ("binary", {}, lambda f: _edit_tensors(
        f, lambda t: t.pop(next(k for k in t if k.endswith(".vcon.signs")))), "lacks tensor"),
    "stray packed tensor": ("binary", {}, lambda f: _edit_tensors(
        f, lambda t: t.update({"bert.pooler.dense.vcon.extra": torch.zeros(1)})), "no layer"),
    "missing dense tensor": ("binary", {}, lambda f: _edit_tensors(f, lambda t: t.pop("classifier.weight")), "missing"),
    "layer the model lacks": ("binary", {}, lambda f: _edit_manifest(
        f, lambda m: m["layers"].update({"bert.nothing": m["layers"][_first_layer(m)]})), "lacks"),
    "shape in manifest differs": ("lowrank", {"rank": 3}, lambda f: _edit_manifest(
        f, lambda m: m["layers"][_first_layer(m)]["tensors"]["A"].update(shape=[2, 32])), "says"),
}


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_mismatched_folder_raises(case, tmp_path):
    method, setting, tamper, message = MISMATCHES[case]
    _saved("bert", method, setting, tmp_path)
    tamper(tmp_path)
    with pytest.raises(IncompatibleCheckpointError, match=message):
        load_compressed(tmp_path)


def test_missing_manifest_raises(tmp_path):
    _saved("bert", "binary", {}, tmp_path)
    os.remove(tmp_path / COMPACT_CONFIG_NAME)
    with pytest.raises(IncompatibleCheckpointError, match="save_compressed"):
        load_compressed(tmp_path)


@pytest.mark.skipif(int(__import__("transformers").__version__.split(".")[0]) < 5, reason="block-wise needs transformers 5")
@pytest.mark.parametrize("method, setting", [("binary", {}), ("lowrank", {"rank": 3}), ("prune", {"sparsity": 0.5})])
def test_block_wise_round_trip_equals_the_merged_model(method, setting, tmp_path):
    model = apply_vcon(build("bert"), vcon_config(method, setting, granularity="block",
                                                   target_blocks=r"bert\.encoder\.layer\.\d+"))
    set_beta(model, 0.0)
    expected = logits(model, "bert")
    save_compressed(model, tmp_path)
    loaded = load_compressed(tmp_path).eval()
    torch.testing.assert_close(logits(loaded, "bert"), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(merge_and_unload(model), "bert"), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("folder, kind", [("compact_binary", "bert"), ("compact_lowrank_gpt2", "gpt2")])
def test_folders_written_by_hf_vcon_0_1_still_load(folder, kind):
    """Compact format 1 (hf_vcon 0.1: one setting for every layer, the config's) loads as written."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "v1", folder)
    assert json.loads(open(os.path.join(path, COMPACT_CONFIG_NAME)).read())["format_version"] == 1
    expected = torch.tensor(json.loads(open(os.path.join(path, "expected_logits.json")).read()))
    got = logits(load_compressed(path), kind)
    torch.testing.assert_close(got if kind == "bert" else got[0, :3], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method, setting", [("lowrank", {"rank_ratio": 0.25}), ("prune", {"sparsity": 0.5}), ("binary", {})])
def test_a_bf16_model_comes_back_bf16(method, setting, tmp_path):
    """A bf16 Qwen2 (GQA) saved compact loads in bf16: half the memory of float32, and low-rank runs at all."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    try:
        model = Qwen2ForCausalLM._from_config(config, dtype=torch.bfloat16)
    except TypeError:
        model = Qwen2ForCausalLM._from_config(config, torch_dtype=torch.bfloat16)
    model = apply_vcon(model.eval(), vcon_config(method, setting))
    set_beta(model, 0.0)
    expected = logits(model, "llama")
    save_compressed(model, tmp_path)
    loaded = load_compressed(tmp_path)
    assert {param.dtype for param in loaded.parameters()} == {torch.bfloat16}
    tolerance = 5e-2 * float(expected.abs().max()) if method == "lowrank" else 0.0  # B(Ax) vs B·A in bf16
    torch.testing.assert_close(logits(loaded, "llama"), expected, atol=tolerance, rtol=0)
