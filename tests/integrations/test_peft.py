"""VCON with PEFT: LoRA adapters on VCON layers honoured at every β (the QLoRA / LoftQ-style recipe: compress a
frozen base smoothly while the adapters compensate), adapters on other layers, PEFT first and VCON after, saving the
compressed base and the adapters apart, and clear errors for what cannot work."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel
from peft import get_peft_model as peft_get_peft_model
from transformers import AutoModelForSequenceClassification

from conftest import FLOAT32, SOLO_METHOD_CASES, TinyTextDataset, build, logits, vcon_config
from hf_vcon import (
    VConConfig,
    VConError,
    apply_vcon,
    get_peft_model,
    get_vcon_state,
    merge_and_unload,
    save_merged,
    set_beta,
)


def with_lora(method, setting, targets=("query",), lora_targets=("query",)):
    torch.manual_seed(0)
    model = apply_vcon(build("bert"), vcon_config(method, setting, target_modules=list(targets)))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(lora_targets), init_lora_weights=False)
    return get_peft_model(model, config)


def test_lora_on_a_layer_the_compression_resizes_is_refused():
    torch.manual_seed(0)
    model = apply_vcon(build("bert"), VConConfig(method="structured", neuron_sparsity=0.5, transition_steps=4,
                                                 target_modules=r".*layer\.\d+\.(intermediate|output)\.dense"))
    with pytest.raises(VConError, match="method='structured' removes rows or columns of this layer"):
        get_peft_model(model, LoraConfig(r=4, target_modules=["intermediate.dense"]))


def lora_delta(layer, x):
    """s·B·A·x of a LoRA layer's default adapter, by hand."""
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    return (x @ a.t() @ b.t()) * layer.scaling["default"]


@pytest.mark.parametrize("method, setting", SOLO_METHOD_CASES)
@pytest.mark.parametrize("beta", [1.0, 0.5, 0.0])
def test_lora_on_a_vcon_layer_adds_its_update_to_the_blend_at_every_beta(method, setting, beta):
    model = with_lora(method, setting)
    set_beta(model, beta)
    lora_layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    vcon_layer = lora_layer.base_layer
    assert get_vcon_state(model).layers[0] is vcon_layer
    x = torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(lora_layer(x), vcon_layer(x) + lora_delta(lora_layer, x), atol=1e-6, rtol=0)
        with model.disable_adapter():
            without = logits(model, "bert")
        assert not torch.allclose(logits(model, "bert"), without)  # the adapter changes the model at this β

    model.train()
    model(**{"input_ids": TinyTextDataset(4).input_ids, "labels": TinyTextDataset(4).labels}).loss.backward()
    grad = lora_layer.lora_A["default"].weight.grad
    assert grad is not None and grad.abs().sum() > 0  # the adapter learns at every β
    assert not vcon_layer.weight.requires_grad  # PEFT froze the base: the compression moves, the adapter adapts


def test_the_compressed_base_and_the_adapters_are_saved_apart_and_reload(tmp_path):
    model = with_lora("prune", {"sparsity": 0.5}, targets=("query", "value"), lora_targets=("query", "intermediate.dense"))
    set_beta(model, 0.0)
    expected = logits(model, "bert")
    save_merged(model, tmp_path)
    base = AutoModelForSequenceClassification.from_pretrained(tmp_path, **FLOAT32).eval()
    query = base.bert.encoder.layer[0].attention.self.query.weight
    assert int((query == 0).sum()) == query.numel() // 2 and not hasattr(base, "peft_config")  # compressed, plain
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(reloaded, "bert"), expected, atol=1e-5, rtol=0)


def test_merging_an_adapter_into_a_vcon_layer_is_refused_and_vcon_merges_under_it():
    model = with_lora("binary", {})
    set_beta(model, 0.0)
    expected = logits(model, "bert")
    with pytest.raises(VConError, match="cannot be merged into it"):
        copy.deepcopy(model).merge_and_unload()
    merged = merge_and_unload(model)  # VCON folds; the adapter stays, now on a plain compressed layer
    lora_layer = merged.base_model.model.bert.encoder.layer[0].attention.self.query
    assert type(lora_layer.base_layer).__name__ == "Linear" and get_vcon_state(merged) is None
    torch.testing.assert_close(logits(merged, "bert"), expected, atol=1e-6, rtol=0)
    assert torch.unique(lora_layer.base_layer.weight.abs()).numel() == 1  # sign(W)·mean|W|


def test_peft_first_then_vcon_on_other_layers(tmp_path):
    torch.manual_seed(0)
    peft_model = peft_get_peft_model(build("bert"), LoraConfig(r=2, target_modules=["query"]))
    apply_vcon(peft_model, vcon_config("binary", {}, target_modules=r".*layer\.\d+\.(intermediate|output)\.dense"))
    names = get_vcon_state(peft_model).targeted_module_names
    assert names and not any("lora" in name or "query" in name for name in names)
    set_beta(peft_model, 0.0)
    expected = logits(peft_model, "bert")
    save_merged(peft_model, tmp_path)
    base = AutoModelForSequenceClassification.from_pretrained(tmp_path, **FLOAT32).eval()
    torch.testing.assert_close(logits(PeftModel.from_pretrained(base, tmp_path / "adapter").eval(), "bert"), expected,
                               atol=1e-5, rtol=0)

    other = peft_get_peft_model(build("bert"), LoraConfig(r=2, target_modules=["query"]))
    with pytest.raises(VConError, match=r"matches layers that PEFT adapters hold"):
        apply_vcon(other, vcon_config("binary", {}, target_modules=["query"]))
    all_linear = get_vcon_state(apply_vcon(other, vcon_config("binary", {}))).targeted_module_names
    assert not any(".query" in name or "lora_" in name for name in all_linear)  # adapter layers left alone


def test_an_adapter_put_inside_a_vcon_layer_is_refused_instead_of_skipped():
    model = apply_vcon(build("bert"), vcon_config("binary", {}, target_modules=["query"]))
    peft_model = peft_get_peft_model(model, LoraConfig(r=2, target_modules=["query.base_layer"]))
    set_beta(peft_model, 0.5)
    with pytest.raises(VConError, match=r"adapter sits inside a VCON layer .* hf_vcon.get_peft_model"):
        logits(peft_model, "bert")


def test_vcon_trainer_trains_adapters_and_saves_both(tmp_path):
    from test_trainer import training_args
    from hf_vcon import VConTrainer

    model = with_lora("lowrank", {"rank": 4}, targets=("query", "value"), lora_targets=("query", "value"))
    trainer = VConTrainer(model=model, args=training_args(tmp_path, max_steps=4), train_dataset=TinyTextDataset(),
                          vcon_config=get_vcon_state(model).config)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    trainer.train()
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if "lora_" in n)
    trainer.save_model()
    assert (tmp_path / "adapter" / "adapter_config.json").is_file() and (tmp_path / "model.safetensors").is_file()
    model.eval()
    base = AutoModelForSequenceClassification.from_pretrained(tmp_path, **FLOAT32).eval()
    torch.testing.assert_close(logits(PeftModel.from_pretrained(base, tmp_path / "adapter").eval(), "bert"),
                               logits(model, "bert"), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------- modules_to_save (SEQ_CLS recipe)
SEQ_CLS_METHODS = [("prune", {"sparsity": 0.5}), ("binary", {}), ("quant", {"bits": 4}), ("lowrank", {"rank_ratio": 0.25})]


def seq_cls_lora(method, options, vcon_first=True, targets=("key", "value", "dense")):
    """The LoRA-for-classification recipe: ``task_type="SEQ_CLS"`` trains the classifier in full beside the adapters
    (a ModulesToSaveWrapper); its trained copy and the adapters moved as a training would move them."""
    torch.manual_seed(0)
    config = VConConfig(method=method, transition_steps=0, target_modules=list(targets), **options)
    lora = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query"], init_lora_weights=False)
    if vcon_first:
        model = get_peft_model(apply_vcon(build("bert"), config), lora)
    else:
        model = apply_vcon(peft_get_peft_model(build("bert"), lora), config)
    trained_head = model.base_model.model.classifier.modules_to_save.default
    with torch.no_grad():
        trained_head.weight.add_(torch.randn(trained_head.weight.shape, generator=torch.Generator().manual_seed(1)))
    set_beta(model, 0.0)
    return model.eval(), trained_head


@pytest.mark.parametrize("vcon_first", [True, False], ids=["vcon-then-lora", "lora-then-vcon"])
@pytest.mark.parametrize("method, options", SEQ_CLS_METHODS, ids=[method for method, _ in SEQ_CLS_METHODS])
def test_modules_to_save_base_loads_its_trained_head_and_base_plus_adapter_is_the_model(method, options, vcon_first,
                                                                                        tmp_path):
    model, trained_head = seq_cls_lora(method, options, vcon_first)
    expected = logits(model, "bert")
    save_merged(model, tmp_path)
    base = AutoModelForSequenceClassification.from_pretrained(tmp_path, **FLOAT32).eval()
    assert torch.equal(base.classifier.weight, trained_head.weight)  # alone: the trained head, as PEFT's unload
    assert torch.equal(base.classifier.bias, trained_head.bias)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(reloaded, "bert"), expected, atol=1e-5, rtol=0)


def test_modules_to_save_in_the_compact_format(tmp_path):
    from hf_vcon import load_compressed, save_compressed

    model, trained_head = seq_cls_lora("quant", {"bits": 4})
    expected = logits(model, "bert")
    save_compressed(model, tmp_path)
    base = load_compressed(tmp_path)
    assert torch.equal(base.classifier.weight, trained_head.weight)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(reloaded, "bert"), expected, atol=1e-5, rtol=0)


def test_a_vcon_layer_in_modules_to_save_is_refused_when_the_trainer_is_built(tmp_path):
    from test_trainer import training_args
    from hf_vcon import VConTrainer

    model, _ = seq_cls_lora("prune", {"sparsity": 0.5}, targets=("value", "classifier"))
    message = r"VCON layer 'classifier' is inside PEFT's modules_to_save wrapper .*exclude_modules=\['classifier'\]"
    with pytest.raises(VConError, match=message):
        VConTrainer(model=model, args=training_args(tmp_path, max_steps=1), train_dataset=TinyTextDataset(),
                    vcon_config=get_vcon_state(model).config)
    with pytest.raises(VConError, match=message):
        save_merged(model, tmp_path / "merged", format="dense")
    assert not (tmp_path / "merged").exists()
