"""The one protocol behind VConLinear and VConWeight: both cache the compression state under the same key, so what
invalidates one invalidates the other."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_vcon.compressors import compressor_class
from hf_vcon.layers.linear import VConLinear
from hf_vcon.layers.protocol import VConUnit
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
    first = unit.compression_states()
    assert unit.compression_states() is first and compressor.computed == 1  # cached within the step
    compressor.token = ("group weights", 1)  # what the state depends on besides W changed
    assert unit.compression_states() is not first and compressor.computed == 2
    assert unit.compression_states() is not None and compressor.computed == 2  # and is cached again


@pytest.mark.parametrize("kind", ["linear", "weight"])
def test_both_units_take_the_protocol_from_one_place(kind):
    unit = _unit(kind, compressor_class("prune")(compressor_class("prune").Options(sparsity=0.5)))
    for method in ("set_beta", "state_cache_key", "compression_states", "compressed_params", "compress", "stats",
                   "pack", "slice_params", "compressed_weight"):
        assert getattr(type(unit), method) is getattr(VConUnit, method), method
    with pytest.raises(ValueError, match=r"beta=1.5 must be in \[0, 1\]"):
        unit.set_beta(1.5)
