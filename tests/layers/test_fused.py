"""Weights VCON reaches without a Linear to wrap: fused 3-D mixture-of-experts weights (each expert compressed on its
own), nn.MultiheadAttention's projections, attention that reads its projections' weights directly; the first-forward
audit that refuses a bypassed layer; what "all-linear" leaves dense (heads, routers); ZeRO-3-partitioned weights."""

from __future__ import annotations

import copy
import sys
import types
import warnings
from contextlib import contextmanager

import pytest
import torch
import transformers
from torch import nn

from architectures import by_key
from conftest import SOLO_METHOD_CASES
from hf_vcon import (
    VConConfig,
    VConError,
    VConLinear,
    VConWarning,
    apply_vcon,
    get_vcon_state,
    load_compressed,
    merge_and_unload,
    release_dense_paths,
    save_compressed,
    set_beta,
    set_step,
    vcon_summary,
)
from hf_vcon.layers.weight import VConWeight

TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
needs_fused_experts = pytest.mark.skipif(not TRANSFORMERS_5, reason="transformers 4 stores experts as Linears")


def logits(model, case, inputs=None):
    with torch.no_grad():
        return getattr(model(**(inputs or case.inputs())), case.output_key)


def expert_units(model):
    state = get_vcon_state(model)
    return [(name, layer) for name, layer in zip(state.targeted_module_names, state.layers) if ".experts." in name]


# -------------------------------------------------------------------------------------------------- experts
@needs_fused_experts
@pytest.mark.parametrize("key", ["mixtral", "gpt_oss"])
@pytest.mark.parametrize("method, setting", SOLO_METHOD_CASES)
def test_each_expert_is_compressed_on_its_own(key, method, setting):
    case = by_key(key)
    model = apply_vcon(case.build(), VConConfig(method=method, **setting))
    units = expert_units(model)
    assert units and all(isinstance(layer, VConWeight) and layer.stacked for _, layer in units)
    for name, layer in units:
        latent = layer.latent_weight().detach()  # (experts, out, in), whatever the storage order
        compressed = layer.compressed_weight()
        assert compressed.shape == latent.shape
        for index in range(latent.shape[0]):  # expert by expert: its own mask, scale or factors
            expected = layer.compressor.compressed_weight(latent[index], layer.slice_params(index))
            torch.testing.assert_close(compressed[index], expected, atol=0, rtol=0)
        if method == "prune" and "sparsity" in setting:
            zeros = (compressed == 0).flatten(1).float().mean(1)
            torch.testing.assert_close(zeros, torch.full_like(zeros, setting["sparsity"]), atol=1e-3, rtol=0)


@needs_fused_experts
def test_routers_and_gates_stay_dense_unless_named():
    case = by_key("qwen2_moe")
    names = get_vcon_state(apply_vcon(case.build(), VConConfig(method="binary"))).targeted_module_names
    assert not [name for name in names if name.endswith(("mlp.gate", "shared_expert_gate"))]
    assert "model.layers.0.mlp.experts.gate_up_proj" in names and "model.layers.0.mlp.shared_expert.up_proj" in names
    named = apply_vcon(case.build(), VConConfig(method="binary", target_modules=["shared_expert_gate"]))
    assert get_vcon_state(named).targeted_module_names == [f"model.layers.{i}.mlp.shared_expert_gate" for i in (0, 1)]


@needs_fused_experts
def test_expert_factors_train_release_and_round_trip(tmp_path):
    case = by_key("mixtral")
    model = apply_vcon(case.build(), VConConfig(method="lowrank", rank_ratio=0.25, transition_steps=2))
    name, unit = expert_units(model)[0]
    assert unit.vcon_A.shape[0] == unit.vcon_B.shape[0] == unit.num_slices  # factors stacked over experts
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(3):  # β = 1, 0.5, then 0
        set_step(model, step)
        model(**case.labels_inputs(seed=step)).loss.backward()
        assert unit.vcon_A.grad is not None and unit.weight.grad is not None
        optimizer.step()
        optimizer.zero_grad()
    assert name in release_dense_paths(model, optimizer) and not unit.weight.requires_grad
    model(**case.labels_inputs()).loss.backward()
    assert unit.weight.grad is None and unit.vcon_B.grad is not None  # only the factors train now

    model.eval()
    expected = logits(model, case)
    summary = vcon_summary(model)
    layer_summary = next(layer for layer in summary.layers if layer.name == name)
    experts, out_features, in_features = layer_summary.shape
    rank = unit.vcon_A.shape[1]
    assert layer_summary.stats.params_after == experts * rank * (out_features + in_features)
    save_compressed(model, tmp_path)
    torch.testing.assert_close(logits(load_compressed(tmp_path), case), expected, atol=1e-5, rtol=0)
    merged = merge_and_unload(copy.deepcopy(model))
    torch.testing.assert_close(logits(merged, case), expected, atol=1e-5, rtol=0)
    experts_module = merged.model.layers[0].mlp.experts
    assert type(experts_module).__name__ == "MixtralExperts" and experts_module.gate_up_proj.requires_grad


DDP_SCRIPT = """
import sys, torch, torch.distributed as dist
from torch import nn
sys.path.insert(0, sys.argv[2])
from architectures import by_key
from hf_vcon import VConConfig, apply_vcon, set_step, release_dense_paths

case = by_key("mixtral")
dist.init_process_group("gloo", init_method=f"file://{sys.argv[1]}", rank=0, world_size=1)
for method, setting in (("lowrank", {"rank_ratio": 0.25}), ("prune", {"sparsity": 0.5})):
    model = apply_vcon(case.build(), VConConfig(method=method, transition_steps=2, **setting)).train()
    ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for step in range(4):  # β = 1 → 0.5 → 0 (released) → 0
        set_step(ddp, step)
        if step == 2:
            release_dense_paths(ddp, optimizer)
        ddp(**case.labels_inputs(seed=step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
dist.destroy_process_group()
print("DDP OK")
"""


@needs_fused_experts
def test_experts_under_ddp_without_find_unused_parameters(tmp_path):
    import os
    import subprocess

    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(tests), tests, here]), GLOO_SOCKET_IFNAME="lo",
               OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", DDP_SCRIPT, str(tmp_path / "store"), tests], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "DDP OK" in result.stdout, result.stderr[-3000:]


# ----------------------------------------------------------------------------------- weights read directly
class Pooling(nn.Module):
    """SigLIP's pooling head in miniature: nn.MultiheadAttention reads out_proj.weight and in_proj_weight."""

    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(16, 4, batch_first=True)
        self.probe = nn.Parameter(torch.randn(1, 1, 16))

    def forward(self, x):
        return self.attention(self.probe.expand(x.shape[0], -1, -1), x, x)[0]


@pytest.mark.parametrize("method, setting", SOLO_METHOD_CASES)
def test_multihead_attention_projections_are_blended(method, setting):
    torch.manual_seed(0)
    original = Pooling()
    model = apply_vcon(copy.deepcopy(original), VConConfig(method=method, **setting))
    state = get_vcon_state(model)
    assert state.targeted_module_names == ["attention.in_proj_weight", "attention.out_proj"]
    assert all(isinstance(layer, VConWeight) for layer in state.layers)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), atol=1e-6, rtol=0)
        set_beta(model, 0.3)
        blended = model(x)
        by_hand = copy.deepcopy(original)
        for name, layer in zip(state.targeted_module_names, state.layers):
            weight = 0.3 * layer.latent_weight() + 0.7 * layer.compressed_weight()
            target = by_hand.attention if name.endswith("in_proj_weight") else by_hand.attention.out_proj
            getattr(target, "in_proj_weight" if name.endswith("in_proj_weight") else "weight").copy_(weight)
        torch.testing.assert_close(blended, by_hand(x), atol=1e-5, rtol=0)
        set_beta(model, 0.0)
        torch.testing.assert_close(merge_and_unload(copy.deepcopy(model))(x), model(x), atol=1e-5, rtol=0)
    model.train()
    set_beta(model, 0.5)
    model(x).sum().backward()
    for layer in state.layers:
        assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in [layer.weight, *layer.compressed_params().values()])


def test_attention_that_reads_projection_weights_gets_them_parametrized():
    case = by_key("wavlm")
    state = get_vcon_state(apply_vcon(case.build(), VConConfig(method="binary")))
    kinds = {name.rsplit(".", 1)[1]: type(layer).__name__ for name, layer in zip(state.targeted_module_names, state.layers)
             if ".attention." in name}
    assert kinds == {"q_proj": "VConWeight", "k_proj": "VConWeight", "v_proj": "VConWeight", "out_proj": "VConWeight",
                     "gru_rel_pos_linear": "VConLinear"}
    t5 = get_vcon_state(apply_vcon(by_key("t5").build(), VConConfig(method="binary")))
    assert all(isinstance(layer, VConLinear) for layer in t5.layers)  # T5 reads wo.weight's dtype only


class Bypass(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        weight = getattr(self, "proj").weight  # read where the source pattern cannot see it
        return x @ weight.t()


def test_a_bypassed_layer_is_refused_at_every_forward_never_silently_wrong():
    model = apply_vcon(Bypass(), VConConfig(method="binary"))
    for _ in range(2):
        with pytest.raises(VConError, match=r"read the weight of VCON layer\(s\) \['proj'\] without calling them"):
            model(torch.randn(2, 4))
    fine = apply_vcon(nn.Sequential(nn.Linear(4, 4)), VConConfig(method="binary"))
    fine(torch.randn(2, 4))
    assert not get_vcon_state(fine).audit_pending


# ----------------------------------------------------------------------------------------- all-linear's edges
@pytest.mark.parametrize("key, heads", [
    ("roberta", ["classifier.dense", "classifier.out_proj"]),
    ("bart:seqcls", ["classification_head.dense", "classification_head.out_proj"]),
    ("deit", ["cls_classifier", "distillation_classifier"]),
    ("wav2vec2", ["lm_head"]),
    ("xlnet", ["sequence_summary.summary", "logits_proj"]),
    ("llama", ["lm_head"]),
])
def test_all_linear_leaves_the_task_head_dense_and_a_head_can_be_named(key, heads):
    case = by_key(key)
    names = get_vcon_state(apply_vcon(case.build(), VConConfig(method="binary"))).targeted_module_names
    assert not set(heads) & set(names) and names
    named = apply_vcon(case.build(), VConConfig(method="binary", target_modules=heads))
    assert get_vcon_state(named).targeted_module_names == heads


def test_all_linear_leaves_layers_a_setting_cannot_take_dense_with_a_warning():
    case = by_key("swinv2")  # continuous_position_bias_mlp.0 is Linear(2, 512): no 2:4 groups in 2 inputs
    with pytest.warns(VConWarning, match=r"all-linear': \d+ layer\(s\) cannot take .*continuous_position_bias_mlp\.0"):
        model = apply_vcon(case.build(), VConConfig(method="prune", prune_pattern="2:4"))
    assert not [n for n in get_vcon_state(model).targeted_module_names if n.endswith("continuous_position_bias_mlp.0")]
    with pytest.raises(ValueError, match=r"needs in_features divisible by 4, but layer '.*continuous_position_bias_mlp.0'"):
        apply_vcon(case.build(), VConConfig(method="prune", prune_pattern="2:4", target_modules=r".*bias_mlp\.0"))


def test_a_layer_too_small_to_factorise_is_named():
    with pytest.raises(ValueError, match=r"layer '0' of shape \(1, 8\) cannot be factorised smaller"):
        apply_vcon(nn.Sequential(nn.Linear(8, 1)), VConConfig(method="lowrank", rank=1, target_modules=["0"]))


# ----------------------------------------------------------------------------------------------- ZeRO-3
@contextmanager
def simulated_zero3(model: nn.Module):
    """Partition every Linear weight as DeepSpeed ZeRO-3 does (empty local data, ``ds_shape``/``ds_id`` set), with a
    stand-in for ``deepspeed.zero.GatheredParameters`` that restores the full values while gathered."""
    full = {}
    for module in model.modules():
        if isinstance(module, nn.Linear):
            weight = module.weight
            full[id(weight)] = weight.data
            weight.ds_shape, weight.ds_id = weight.shape, len(full)
            weight.data = torch.empty(0, dtype=weight.dtype)

    @contextmanager
    def gathered(params, modifier_rank=None):
        for param in params:
            param.data = full[id(param)]
        yield
        for param in params:
            param.data = torch.empty(0, dtype=param.dtype)

    fake = types.ModuleType("deepspeed")
    fake.zero = types.SimpleNamespace(GatheredParameters=gathered)
    saved = sys.modules.get("deepspeed")
    sys.modules["deepspeed"] = fake
    try:
        yield full
    finally:
        if saved is None:
            sys.modules.pop("deepspeed", None)
        else:
            sys.modules["deepspeed"] = saved


@pytest.mark.parametrize("method, setting", SOLO_METHOD_CASES)
def test_apply_vcon_reads_zero3_partitioned_weights_whole(method, setting):
    case = by_key("bert")
    model, reference = case.build(), case.build()
    with simulated_zero3(model) as full:
        apply_vcon(model, VConConfig(method=method, **setting))
        state = get_vcon_state(model)
        assert state.targeted_module_names
        expected = apply_vcon(reference, VConConfig(method=method, **setting))
        for layer, twin in zip(state.layers, get_vcon_state(expected).layers):
            assert (layer.out_features, layer.in_features) == (twin.out_features, twin.in_features)
            for key, value in layer.compressed_params().items():  # low-rank factors: from the full weight
                torch.testing.assert_close(value, twin.compressed_params()[key], atol=1e-6, rtol=0)
        assert all(layer.weight.numel() == 0 for layer in state.layers) and len(full) > 0


DEEPSPEED_SCRIPT = """
import os, sys, torch
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed
from transformers import BertConfig, BertForSequenceClassification
from transformers.integrations import HfDeepSpeedConfig
from hf_vcon import VConConfig, apply_vcon, get_vcon_state, set_beta
from hf_vcon.patching.distributed import gathered_for_reading, prepare_zero3

deepspeed.init_distributed(dist_backend="gloo")
ds_config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3},
             "optimizer": {"type": "SGD", "params": {"lr": 0.1}}, "zero_allow_untested_optimizer": True}
keep = HfDeepSpeedConfig(ds_config)  # from_pretrained / _from_config partition at once, as under the Trainer
model = BertForSequenceClassification._from_config(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
    num_attention_heads=4, intermediate_size=64, max_position_embeddings=64))
query = model.bert.encoder.layer[0].attention.self.query.weight
assert query.numel() == 0 and tuple(query.ds_shape) == (32, 32)  # partitioned
apply_vcon(model, VConConfig(method="lowrank", rank=4))
layer = get_vcon_state(model).layers[0]
assert (layer.out_features, layer.in_features) == (32, 32)
with gathered_for_reading([layer.weight]):  # the factors are the rank-4 SVD of the whole weight
    u, s, vh = torch.linalg.svd(layer.weight.detach().float())
    best = (u[:, :4] * s[:4]) @ vh[:4]
    assert torch.allclose(layer.vcon_B @ layer.vcon_A, best, atol=1e-5)
prepare_zero3(model)
engine, *_ = deepspeed.initialize(model=model, config=ds_config)
set_beta(engine.module, 0.5)
out = engine(input_ids=torch.randint(0, 99, (2, 7)), labels=torch.tensor([0, 1]))
engine.backward(out.loss)
engine.step()
print("ZERO3 OK", float(out.loss))
"""


@pytest.mark.slow
def test_real_deepspeed_zero3_partitioned_model_trains():
    """With DeepSpeed installed (CPU accelerator, one gloo rank): apply_vcon reads partitioned shapes, builds the
    low-rank factors from the gathered weight, and a ZeRO-3 engine trains a step at β = 0.5."""
    pytest.importorskip("deepspeed")
    import os
    import random
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", DEEPSPEED_SCRIPT, str(random.randint(20000, 40000))], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "ZERO3 OK" in result.stdout, result.stdout[-2000:] + result.stderr[-4000:]


@pytest.mark.parametrize("key", ["bert", "mixtral", "siglip_vision_model"])
def test_zero3_leaves_hold_every_unit_with_its_weight_whatever_the_unit_kind(key, monkeypatch):
    """ZeRO-3 gathers a leaf module's parameters whole before its forward: for every VCON unit (VConLinear, or the
    VConWeight of fused experts / MultiheadAttention), the module that reads it is a leaf holding W and its tensors."""
    from hf_vcon.layers.protocol import VConUnit
    from hf_vcon.patching.distributed import prepare_zero3

    case = by_key(key)
    if not hasattr(transformers, case.model_class):
        pytest.skip(f"{case.model_class} is not in this transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VConWarning)
        model = apply_vcon(case.build(), VConConfig(method="binary"))
    marked = []
    fake = types.ModuleType("deepspeed.utils")
    fake.set_z3_leaf_modules = lambda model, classes: marked.extend(classes)
    monkeypatch.setitem(sys.modules, "deepspeed", types.ModuleType("deepspeed"))
    monkeypatch.setitem(sys.modules, "deepspeed.utils", fake)
    prepare_zero3(model)
    units = [module for module in model.modules() if isinstance(module, VConUnit)]
    if key == "siglip_vision_model" or key == "mixtral" and int(transformers.__version__.split(".")[0]) >= 5:
        assert any(isinstance(unit, VConWeight) for unit in units)  # 4.x keeps one Linear per expert
    leaves = [module for module in model.modules() if type(module) in marked]
    for unit in units:
        held = [leaf for leaf in leaves if any(part is unit for part in leaf.modules())]
        assert held, f"no ZeRO-3 leaf holds {type(unit).__name__}"
        owned = {id(param) for param in held[0].parameters()}
        assert all(id(param) in owned for param in [unit.weight, *unit.compressed_params().values()])
