"""Training checkpoints → the merged compressed model: ``hf_vcon.export_checkpoint``, ``python -m hf_vcon export``."""

from __future__ import annotations

import json
import runpy
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification, TrainingArguments

from conftest import FLOAT32, METHOD_CASES, TinyTextDataset, build, logits, tiny_bert, vcon_config
from hf_vcon import (
    IncompatibleCheckpointError,
    VConConfig,
    VConTrainer,
    VConWarning,
    apply_vcon,
    export_checkpoint,
    get_beta,
    load_training_checkpoint,
    merge_and_unload,
    set_step,
)

AUTO = {"bert": "AutoModelForSequenceClassification", "vit": "AutoModelForImageClassification",
        "gpt2": "AutoModelForCausalLM", "llama": "AutoModelForCausalLM"}


def training_state(kind: str, config: VConConfig, folder, dtype=torch.float32, step: int = 8):
    """What the Trainer writes to ``checkpoint-N``: the patched model's ``save_pretrained``, plus vcon_config.json."""
    model = apply_vcon(build(kind).to(dtype), config)
    with torch.no_grad():  # trained weights: not the ones a fresh model of the same seed has
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.01)
    set_step(model, step, 8)
    model.save_pretrained(folder)
    config.save_pretrained(folder)
    return model


@pytest.mark.parametrize("method, setting", METHOD_CASES)
def test_export_equals_merging_the_trained_model(tmp_path, method, setting):
    _export_equals_merging(tmp_path, "bert", method, setting)


@pytest.mark.parametrize("kind, method, setting",
                         [("vit", "prune", {"sparsity": 0.5}), ("gpt2", "lowrank", {"rank": 3}),
                          ("llama", "binary", {})],
                         ids=["vit", "gpt2", "llama"])
def test_export_across_architectures(tmp_path, kind, method, setting):
    """ViT (saved under legacy names by transformers 5), GPT-2 (Conv1D, tied embeddings), Llama (GQA)."""
    _export_equals_merging(tmp_path, kind, method, setting)


def _export_equals_merging(tmp_path, kind, method, setting):
    model = training_state(kind, vcon_config(method, setting, transition_steps=4), tmp_path / "checkpoint-8")
    summary = export_checkpoint(tmp_path / "checkpoint-8", tmp_path / "merged")
    import transformers

    reloaded = getattr(transformers, AUTO[kind]).from_pretrained(tmp_path / "merged", **FLOAT32).eval()
    torch.testing.assert_close(logits(reloaded, kind), logits(merge_and_unload(model).eval(), kind), atol=1e-5, rtol=0)
    merged_keys = load_file(tmp_path / "merged" / "model.safetensors")
    assert not any("base_layer" in key or "vcon_" in key for key in merged_keys)
    assert json.loads((tmp_path / "merged" / "vcon_config.json").read_text())["method"] == method
    assert summary.layers and f"| method | {method} |" in (tmp_path / "merged" / "README.md").read_text()


def test_export_keeps_the_checkpoint_dtype(tmp_path):
    model = training_state("llama", VConConfig(method="prune", sparsity=0.5, transition_steps=4), tmp_path / "ckpt",
                           dtype=torch.bfloat16)
    export_checkpoint(tmp_path / "ckpt", tmp_path / "merged")
    weights = load_file(tmp_path / "merged" / "model.safetensors")
    assert {tensor.dtype for tensor in weights.values()} == {torch.bfloat16}
    restored = load_training_checkpoint(tmp_path / "ckpt")
    for key, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key


def run_cli(monkeypatch, *argv: str) -> int:
    """``python -m hf_vcon …`` in this process (its ``__main__``), returning the exit code."""
    monkeypatch.setattr(sys, "argv", ["python -m hf_vcon", *argv])
    with pytest.raises(SystemExit) as exited:
        runpy.run_module("hf_vcon", run_name="__main__", alter_sys=True)
    return exited.value.code


def test_a_trainer_checkpoint_exports_to_the_model_the_trainer_saves(tmp_path, monkeypatch):
    args = TrainingArguments(str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
                             save_strategy="steps", save_steps=4, report_to=[], use_cpu=True, disable_tqdm=True,
                             eval_strategy="steps", eval_steps=4, logging_steps=1)
    torch.manual_seed(0)
    trainer = VConTrainer(model=tiny_bert(), args=args, train_dataset=TinyTextDataset(),
                          eval_dataset=TinyTextDataset(16, seed=1),
                          vcon_config=VConConfig(method="lowrank", rank=4, transition_steps=2))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    checkpoint = tmp_path / "checkpoint-4"
    assert "python -m hf_vcon export" in (checkpoint / "README.md").read_text()  # the folder says what it is

    assert run_cli(monkeypatch, "export", str(checkpoint), str(tmp_path / "merged")) == 0
    inputs = TinyTextDataset(4, seed=5).input_ids
    with torch.no_grad():
        final = AutoModelForSequenceClassification.from_pretrained(tmp_path / "final", **FLOAT32).eval()
        merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged", **FLOAT32).eval()
        expected, exported = final(input_ids=inputs).logits, merged(input_ids=inputs).logits
    torch.testing.assert_close(exported, expected, atol=1e-6, rtol=0)
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "| eval_loss |" in card and "optimizer steps | 4" in card  # metrics and steps from trainer_state.json


def test_a_checkpoint_mid_transition_warns_and_exports_the_compressed_model(tmp_path):
    model = training_state("bert", VConConfig(method="binary", transition_steps=100), tmp_path / "ckpt", step=5)
    state = {"global_step": 5, "max_steps": 8, "log_history": []}
    (tmp_path / "ckpt" / "trainer_state.json").write_text(json.dumps(state))
    with pytest.warns(VConWarning, match="while β = 0.95 > 0"):
        export_checkpoint(tmp_path / "ckpt", tmp_path / "merged")
    assert get_beta(load_training_checkpoint(tmp_path / "ckpt")) == pytest.approx(0.95)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged", **FLOAT32).eval()
    expected = logits(merge_and_unload(model).eval(), "bert")
    torch.testing.assert_close(logits(reloaded, "bert"), expected, atol=1e-5, rtol=0)


def test_missing_or_extra_vcon_tensors_raise(tmp_path):
    training_state("bert", VConConfig(method="lowrank", rank=4), tmp_path / "ckpt")
    weights = load_file(tmp_path / "ckpt" / "model.safetensors")
    dropped = next(key for key in weights if key.endswith("vcon_A"))
    save_file({key: value for key, value in weights.items() if key != dropped}, tmp_path / "ckpt" / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(IncompatibleCheckpointError, match=rf"1 missing \(e.g. \['{dropped}'\]\), 0 unexpected"):
        export_checkpoint(tmp_path / "ckpt", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()

    weights["bert.encoder.layer.0.attention.self.query.vcon_C"] = torch.zeros(4, 32)
    save_file(weights, tmp_path / "ckpt" / "model.safetensors", metadata={"format": "pt"})
    extra = r"0 missing .*1 unexpected \(e.g. \['bert.encoder.layer.0.attention"
    with pytest.raises(IncompatibleCheckpointError, match=extra):
        load_training_checkpoint(tmp_path / "ckpt")


def test_other_config_merged_folder_and_existing_output_are_refused(tmp_path, monkeypatch, capsys):
    training_state("bert", VConConfig(method="lowrank", rank=4), tmp_path / "ckpt")
    VConConfig(method="lowrank", rank=2).save_pretrained(tmp_path / "ckpt")  # the tensors are rank 4
    with pytest.raises(IncompatibleCheckpointError, match="other shapes"):
        load_training_checkpoint(tmp_path / "ckpt")

    export_checkpoint_source = tmp_path / "good"
    training_state("bert", VConConfig(method="binary"), export_checkpoint_source)
    export_checkpoint(export_checkpoint_source, tmp_path / "merged")
    before = (tmp_path / "merged" / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="already holds a model"):
        export_checkpoint(export_checkpoint_source, tmp_path / "merged")
    assert (tmp_path / "merged" / "model.safetensors").read_bytes() == before
    with pytest.raises(IncompatibleCheckpointError, match="merged model already"):
        load_training_checkpoint(tmp_path / "merged")

    assert run_cli(monkeypatch, "export", str(tmp_path / "merged"), str(tmp_path / "x")) == 2
    assert "python -m hf_vcon export: error:" in capsys.readouterr().err and not (tmp_path / "x").exists()
