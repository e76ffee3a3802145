"""VConConfig validation and JSON round trip, schedules, target grammar (parity with PEFT), bad input."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import warnings

import pytest
import torch

from conftest import build, tiny_bert
from hf_vcon import NoTargetModulesError, VConConfig, VConLinear, VConWarning, apply_vcon, beta_at
from hf_vcon.config.vcon_config import CONFIG_NAME, SCHEDULES
from hf_vcon.config.schedules import SCHEDULE_FUNCTIONS
from hf_vcon.config.targets import find_targets, matches
from hf_vcon.version import __version__

BAD_CONFIGS = [
    (dict(method="int4"), ValueError, r"method='int4' is not known; use one of: binary, lowrank, prune"),
    (dict(method="prune", sparsity=1.0), ValueError, r"sparsity=1.0 must be a number in \[0, 1\)"),
    (dict(method="prune", sparsity=-0.1), ValueError, r"sparsity=-0.1"),
    (dict(method="lowrank"), ValueError, r"exactly one of rank .* and rank_ratio"),
    (dict(method="lowrank", rank=4, rank_ratio=0.5), ValueError, r"exactly one of rank"),
    (dict(method="lowrank", rank=0), ValueError, r"rank=0 must be an int > 0"),
    (dict(method="lowrank", rank_ratio=1.0), ValueError, r"rank_ratio=1.0 must be a number in \(0, 1\)"),
    (dict(method="lowrank", rank_ratio=0.0), ValueError, r"rank_ratio=0.0"),
    (dict(method="prune", prune_pattern="4:2"), ValueError, r"prune_pattern='4:2'.*0 < N < M"),
    (dict(method="prune", prune_pattern="2.5:4"), ValueError, r"prune_pattern='2.5:4' is not valid"),
    (dict(method="prune", prune_pattern="diagonal"), ValueError, r"prune_pattern='diagonal' is not valid"),
    (dict(method="prune", prune_pattern="2:4", sparsity=0.9), ValueError, r"sparsity=0.9 contradicts"),
    (dict(transition_steps=-1), ValueError, r"transition_steps=-1 must be >= 0"),
    (dict(transition_steps="10"), TypeError, r"transition_steps='10' must be an int"),
    (dict(transition_steps=True), TypeError, r"transition_steps=True"),
    (dict(transition_steps=1.5), ValueError, r"transition_steps=1.5: a float is a fraction .* pass an int \(1\)"),
    (dict(start_step=-3), ValueError, r"start_step=-3 must be an int >= 0"),
    (dict(schedule="exp"), ValueError, r"schedule='exp' is not known; use one of: cosine, cubic, linear"),
    (dict(method="binary", binary_scale="group"), ValueError, r"binary_scale='group' is not known; use one of: channel, tensor"),
    (dict(method="binary", sparsity=0.5), ValueError, r"sparsity=0.5 only applies to method='prune'"),
    (dict(method="prune", rank=4), ValueError, r"rank=4 only applies to method='lowrank'"),
    (dict(method="lowrank", rank=2, binary_scale="tensor"), ValueError, r"binary_scale='tensor' only applies to method='binary'"),
    (dict(method="binary", prune_pattern="row"), ValueError, r"prune_pattern='row' only applies to method='prune'"),
    (dict(target_modules="(unclosed"), ValueError, r"target_modules='\(unclosed' is not a valid regular expression"),
    (dict(exclude_modules="[a-"), ValueError, r"exclude_modules='\[a-' is not a valid regular expression"),
    (dict(target_modules=[]), TypeError, r"target_modules=\[\] must be a non-empty list"),
    (dict(target_modules=3), TypeError, r"target_modules must be a list"),
]


@pytest.mark.parametrize("kwargs, error, message", BAD_CONFIGS, ids=[str(case[0]) for case in BAD_CONFIGS])
def test_bad_config_raises_naming_the_field(kwargs, error, message):
    with pytest.raises(error, match=message):
        VConConfig(**kwargs)


def test_defaults_are_resolved_per_method():
    assert VConConfig(method="prune").sparsity == 0.9 and VConConfig(method="prune").prune_pattern == "layer"
    assert VConConfig(method="prune", prune_pattern="2:4").sparsity == 0.5
    assert VConConfig(method="binary").binary_scale == "tensor"
    with pytest.raises(AttributeError, match=r"method='binary' has no 'sparsity' \(an option of method='prune'\)"):
        VConConfig(method="binary").sparsity
    assert VConConfig(method="lowrank", rank=8).rank_ratio is None


def test_json_round_trip_with_version_stamp(tmp_path):
    config = VConConfig(method="lowrank", rank_ratio=0.25, target_modules=["query", "value"], transition_steps=100,
                        start_step=5, schedule="cosine")
    path = config.save_pretrained(tmp_path)
    data = json.loads(open(path).read())
    assert path.endswith(CONFIG_NAME) and data["hf_vcon_version"] == __version__
    assert VConConfig.from_pretrained(tmp_path) == config
    assert VConConfig.from_pretrained(path) == config


def test_unknown_keys_are_ignored_with_a_warning(tmp_path):
    data = VConConfig(method="binary").to_dict()
    data["future_option"] = 1
    (tmp_path / CONFIG_NAME).write_text(json.dumps(data))
    with pytest.warns(VConWarning, match=r"unknown VConConfig keys \['future_option'\]"):
        assert VConConfig.from_pretrained(tmp_path) == VConConfig(method="binary")


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        VConConfig.from_pretrained(tmp_path)


def test_fraction_of_max_steps():
    assert VConConfig(transition_steps=0.2).resolve_transition_steps(1000) == 200
    assert VConConfig(transition_steps=1.0).resolve_transition_steps(7) == 7
    assert VConConfig(transition_steps=1).resolve_transition_steps(1000) == 1  # an int is steps
    assert VConConfig(transition_steps=0.0).transition_steps == 0
    with pytest.raises(ValueError, match="needs max_steps > 0"):
        VConConfig(transition_steps=0.5).resolve_transition_steps(None)


# -------------------------------------------------------------------------------------------- schedules
def test_schedule_and_transition_names_match_the_config():
    from hf_vcon.config.vcon_config import TRANSITIONS
    from hf_vcon.patching.transitions import TRANSITIONS as TRANSITION_OBJECTS

    assert set(SCHEDULE_FUNCTIONS) == set(SCHEDULES)
    assert set(TRANSITION_OBJECTS) == set(TRANSITIONS)


@pytest.mark.parametrize(
    "schedule, expected",
    [
        ("linear", lambda p: 1 - p),
        ("cosine", lambda p: (1 + math.cos(math.pi * p)) / 2),
        ("cubic", lambda p: (1 - p) ** 3),
    ],
)
def test_schedule_values(schedule, expected):
    q, start = 20, 5
    for step in range(0, 40):
        beta = beta_at(step, q, start, schedule)
        if step <= start:
            assert beta == 1.0
        elif step >= start + q:
            assert beta == 0.0
        else:
            assert beta == pytest.approx(expected((step - start) / q), abs=1e-12)
            assert 0.0 < beta < 1.0


def test_linear_schedule_is_the_paper_formula_and_post_shot_is_zero():
    for step in range(30):
        assert beta_at(step, 10) == pytest.approx(max(1 - step / 10, 0), abs=1e-15)
        assert beta_at(step, 0) == 0.0
    assert beta_at(2, 0, start_step=3) == 1.0 and beta_at(3, 0, start_step=3) == 0.0


# ------------------------------------------------------------------------------------ target grammar
GRAMMAR_CASES = [
    ["query", "value"],
    ["attention.self.query"],
    ["encoder.layer.0.output.dense"],
    ["dense"],
    ["uery"],  # not a dotted suffix: matches nothing
    r".*layer\.1\..*(query|key)",
    r"query",  # a regex is fullmatched against the whole name: matches nothing
    r"bert\.encoder\.layer\.\d+\.intermediate\.dense",
]


@pytest.mark.parametrize("targets", GRAMMAR_CASES, ids=str)
@pytest.mark.parametrize("exclude", [None, ["key"], r".*layer\.0\..*"], ids=str)
def test_target_grammar_matches_peft(targets, exclude):
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    model = tiny_bert()
    peft_config = LoraConfig(target_modules=targets, exclude_modules=exclude)
    linear = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    expected = [name for name in linear if check_target_module_exists(peft_config, name) is True
                or type(check_target_module_exists(peft_config, name)).__name__ == "Match"]
    assert find_targets(model, targets, exclude) == expected


def test_matches_examples():
    assert matches("a.b.query", ["query"]) and matches("query", ["query"])
    assert not matches("a.b.subquery", ["query"])
    assert matches("a.b.query", r"a\.b\..*") and not matches("a.b.query", r"b\..*")


# ------------------------------------------------------------------------------------------ bad input
def _snapshot(model):
    return {key: value.clone() for key, value in model.state_dict().items()}


def _assert_unchanged(model, snapshot):
    assert not any(isinstance(module, VConLinear) for module in model.modules())
    assert not hasattr(model, "vcon_state")
    state = model.state_dict()
    assert state.keys() == snapshot.keys()
    assert all(torch.equal(state[key], value) for key, value in snapshot.items())


@pytest.mark.parametrize(
    "config, error, message",
    [
        (VConConfig(method="binary", target_modules=["nonexistent"]), NoTargetModulesError,
         r"matched no Linear/Conv1D module.*bert\.encoder\.layer\.0\.attention\.self\.query"),
        (VConConfig(method="binary", target_modules=r"nothing\..*"), NoTargetModulesError, r"matched no"),
        (VConConfig(method="lowrank", rank=32), ValueError,
         r"rank=32 gives rank 32 for layer 'bert\.encoder\.layer\.0\.attention\.self\.query' of shape \(32, 32\)"),
        (VConConfig(method="lowrank", rank_ratio=0.99), ValueError, r"rank_ratio=0.99 gives rank 32 for layer"),
        (VConConfig(method="prune", prune_pattern="3:7"), ValueError,
         r"prune_pattern='3:7' needs in_features divisible by 7, but layer 'bert\.encoder\.layer\.0\.attention\.self\.query'"),
        ({"method": "prune"}, TypeError, r"config must be a VConConfig, not dict"),
    ],
    ids=["no-match-list", "no-match-regex", "rank-too-large", "rank-ratio-too-large", "n-m-indivisible", "dict"],
)
def test_bad_input_at_apply_time_leaves_the_model_unchanged(config, error, message):
    model = build("bert")
    snapshot = _snapshot(model)
    with pytest.raises(error, match=message):
        apply_vcon(model, config)
    _assert_unchanged(model, snapshot)


def test_no_match_lists_at_most_ten_names():
    model = build("llama")
    with pytest.raises(NoTargetModulesError) as info:
        apply_vcon(model, VConConfig(method="binary", target_modules=["nope"]))
    listed = str(info.value).split("names of this model: ")[1]
    assert listed.count("'") == 20 and listed.endswith("….")


def test_config_is_not_mutated_by_apply():
    config = VConConfig(method="prune", sparsity=0.5, target_modules=["query"])
    before = copy.deepcopy(config)
    apply_vcon(build("bert"), config)
    assert config == before


@pytest.mark.skipif(int(__import__("transformers").__version__.split(".")[0]) >= 5, reason="transformers 4.x only")
def test_block_granularity_on_transformers_4_is_a_clear_error():
    from hf_vcon import VConError

    model = build("bert")
    snapshot = _snapshot(model)
    with pytest.raises(VConError, match=r"granularity='block' needs transformers >= 5"):
        apply_vcon(model, VConConfig(method="binary", granularity="block", target_blocks=r"bert\.encoder\.layer\.\d+"))
    _assert_unchanged(model, snapshot)


# ------------------------------------------------------------------------------- format versions
V1 = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "v1")
V1_EXPECTED = {
    "prune.json": VConConfig(method="prune", sparsity=0.9),
    "lowrank_targets.json": VConConfig(method="lowrank", rank_ratio=0.25, target_modules=["query", "value"],
                                       transition_steps=100, start_step=5, schedule="cosine"),
    "binary_blocks.json": VConConfig(method="binary", binary_scale="channel", granularity="block",
                                     target_blocks=r"bert\.encoder\.layer\.\d+", stagger=True, transition_steps=0.3,
                                     block_order=["bert.encoder.layer.1", "bert.encoder.layer.0"]),
    "gmp_row.json": VConConfig(method="prune", sparsity=0.8, prune_pattern="row", transition="gmp",
                               transition_steps=50, recompute_every=2),
    "nm.json": VConConfig(method="prune", prune_pattern="2:4", exclude_modules=r".*pooler.*"),
}


@pytest.mark.parametrize("name", sorted(V1_EXPECTED))
def test_files_written_by_hf_vcon_0_1_still_load(name):
    """vcon_config.json files written by hf_vcon 0.1 (format 1: every method's options flat, None where unused)."""
    data = json.loads(open(os.path.join(V1, name)).read())
    assert "options" not in data and data["hf_vcon_version"] == "0.1.0"
    with warnings.catch_warnings():
        warnings.simplefilter("error", VConWarning)  # nothing of a format-1 file is unknown
        config = VConConfig.from_pretrained(os.path.join(V1, name))
    assert config == V1_EXPECTED[name]
    assert config.to_dict()["format_version"] == 2 and VConConfig.from_dict(config.to_dict()) == config


def test_options_as_a_dataclass_a_dict_or_keywords_are_the_same_config():
    from hf_vcon.compressors.prune import PruneOptions

    flat = VConConfig(method="prune", sparsity=0.75, prune_pattern="row")
    assert VConConfig(method="prune", options={"sparsity": 0.75, "prune_pattern": "row"}) == flat
    assert VConConfig(method="prune", options=PruneOptions(sparsity=0.75, prune_pattern="row")) == flat
    assert VConConfig(method="prune", options=PruneOptions(prune_pattern="row"), sparsity=0.75) == flat
    assert flat.options == PruneOptions(0.75, "row") and flat.sparsity == 0.75
    assert dataclasses.replace(flat, transition_steps=0).options == flat.options


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(method="prune", options={"rank": 2}), ValueError, r"rank=2 only applies to method='lowrank'"),
        (dict(method="prune", options=3), TypeError, r"options must be a PruneOptions or a dict, not int"),
        (dict(method="binary", options=__import__("hf_vcon.compressors.prune", fromlist=["x"]).PruneOptions()),
         TypeError, r"are not method='binary''s \(BinaryOptions\)"),
        (dict(method="prune", nonsense=1), TypeError,
         r"'nonsense' is not an option of method='prune' \(its options: sparsity, prune_pattern\)"),
    ],
)
def test_bad_options_name_the_option_and_what_is_accepted(kwargs, error, message):
    with pytest.raises(error, match=message):
        VConConfig(**kwargs)


# ------------------------------------------------------------------------------- module_overrides
def test_overrides_resolve_first_match_and_inherit_the_base_options():
    config = VConConfig(method="prune", sparsity=0.9, prune_pattern="row", module_overrides={
        r".*attention.*": {"sparsity": 0.5},
        r".*query": {"sparsity": 0.1},  # never wins for attention modules: the first match does
        "intermediate.dense": {"method": "lowrank", "rank_ratio": 0.25},
    })
    assert config.setting_for("bert.encoder.layer.0.attention.self.query").options.sparsity == 0.5
    assert config.setting_for("bert.encoder.layer.0.attention.self.query").options.prune_pattern == "row"  # inherited
    lowrank = config.setting_for("bert.encoder.layer.1.intermediate.dense")  # a name matches as a dotted suffix
    assert lowrank.method == "lowrank" and lowrank.options.rank_ratio == 0.25
    assert config.setting_for("bert.encoder.layer.0.output.dense") == config.setting
    assert [setting.method for setting in config.settings()] == ["prune", "prune", "prune", "lowrank"]
    assert VConConfig.from_dict(json.loads(config.to_json_string())) == config


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        ([".*query"], TypeError, r"module_overrides=\['\.\*query'\] must be a non-empty dict"),
        ({}, TypeError, r"module_overrides=\{\} must be a non-empty dict"),
        ({"(bad": {"sparsity": 0.5}}, ValueError, r"module_overrides\['\(bad'\]: the key is not a valid regular"),
        ({".*query": 0.5}, TypeError, r"module_overrides\['\.\*query'\]: the setting must be a non-empty dict"),
        ({".*query": {"sparsity": 1.5}}, ValueError, r"module_overrides\['\.\*query'\]: sparsity=1.5 must be a number"),
        ({".*query": {"method": "int9"}}, ValueError, r"module_overrides\['\.\*query'\]: method='int9' is not known"),
        ({".*query": {"method": "lowrank"}}, ValueError,
         r"module_overrides\['\.\*query'\]: method='lowrank' needs exactly one of rank"),
        ({".*query": {"rank": 4}}, ValueError,
         r"module_overrides\['\.\*query'\]: rank=4 only applies to method='lowrank', but method='prune'"),
        ({".*query": {"transition_steps": 4}}, TypeError,
         r"module_overrides\['\.\*query'\]: 'transition_steps' is not an option of method='prune'"),
    ],
)
def test_bad_overrides_name_the_pattern(overrides, error, message):
    with pytest.raises(error, match=message):
        VConConfig(method="prune", module_overrides=overrides)
