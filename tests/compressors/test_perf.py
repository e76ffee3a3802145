"""The fast paths: selection-based masks, the per-step cache, no full-size temporaries kept for backward,
the low-rank blend forms, and "only the compressed path is computed once β = 0" (release_dense_paths)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import build, tiny_inputs, vcon_config
from reference import _keep_largest_rows
from sync_count import as_on_an_accelerator, count_syncs
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from hf_vcon import VConError, VConLinear, apply_vcon, get_vcon_state, release_dense_paths, set_beta, set_step
from hf_vcon.compressors.selection import keep_largest

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _layer(method: str, setting: dict, out_features=12, in_features=16, **overrides) -> VConLinear:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(in_features, out_features))
    apply_vcon(model, vcon_config(method, setting, target_modules=["0"], **overrides))
    return model[0].train()


# -------------------------------------------------------------------------------------------- masks
@pytest.mark.parametrize("shape, keep", [((1, 60), 17), ((5, 24), 7), ((6, 4, 4), 2), ((3, 10), 10), ((3, 10), 0)])
def test_selection_mask_keeps_exact_count_and_breaks_ties_by_position(shape, keep):
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):  # few distinct values: ties straddle the cut
        scores = torch.randint(0, 4, shape, generator=generator).float()
        expected = _keep_largest_rows(scores.numpy(), keep)
        assert np.array_equal(keep_largest(scores, keep).numpy(), expected)


def _pruner(sparsity: float):
    return _layer("prune", {"sparsity": sparsity}).compressor




def _tied_weights(shape, dtype, generator) -> torch.Tensor:
    """Weights with many ties at every magnitude: few distinct values, or bf16 roundings of normal ones (upcast)."""
    if dtype == "bf16-upcast":
        return torch.randn(shape, generator=generator).to(torch.bfloat16).float()
    return torch.randint(-3, 4, shape, generator=generator).to(dtype)


@pytest.mark.parametrize("path", ["cpu", "accelerator"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, "bf16-upcast"], ids=str)
@pytest.mark.parametrize("setting", [{"sparsity": 0.9}, {"sparsity": 0.5}, {"sparsity": 0.3, "prune_pattern": "row"},
                                     {"prune_pattern": "2:4"}], ids=lambda s: "-".join(map(str, s.values())))
def test_training_state_is_the_position_rule_mask_bit_for_bit(setting, dtype, path):
    """The state is the mask of the definition (the largest |W|, ties broken by position), for moving weights, weights
    full of ties (fp32, bf16 and bf16-rounded fp32), in any storage order: found with device operations alone (an
    accelerator's path), and on a CPU near the previous step's cut (one memo through the sequence)."""
    pruner = _layer("prune", setting).compressor
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(96, 80, generator=generator)]
    for move in (1e-4, 0.3, 0.0, 1e-6):
        weights.append(weights[-1] + move * torch.randn(96, 80, generator=generator))
    weights += [_tied_weights((96, 80), dtype, generator) for _ in range(3)]
    weights += [weights[-1] + 1e-3, torch.zeros(96, 80)]  # ties shifted a little; nothing to keep but zeros
    memos = ({}, {})
    paths = as_on_an_accelerator if path == "accelerator" else contextlib.nullcontext
    for weight in weights:
        weight = weight.to(torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
        for stored, memo in zip((weight, weight.t().contiguous().t()), memos):  # row-major and transposed storage
            with paths():
                state = pruner.compression_state(stored, memo)
            groups, keep = pruner._groups(stored.abs())
            expected = _keep_largest_rows(groups.float().numpy(), keep).reshape(stored.shape)
            assert state.dtype == torch.bool and np.array_equal(state.numpy(), expected)
            assert torch.equal(pruner.blend(stored, state, 0.0), stored * torch.from_numpy(expected))
            blended = pruner.blend(stored, state, torch.tensor(0.25))
            assert torch.equal(blended, torch.where(state, stored, torch.lerp(stored * 0, stored, 0.25)))


class _FullSelections(TorchDispatchMode):
    """Counts the selections (``kthvalue``) over ``numel`` entries or more."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ == "kthvalue" and args[0].numel() >= self.numel:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_on_a_cpu_the_cut_is_searched_near_the_previous_one():
    """A per-layer cut is selected over all of W at the first step only, then among the weights near it (values
    read back: free on a CPU); the accelerator path never reads one back."""
    pruner = _pruner(0.7)
    generator = torch.Generator().manual_seed(0)
    weight, memo = torch.randn(96, 80, generator=generator), {}
    selections = []
    for _ in range(4):
        with _FullSelections(weight.numel()) as full:
            pruner.compression_state(weight, memo)
        selections.append(full.count)
        weight = weight + 1e-4 * torch.randn(96, 80, generator=generator)
    assert selections == [1, 0, 0, 0]
    assert count_syncs(lambda: pruner.compression_state(weight, memo)).total > 0
    with as_on_an_accelerator():
        assert count_syncs(lambda: pruner.compression_state(weight, memo)).total == 0


@pytest.mark.parametrize("method, setting", [("prune", {"sparsity": 0.7}), ("prune", {"prune_pattern": "row", "sparsity": 0.5}),
                                             ("prune", {"prune_pattern": "2:4"}), ("binary", {}),
                                             ("binary", {"binary_scale": "channel"}), ("quant", {"bits": 4}),
                                             ("quant", {"bits": 3, "strategy": "group", "group_size": 8}),
                                             ("quant", {"bits": 2, "strategy": "tensor", "clip_search": True})])
def test_a_leading_expert_dimension_compresses_each_expert_on_its_own(method, setting):
    """States and blends of a stacked ``(experts, out, in)`` weight, in one call, equal those of each expert alone."""
    compressor = _layer(method, setting).compressor
    assert compressor.accepts_leading_dims
    generator = torch.Generator().manual_seed(0)
    stacked = torch.randn(5, 12, 16, generator=generator)
    stacked[1] = torch.randint(-2, 3, (12, 16), generator=generator).float()  # ties
    states = compressor.compression_state(stacked, {})
    beta = torch.tensor(0.3)
    for index, weight in enumerate(stacked):
        alone = compressor.compression_state(weight, {})
        assert torch.equal(states[index].reshape(alone.shape), alone)
        assert torch.equal(compressor.blend(stacked, states, beta)[index], compressor.blend(weight, alone, beta))
        assert torch.equal(compressor.blend(stacked, states, 0.0)[index], compressor.compress(weight))


# -------------------------------------------------------------------------------------------- cache
def _count_state_calls(layer: VConLinear) -> list[int]:
    calls = [0]
    original = layer.compressor.compression_state

    def counting(weight, memo=None, **kwargs):
        calls[0] += 1
        return original(weight, memo, **kwargs)

    layer.compressor.compression_state = counting
    return calls


@pytest.mark.parametrize("method, setting", [("prune", {"sparsity": 0.5}), ("binary", {})])
def test_state_is_computed_once_per_optimizer_step(method, setting):
    layer = _layer(method, setting)
    layer.set_beta(0.5)
    calls = _count_state_calls(layer)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    for step in range(3):
        for _ in range(4):  # micro-batches of one accumulation window
            layer(torch.randn(3, 16)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        assert calls[0] == step + 1
    layer.optimizer_step = 7  # a new step from set_step refreshes it even if W's version did not move
    layer(torch.randn(3, 16))
    assert calls[0] == 4


def test_recompute_every_k_steps():
    model = nn.Sequential(nn.Linear(16, 12))
    apply_vcon(model, vcon_config("prune", {"sparsity": 0.5}, target_modules=["0"], recompute_every=3,
                                  transition_steps=100))
    layer = model[0].train()
    calls = _count_state_calls(layer)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3, 10):  # β < 1 from the first step on: every step uses the compressed path
        set_step(model, step)
        if step % 3 == 0:
            mask = layer.compressor.mask(layer.weight)
        x = torch.randn(3, 16)
        # between refreshes the mask of the last refresh holds, at the exact sparsity, on the moving W
        blended = torch.where(mask, layer.weight, layer.beta * layer.weight)
        torch.testing.assert_close(model(x), x @ blended.T + layer.bias)
        model(x).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert calls[0] == 3  # steps 3, 6, 9


def test_recompute_every_is_validated():
    with pytest.raises(ValueError, match="recompute_every"):
        vcon_config("prune", {}, recompute_every=0)
    with pytest.raises(ValueError, match="recompute_every"):
        vcon_config("lowrank", {"rank": 2}, recompute_every=5)


# -------------------------------------------------------------------- nothing full-size kept for backward
@pytest.mark.parametrize("method, setting", [("prune", {"sparsity": 0.5}), ("binary", {"binary_scale": "channel"})])
@pytest.mark.parametrize("beta", [0.5, 0.0])
def test_no_effective_weight_is_saved_for_backward(method, setting, beta):
    layer = _layer(method, setting, out_features=24, in_features=20)
    layer.set_beta(beta)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        output = layer(torch.randn(5, 20))
    full_size = [t for t in saved if t.is_floating_point() and t.numel() == layer.weight.numel()]
    weight_storage = layer.weight.untyped_storage().data_ptr()
    assert full_size and all(t.untyped_storage().data_ptr() == weight_storage for t in full_size)
    output.sum().backward()
    assert layer.weight.grad is not None


@pytest.mark.parametrize("method, setting", [("prune", {"sparsity": 0.5}), ("binary", {}), ("quant", {"bits": 4})])
@pytest.mark.parametrize("beta", [0.5, 0.0])
def test_under_autocast_the_16_bit_weight_is_kept_as_a_plain_linear_keeps_it(method, setting, beta):
    """Under autocast the function saves the 16-bit effective weight and input, as autocast does for a plain Linear
    (so the memory is a plain Linear's), and gives the output and gradients of the straight-through reference."""
    layer = _layer(method, setting, out_features=24, in_features=32)
    layer.set_beta(beta)
    x = torch.randn(5, 32, requires_grad=True)
    with torch.no_grad():
        blended = layer.compressor.blend(layer.weight, layer.compression_state(), beta)
    reference_weight = layer.weight.detach().clone().requires_grad_(True)
    reference_x = x.detach().clone().requires_grad_(True)
    saved = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            output = layer(x)
        straight_through = reference_weight + (blended - reference_weight).detach()
        expected = F.linear(reference_x, straight_through, layer.bias)
    assert output.dtype == torch.bfloat16 and torch.equal(output, expected)
    full_size = [t for t in saved if t.is_floating_point() and t.numel() == layer.weight.numel()]
    assert sorted(str(t.dtype) for t in full_size) == ["torch.bfloat16", "torch.float32"]
    assert any(t.untyped_storage().data_ptr() == layer.weight.untyped_storage().data_ptr() for t in full_size)
    gradient = torch.randn(5, 24).to(torch.bfloat16)
    output.backward(gradient)
    expected.backward(gradient)
    assert torch.equal(layer.weight.grad, reference_weight.grad) and torch.equal(x.grad, reference_x.grad)
    saved.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t) or t, lambda t: t):
        layer(x.detach())  # no input gradient wanted: nothing 16-bit of full size is kept
    assert [t.dtype for t in saved if t.numel() == layer.weight.numel()] == [torch.float32]


# ------------------------------------------------------------------------------- low-rank blend forms
@pytest.mark.parametrize("tokens", [4, 400], ids=["activation-space", "weight-space"])
def test_lowrank_blend_forms_match_the_two_path_reference(tokens):
    layer = _layer("lowrank", {"rank": 3})
    layer.set_beta(0.3)
    x = torch.randn(tokens, 16)
    upstream = torch.randn(tokens, 12)
    (layer(x) * upstream).sum().backward()
    w, a, b, bias = (t.detach().clone().requires_grad_(True) for t in (layer.weight, layer.vcon_A, layer.vcon_B, layer.bias))
    reference = 0.3 * F.linear(x, w, bias) + 0.7 * F.linear(F.linear(x, a), b, bias)
    (reference * upstream).sum().backward()
    for ours, theirs in [(layer.weight, w), (layer.vcon_A, a), (layer.vcon_B, b), (layer.bias, bias)]:
        torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------- only the compressed path once β = 0
class _RecordOps(TorchDispatchMode):
    """Record every aten op and whether any of its tensor arguments shares storage with ``watched``."""

    def __init__(self, watched: torch.Tensor):
        super().__init__()
        self.storage = watched.untyped_storage().data_ptr()
        self.reads, self.matmul_shapes = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if any(t.untyped_storage().data_ptr() == self.storage for t in tensors if t.device.type != "meta"):
            self.reads.append(str(func))
        if func.__name__.split(".")[0] in ("mm", "addmm", "bmm", "matmul"):
            self.matmul_shapes.append([tuple(t.shape) for t in tensors])
        return func(*args, **(kwargs or {}))


def test_lowrank_after_release_computes_only_the_factors():
    model = apply_vcon(build("bert").train(), vcon_config("lowrank", {"rank": 3}, transition_steps=0))
    set_step(model, 0)
    layer = get_vcon_state(model).layers[0]
    dense_shape = tuple(layer.weight.shape)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)

    model(**tiny_inputs("bert")).logits.sum().backward()  # β = 0 but not released: W gets an exact zero gradient
    assert torch.count_nonzero(layer.weight.grad) == 0
    optimizer.step()
    assert layer.weight in optimizer.state
    optimizer.zero_grad()

    released = release_dense_paths(model, optimizer)
    assert released == get_vcon_state(model).targeted_module_names
    assert layer.weight not in optimizer.state and not layer.weight.requires_grad
    before = layer.weight.detach().clone()
    with _RecordOps(layer.weight) as recorder:
        model(**tiny_inputs("bert")).logits.sum().backward()
    assert recorder.reads == []  # W is not read, forward or backward
    assert all(dense_shape not in shapes for shapes in recorder.matmul_shapes)
    assert layer.weight.grad is None and layer.vcon_A.grad is not None
    optimizer.step()
    assert torch.equal(layer.weight, before) and layer.weight not in optimizer.state


def test_release_keeping_w_trainable_as_under_ddp():
    model = apply_vcon(build("bert").train(), vcon_config("lowrank", {"rank": 3}, transition_steps=0))
    set_step(model, 0)
    layer = get_vcon_state(model).layers[0]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    release_dense_paths(model, optimizer, freeze=False)
    before = layer.weight.detach().clone()
    for _ in range(2):
        model(**tiny_inputs("bert")).logits.sum().backward()
        assert layer.weight.requires_grad and torch.count_nonzero(layer.weight.grad) == 0
        optimizer.step()  # the pre-hook drops W's gradient: no state, no weight decay
        optimizer.zero_grad()
    assert torch.equal(layer.weight, before) and layer.weight not in optimizer.state


def test_release_needs_beta_zero_and_then_pins_it():
    model = apply_vcon(build("bert"), vcon_config("lowrank", {"rank": 3}))
    set_beta(model, 0.2)
    with pytest.raises(VConError, match="beta = 0"):
        release_dense_paths(model)
    set_beta(model, 0.0)
    release_dense_paths(model)
    with pytest.raises(VConError, match="release_dense_paths"):
        set_beta(model, 0.5)
    assert release_dense_paths(apply_vcon(build("bert"), vcon_config("binary", {}))) == []  # no separate dense path


def _torchrun_ddp_release(freeze: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), HERE]), "OMP_NUM_THREADS": "1",
           "VCON_DDP_FREEZE": "1" if freeze else "0"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         os.path.join(HERE, "ddp_release.py")],
        capture_output=True, text=True, env=env, timeout=300,
    )


@pytest.mark.slow
def test_ddp_release_with_find_unused_parameters_false():
    """Two gloo ranks through the β = 0 switch, release_dense_paths included, without find_unused_parameters."""
    result = _torchrun_ddp_release(freeze=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("DDP OK") == 2, result.stdout


@pytest.mark.slow
def test_ddp_control_freezing_after_wrapping_breaks_the_reducer():
    """Why release_dense_paths keeps W trainable under DDP: freezing it after wrapping stalls the reducer."""
    result = _torchrun_ddp_release(freeze=True)
    assert result.returncode != 0
    assert "Expected to have finished reduction" in result.stdout + result.stderr
