"""The compressor contract, for every registered compression (plugins included): each speed path equals the one
definition of C, packing round-trips it, and the registry and the example flags pick a plugin up with no edit."""

from __future__ import annotations

import importlib.metadata
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import SOLO_SETTING_CASES
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_vcon import VConConfig, apply_vcon, available_compressors, register_compressor
from hf_vcon.compressors import WeightCompressor, compressor_class, registry
from hf_vcon.config.settings import LayerSetting, build_options

BETAS = (1.0, 0.7, 0.25, 0.0)


def compressor(method: str, setting: dict):
    return LayerSetting(method, build_options(method, setting)).compressor()


def drifting_weights(steps: int = 5, shape=(24, 32), seed: int = 0):
    """W as an optimizer moves it: small steps, one large one (a cut that leaves its band), and ties."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=generator)
    for step in range(steps):
        weight = weight + (0.3 if step == 2 else 1e-3) * torch.randn(shape, generator=generator)
        yield weight
    yield torch.randint(-2, 3, shape, generator=generator).float()  # ties at every magnitude


# --------------------------------------------------------------------------- speed paths vs the definition
@pytest.mark.parametrize("method, setting", SOLO_SETTING_CASES)
def test_speed_paths_equal_the_definition(method, setting):
    comp = compressor(method, setting)
    if isinstance(comp, WeightCompressor):
        memo = {}
        for weight in drifting_weights():
            definition = comp.compress(weight)
            for frozen in (False, True):
                state = comp.compression_state(weight, memo if not frozen else {}, frozen=frozen)
                for beta in BETAS:
                    expected = beta * weight + (1 - beta) * definition
                    torch.testing.assert_close(comp.blend(weight, state, beta), expected, rtol=1e-6, atol=1e-6)
            assert torch.equal(comp.compressed_weight(weight, {}), definition)
        return
    weight = torch.randn(24, 32)
    params = comp.init_params(weight)
    definition = comp.compose(params)
    torch.testing.assert_close(comp.compressed_weight(weight, params), definition)
    for tokens in (2, 400):  # both of low-rank's forms: activation space and weight space
        x, bias = torch.randn(tokens, 32), torch.randn(24)
        torch.testing.assert_close(comp.compressed_forward(x, params, bias), F.linear(x, definition, bias),
                                   rtol=1e-5, atol=1e-5)
        for beta in BETAS:
            expected = F.linear(x, beta * weight + (1 - beta) * definition, bias)
            torch.testing.assert_close(comp.blended_forward(x, weight, params, bias, beta), expected,
                                       rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("method, setting", SOLO_SETTING_CASES)
def test_pack_and_unpack_store_c_exactly(method, setting, conv1d):
    torch.manual_seed(0)
    base = Conv1D(24, 32) if conv1d else nn.Linear(32, 24)
    model = apply_vcon(nn.Sequential(base), VConConfig(method=method, target_modules=["0"], **setting))
    layer = model[0]
    with torch.no_grad():
        layer.weight[0, :2] = 0.0  # exact zeros, which binary weights must keep
    packed = layer.compressor.pack(layer.latent_weight().detach(), layer.compressed_params())
    rebuilt = layer.compressor.unpacked_weight(packed, 24, 32)
    torch.testing.assert_close(rebuilt, layer.compressed_weight(), rtol=1e-6, atol=1e-6)
    target = Conv1D(24, 32) if conv1d else nn.Linear(32, 24)
    module = layer.compressor.unpack(packed, target)
    x = torch.randn(3, 32)
    torch.testing.assert_close(module(x), F.linear(x, layer.compressed_weight(), target.bias), rtol=1e-5, atol=1e-5)
    assert all(value.untyped_storage().data_ptr() != layer.weight.untyped_storage().data_ptr() for value in packed.values())


def test_each_family_states_its_decisions():
    for method in available_compressors():
        cls = compressor_class(method)
        straight = cls.trains_straight_through
        assert cls.recomputes_from_weight == straight  # C follows W as it trains
        assert cls.releases_dense_path == (not straight)  # at β = 0 only the own tensors are read
        assert cls.copy_trains_latent_weight == straight


# ------------------------------------------------------------------------------------------- registry
def test_the_registry_imports_nothing_of_hf_vcon():
    source = open(registry.__file__, encoding="utf-8").read()
    assert "from ." not in source and "import hf_vcon" not in source


def test_a_plugin_from_outside_is_registered_like_the_built_ins():
    assert "toygrid" in available_compressors()
    assert sys.modules[compressor_class("toygrid").__module__].__file__.endswith("tests/plugins/toy_grid.py")
    config = VConConfig(method="toygrid", step=0.1)
    assert config.options.step == 0.1 and config.step == 0.1
    with pytest.raises(ValueError, match=r"step=0 must be a number in \(0, inf\]: a grid spacing"):
        VConConfig(method="toygrid", step=0)
    with pytest.raises(ValueError, match=r"method='int9' is not known; use one of: binary, lowrank, prune, quant, structured, toygrid"):
        VConConfig(method="int9")


def test_a_name_is_registered_once():
    with pytest.raises(ValueError, match=r"register_compressor\('prune'\): the name is taken by hf_vcon"):
        @register_compressor("prune")
        class Other(WeightCompressor):
            pass
    with pytest.raises(ValueError, match="a compression name is a non-empty word"):
        register_compressor("two words")


def test_installed_packages_register_through_entry_points(monkeypatch, tmp_path):
    module = tmp_path / "vcon_entry_point_plugin.py"
    module.write_text(
        "from hf_vcon import WeightCompressor, register_compressor\n"
        "@register_compressor('halved')\n"
        "class Halved(WeightCompressor):\n"
        "    def compress(self, weight):\n"
        "        return weight / 2\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    entry_point = importlib.metadata.EntryPoint("halved", "vcon_entry_point_plugin", registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group=None: [entry_point] if group == registry.ENTRY_POINT_GROUP else [])
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    try:
        assert "halved" in available_compressors()
        layer = apply_vcon(nn.Sequential(nn.Linear(4, 4)), VConConfig(method="halved"))[0]
        torch.testing.assert_close(layer.compressed_weight(), layer.latent_weight().detach() / 2)
    finally:
        registry._REGISTRY.pop("halved", None)


# --------------------------------------------------------------------------------------- example flags
def test_every_option_of_every_compression_is_an_example_flag_with_its_help(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples"))
    from transformers import HfArgumentParser
    from vcon_examples import VConArguments

    help_text = HfArgumentParser(VConArguments).format_help()
    for method in available_compressors():
        for name, text in compressor_class(method).Options.field_help().items():
            assert f"--vcon_{name}" in help_text and text.split()[0] in help_text
    (arguments,) = HfArgumentParser(VConArguments).parse_args_into_dataclasses(
        ["--vcon_method", "toygrid", "--vcon_step", "0.25"])
    assert arguments.to_vcon_config().options.step == 0.25
