"""A training step never makes the host wait for the device: one optimizer step (``set_step``, forward, backward,
optimizer) of a patched model makes exactly the synchronising operations (:mod:`sync_count`) its dense model makes,
for every registered compression, layer-wise and block-wise, on fused experts, mid-transition and after, in fp32
and under bf16 autocast. The steps run hf_vcon's accelerator paths (:func:`sync_count.as_on_an_accelerator`): on a CPU,
where reading a value back is free, pruning searches its cut near the previous one, which reads values back."""

from __future__ import annotations

import functools

import pytest
import torch
import transformers

from architectures import by_key
from conftest import METHOD_CASES, SETTING_CASES, SOLO_METHOD_CASES, build, tiny_inputs, vcon_config
from hf_vcon import apply_vcon, set_step
from sync_count import as_on_an_accelerator, count_syncs

TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
Q = 4  # transition steps: step 2 is mid-transition (β = 0.5), step 5 after it (β = 0)
PHASES = {"transition": (1, 2), "after": (4, 5), "new window": (2, 3)}  # (a step that warms up, the step counted)
BLOCKS = {"bert": r"bert\.encoder\.layer\.\d+"}


@pytest.fixture(autouse=True)
def _accelerator_paths():
    with as_on_an_accelerator():
        yield


def _bert_batch():
    return {**tiny_inputs("bert"), "labels": torch.tensor([0, 2])}


def _mixtral_batch():
    return by_key("mixtral").labels_inputs()


MODELS = {"bert": (lambda: build("bert").train(), _bert_batch),
          "mixtral": (lambda: by_key("mixtral").build().train(), _mixtral_batch)}


def training_step(model, batch, optimizer, step, autocast: bool, patched: bool = True):
    if patched:
        set_step(model, step)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def _optimizer(model):
    # SGD with momentum reads no scalar of its own (AdamW on CPU reads each parameter's step count): what is counted
    # is the model's
    return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)


@functools.lru_cache(maxsize=None)
def dense_syncs(kind: str, autocast: bool) -> int:
    build_model, batch = MODELS[kind]
    model = build_model()
    optimizer = _optimizer(model)
    training_step(model, batch(), optimizer, 0, autocast, patched=False)
    return count_syncs(lambda: training_step(model, batch(), optimizer, 1, autocast, patched=False)).total


def assert_sync_free(kind: str, config, phase: str, autocast: bool) -> None:
    build_model, batch = MODELS[kind]
    model = apply_vcon(build_model(), config)
    optimizer = _optimizer(model)
    warm, counted = PHASES[phase]
    training_step(model, batch(), optimizer, 0, autocast)
    training_step(model, batch(), optimizer, warm, autocast)
    counter = count_syncs(lambda: training_step(model, batch(), optimizer, counted, autocast))
    extra = counter.total - dense_syncs(kind, autocast)
    assert extra == 0, f"{extra} synchronising operation(s) more than the dense model: {dict(counter.sites)}"


DTYPES = [pytest.param(False, id="fp32"), pytest.param(True, id="bf16-autocast")]


@pytest.mark.parametrize("autocast", DTYPES)
@pytest.mark.parametrize("phase", ["transition", "after"])
@pytest.mark.parametrize("method, setting", SETTING_CASES)
def test_layer_wise_step_is_sync_free(method, setting, phase, autocast):
    assert_sync_free("bert", vcon_config(method, setting, transition_steps=Q), phase, autocast)


@pytest.mark.skipif(not TRANSFORMERS_5, reason="block-wise VCON needs transformers >= 5")
@pytest.mark.parametrize("autocast", DTYPES)
@pytest.mark.parametrize("phase", ["transition", "after"])
@pytest.mark.parametrize("method, setting", METHOD_CASES)
def test_block_wise_step_is_sync_free(method, setting, phase, autocast):
    config = vcon_config(method, setting, transition_steps=Q, granularity="block", target_blocks=BLOCKS["bert"])
    assert_sync_free("bert", config, phase, autocast)


@pytest.mark.skipif(not TRANSFORMERS_5, reason="transformers 4 stores experts as Linears")
@pytest.mark.parametrize("autocast", DTYPES)
@pytest.mark.parametrize("phase", ["transition", "after"])
@pytest.mark.parametrize("method, setting", SOLO_METHOD_CASES)
def test_fused_experts_step_is_sync_free(method, setting, phase, autocast):
    assert_sync_free("mixtral", vcon_config(method, setting, transition_steps=Q), phase, autocast)


@pytest.mark.parametrize("autocast", DTYPES)
@pytest.mark.parametrize("phase", ["transition", "after"])
@pytest.mark.parametrize("setting", [pytest.param({"bits": 8, "activations": "int8"}, id="W8A8-int8"),
                                     pytest.param({"format": "fp8", "activations": "fp8"}, id="FP8-dynamic"),
                                     pytest.param({"scheme": "FP8"}, id="FP8-static"),
                                     pytest.param({"scheme": "NVFP4"}, id="NVFP4-W4A4"),
                                     pytest.param({"scheme": "MXFP4"}, id="MXFP4-W4A4")])
def test_step_with_quantized_inputs_is_sync_free(setting, phase, autocast):
    """The activation-quantizing path (g(x) = C·Q(x) + b, outputs blended; FP8 and NVFP4 also fold max|x| into the
    layer's observer) is not among the example settings, whose merged model must equal β = 0: it has its own cases
    here."""
    assert_sync_free("bert", vcon_config("quant", setting, transition_steps=Q), phase, autocast)


@pytest.mark.skipif(not TRANSFORMERS_5, reason="transformers 4 stores experts as Linears")
@pytest.mark.parametrize("phase", ["transition", "after"])
@pytest.mark.parametrize("setting", [pytest.param({"scheme": "FP8"}, id="FP8-static"),
                                     pytest.param({"scheme": "NVFP4"}, id="NVFP4-W4A4"),
                                     pytest.param({"scheme": "MXFP4"}, id="MXFP4-W4A4")])
def test_decoder_step_with_quantized_inputs_is_sync_free(setting, phase):
    """A decoder too (Mixtral's attention and router-free Linears; its fused experts take no input quantization)."""
    config = vcon_config("quant", setting, transition_steps=Q, exclude_modules=r".*experts.*")
    assert_sync_free("mixtral", config, phase, False)


@pytest.mark.parametrize("phase", ["transition", "after"])
@pytest.mark.parametrize("setting", [{"sparsity": 0.5}, {"sparsity": 0.75, "prune_pattern": "row"}])
def test_gradual_pruning_step_is_sync_free(setting, phase):
    assert_sync_free("bert", vcon_config("prune", setting, transition_steps=Q, transition="gmp"), phase, False)


@pytest.mark.parametrize("method, setting", [pytest.param("prune", {"sparsity": 0.5}, id="prune"),
                                             pytest.param("binary", {}, id="binary")])
def test_step_with_recompute_every_is_sync_free(method, setting):
    assert_sync_free("bert", vcon_config(method, setting, transition_steps=Q, recompute_every=3), "new window", False)


def test_the_counter_sees_what_synchronises():
    weight = torch.randn(6, 6)
    counter = count_syncs(lambda: (float(weight.sum()), weight[weight > 0], torch.equal(weight, weight),
                                   weight.nonzero(), torch.repeat_interleave(torch.tensor([1, 2]))))
    assert counter.counts["_local_scalar_dense"] >= 1 and counter.counts["index (boolean index)"] == 1
    assert counter.counts["equal"] == 1 and counter.counts["nonzero"] >= 1
    assert counter.counts["repeat_interleave (no output_size)"] == 1
    quiet = count_syncs(lambda: (weight.abs().kthvalue(3, dim=-1), weight.cumsum(0), weight[torch.tensor([0, 2])],
                                 torch.where(weight > 0, weight, 0.0)))
    assert quiet.total == 0, dict(quiet.counts)
