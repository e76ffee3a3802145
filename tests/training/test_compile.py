"""torch.compile through a whole transition: β is a tensor read by the graph and the phase (dense / blending /
compressed) is the only Python value the forward branches on, so a patched model compiles one graph per phase, never
one per optimizer step, without graph breaks, and computes what the eager model computes."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from conftest import build, tiny_inputs, vcon_config
from hf_vcon import apply_vcon, set_step

SETTINGS = [pytest.param("prune", {"sparsity": 0.5}, id="prune"), pytest.param("lowrank", {"rank": 3}, id="lowrank"),
            pytest.param("binary", {}, id="binary", marks=pytest.mark.slow),
            pytest.param("quant", {"bits": 4}, id="quant", marks=pytest.mark.slow),  # the same path as prune's
            # inputs quantized, outputs blended; the observer of the static scales updated in place by the graph
            pytest.param("quant", {"scheme": "FP8"}, id="quant-fp8-static-inputs", marks=pytest.mark.slow),
            pytest.param("quant", {"scheme": "NVFP4"}, id="quant-nvfp4-w4a4", marks=pytest.mark.slow)]
Q = 2  # steps 0 (β = 1), 1 (β = 0.5), 2 and 3 (β = 0)


def compiled_transition(method: str, setting: dict, backend: str, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Train a tiny BERT compiled with ``backend`` through the transition; per step the eager and compiled logits of
    the same weights."""
    torch._dynamo.reset()
    counters.clear()
    model = apply_vcon(build("bert").train(), vcon_config(method, setting, transition_steps=Q))
    compiled = torch.compile(model, backend=backend)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    batch = {**tiny_inputs("bert"), "labels": torch.tensor([0, 2])}
    logits = []
    for step in range(steps):
        set_step(model, step)
        eager = model(**batch).logits.detach()
        output = compiled(**batch)
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        logits.append((eager, output.logits.detach()))
    return logits


def assert_compiles_once_per_phase(method, setting, backend, steps, tolerance):
    logits = compiled_transition(method, setting, backend, steps)
    assert counters["stats"]["unique_graphs"] <= 3, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    for eager, compiled in logits:
        torch.testing.assert_close(compiled, eager, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("method, setting", SETTINGS)
def test_a_transition_compiles_one_graph_per_phase(method, setting):
    """Dynamo alone (the graphs, their guards and breaks): the graphs run as traced, equal to eager exactly."""
    assert_compiles_once_per_phase(method, setting, "eager", Q + 2, tolerance=0.0)


@pytest.mark.slow
@pytest.mark.parametrize("method, setting", SETTINGS)
def test_a_transition_compiles_with_inductor(method, setting):
    """Inductor's generated code (fused kernels round differently): equal to eager up to float32 rounding."""
    assert_compiles_once_per_phase(method, setting, "inductor", Q + 3, tolerance=1e-6)
