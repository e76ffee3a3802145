"""Per-module settings (``module_overrides``): through apply_vcon (layer- and block-wise), the transitions, the trainer,
both exports, the summary, the model card and the example scripts."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers
from transformers import AutoModelForSequenceClassification

from conftest import TinyTextDataset, build, logits
from hf_vcon import (
    LowRankLinear,
    VConConfig,
    apply_vcon,
    get_vcon_state,
    load_compressed,
    merge_and_unload,
    save_compressed,
    set_beta,
    set_step,
    vcon_summary,
)
from hf_vcon.export.compact_save import COMPACT_CONFIG_NAME
from test_core import as_linear_weight

OVERRIDES = {r".*attention.*": {"sparsity": 0.5}, r".*intermediate.*": {"method": "lowrank", "rank_ratio": 0.25}}
TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5


def overridden(**extra) -> VConConfig:
    return VConConfig(method="prune", sparsity=0.9, module_overrides=OVERRIDES, **extra)


def expected_setting(name: str) -> tuple[str, float]:
    if ".attention." in name:
        return "prune", 0.5
    if ".intermediate." in name:
        return "lowrank", 0.25
    return "prune", 0.9


def assert_merged_per_module(merged, names):
    for name in names:
        weight = as_linear_weight(merged.get_submodule(name)).detach()
        method, value = expected_setting(name)
        if method == "prune":
            assert int((weight == 0).sum()) == round(weight.numel() * value), name
        else:
            rank = round(value * min(weight.shape))
            singular = torch.linalg.svdvals(weight.double())
            assert (singular[rank:] <= 1e-5 * singular[0]).all(), name


# ------------------------------------------------------------------------------------------- patching
@pytest.mark.parametrize("granularity", ["layer", "block"])
def test_each_module_gets_its_setting_and_merges_to_it(granularity):
    if granularity == "block" and not TRANSFORMERS_5:
        pytest.skip("block-wise VCON needs transformers >= 5")
    extra = dict(granularity="block", target_blocks=r"bert\.encoder\.layer\.\d+") if granularity == "block" else {}
    original = build("bert")
    model = apply_vcon(copy.deepcopy(original), overridden(**extra))
    state = get_vcon_state(model)
    for name, layer, setting in state.named_layers():
        method, value = expected_setting(name)
        assert layer.compressor.name == setting.method == method, name
    compressors = {id(layer.compressor) for layer in state.layers}
    assert len(compressors) == 3  # one compressor per distinct setting, shared by its layers

    set_beta(model, 0.0)
    expected = logits(model, "bert")
    merged = merge_and_unload(copy.deepcopy(model))
    torch.testing.assert_close(logits(merged, "bert"), expected, atol=1e-5, rtol=0)
    assert_merged_per_module(merged, state.targeted_module_names)


def test_summary_and_card_show_every_setting():
    from hf_vcon import model_card

    model = apply_vcon(build("bert"), overridden())
    summary = vcon_summary(model)
    assert summary.methods == ["prune", "lowrank"]
    rows = summary.table().splitlines()[2:]
    assert len(rows) == 3
    assert any("| 8 | prune | sparsity 0.500 (layer)" in row for row in rows)  # q, k, v, attention output × 2
    assert any("| 2 | lowrank | rank 8" in row for row in rows) and any("sparsity 0.900" in row for row in rows)
    assert {layer.method for layer in summary.layers} == {"prune", "lowrank"}
    card = model_card(model, summary)
    assert "| module_overrides `.*attention.*` | method='prune', sparsity=0.5, prune_pattern='layer' |" in card
    assert "| module_overrides `.*intermediate.*` | method='lowrank', rank=None, rank_ratio=0.25 |" in card
    assert summary.table() in card and "- lowrank" in card and "- prune" in card


def test_compact_checkpoint_records_each_layer_setting(tmp_path):
    model = apply_vcon(build("bert"), overridden())
    set_beta(model, 0.0)
    expected = logits(model, "bert")
    save_compressed(model, tmp_path)
    manifest = json.loads((tmp_path / COMPACT_CONFIG_NAME).read_text())
    for name, entry in manifest["layers"].items():
        method, value = expected_setting(name)
        assert entry["method"] == method
        assert entry["options"]["sparsity" if method == "prune" else "rank_ratio"] == value
    loaded = load_compressed(tmp_path)
    assert isinstance(loaded.bert.encoder.layer[0].intermediate.dense, LowRankLinear)
    torch.testing.assert_close(logits(loaded, "bert"), expected, atol=1e-5, rtol=0)


# -------------------------------------------------------------------------------------------- errors
def test_a_pattern_that_matches_no_targeted_module_is_an_error_and_the_model_stays():
    model = build("bert")
    before = {key: value.clone() for key, value in model.state_dict().items()}
    config = VConConfig(method="prune", target_modules=["query", "value"],
                        module_overrides={r".*intermediate.*": {"sparsity": 0.5}})
    with pytest.raises(ValueError, match=r"module_overrides\['\.\*intermediate\.\*'\] matches none of the 4 targeted"):
        apply_vcon(model, config)
    assert get_vcon_state(model) is None
    assert all(torch.equal(model.state_dict()[key], value) for key, value in before.items())


def test_gradual_pruning_needs_every_setting_to_ramp():
    with pytest.raises(ValueError, match=r"transition='gmp' .* but method='lowrank'"):
        VConConfig(method="prune", transition="gmp", module_overrides={"query": {"method": "lowrank", "rank": 2}})
    with pytest.raises(ValueError, match=r"prune_pattern='2:4' \(a fixed N:M sparsity\) cannot do"):
        VConConfig(method="prune", transition="gmp", module_overrides={"query": {"prune_pattern": "2:4", "sparsity": 0.5}})


def test_recompute_every_applies_when_some_setting_is_recomputed_from_w():
    VConConfig(method="lowrank", rank=2, recompute_every=4, module_overrides={"query": {"method": "binary"}})
    with pytest.raises(ValueError, match="recompute_every=4 only applies"):
        VConConfig(method="lowrank", rank=2, recompute_every=4, module_overrides={"query": {"rank": 3}})


# --------------------------------------------------------------------------------------- transitions
def test_gradual_pruning_ramps_each_module_to_its_own_sparsity():
    model = apply_vcon(build("bert"), VConConfig(method="prune", sparsity=0.8, transition="gmp", transition_steps=10,
                                                 module_overrides={r".*attention.*": {"sparsity": 0.4}}))
    state = get_vcon_state(model)
    for step, fraction in ((5, 1 - 0.5 ** 3), (10, 1.0)):
        set_step(model, step)
        for name, layer, _ in state.named_layers():
            target = 0.4 if ".attention." in name else 0.8
            zeros = float((layer.compressed_weight() == 0).float().mean())
            assert zeros == pytest.approx(target * fraction, abs=2e-3), (step, name)


# ------------------------------------------------------------------------------------------- trainer
def test_trainer_trains_and_saves_the_per_module_model(tmp_path):
    from test_trainer import make_trainer

    trainer = make_trainer(tmp_path, overridden(transition_steps=3), max_steps=4)
    trainer.train()
    trainer.save_model()
    names = get_vcon_state(trainer.model).targeted_module_names
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert_merged_per_module(reloaded, names)
    inputs = TinyTextDataset(4, seed=5).input_ids
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=inputs).logits, trainer.model(input_ids=inputs).logits,
                                   atol=1e-5, rtol=0)
    saved = json.loads((tmp_path / "vcon_config.json").read_text())
    assert saved["module_overrides"] == OVERRIDES
    assert "module_overrides `.*intermediate.*`" in (tmp_path / "README.md").read_text()
