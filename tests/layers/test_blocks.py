"""Block-wise VCON: whole blocks blend β·f(x) + (1−β)·g(x), staggered windows, merge, and its errors."""

from __future__ import annotations

import copy
from fractions import Fraction

import pytest
import torch
from torch import nn
from transformers import BertForSequenceClassification
from transformers.cache_utils import Cache
from transformers.pytorch_utils import Conv1D

import transformers
from conftest import METHOD_CASES, SOLO_METHOD_CASES, build, logits, merged_shapes, tiny_bert, tiny_inputs, vcon_config
from hf_vcon import (
    NoTargetModulesError,
    VConBlock,
    VConConfig,
    VConError,
    VConLinear,
    apply_vcon,
    beta_at,
    get_beta,
    get_block_betas,
    get_vcon_state,
    merge_and_unload,
    set_beta,
    set_step,
    unload,
    vcon_summary,
)
from reference import REFERENCE_METHODS
from test_core import AUTO_CLASSES, KINDS, _assert_compressed, as_linear_weight, expected_compressed

pytestmark = pytest.mark.skipif(
    int(transformers.__version__.split(".")[0]) < 5, reason="block-wise VCON needs transformers >= 5"
)

BLOCKS = {
    "bert": r"bert\.encoder\.layer\.\d+",
    "vit": r"vit\.layers\.\d+",
    "gpt2": r"transformer\.h\.\d+",
    "llama": r"model\.layers\.\d+",
}


def block_config(kind: str, method: str, setting: dict, **overrides) -> VConConfig:
    return vcon_config(method, setting, granularity="block", target_blocks=BLOCKS[kind], **overrides)


def patched_blocks(kind: str, method: str, setting: dict, **overrides):
    original = build(kind)
    model = apply_vcon(copy.deepcopy(original), block_config(kind, method, setting, **overrides))
    return original, model


def reference_g(original: nn.Module, block_name: str, state) -> nn.Module:
    """g built by hand: a copy of the original block with plain layers holding C (the naive reference for the
    built-in methods, the compression's definition otherwise), from g's layers before any training."""
    block = copy.deepcopy(original.get_submodule(block_name))
    for name, layer, setting in state.named_layers():
        if not name.startswith(f"{block_name}."):
            continue
        plain = block.get_submodule(name[len(block_name) + 1:])
        compressed = expected_compressed(layer, setting)
        with torch.no_grad():
            plain.weight.copy_(compressed.t() if isinstance(plain, Conv1D) else compressed)
    return block


def record_block_calls(state) -> tuple[dict, list]:
    calls = {}

    def hook(name):
        def record(module, args, kwargs, output):
            # The reference blocks run without the cache (f has filled it by now; g never sees it).
            args = tuple(None if isinstance(v, Cache) else v for v in args)
            calls[name] = (args, {k: None if isinstance(v, Cache) else v for k, v in kwargs.items()}, output)

        return record

    handles = [b.register_forward_hook(hook(n), with_kwargs=True) for n, b in zip(state.block_names, state.blocks)]
    return calls, handles


# ------------------------------------------------------------------------------------------ 1. β = 1
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method, setting", METHOD_CASES)
def test_beta_one_is_the_original_model(kind, method, setting):
    original, model = patched_blocks(kind, method, setting)
    state = get_vcon_state(model)
    assert len(state.blocks) == 2 and all(isinstance(b, VConBlock) for b in state.blocks)
    assert isinstance(model, type(original))
    torch.testing.assert_close(logits(model, kind), logits(original, kind), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------ 2. β = 0
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method, setting", METHOD_CASES)
def test_beta_zero_equals_merged_model_and_naive_reference(kind, method, setting):
    original, model = patched_blocks(kind, method, setting)
    state = get_vcon_state(model)
    set_beta(model, 0.0)
    blended = logits(model, kind)

    reference = copy.deepcopy(original)
    for name in state.block_names:
        g = reference_g(original, name, state)
        parent, _, child = name.rpartition(".")
        setattr(reference.get_submodule(parent), child, g)
    merged = merge_and_unload(copy.deepcopy(model))

    torch.testing.assert_close(blended, logits(merged, kind), atol=1e-5, rtol=0)
    torch.testing.assert_close(blended, logits(reference, kind), atol=1e-5, rtol=0)


# -------------------------------------------------------------------------------------- 3. 0 < β < 1
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method, setting", METHOD_CASES)
def test_intermediate_beta_blends_the_two_block_outputs(kind, method, setting):
    original, model = patched_blocks(kind, method, setting)
    state = get_vcon_state(model)
    set_beta(model, 0.3)
    calls, handles = record_block_calls(state)
    with torch.no_grad():
        model(**tiny_inputs(kind))
    for handle in handles:
        handle.remove()

    assert set(calls) == set(state.block_names)
    for name in state.block_names:
        args, kwargs, output = calls[name]
        f = original.get_submodule(name)
        g = reference_g(original, name, state)
        with torch.no_grad():
            expected = 0.3 * f(*args, **kwargs) + 0.7 * g(*args, **kwargs)
        torch.testing.assert_close(output, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_recorded_hidden_states_and_attentions_are_the_blends(kind):
    original = build(kind)
    original.set_attn_implementation("eager")
    model = apply_vcon(copy.deepcopy(original), block_config(kind, "binary", {}))
    state = get_vcon_state(model)
    set_beta(model, 0.3)
    calls, handles = record_block_calls(state)
    with torch.no_grad():
        out = model(**tiny_inputs(kind), output_hidden_states=True, output_attentions=True)
    for handle in handles:
        handle.remove()

    # One hidden state per block (plus the input), one attention map per block, as without VCON.
    assert len(out.hidden_states) == len(state.blocks) + 1 and len(out.attentions) == len(state.blocks)
    torch.testing.assert_close(out.hidden_states[1], calls[state.block_names[0]][2], atol=0, rtol=0)
    attention_class = type(original)._can_record_outputs["attentions"]
    for index, name in enumerate(state.block_names):
        args, kwargs, _ = calls[name]
        maps = []
        for block in (original.get_submodule(name), reference_g(original, name, state)):
            attention = next(m for m in block.modules() if isinstance(m, attention_class))
            handle = attention.register_forward_hook(lambda module, inputs, output: maps.append(output[1]))
            with torch.no_grad():
                block(*args, **kwargs)
            handle.remove()
        torch.testing.assert_close(out.attentions[index], 0.3 * maps[0] + 0.7 * maps[1], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------- 4. training
@pytest.mark.parametrize("method, setting", METHOD_CASES)
@pytest.mark.parametrize("beta", [1.0, 0.5, 0.0])
def test_every_trainable_parameter_gets_a_gradient(method, setting, beta):
    _, model = patched_blocks("llama", method, setting)
    model.train()
    set_beta(model, beta)
    model(**tiny_inputs("llama"), labels=tiny_inputs("llama")["input_ids"]).loss.backward()
    state = get_vcon_state(model)
    for block in state.blocks:
        for path, weight in (("base_block", beta), ("vcon_block", 1 - beta)):
            params = {n: p for n, p in getattr(block, path).named_parameters() if p.requires_grad}
            missing = [n for n, p in params.items() if p.grad is None]
            assert not missing, f"{path}: {missing}"
            grads = torch.stack([p.grad.abs().sum() for p in params.values()])
            assert (grads.sum() > 0) == (weight > 0), path  # the path that contributes 0 gets an exact 0 gradient
    frozen = [layer.weight for layer in state.layers if not layer.weight.requires_grad]
    # g never reads its dense copy where C is built from tensors of its own (low-rank): frozen
    assert bool(frozen) == (not state.layers[0].compressor.copy_trains_latent_weight)


DDP_SCRIPT = """
import sys, torch, torch.distributed as dist
from torch import nn
from test_blocks import get_block_betas, patched_blocks, set_step, tiny_inputs

_, model = patched_blocks("bert", "prune", {"sparsity": 0.5}, transition_steps=2, stagger=True)
model.train()
dist.init_process_group("gloo", init_method=f"file://{sys.argv[1]}", rank=0, world_size=1)
ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
for step in range(4):  # β = 1 → staggered handover → β = 0
    set_step(ddp, step)
    ddp(**tiny_inputs("bert"), labels=torch.tensor([0, 1])).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
dist.destroy_process_group()
assert set(get_block_betas(model).values()) == {0.0}
print("DDP OK")
"""


def test_ddp_without_find_unused_parameters(tmp_path):
    """DDP raises if a trainable parameter misses its gradient; a subprocess keeps the process group (and any
    gloo hang) out of the test session."""
    import os
    import subprocess
    import sys

    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(tests), tests, here]), GLOO_SOCKET_IFNAME="lo")
    result = subprocess.run([sys.executable, "-c", DDP_SCRIPT, str(tmp_path / "store")], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and "DDP OK" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize("method, setting", METHOD_CASES)
def test_after_training_merge_is_still_the_beta_zero_model(method, setting, tmp_path):
    original, model = patched_blocks("gpt2", method, setting, transition_steps=3, stagger=True)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(4):
        set_step(model, step)
        model(**tiny_inputs("gpt2", seed=step), labels=tiny_inputs("gpt2", seed=step)["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    assert get_beta(model) == 0.0
    expected = logits(model, "gpt2")
    state = get_vcon_state(model)
    compressed = {name: (layer.merged_tensors()[0], setting) for name, layer, setting in state.named_layers()}
    shapes = merged_shapes(original, model)
    merged = merge_and_unload(model)

    assert not any(isinstance(m, (VConBlock, VConLinear)) for m in merged.modules())
    assert {key: value.shape for key, value in merged.state_dict().items()} == shapes
    assert all(p.requires_grad for p in merged.parameters())
    for name, (weight, setting) in compressed.items():
        merged_weight = as_linear_weight(merged.get_submodule(name)).detach()
        assert torch.equal(merged_weight, weight)
        if setting.method in REFERENCE_METHODS:
            _assert_compressed(merged_weight, setting)
    merged.save_pretrained(tmp_path)
    reloaded = AUTO_CLASSES["gpt2"].from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded, "gpt2"), expected, atol=1e-5, rtol=0)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        _, model = patched_blocks("bert", "binary", {})
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        set_beta(model, 0.5)
        model(**tiny_inputs("bert"), labels=torch.tensor([0, 1])).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------- 5. stagger
def three_layer_bert() -> BertForSequenceClassification:
    config = tiny_bert().config
    config.num_hidden_layers = 3
    torch.manual_seed(0)
    return BertForSequenceClassification(config).eval()


def window_beta(step: int, index: int, count: int, q: int, start: int) -> float:
    """The β of block ``index`` whose window is [start + index·Q/n, start + (index+1)·Q/n], linear inside."""
    low, high = start + Fraction(index * q, count), start + Fraction((index + 1) * q, count)
    if step >= high:  # checked first: with Q = 0 the window is empty and β = 0 from start_step on (post-shot)
        return 0.0
    if step <= low:
        return 1.0
    return float(1 - (step - low) / (high - low))


@pytest.mark.parametrize("order", [None, ["bert.encoder.layer.2", "bert.encoder.layer.0", "bert.encoder.layer.1"]])
@pytest.mark.parametrize("q, start", [(10, 0), (7, 3), (2, 1), (0, 2)])
def test_staggered_windows_give_each_block_its_beta_at_every_step(order, q, start):
    config = VConConfig(method="binary", granularity="block", target_blocks=BLOCKS["bert"], transition_steps=q,
                        start_step=start, stagger=True, block_order=order)
    model = apply_vcon(three_layer_bert(), config)
    handover = order or [f"bert.encoder.layer.{i}" for i in range(3)]
    assert list(get_block_betas(model)) == handover
    for step in range(start + q + 3):
        mean = set_step(model, step)
        betas = get_block_betas(model)
        for index, name in enumerate(handover):
            assert betas[name] == pytest.approx(window_beta(step, index, 3, q, start), abs=1e-12), (step, name)
        assert sum(0 < beta < 1 for beta in betas.values()) <= 1  # one block at a time hands over
        assert mean == pytest.approx(sum(betas.values()) / 3) == get_beta(model)
        # The blocks hand over in order: a later block never moves before an earlier one is done.
        values = [betas[name] for name in handover]
        assert all(a <= b for a, b in zip(values, values[1:]))


def test_without_stagger_every_block_has_the_schedule_beta_and_fractions_resolve():
    config = VConConfig(method="binary", granularity="block", target_blocks=BLOCKS["bert"], transition_steps=0.5,
                        schedule="cosine")
    model = apply_vcon(three_layer_bert(), config)
    for step in range(12):
        set_step(model, step, max_steps=20)
        assert set(get_block_betas(model).values()) == {beta_at(step, 10, schedule="cosine")}


def test_figure_two_last_block_stays_dense():
    original = three_layer_bert()
    model = apply_vcon(copy.deepcopy(original), VConConfig(
        method="prune", sparsity=0.5, granularity="block", target_blocks=["encoder.layer.0", "encoder.layer.1"],
        transition_steps=4, stagger=True))
    layers = model.bert.encoder.layer
    assert isinstance(layers[0], VConBlock) and isinstance(layers[1], VConBlock)
    assert type(layers[2]) is type(original.bert.encoder.layer[2])
    betas = {}
    for step in range(6):
        set_step(model, step)
        betas[step] = get_block_betas(model)
    assert betas[1] == {"bert.encoder.layer.0": 0.5, "bert.encoder.layer.1": 1.0}
    assert betas[3] == {"bert.encoder.layer.0": 0.0, "bert.encoder.layer.1": 0.5}
    compressed = {f"{name}.weight" for name in get_vcon_state(model).targeted_module_names}
    assert all(".layer.0." in name or ".layer.1." in name for name in compressed) and len(compressed) == 12
    merged = merge_and_unload(model).state_dict()
    for key, value in original.state_dict().items():  # only the Linear weights of blocks 0 and 1 changed
        assert torch.equal(merged[key], value) == (key not in compressed), key


# ------------------------------------------------------------------------- 6. layer-wise vs block-wise
@pytest.mark.parametrize("method, setting", SOLO_METHOD_CASES)
def test_one_layer_blocks_agree_with_layer_wise(method, setting):
    """A block that is one Linear: output blend = weight blend, so both granularities compute the same model."""
    original = build("bert")
    layer_wise = apply_vcon(copy.deepcopy(original), vcon_config(method, setting, target_modules=["query", "value"]))
    block_wise = apply_vcon(copy.deepcopy(original), vcon_config(method, setting, granularity="block",
                                                                 target_blocks=r".*\.(query|value)"))
    assert get_vcon_state(block_wise).targeted_module_names == get_vcon_state(layer_wise).targeted_module_names
    for beta in (1.0, 0.3, 0.0):
        set_beta(layer_wise, beta)
        set_beta(block_wise, beta)
        torch.testing.assert_close(logits(block_wise, "bert"), logits(layer_wise, "bert"), atol=1e-5, rtol=0)

    # Gradients: layer-wise W gets what block-wise gives f's W and g's latent W together (straight-through),
    # or f's W and g's factors one by one (low-rank).
    set_beta(layer_wise, 0.3)
    set_beta(block_wise, 0.3)
    for model in (layer_wise, block_wise):
        model.train()
        model(**tiny_inputs("bert"), labels=torch.tensor([0, 2])).loss.backward()
    for layer, block in zip(get_vcon_state(layer_wise).layers, get_vcon_state(block_wise).blocks):
        f, g = block.base_block, block.vcon_block
        if layer.compressor.trains_straight_through:
            torch.testing.assert_close(f.weight.grad + g.weight.grad, layer.weight.grad, atol=1e-6, rtol=1e-5)
        else:
            torch.testing.assert_close(f.weight.grad, layer.weight.grad, atol=1e-6, rtol=1e-5)
            for key, value in layer.compressed_params().items():
                torch.testing.assert_close(g.compressed_params()[key].grad, value.grad, atol=1e-6, rtol=1e-5)

    merged_layer, merged_block = merge_and_unload(layer_wise), merge_and_unload(block_wise)
    assert merged_block.state_dict().keys() == merged_layer.state_dict().keys()


@pytest.mark.parametrize("method, setting", METHOD_CASES)
def test_layer_and_block_wise_merged_models_agree_before_training(method, setting):
    """Whole-layer blocks: g starts as f, so both merged models are the original with C(W) in the same layers."""
    original = build("llama")
    layer_wise = apply_vcon(copy.deepcopy(original), vcon_config(method, setting))
    block_wise = apply_vcon(copy.deepcopy(original), block_config("llama", method, setting))
    assert get_vcon_state(block_wise).targeted_module_names == get_vcon_state(layer_wise).targeted_module_names
    merged_layer, merged_block = merge_and_unload(layer_wise).state_dict(), merge_and_unload(block_wise).state_dict()
    assert merged_block.keys() == merged_layer.keys() == original.state_dict().keys()
    for key, value in merged_layer.items():
        torch.testing.assert_close(merged_block[key], value, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------- 7. caches, unload
def test_kv_cache_during_the_transition():
    original, model = patched_blocks("llama", "binary", {})
    inputs = tiny_inputs("llama")
    set_beta(model, 0.5)
    with torch.no_grad():  # a forward from an empty cache is exact: g runs without it
        with_cache = model(**inputs, use_cache=True)
        torch.testing.assert_close(with_cache.logits, model(**inputs, use_cache=False).logits, atol=1e-6, rtol=0)
        assert with_cache.cache.get_seq_length() == inputs["input_ids"].shape[1]  # f filled it once, not twice
    with pytest.raises(VConError, match="filled KV cache while 0 < beta < 1"):
        model.generate(**inputs, max_new_tokens=3, do_sample=False)

    set_beta(model, 0.0)
    merged = merge_and_unload(copy.deepcopy(model))
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(generated, merged.generate(**inputs, max_new_tokens=3, do_sample=False))
    set_beta(model, 1.0)
    assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False),
                       original.generate(**inputs, max_new_tokens=3, do_sample=False))


@pytest.mark.parametrize("method, setting", METHOD_CASES)
def test_unload_returns_the_original_blocks(method, setting):
    original, model = patched_blocks("vit", method, setting)
    set_beta(model, 0.0)
    dense = unload(model)
    assert get_vcon_state(dense) is None and not any(isinstance(m, VConBlock) for m in dense.modules())
    assert dense.state_dict().keys() == original.state_dict().keys()
    assert all(torch.equal(dense.state_dict()[k], v) for k, v in original.state_dict().items())


def test_summary_config_round_trip_and_attribute_forwarding(tmp_path):
    _, model = patched_blocks("llama", "lowrank", {"rank": 4}, stagger=True)
    summary = vcon_summary(model)
    assert summary.params_before == sum(l.weight.numel() for l in get_vcon_state(model).layers)
    assert summary.beta == 1.0 and "rank 4" in str(summary)
    config = get_vcon_state(model).config
    config.save_pretrained(tmp_path)
    assert VConConfig.from_pretrained(tmp_path) == config
    block = model.model.layers[0]
    assert block.self_attn is block.base_block.self_attn  # the model may read its layers' attributes
    assert "vcon_block.self_attn.q_proj.vcon_A" in dict(block.named_parameters())


# ----------------------------------------------------------------------------------------- 8. errors
BAD_BLOCK_CONFIGS = [
    (dict(granularity="blocks"), ValueError, r"granularity='blocks' is not known; use one of: block, layer"),
    (dict(granularity="block"), ValueError, r"granularity='block' needs target_blocks"),
    (dict(target_blocks=["layer.0"]), ValueError, r"target_blocks=\['layer.0'\] only applies to granularity='block'"),
    (dict(stagger=True), ValueError, r"stagger=True only applies to granularity='block'"),
    (dict(granularity="block", target_blocks="x", stagger=1), TypeError, r"stagger=1 must be True or False"),
    (dict(granularity="block", target_blocks="x", block_order=["x"]), ValueError,
     r"block_order=\['x'\] only applies with stagger=True"),
    (dict(granularity="block", target_blocks="x", stagger=True, block_order=["x", "x"]), ValueError,
     r"block_order=.* names \['x'\] more than once"),
    (dict(granularity="block", target_blocks="x", stagger=True, block_order="x"), TypeError,
     r"block_order='x' must be a non-empty list"),
    (dict(granularity="block", target_blocks="(x"), ValueError, r"target_blocks='\(x' is not a valid regular"),
    (dict(granularity="block", target_blocks="all-linear"), ValueError, r"target_blocks='all-linear' is not a set"),
    (dict(granularity="block", target_blocks=[]), TypeError, r"target_blocks=\[\] must be a non-empty list"),
]


@pytest.mark.parametrize("kwargs, error, message", BAD_BLOCK_CONFIGS, ids=[str(c[0]) for c in BAD_BLOCK_CONFIGS])
def test_bad_block_config_raises_naming_the_field(kwargs, error, message):
    with pytest.raises(error, match=message):
        VConConfig(method="binary", **kwargs)


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (dict(target_blocks=["nope"]), NoTargetModulesError,
         r"target_blocks=\['nope'\] matched no module. Repeated blocks of this model: \['bert.encoder.layer.0'"),
        (dict(target_blocks=["encoder.layer"]), ValueError, r"matched container\(s\) \['bert.encoder.layer'\]"),
        (dict(target_blocks=["LayerNorm"]), ValueError, r"hold\(s\) no Linear/Conv1D that target_modules"),
        (dict(target_blocks=r"bert\.encoder\.layer\.0(\.attention)?"), ValueError,
         r"matched 'bert.encoder.layer.0.attention' inside 'bert.encoder.layer.0'; blocks must not contain"),
        (dict(target_blocks=BLOCKS["bert"], target_modules=["nope"]), ValueError, r"hold\(s\) no Linear/Conv1D"),
        (dict(target_blocks=BLOCKS["bert"], stagger=True, block_order=["bert.encoder.layer.1", "layer.0"]), ValueError,
         r"block_order must name every block .* unknown: \['layer.0'\], missing: \['bert.encoder.layer.0'\]"),
        (dict(target_blocks=BLOCKS["bert"], method="lowrank", rank=32, sparsity=None), ValueError,
         r"rank=32 gives rank 32 for layer 'bert.encoder.layer.0.attention.self.query'"),
    ],
    ids=["no-match", "container", "no-linear", "nested", "no-linear-targeted", "order", "rank"],
)
def test_bad_blocks_at_apply_time_leave_the_model_unchanged(overrides, error, message):
    model = build("bert")
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    settings = dict(method="prune", sparsity=0.5, granularity="block")
    settings.update(overrides)
    config = VConConfig(**{k: v for k, v in settings.items() if v is not None})
    with pytest.raises(error, match=message):
        apply_vcon(model, config)
    assert get_vcon_state(model) is None and not any(isinstance(m, (VConBlock, VConLinear)) for m in model.modules())
    assert model.state_dict().keys() == snapshot.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in snapshot.items())


def test_block_betas_need_blocks():
    model = apply_vcon(build("bert"), vcon_config("binary", {}))
    with pytest.raises(VConError, match="granularity='block'"):
        get_block_betas(model)


# ---------------------------------------------------------------------------------- 9. with the trainer
def test_trainer_staggers_blocks_exports_and_resumes(tmp_path):
    from test_trainer import BetaRecorder, TinyTextDataset, make_trainer
    from transformers import AutoModelForSequenceClassification

    from hf_vcon import merged_state_dict

    config = VConConfig(method="binary", granularity="block", target_blocks=BLOCKS["bert"], transition_steps=4,
                        stagger=True)
    full = make_trainer(tmp_path / "full", config, max_steps=6, save_strategy="steps", save_steps=3,
                        gradient_accumulation_steps=2, per_device_train_batch_size=2)
    per_block = []
    recorder = BetaRecorder(full)
    original_compute_loss = full.compute_loss

    def compute_loss(model, inputs, *args, **kwargs):
        per_block.append((full.state.global_step, list(get_block_betas(full.model).values())))
        return original_compute_loss(model, inputs, *args, **kwargs)

    full.compute_loss = compute_loss
    full.train()
    expected = {step: [window_beta(step, index, 2, 4, 0) for index in range(2)] for step in range(6)}
    assert per_block == [(step, expected[step]) for step in range(6) for _ in range(2)]  # β per block per step
    assert [beta for _, beta in recorder.records] == [sum(expected[s]) / 2 for s in range(6) for _ in range(2)]

    # The merged export equals merge_and_unload and reloads without hf_vcon.
    exported = merged_state_dict(full.model)
    full.save_model(str(tmp_path / "merged"))
    inputs = TinyTextDataset(4, seed=5).input_ids
    full.model.eval()
    with torch.no_grad():
        compressed = full.model(input_ids=inputs).logits
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=inputs).logits, compressed, atol=1e-5, rtol=0)
    merged = merge_and_unload(copy.deepcopy(full.model)).state_dict()
    # binary weights are saved as compressed-tensors, whose layers keep their scale and shape next to the weight
    reloaded_keys = {key for key in reloaded.state_dict() if not key.endswith((".weight_scale", ".weight_shape"))}
    assert exported.keys() == merged.keys() == reloaded_keys
    assert all(torch.equal(exported[key], merged[key]) for key in merged)

    # Resuming mid-transition (step 3: block 0 done, block 1 half-way) gives the uninterrupted run.
    resumed = make_trainer(tmp_path / "resumed", config, seed=123, max_steps=6, gradient_accumulation_steps=2,
                           per_device_train_batch_size=2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    for key, value in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, atol=1e-6, rtol=0, msg=key)


def test_compressed_view_sets_every_block_to_zero():
    from hf_vcon import compressed_view

    _, model = patched_blocks("bert", "prune", {"sparsity": 0.5}, stagger=True, transition_steps=4)
    set_step(model, 1)
    before = get_block_betas(model)
    with compressed_view(model):
        assert set(get_block_betas(model).values()) == {0.0}
        inside = logits(model, "bert")
    assert get_block_betas(model) == before
    torch.testing.assert_close(inside, logits(merge_and_unload(model), "bert"), atol=1e-5, rtol=0)
