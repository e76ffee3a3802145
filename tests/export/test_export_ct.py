"""The compressed-tensors export: what the files hold, that plain ``from_pretrained`` loads exactly the merged dense
model (BERT, ViT, Llama, Qwen2 GQA; every strategy; 2, 3, 4, 8 bits; binary; bf16), and the refusals (GPT-2's
Conv1D, no integer layers, a tied head, the package missing) before anything is written."""

from __future__ import annotations

import builtins
import copy
import json
import os
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from conftest import DTYPE_KEY, TinyTextDataset, build, logits, tiny_inputs
from hf_vcon import VConConfig, VConError, VConTrainer, VConWarning, apply_vcon, get_vcon_state, merge_and_unload, save_merged
from hf_vcon.export import compressed_tensors as export_ct

pytest.importorskip("compressed_tensors")

AUTO = {"bert": AutoModelForSequenceClassification, "vit": AutoModelForImageClassification,
        "llama": AutoModelForCausalLM, "qwen2": AutoModelForCausalLM}  # 4.x loads these checkpoints in float16 by default


def tiny_qwen2() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return Qwen2ForCausalLM(config).eval()


def model_of(kind: str):
    return tiny_qwen2() if kind == "qwen2" else build(kind)


def exported(kind: str, folder, dtype=torch.float32, **setting):
    """A post-shot model of ``kind`` with ``setting``, its merged dense copy, saved as compressed-tensors."""
    model = apply_vcon(model_of(kind).to(dtype), VConConfig(transition_steps=0, **setting))
    save_merged(model, str(folder), format="compressed-tensors")
    return model, merge_and_unload(copy.deepcopy(model))


def load(kind: str, folder, dtype=torch.float32):
    return AUTO[kind].from_pretrained(str(folder), **{DTYPE_KEY: dtype}).eval()


def tensors(folder) -> dict[str, torch.Tensor]:
    with safe_open(os.path.join(folder, "model.safetensors"), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def quantization_config(folder) -> dict:
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as handle:
        return json.load(handle)["quantization_config"]


# ------------------------------------------------------------------------------------------ exactness
GRID = [dict(method="quant", bits=bits, strategy=strategy, group_size=16)
        for bits in (2, 3, 4, 8) for strategy in ("tensor", "channel", "group")]
BINARY = [dict(method="binary"), dict(method="binary", binary_scale="channel")]
CASES = [("llama", setting) for setting in GRID + BINARY] + [("qwen2", setting) for setting in GRID[::2] + BINARY] + [
    (kind, setting) for kind in ("bert", "vit") for setting in (GRID[1], GRID[5], GRID[9], GRID[10], BINARY[1])]


def _id(case) -> str:
    kind, setting = case
    if setting["method"] == "binary":
        return f"{kind}-binary-{setting.get('binary_scale', 'tensor')}"
    return f"{kind}-int{setting['bits']}-{setting['strategy']}"


@pytest.mark.parametrize("kind, setting", CASES, ids=[_id(case) for case in CASES])
def test_from_pretrained_loads_the_merged_dense_model(kind, setting, tmp_path):
    model, merged = exported(kind, tmp_path, **setting)
    loaded = load(kind, tmp_path)
    torch.testing.assert_close(logits(loaded, kind), logits(merged, kind), atol=1e-5, rtol=0)
    expected = merged.state_dict()  # the first forward unpacked the loaded weights: bit for bit C
    for name in get_vcon_state(model).targeted_module_names:
        assert torch.equal(loaded.get_submodule(name).weight, expected[f"{name}.weight"]), name


@pytest.mark.parametrize("setting", [GRID[2], GRID[7], GRID[9], BINARY[0]], ids=["int2-group", "int3-channel",
                                                                               "int8-tensor", "binary"])
def test_the_files_hold_what_compressed_tensors_expects(setting, tmp_path):
    model, _ = exported("llama", tmp_path, **setting)
    stored = tensors(tmp_path)
    bits = setting.get("bits", 2)
    strategy = setting.get("strategy", setting.get("binary_scale", "tensor"))
    config = quantization_config(tmp_path)
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert "sparsity_config" not in config
    assert config["ignore"] == ["lm_head"]
    (group,) = config["config_groups"].values()
    assert group["targets"] == ["Linear"]
    weights = group["weights"]
    assert (weights["num_bits"], weights["strategy"], weights["symmetric"], weights["type"]) == (bits, strategy, True, "int")
    assert weights["group_size"] == (16 if strategy == "group" else None)
    state = get_vcon_state(model)
    for name, layer, _ in state.named_layers():
        out_features, in_features = layer.out_features, layer.in_features
        packed, scale, shape = (stored[f"{name}.{key}"] for key in ("weight_packed", "weight_scale", "weight_shape"))
        assert packed.dtype == torch.int32 and tuple(packed.shape) == (out_features, -(-in_features * bits // 32))
        assert scale.dtype == torch.float32
        assert tuple(scale.shape) == {"tensor": (1,), "channel": (out_features, 1), "group": (out_features, in_features // 16)}[strategy]
        assert shape.dtype == torch.int64 and shape.tolist() == [out_features, in_features]
        assert f"{name}.weight" not in stored and f"{name}.weight_zero_point" not in stored
        form = layer.compressor.integer_form(layer.latent_weight(), {})
        torch.testing.assert_close(scale, form.scale, atol=0, rtol=0)  # the scales VCON trained with
    assert stored["lm_head.weight"].dtype == torch.float32  # untouched Linears stay dense


@pytest.mark.parametrize("setting", [GRID[9], GRID[5], BINARY[1]], ids=["int8-tensor", "int4-group", "binary"])
def test_a_bf16_model_round_trips_in_bf16(setting, tmp_path):
    model, merged = exported("llama", tmp_path, dtype=torch.bfloat16, **setting)
    save_merged(model, str(tmp_path / "dense"), format="dense")
    stored = tensors(tmp_path)
    assert {value.dtype for key, value in stored.items() if key.endswith("weight_scale")} == {torch.bfloat16}
    assert stored["model.embed_tokens.weight"].dtype == torch.bfloat16
    with open(os.path.join(tmp_path, "config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    loaded = load("llama", tmp_path, dtype=torch.bfloat16)
    # against the dense checkpoint loaded the same way (a bf16 load keeps the rotary buffer in float32, .to() does not)
    dense = load("llama", tmp_path / "dense", dtype=torch.bfloat16)
    assert torch.equal(logits(loaded, "llama"), logits(dense, "llama"))
    expected = merged.state_dict()  # the first forward unpacked the weights: bit for bit C in bf16
    for name in get_vcon_state(model).targeted_module_names:
        assert torch.equal(loaded.get_submodule(name).weight, expected[f"{name}.weight"]), name


def test_module_overrides_give_one_config_group_per_setting(tmp_path):
    setting = dict(method="quant", bits=4, strategy="group", group_size=16,
                   module_overrides={"v_proj": {"bits": 8, "strategy": "channel"}, "down_proj": {"method": "prune"}})
    model, merged = exported("llama", tmp_path, **setting)
    config = quantization_config(tmp_path)
    groups = sorted(config["config_groups"].values(), key=lambda group: group["weights"]["num_bits"])
    assert [group["weights"]["num_bits"] for group in groups] == [4, 8]
    assert groups[1]["targets"] == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]
    assert sorted(config["ignore"]) == ["lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    stored = tensors(tmp_path)
    assert (stored["model.layers.0.mlp.down_proj.weight"] == 0).float().mean() == pytest.approx(0.9, abs=0.01)
    torch.testing.assert_close(logits(load("llama", tmp_path), "llama"), logits(merged, "llama"), atol=1e-5, rtol=0)


@pytest.mark.skipif(int(transformers.__version__.split(".")[0]) < 5, reason="fused MoE experts are transformers 5's")
def test_fused_moe_experts_are_written_dense_and_the_model_loads_exactly(tmp_path):
    """Mixtral's fused experts are no nn.Linear: stored dense (quantized values), the attention packed; the model's
    own layout is written, which transformers 5 loads (the per-expert layout it would revert to does not load)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                                             num_experts_per_tok=2)).eval()
    model = apply_vcon(model, VConConfig(method="quant", bits=4, strategy="channel", transition_steps=0))
    with pytest.warns(VConWarning, match="2 quantized weights .*experts.* are no nn.Linear"):
        save_merged(model, str(tmp_path), format="compressed-tensors")
    stored = tensors(tmp_path)
    assert "model.layers.0.self_attn.q_proj.weight_packed" in stored
    experts = stored["model.layers.0.mlp.experts.gate_up_proj"]
    assert experts.is_floating_point() and experts.dim() == 3
    merged = merge_and_unload(copy.deepcopy(model)).eval()
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(load("llama", tmp_path)(ids).logits, merged(ids).logits, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------- refusals
def test_gpt2_conv1d_is_refused_before_anything_is_written(tmp_path):
    model = apply_vcon(build("gpt2"), VConConfig(method="quant", transition_steps=0))
    folder = tmp_path / "out"
    with pytest.raises(VConError, match=r"Conv1D modules \(GPT-2 style\): compressed-tensors quantizes nn.Linear"):
        save_merged(model, str(folder), format="compressed-tensors")
    assert not folder.exists()
    with pytest.warns(VConWarning, match="Saving the merged model dense: .* Conv1D"):
        save_merged(model, str(folder))  # auto: dense
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    with pytest.raises(VConError, match="Conv1D"):
        VConTrainer(model=build("gpt2"), vcon_config=VConConfig(method="quant"), export_format="compressed-tensors",
                    args=transformers.TrainingArguments(str(tmp_path / "t"), report_to=[], use_cpu=True))


def test_no_integer_layer_or_a_tied_head_is_refused(tmp_path):
    pruned = apply_vcon(build("llama"), VConConfig(method="prune", transition_steps=0))
    with pytest.raises(VConError, match="no compressed layer has integer weights \\(method prune\\)"):
        save_merged(pruned, str(tmp_path / "a"), format="compressed-tensors")
    save_merged(pruned, str(tmp_path / "a"))  # auto: dense, nothing to say
    assert not (tmp_path / "a" / "config.json").read_text().count("quantization_config")

    tied = build("llama")
    tied.config.tie_word_embeddings = True
    tied.tie_weights()
    with pytest.raises(VConError, match="The targeted layer 'lm_head' shares its weight"):  # at apply_vcon already
        apply_vcon(tied, VConConfig(method="quant", target_modules=["q_proj", "lm_head"], transition_steps=0))
    with pytest.raises(ValueError, match=r"format='packed' is not known; use one of: auto, compressed-tensors, dense"):
        save_merged(pruned, str(tmp_path / "c"), format="packed")


def test_without_the_package_a_clear_error_names_the_extra(monkeypatch, tmp_path):
    real_import = builtins.__import__

    def no_compressed_tensors(name, *args, **kwargs):
        if name == "compressed_tensors" or name.startswith("compressed_tensors."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_compressed_tensors)
    monkeypatch.setattr(export_ct, "is_available", lambda: False)
    model = apply_vcon(build("llama"), VConConfig(method="quant", transition_steps=0))
    with pytest.raises(VConError, match=r"needs the compressed-tensors package: pip install 'hf_vcon\[export\]'"):
        save_merged(model, str(tmp_path / "a"), format="compressed-tensors")
    assert not (tmp_path / "a").exists()
    with pytest.warns(VConWarning, match=r"saved dense .*pip install 'hf_vcon\[export\]'"):
        save_merged(model, str(tmp_path / "b"))
    merged = merge_and_unload(copy.deepcopy(model))
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "b"), **{DTYPE_KEY: torch.float32})
    torch.testing.assert_close(logits(loaded, "llama"), logits(merged, "llama"), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------- with training
def test_trainer_saves_compressed_tensors_by_default_with_its_card(tmp_path):
    model = build("bert").train()
    args = transformers.TrainingArguments(str(tmp_path), max_steps=4, per_device_train_batch_size=4, report_to=[],
                                          use_cpu=True, save_strategy="no", learning_rate=1e-3, logging_steps=1)
    trainer = VConTrainer(model=model, args=args, train_dataset=TinyTextDataset(16),
                          vcon_config=VConConfig(method="quant", bits=4, strategy="group", group_size=16,
                                                 transition_steps=2))
    assert trainer.export_format == "compressed-tensors"
    trainer.train()
    assert {entry.get("vcon/bits") for entry in trainer.state.log_history if "loss" in entry} == {4.0}
    trainer.save_model()
    trainer.create_model_card()
    card = (tmp_path / "README.md").read_text()
    assert "## Checkpoint format" in card and "`format: pack-quantized`" in card and "- compressed-tensors" in card
    assert "| targeted layers as stored |" in card
    merged = merge_and_unload(copy.deepcopy(trainer.model)).eval()
    loaded = load("bert", tmp_path)
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, merged(**inputs).logits, atol=1e-5, rtol=0)
    dense = VConTrainer(model=build("bert"), args=args, vcon_config=VConConfig(method="quant"), export_format="dense")
    assert dense.export_format == "dense"


@pytest.mark.skipif(int(transformers.__version__.split(".")[0]) < 5, reason="block-wise VCON needs transformers >= 5")
def test_block_wise_models_export_the_same_way(tmp_path):
    model, merged = exported("llama", tmp_path, method="quant", bits=3, strategy="group", group_size=16,
                             granularity="block", target_blocks=r"model\.layers\.\d+")
    assert quantization_config(tmp_path)["config_groups"]["group_0"]["weights"]["num_bits"] == 3
    torch.testing.assert_close(logits(load("llama", tmp_path), "llama"), logits(merged, "llama"), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------- what is written loads back
def tiny_falcon():
    torch.manual_seed(0)
    return transformers.FalconForCausalLM(transformers.FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                                    num_attention_heads=2)).eval()


def skip_packed_modules_at_init(monkeypatch, model_class):
    """transformers 5's Falcon / SigLIP initialisation reads ``.weight`` of the packed Linears and crashes on load
    (a transformers limitation, see the fallback tests): let the class skip them, as a loader that works would."""
    original = model_class._init_weights

    def init_weights(self, module):
        if not any(hasattr(part, "weight_packed") for part in module.modules()):
            original(self, module)

    monkeypatch.setattr(model_class, "_init_weights", init_weights)


def test_untargeted_linears_of_another_class_are_ignored_falcon(monkeypatch, tmp_path):
    # Falcon's quantized layers are FalconLinear, its head a plain nn.Linear: the loader's "Linear" target matches
    # both, so the head must be listed in ignore or it loads as packed (random) weights.
    skip_packed_modules_at_init(monkeypatch, transformers.FalconPreTrainedModel)
    model = apply_vcon(tiny_falcon(), VConConfig(method="quant", bits=4, transition_steps=0))
    merged = merge_and_unload(copy.deepcopy(model))
    save_merged(model, str(tmp_path), format="compressed-tensors")
    assert quantization_config(tmp_path)["ignore"] == ["lm_head"]
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), **{DTYPE_KEY: torch.float32}).eval()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_siglip_head_out_proj_is_ignored(monkeypatch, tmp_path):
    from architectures import by_key

    case = by_key("siglip_vision_model")
    skip_packed_modules_at_init(monkeypatch, transformers.SiglipPreTrainedModel)
    with pytest.warns(VConWarning):  # the MultiheadAttention pooling head's in_proj is written dense
        model = apply_vcon(case.build(), VConConfig(method="quant", bits=4, transition_steps=0))
        save_merged(model, str(tmp_path), format="compressed-tensors")
    ignore = quantization_config(tmp_path)["ignore"]
    assert "vision_model.head.attention.out_proj" in ignore  # a NonDynamicallyQuantizableLinear left dense
    loaded = transformers.SiglipForImageClassification.from_pretrained(str(tmp_path), **{DTYPE_KEY: torch.float32})
    loaded.eval()
    merged = merge_and_unload(copy.deepcopy(model))
    with torch.no_grad():
        inputs = case.inputs()
        torch.testing.assert_close(loaded(**inputs).logits, merged(**inputs).logits, atol=1e-5, rtol=0)


def init_reading_every_weight(monkeypatch):
    """A loader that fails on packed Linears, as transformers 5's does for the many model classes whose weight
    initialisation reads ``module.weight`` of every Linear (Falcon, T5, SigLIP…)."""
    original = transformers.LlamaForCausalLM.from_pretrained.__func__

    def from_pretrained(cls, folder, *args, **kwargs):
        if "quantization_config" in json.loads((Path(folder) / "config.json").read_text()):
            raise AttributeError("'Linear' object has no attribute 'weight'")
        return original(cls, folder, *args, **kwargs)

    monkeypatch.setattr(transformers.LlamaForCausalLM, "from_pretrained", classmethod(from_pretrained))


def test_a_folder_transformers_cannot_load_falls_back_to_dense_under_auto(monkeypatch, tmp_path):
    init_reading_every_weight(monkeypatch)
    model = apply_vcon(build("llama"), VConConfig(method="quant", bits=4, transition_steps=0))
    merged = merge_and_unload(copy.deepcopy(model))
    with pytest.warns(VConWarning, match=r"Saving the merged model dense: the compressed-tensors checkpoint of this "
                                         r"LlamaForCausalLM does not load back: transformers cannot load it "
                                         r"\(AttributeError: .*weight"):
        save_merged(model, str(tmp_path / "auto"))
    assert "quantization_config" not in json.loads((tmp_path / "auto" / "config.json").read_text())
    loaded = load("llama", tmp_path / "auto")
    torch.testing.assert_close(logits(loaded, "llama"), logits(merged, "llama"), atol=1e-6, rtol=0)
    assert [path.name for path in tmp_path.iterdir()] == ["auto"]  # the attempt left nothing behind

    with pytest.raises(VConError, match=r"export_format='compressed-tensors' cannot write this model: .*"
                                        r"transformers cannot load it"):
        save_merged(model, str(tmp_path / "explicit"), format="compressed-tensors")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["auto"]


def test_a_folder_that_loads_other_weights_falls_back(monkeypatch, tmp_path):
    # An ignore list that misses the head: the loader expects it packed and initialises it at random.
    monkeypatch.setattr(export_ct, "_checkpoint_names", lambda plain, names: [])
    model = apply_vcon(build("llama"), VConConfig(method="quant", bits=4, transition_steps=0))
    # transformers 5 loads the head packed from nothing (other weights); 4.x fails on it
    with pytest.warns(VConWarning, match=r"does not load back: .*(lm_head|no attribute 'weight')"):
        save_merged(model, str(tmp_path))
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())


def test_the_trainer_under_auto_falls_back_after_training_and_its_card_says_dense(monkeypatch, tmp_path):
    init_reading_every_weight(monkeypatch)
    args = transformers.TrainingArguments(str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[],
                                          use_cpu=True, save_strategy="no", learning_rate=1e-3)
    causal = [{"input_ids": row, "labels": row} for row in TinyTextDataset(8).input_ids]
    trainer = VConTrainer(model=build("llama").train(), args=args, train_dataset=causal,
                          vcon_config=VConConfig(method="quant", bits=4, transition_steps=1))
    assert trainer.export_format == "compressed-tensors"  # what the model allows; loading is checked when written
    trainer.train()
    with pytest.warns(VConWarning, match="Saving the merged model dense: .*does not load back"):
        trainer.save_model()
    assert trainer.export_format == "dense"
    trainer.create_model_card()
    card = (tmp_path / "README.md").read_text()
    assert "pack-quantized" not in card and "| targeted layers as stored | 0 " not in card
    merged = merge_and_unload(copy.deepcopy(trainer.model)).eval()
    torch.testing.assert_close(logits(load("llama", tmp_path), "llama"), logits(merged, "llama"), atol=1e-6, rtol=0)
