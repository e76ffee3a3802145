"""The one protocol behind VConLinear and VConWeight: both cache the compression state under the same key, so what
invalidates one invalidates the other; set_step computes every state once per optimizer step (batched across layers
of one setting and shape, fused experts in one call) and the forward only reads them."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from architectures import by_key
from conftest import build, tiny_inputs, vcon_config
from hf_vcon import VConConfig, apply_vcon, get_vcon_state, set_step
from hf_vcon.compressors import compressor_class
from hf_vcon.layers.linear import VConLinear
from hf_vcon.layers.protocol import VConUnit, refresh_states
from hf_vcon.layers.weight import VConWeight


class _CountingPruner(compressor_class("prune")):
    """Unstructured pruning that counts the states it computes, with a state token the test sets."""

    def __init__(self, options):
        super().__init__(options)
        self.computed = 0
        self.token = None

    def compression_state(self, weight, memo=None, *, frozen=False):
        self.computed += 1
        return super().compression_state(weight, memo, frozen=frozen)

    def state_token(self):
        return self.token


def _unit(kind: str, compressor) -> VConUnit:
    torch.manual_seed(0)
    linear = nn.Linear(8, 6)
    if kind == "linear":
        return VConLinear(linear, compressor)
    unit = VConWeight(linear, "weight", compressor)
    unit.attach_to(linear, "")
    return unit


@pytest.mark.parametrize("kind", ["linear", "weight"])
def test_a_new_state_token_invalidates_the_cached_state(kind):
    compressor = _CountingPruner(compressor_class("prune").Options(sparsity=0.5))
    unit = _unit(kind, compressor)
    unit.set_beta(0.5)
    unit.optimizer_step = 3
    first = unit.compression_states()[0]
    assert unit.compression_states()[0] is first and compressor.computed == 1  # cached within the step
    compressor.token = ("group weights", 1)  # what the state depends on besides W changed
    assert unit.compression_states()[0] is not first and compressor.computed == 2
    assert unit.compression_states() is not None and compressor.computed == 2  # and is cached again


@pytest.mark.parametrize("kind", ["linear", "weight"])
def test_both_units_take_the_protocol_from_one_place(kind):
    unit = _unit(kind, compressor_class("prune")(compressor_class("prune").Options(sparsity=0.5)))
    for method in ("set_beta", "state_cache_key", "compression_states", "compressed_params", "compress", "stats",
                   "pack", "slice_params", "compressed_weight"):
        assert getattr(type(unit), method) is getattr(VConUnit, method), method
    with pytest.raises(ValueError, match=r"beta=1.5 must be in \[0, 1\]"):
        unit.set_beta(1.5)


# ------------------------------------------------------------------------- states, once per optimizer step
def _counting(model):
    """Count the compression_state calls of every compressor of ``model``, by wrapping the class method."""
    calls = []
    for layer in get_vcon_state(model).layers:
        compressor = layer.compressor
        if "compression_state" in vars(compressor):
            continue
        original = compressor.compression_state

        def counting(weight, memo=None, *, frozen=False, original=original):
            calls.append(tuple(weight.shape))
            return original(weight, memo, frozen=frozen)

        compressor.compression_state = counting
    return calls


@pytest.mark.parametrize("method, setting", [("prune", {"sparsity": 0.5}), ("binary", {}), ("quant", {"bits": 4})])
def test_set_step_computes_the_states_and_the_forward_only_reads_them(method, setting):
    model = apply_vcon(build("bert").train(), vcon_config(method, setting, transition_steps=4))
    calls = _counting(model)
    set_step(model, 0)
    assert calls == []  # β = 1: no layer reads a state
    set_step(model, 1)
    assert len(calls) == len(get_vcon_state(model).layers)
    calls.clear()
    for _ in range(2):  # micro-batches
        model(**tiny_inputs("bert")).logits.sum().backward()
    assert calls == []
    set_step(model, 1)  # the same step again: nothing to do
    assert calls == []


@pytest.mark.parametrize("method, setting", [("prune", {"sparsity": 0.7}), ("prune", {"prune_pattern": "2:4"}),
                                             ("binary", {}), ("quant", {"bits": 3, "strategy": "group", "group_size": 8})])
def test_batched_states_equal_each_layers_own(method, setting):
    """Layers of one (compression, options, shape, dtype) computed in one stacked call get the states they would
    compute alone, bit for bit."""
    model = apply_vcon(build("bert").train(), vcon_config(method, setting, transition_steps=4))
    set_step(model, 1)
    layers = get_vcon_state(model).layers
    alone = [layer.compression_state() for layer in layers]
    for layer in layers:
        layer._states = None
    calls = _counting(model)
    refresh_states(layers, batched=True)
    shapes = {tuple(layer.latent_weight().shape) for layer in layers}
    assert len(calls) == len(shapes) < len(layers)  # one call per shape
    for layer, expected in zip(layers, alone):
        assert torch.equal(layer.compression_state().reshape(expected.shape), expected)


@pytest.mark.skipif(int(transformers.__version__.split(".")[0]) < 5, reason="transformers 4 stores experts as Linears")
def test_fused_experts_are_compressed_in_one_call():
    model = apply_vcon(by_key("mixtral").build().train(), VConConfig(method="prune", sparsity=0.5, transition_steps=4))
    calls = _counting(model)
    set_step(model, 1)
    experts = [layer for layer in get_vcon_state(model).layers if layer.stacked]
    assert experts and [shape for shape in calls if len(shape) == 3] == [tuple(layer.latent_weight().shape)
                                                                        for layer in experts]



@pytest.mark.parametrize("kind", ["linear", "weight"])
def test_beta_is_a_float32_buffer_updated_in_place_with_a_phase(kind):
    """β lives in a 0-d float32 buffer that keeps its identity from step to step (a compiled graph reads it), its
    precision when the model is cast, and stays out of the state dict; the phase changes at β = 1 and β = 0 only."""
    unit = _unit(kind, compressor_class("binary")(compressor_class("binary").Options()))
    buffer = unit.vcon_beta
    assert (unit.phase, unit.beta, buffer.dtype) == ("dense", 1.0, torch.float32)
    phases = []
    for beta in (0.9, 0.7, 0.3, 0.0):
        unit.set_beta(beta)
        phases.append(unit.phase)
        assert unit.vcon_beta is buffer and buffer.item() == torch.tensor(beta).item() and unit.beta == beta
    assert phases == ["blending", "blending", "blending", "compressed"]
    unit.set_beta(0.7)
    unit.to(torch.bfloat16)
    assert unit.vcon_beta.dtype == torch.float32 and unit.vcon_beta.item() == torch.tensor(0.7).item()
    assert not any(key.endswith("vcon_beta") for key in unit.state_dict())
