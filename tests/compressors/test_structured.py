"""Structured pruning (method="structured"): the same MLP neurons (and key/value groups) removed from every block's
coupled layers, scored from their latent weights, and a physically smaller checkpoint that plain from_pretrained
loads, with logits equal to the patched model's at β = 0."""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch
import transformers
from architectures import by_key
from conftest import TinyTextDataset, tiny_bert
from safetensors import safe_open

from hf_vcon import (
    NeuronCoupling,
    UnsupportedLayerError,
    VConConfig,
    VConError,
    VConTrainer,
    VConWarning,
    apply_vcon,
    get_vcon_state,
    merge_and_unload,
    merged_state_dict,
    register_coupling,
    save_compressed,
    save_merged,
    set_beta,
    set_step,
    vcon_summary,
)
from hf_vcon.compressors.structured import couplings

# key → (settings, the config fields the merged model must have, per setting)
CASES = {
    "bert": {"intermediate_size": 32},
    "roberta": {"intermediate_size": 32},
    "vit": {"intermediate_size": 32},
    "gpt2": {"n_inner": 64},
    "llama": {"intermediate_size": 32, "num_key_value_heads": 1, "num_attention_heads": 2, "head_dim": 8},
    "qwen2": {"intermediate_size": 32, "num_key_value_heads": 1, "num_attention_heads": 2, "head_dim": 8},
}
HEADS = {"llama", "qwen2"}


def structured(key, **options):
    options.setdefault("neuron_sparsity", 0.5)
    if key in HEADS:
        options.setdefault("head_sparsity", 0.5)
    return VConConfig(method="structured", transition_steps=10, **options)


def output(model, case, inputs=None):
    with torch.no_grad():
        return getattr(model(**(inputs or case.inputs())), case.output_key)


def patched(key, **options):
    case = by_key(key)
    original = case.build()
    return case, original, apply_vcon(copy.deepcopy(original), structured(key, **options))


def numel(model) -> int:
    return sum(param.numel() for param in model.parameters())


def merged_and_reloaded(model, case, folder):
    """β = 0: the patched model's output, and the model its merged checkpoint reloads as with plain transformers."""
    set_beta(model, 0.0)
    expected = output(model, case)
    save_merged(model, folder)
    return expected, getattr(transformers, case.reload_class).from_pretrained(folder).eval()  # no hf_vcon involved


# ------------------------------------------------------------------------------------ the promise, per model
@pytest.mark.parametrize("key", list(CASES))
def test_the_smaller_checkpoint_loads_plainly_and_equals_the_beta_zero_model(key, tmp_path):
    case, original, model = patched(key)
    torch.testing.assert_close(output(model, case), output(original, case), atol=1e-6, rtol=0)  # β = 1
    expected, reloaded = merged_and_reloaded(model, case, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert {field: saved[field] for field in CASES[key]} == CASES[key]
    torch.testing.assert_close(output(reloaded, case), expected, atol=1e-5, rtol=0)
    assert numel(reloaded) < numel(original)

    # The tensors themselves are smaller: as many as the original's, each at the shape transformers builds from the
    # saved config, fewer numbers in all.
    original.save_pretrained(tmp_path / "original")
    type(original)(reloaded.config).save_pretrained(tmp_path / "from_config")
    stored = stored_shapes(tmp_path)
    assert stored == stored_shapes(tmp_path / "from_config")
    assert stored.keys() == stored_shapes(tmp_path / "original").keys()
    assert sum(map(np.prod, stored.values())) < sum(map(np.prod, stored_shapes(tmp_path / "original").values()))

    merged = merge_and_unload(model)
    assert {field: getattr(merged.config, field) for field in CASES[key]} == CASES[key]
    torch.testing.assert_close(output(merged, case), expected, atol=1e-5, rtol=0)
    assert {k: v.shape for k, v in merged.state_dict().items()} == {k: v.shape for k, v in reloaded.state_dict().items()}


def stored_shapes(folder) -> dict:
    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}


def scores_by_hand(weights: list[np.ndarray], along: list[str], units: int) -> np.ndarray:
    """Σ ‖coupled rows‖² + Σ ‖coupled columns‖² per unit, in float64."""
    total = np.zeros(units)
    for weight, side in zip(weights, along):
        squares = (weight.astype(np.float64) ** 2).sum(axis=1 if side == "rows" else 0)
        total += squares.reshape(units, -1).sum(axis=1)
    return total


@pytest.mark.parametrize("key", ["bert", "gpt2", "llama"])
def test_every_block_keeps_its_k_best_units_by_the_coupled_l2_norm(key):
    _, _, model = patched(key)
    groups = {}
    for layer in get_vcon_state(model).layers:
        groups.setdefault(id(layer.compressor.group), []).append(layer)
    for members in groups.values():
        block = members[0].compressor.group.block
        weights = [layer.latent_weight().detach().numpy() for layer in members]
        scores = scores_by_hand(weights, list(block.along), block.units)
        k = members[0].compressor.kept_units()
        assert k == block.units - round(block.units * 0.5)
        kept_units = np.sort(np.argsort(-scores, kind="stable")[:k])
        for layer, side, width in zip(members, block.along, block.widths):
            kept = np.repeat(np.isin(np.arange(block.units), kept_units), width)
            compressed = layer.compressed_weight().numpy()
            latent = layer.latent_weight().detach().numpy()
            expected = latent * (kept[:, None] if side == "rows" else kept[None, :])
            np.testing.assert_array_equal(compressed, expected)


def test_the_mask_follows_the_coupled_weights_and_every_optimizer_step():
    _, _, model = patched("bert")
    set_step(model, 0)
    set_beta(model, 0.0)
    producer, consumer = get_vcon_state(model).layers[:2]
    before = producer.compression_state().clone()
    first, second = (int(index) for index in torch.nonzero(~before)[:2, 0])
    with torch.no_grad():  # a change to one coupled layer makes a removed neuron the strongest of its block
        consumer.weight[:, first] = 100.0
    after = producer.compression_state()
    assert after[first] and int(after.sum()) == int(before.sum())
    assert torch.equal(consumer.compression_state(), after)  # the coupled layers share one mask

    # A fused optimizer writes the weights without bumping their versions: the next optimizer step still recomputes.
    consumer.weight.data[:, second] = 200.0
    assert not producer.compression_state()[second]  # the same step: the mask stays, as for unstructured pruning
    set_step(model, 1)
    assert producer.compression_state()[second] and consumer.compression_state()[second]


def test_removed_units_learn_during_the_transition_only_with_vcon():
    """Straight-through, a removed unit's weights get the gradient of their blended (β-scaled) use; GMP's get none.
    (At β = 0 the coupled zero columns block their gradient: the kept set settles once the transition is over.)"""
    for transition in ("vcon", "gmp"):
        _, _, model = patched("llama", transition=transition)
        model.train()
        set_step(model, 5)  # β = 0.5; GMP: half-way up its ramp
        model(**by_key("llama").labels_inputs()).loss.backward()
        for layer in get_vcon_state(model).layers:
            removed = ~layer.compressor.kept_mask(layer.latent_weight(), layer.compression_state())
            grad = layer.weight.grad
            if transition == "gmp":
                assert torch.all(grad[removed] == 0)
            else:
                assert grad[removed].abs().sum() > 0


def test_gmp_ramps_neurons_and_heads_together():
    _, _, model = patched("llama", transition="gmp")
    compressor = get_vcon_state(model).layers[0].compressor
    set_step(model, 5)
    ramped = get_vcon_state(model).layers[0].compressor
    assert ramped is not compressor and ramped.group is compressor.group
    assert 0 < ramped.options.neuron_sparsity < 0.5 and 0 < ramped.options.head_sparsity < 0.5
    set_step(model, 10)
    final = get_vcon_state(model).layers[0].compressor.options
    assert (final.neuron_sparsity, final.head_sparsity) == (0.5, 0.5)


def test_the_state_dict_path_reads_the_group_from_the_state_dict():
    """FSDP / ZeRO-3 pass a full state dict while the modules hold shards: the mask must come from the state dict."""
    _, _, model = patched("llama")
    set_beta(model, 0.0)
    full = {key: value.clone() for key, value in model.state_dict().items()}
    expected = merged_state_dict(model)
    with torch.no_grad():
        for layer in get_vcon_state(model).layers:
            layer.weight.zero_()  # what a rank sees of a weight it does not hold
    actual = merged_state_dict(model, full)
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


@pytest.mark.skipif(int(transformers.__version__.split(".")[0]) < 5, reason="block-wise VCON needs transformers >= 5")
def test_block_wise_vcon_shrinks_every_block_copy(tmp_path):
    case, original, _ = patched("bert")
    config = VConConfig(method="structured", neuron_sparsity=0.5, granularity="block",
                        target_blocks=r"bert\.encoder\.layer\.\d+")
    expected, reloaded = merged_and_reloaded(apply_vcon(copy.deepcopy(original), config), case, tmp_path)
    assert reloaded.config.intermediate_size == 32
    torch.testing.assert_close(output(reloaded, case), expected, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("kwargs, error, message", [
    (dict(exclude_modules=["bert.encoder.layer.1.output.dense"]), ValueError,
     r"every coupled layer must be targeted.*'bert.encoder.layer.1.output.dense'"),
    (dict(target_modules=r".*layer\.0\.(intermediate|output)\.dense"), ValueError, r"not targeted: \['bert.encoder.layer.1"),
    (dict(module_overrides={r".*layer\.1\..*": {"neuron_sparsity": 0.25}}), ValueError, "module_overrides give it 2"),
    (dict(module_overrides={r".*output\.dense": {"method": "prune"}}), ValueError, "with another method"),
    (dict(head_sparsity=0.5), ValueError, r"'bert' model cannot lose attention heads.*head_dim"),
    (dict(neuron_sparsity=0.995), ValueError, r"neuron_sparsity=0.995 removes all 64 neurons"),
    (dict(target_modules=["query", "intermediate.dense", "output.dense"]), UnsupportedLayerError, "query"),
])
def test_what_structured_pruning_cannot_express_is_refused_before_the_model_changes(kwargs, error, message):
    model = tiny_bert()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=message):
        apply_vcon(model, VConConfig(method="structured", **{"neuron_sparsity": 0.5, **kwargs}))
    assert get_vcon_state(model) is None
    assert all(torch.equal(model.state_dict()[key], value) for key, value in before.items())


@pytest.mark.skipif(int(transformers.__version__.split(".")[0]) < 5,
                    reason="LlamaConfig validates head counts from transformers 5 on")
def test_heads_whose_count_the_config_validator_rejects_are_refused_at_apply_vcon():
    # LlamaConfig checks hidden_size % num_attention_heads even with an explicit head_dim: 3 of 4 groups = 6 heads
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=64, num_attention_heads=8, num_key_value_heads=4,
                                      head_dim=8, num_hidden_layers=1, vocab_size=50)
    with pytest.raises(ValueError, match=r"(?s)'num_attention_heads': 6.*transformers refuses.*divides hidden_size"):
        apply_vcon(transformers.LlamaModel(config), VConConfig(method="structured", head_sparsity=0.25))
    apply_vcon(transformers.LlamaModel(config), VConConfig(method="structured", head_sparsity=0.5))


def test_an_unknown_architecture_is_refused_and_a_declared_coupling_prunes_it(monkeypatch, tmp_path):
    monkeypatch.setattr(couplings, "_REGISTERED", {})
    monkeypatch.delitem(couplings._BUILT_IN, "opt")  # OPT as a model type the table does not know
    case, original = by_key("opt"), by_key("opt").build()
    with pytest.raises(ValueError, match=r"'opt' model are coupled.*register_coupling\('opt'"):
        apply_vcon(copy.deepcopy(original), VConConfig(method="structured"))

    register_coupling("opt", NeuronCoupling(producers=("fc1",), consumers=("fc2",), size_field="ffn_dim"))
    model = apply_vcon(copy.deepcopy(original), VConConfig(method="structured", neuron_sparsity=0.25))
    expected, reloaded = merged_and_reloaded(model, case, tmp_path)
    assert reloaded.config.ffn_dim == 48
    torch.testing.assert_close(output(reloaded, case), expected, atol=1e-5, rtol=0)
    with pytest.raises(TypeError, match="one coupling per kind"):
        register_coupling("x", NeuronCoupling(("a",), ("b",), "n"), NeuronCoupling(("c",), ("d",), "n"))


def test_a_coupling_that_does_not_fit_the_model_is_refused(monkeypatch):
    monkeypatch.setattr(couplings, "_REGISTERED", {})
    register_coupling("bert", NeuronCoupling(("intermediate.dense",), ("output.proj",), "intermediate_size"))
    with pytest.raises(ValueError, match=r"block 'bert.encoder.layer.0' has .* but not the layers it is coupled with"):
        apply_vcon(tiny_bert(), VConConfig(method="structured"))
    register_coupling("bert", NeuronCoupling(("intermediate.dense",), ("attention.output.dense",), "intermediate_size"))
    with pytest.raises(ValueError, match=r"has 32 columns, which do not split into the 64 neurons"):
        apply_vcon(tiny_bert(), VConConfig(method="structured"))
    register_coupling("bert", NeuronCoupling(("intermediate.dense",), ("output.dense",), "ffn_size"))
    with pytest.raises(ValueError, match="its config has no field 'ffn_size'"):
        apply_vcon(tiny_bert(), VConConfig(method="structured"))


def test_the_compact_format_refuses_and_points_to_the_merged_model(tmp_path):
    _, _, model = patched("bert")
    with pytest.raises(VConError, match="already the compact form.*save_merged"):
        save_compressed(model, tmp_path / "compact")
    assert not (tmp_path / "compact").exists()


def test_a_weight_alone_cannot_be_structurally_pruned():
    from hf_vcon.compressors.structured.pruner import StructuredPruner

    with pytest.raises(VConError, match="coupled layers of a block together"):
        StructuredPruner().compress(torch.randn(4, 4))


# ------------------------------------------------------------------------------------------------- trainer
def test_trainer_saves_the_smaller_model_with_its_sizes_on_the_card(tmp_path):
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4,
                                          learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VConWarning)
        trainer = VConTrainer(model=tiny_bert(), args=args, train_dataset=TinyTextDataset(),
                              vcon_config=VConConfig(method="structured", neuron_sparsity=0.75, transition_steps=2))
        trainer.train()
        trainer.save_model()
    set_beta(trainer.model, 0.0)
    batch = TinyTextDataset()[0]["input_ids"][None]
    with torch.no_grad():
        expected = trainer.model.eval()(input_ids=batch).logits
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert reloaded.config.intermediate_size == 16
    torch.testing.assert_close(reloaded(input_ids=batch).logits, expected, atol=1e-5, rtol=0)
    card = (tmp_path / "README.md").read_text()
    assert "| intermediate_size | 64 → 16 |" in card
    summary = vcon_summary(trainer.model)
    assert summary.params_after == summary.params_before // 4
