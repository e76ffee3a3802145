"""Gradual magnitude pruning (transition="gmp"): the sparsity ramp, its validation, and what the trainer logs."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import TrainingArguments

from hf_vcon import VConConfig, VConTrainer, apply_vcon, get_beta, merge_and_unload, set_step
from hf_vcon.config.schedules import gmp_sparsity

from conftest import tiny_bert


# ---------------------------------------------------------------------------------------------- the ramp
@pytest.mark.parametrize(
    "step, expected",
    [(0, 0.0), (2, 0.8 * (1 - 0.8**3)), (5, 0.8 * (1 - 0.5**3)), (9, 0.8 * (1 - 0.1**3)), (10, 0.8), (50, 0.8)],
)
def test_gmp_sparsity_is_zhu_and_gupta_cubic(step, expected):
    assert gmp_sparsity(step, sparsity=0.8, transition_steps=10) == pytest.approx(expected, abs=1e-12)


def test_gmp_sparsity_start_step_and_post_shot():
    assert gmp_sparsity(3, 0.9, transition_steps=10, start_step=4) == 0.0
    assert gmp_sparsity(9, 0.9, transition_steps=10, start_step=4) == pytest.approx(0.9 * (1 - 0.5**3))
    assert gmp_sparsity(14, 0.9, transition_steps=10, start_step=4) == 0.9
    assert gmp_sparsity(0, 0.9, transition_steps=0) == 0.9  # Q = 0: pruned at once, as post-shot
    values = [gmp_sparsity(t, 0.9, 20) for t in range(25)]
    assert values == sorted(values)  # never falls


# ------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="binary", transition="gmp"), r"transition='gmp' .* only applies to method='prune/structured', but method='binary'"),
        (dict(method="lowrank", rank=2, transition="gmp"), r"only applies to method='prune/structured', but method='lowrank'"),
        (dict(method="prune", prune_pattern="2:4", transition="gmp"), r"prune_pattern='2:4' .* cannot do"),
        (dict(method="prune", schedule="cosine", transition="gmp"), r"schedule='cosine' shapes β"),
        (dict(method="prune", transition="iterative"), r"transition='iterative' is not known; use one of: gmp, vcon"),
    ],
)
def test_gmp_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VConConfig(**kwargs)


def test_transition_round_trips_and_defaults_to_vcon():
    assert VConConfig().transition == "vcon"
    config = VConConfig(method="prune", sparsity=0.5, transition="gmp", transition_steps=10)
    assert VConConfig.from_dict(config.to_dict()) == config


# ------------------------------------------------------------------------------------------ the layers
def _zeros(model: nn.Module) -> float:
    weight = model[0].compressed_weight()
    return int((weight == 0).sum()) / weight.numel()


@pytest.mark.parametrize("pattern", ["layer", "row"])
def test_set_step_gives_the_exact_sparsity_at_chosen_steps(pattern):
    torch.manual_seed(0)
    model = apply_vcon(nn.Sequential(nn.Linear(100, 10)),
                       VConConfig(method="prune", sparsity=0.8, prune_pattern=pattern, transition="gmp", transition_steps=10))
    x = torch.randn(3, 100)
    for step, expected in [(0, 0.0), (5, 0.7), (10, 0.8), (30, 0.8)]:
        assert set_step(model, step) == 0.0 and get_beta(model) == 0.0  # hard mask, no blending
        assert _zeros(model) == pytest.approx(expected, abs=1e-9)
        # the forward pass is the masked layer alone
        torch.testing.assert_close(model(x), x @ model[0].compressed_weight().T + model[0].bias)


@pytest.mark.parametrize("quantized", [False, True], ids=["threshold-state", "tie-mask-state"])
@pytest.mark.parametrize("transition", ["gmp", "vcon"])
def test_gmp_pruned_weights_get_no_gradient_while_vcon_passes_it_straight_through(transition, quantized):
    """Zhu & Gupta's pruned weights are frozen; VCON's (and post-shot's) latent W receives the full gradient."""
    torch.manual_seed(0)
    model = apply_vcon(nn.Sequential(nn.Linear(30, 8)),
                       VConConfig(method="prune", sparsity=0.7, transition=transition, transition_steps=0))
    layer = model[0].train()
    if quantized:  # ties straddle the cut: the layer's state is a mask, not a threshold
        with torch.no_grad():
            layer.weight.copy_(torch.randint(-2, 3, layer.weight.shape).float())
    set_step(model, 3)
    x = torch.randn(5, 30)
    model(x).square().sum().backward()
    kept = layer.compressor.mask(layer.weight)
    output = x @ layer.compressed_weight().T + layer.bias
    full = (2 * output).T @ x  # dL/dW_eff for L = sum(output²)
    expected = full * kept if transition == "gmp" else full
    torch.testing.assert_close(layer.weight.grad, expected, rtol=1e-5, atol=1e-5)
    assert bool((layer.weight.grad[~kept] == 0).all()) == (transition == "gmp")


def test_gmp_fraction_resolves_against_max_steps_and_merges_at_full_sparsity():
    torch.manual_seed(0)
    model = apply_vcon(nn.Sequential(nn.Linear(40, 10)),
                       VConConfig(method="prune", sparsity=0.5, transition="gmp", transition_steps=0.5))
    set_step(model, 5, max_steps=20)  # Q = 10 steps, p = 0.5
    assert _zeros(model) == pytest.approx(0.5 * (1 - 0.5**3))
    set_step(model, 20, max_steps=20)
    plain = merge_and_unload(model)
    assert int((plain[0].weight == 0).sum()) == 200


def test_trainer_logs_the_rising_sparsity(tmp_path):
    torch.manual_seed(0)
    data = [{"input_ids": torch.randint(0, 99, (7,)), "labels": torch.tensor(i % 3)} for i in range(16)]
    args = TrainingArguments(str(tmp_path), max_steps=8, per_device_train_batch_size=2, logging_steps=1,
                             learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True)
    trainer = VConTrainer(model=tiny_bert(), args=args, train_dataset=data,
                          vcon_config=VConConfig(method="prune", sparsity=0.8, transition="gmp", transition_steps=4))
    trainer.train()
    logged = [entry["vcon/sparsity"] for entry in trainer.state.log_history if "vcon/sparsity" in entry and "loss" in entry]
    assert len(logged) == 8
    # the log at step k reflects the model after update k, whose mask the next set_step (step k) recomputes
    assert logged[0] < logged[1] < logged[2] < 0.8 and logged[-1] == pytest.approx(0.8, abs=1e-3)
    assert all(entry.get("vcon/beta", 0.0) == 0.0 for entry in trainer.state.log_history)


def test_saving_a_gmp_model_mid_ramp_warns(tmp_path):
    import warnings as warnings_module

    from hf_vcon import VConWarning

    data = [{"input_ids": torch.randint(0, 99, (7,)), "labels": torch.tensor(i % 3)} for i in range(16)]

    def trained(max_steps):
        args = TrainingArguments(str(tmp_path / str(max_steps)), max_steps=max_steps, per_device_train_batch_size=2,
                                 report_to=[], save_strategy="no", use_cpu=True)
        trainer = VConTrainer(model=tiny_bert(), args=args, train_dataset=data,
                              vcon_config=VConConfig(method="prune", sparsity=0.8, transition="gmp", transition_steps=4))
        trainer.train()
        return trainer

    with pytest.warns(VConWarning, match=r"mid-ramp: layer '.*' is at sparsity=0\.\d+, not the sparsity=0.8"):
        trained(2).save_model()
    with warnings_module.catch_warnings():
        warnings_module.simplefilter("error", VConWarning)
        trained(5).save_model()  # past the ramp: no warning
