#!/usr/bin/env python
"""Fine-tune a text classifier on GLUE (or your CSV/JSON files) with VCON compression: transformers'
``run_glue.py`` plus the ``--vcon_*`` flags.

    accelerate launch examples/glue/run_glue_vcon.py --model_name_or_path bert-base-uncased --task_name sst2 \\
        --vcon_method prune --vcon_sparsity 0.9 --output_dir out --push_to_hub

trains, evaluates the compressed model, saves it merged (plain ``from_pretrained`` loads it) and pushes it. Without
``--do_train``/``--do_eval``/``--do_predict`` it trains and evaluates. ``--vcon_method none`` is the dense fine-tune
(the reference) and ``--vcon_transition_steps 0`` the post-shot baseline, so the three arms of a comparison are three
runs of this script; ``--vcon_compare`` runs all three in one.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # examples/, for vcon_examples

import numpy as np  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    TrainingArguments,
    default_data_collator,
)

from vcon_examples import (  # noqa: E402
    Task,
    UsageError,
    VConArguments,
    check_output_dir,
    load_metric,
    load_or_fail,
    parse_args,
    run,
    run_main,
)

logger = logging.getLogger(__name__)

task_to_keys = {
    "cola": ("sentence", None),
    "mnli": ("premise", "hypothesis"),
    "mrpc": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"),
    "qqp": ("question1", "question2"),
    "rte": ("sentence1", "sentence2"),
    "sst2": ("sentence", None),
    "stsb": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}
# The metric the comparison table shows, per task (every metric of the task is saved).
HEADLINE_METRIC = {"cola": "matthews_correlation", "stsb": "pearson"}


@dataclass
class DataTrainingArguments:
    task_name: Optional[str] = field(
        default=None, metadata={"help": "The GLUE task to train on: " + ", ".join(task_to_keys)}
    )
    dataset_name: Optional[str] = field(default=None, metadata={"help": "A dataset on the Hub (via datasets)."})
    dataset_config_name: Optional[str] = field(default=None, metadata={"help": "The dataset's configuration name."})
    max_seq_length: int = field(
        default=128, metadata={"help": "Tokens per example after tokenization; longer is truncated, shorter padded."}
    )
    overwrite_cache: bool = field(default=False, metadata={"help": "Overwrite the cached preprocessed datasets."})
    pad_to_max_length: bool = field(
        default=True, metadata={"help": "Pad every example to max_seq_length (else pad each batch to its longest)."}
    )
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Keep this many training examples."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Keep this many evaluation examples."})
    max_predict_samples: Optional[int] = field(default=None, metadata={"help": "Keep this many test examples."})
    train_file: Optional[str] = field(default=None, metadata={"help": "A csv or a json file of training data."})
    validation_file: Optional[str] = field(default=None, metadata={"help": "A csv or a json file of validation data."})
    test_file: Optional[str] = field(default=None, metadata={"help": "A csv or a json file of test data."})
    label_column_name: str = field(
        default="label", metadata={"help": "The label column of --train_file/--validation_file/--dataset_name."}
    )

    def check(self) -> None:
        """Raise a :class:`UsageError` naming the flag for an unknown task, a missing or mismatched data file."""
        if self.task_name is not None:
            self.task_name = self.task_name.lower()
            if self.task_name not in task_to_keys:
                raise UsageError(f"argument --task_name: {self.task_name!r} is not a GLUE task; use one of: "
                                 f"{', '.join(task_to_keys)}.")
            return
        if self.dataset_name is not None:
            return
        if self.train_file is None or self.validation_file is None:
            raise UsageError("argument --task_name: give a GLUE --task_name, a --dataset_name, or both --train_file "
                             "and --validation_file.")
        extension = None
        for flag, path in (("--train_file", self.train_file), ("--validation_file", self.validation_file),
                           ("--test_file", self.test_file)):
            if path is None:
                continue
            if not os.path.isfile(path):
                raise UsageError(f"argument {flag}: {path!r} does not exist.")
            suffix = path.rsplit(".", 1)[-1]
            if suffix not in ("csv", "json", "jsonl"):
                raise UsageError(f"argument {flag}: {path!r} must be a .csv or .json file.")
            if extension is not None and suffix != extension:
                raise UsageError(f"argument {flag}: {path!r} must have the same extension as --train_file (.{extension}).")
            extension = suffix


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        metadata={"help": "A model on the Hub or a folder, such as bert-base-uncased."}
    )
    config_name: Optional[str] = field(default=None, metadata={"help": "Config name or path, if not the model's."})
    tokenizer_name: Optional[str] = field(default=None, metadata={"help": "Tokenizer name or path, if not the model's."})
    cache_dir: Optional[str] = field(default=None, metadata={"help": "Where to store downloads from the Hub."})
    use_fast_tokenizer: bool = field(default=True, metadata={"help": "Use a fast (tokenizers) tokenizer."})
    model_revision: str = field(default="main", metadata={"help": "Model version: branch, tag or commit id."})
    token: Optional[str] = field(default=None, metadata={"help": "Hub token for private models and datasets."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run code from the Hub repos named."})
    ignore_mismatched_sizes: bool = field(
        default=False, metadata={"help": "Load a model whose classifier has another number of labels (a new head)."}
    )


def load_raw_datasets(data_args: DataTrainingArguments, model_args: ModelArguments, do_predict: bool):
    from datasets import load_dataset

    hub = dict(cache_dir=model_args.cache_dir, token=model_args.token)
    offline = "Without internet, pass --train_file and --validation_file (CSV or JSON) instead."
    if data_args.task_name is not None:
        return load_or_fail("--task_name", data_args.task_name,
                            lambda: load_dataset("nyu-mll/glue", data_args.task_name, **hub), hint=offline)
    if data_args.dataset_name is not None:
        return load_or_fail("--dataset_name", data_args.dataset_name,
                            lambda: load_dataset(data_args.dataset_name, data_args.dataset_config_name, **hub), hint=offline)
    data_files = {"train": data_args.train_file, "validation": data_args.validation_file}
    if data_args.test_file is not None:
        data_files["test"] = data_args.test_file
    elif do_predict:
        raise UsageError("argument --test_file: --do_predict needs a --test_file (or a GLUE --task_name).")
    builder = "csv" if data_args.train_file.endswith(".csv") else "json"
    return load_or_fail("--train_file", data_args.train_file,
                        lambda: load_dataset(builder, data_files=data_files, cache_dir=model_args.cache_dir))


def main(argv: Optional[list[str]] = None) -> dict:
    model_args, data_args, training_args, vcon_args, overwrite = parse_args(
        (ModelArguments, DataTrainingArguments, TrainingArguments, VConArguments), argv
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)])
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    logging.getLogger("vcon_examples").setLevel(log_level)
    transformers.utils.logging.set_verbosity(log_level)

    # Every bad flag fails here, before any data or model is loaded.
    data_args.check()
    vcon_args.to_vcon_config()
    compare = vcon_args.vcon_compare and vcon_args.vcon_method != "none"
    checkpoint = check_output_dir(training_args, overwrite, allow_resume=not compare)

    raw_datasets = load_raw_datasets(data_args, model_args, training_args.do_predict)
    label = data_args.label_column_name
    columns = raw_datasets["train"].column_names
    if label not in columns:
        source = "--train_file" if data_args.train_file else ("--task_name" if data_args.task_name else "--dataset_name")
        raise UsageError(f"argument --label_column_name: column {label!r} is not in the data of {source}; its columns "
                         f"are {', '.join(columns)}.")
    if label != "label":
        raw_datasets = raw_datasets.rename_column(label, "label")

    if data_args.task_name is not None:
        is_regression = data_args.task_name == "stsb"
        label_list = None if is_regression else raw_datasets["train"].features["label"].names
    else:
        is_regression = raw_datasets["train"].features["label"].dtype in ("float32", "float64")
        label_list = None if is_regression else sorted(raw_datasets["train"].unique("label"))
    num_labels = 1 if is_regression else len(label_list)

    path = model_args.model_name_or_path
    hub = dict(cache_dir=model_args.cache_dir, revision=model_args.model_revision, token=model_args.token,
               trust_remote_code=model_args.trust_remote_code)
    config = load_or_fail("--model_name_or_path", path, lambda: AutoConfig.from_pretrained(
        model_args.config_name or path, num_labels=num_labels, finetuning_task=data_args.task_name, **hub))
    tokenizer = load_or_fail("--tokenizer_name", model_args.tokenizer_name or path, lambda: AutoTokenizer.from_pretrained(
        model_args.tokenizer_name or path, use_fast=model_args.use_fast_tokenizer, **hub))
    label_to_id = None
    if not is_regression:
        config.label2id = {str(name): i for i, name in enumerate(label_list)}
        config.id2label = {i: str(name) for i, name in enumerate(label_list)}
        if data_args.task_name is None:
            label_to_id = {value: i for i, value in enumerate(label_list)}

    def build_model():
        return AutoModelForSequenceClassification.from_pretrained(
            path, config=config, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes, **hub)

    if data_args.task_name is not None:
        sentence1_key, sentence2_key = task_to_keys[data_args.task_name]
    else:
        others = [name for name in raw_datasets["train"].column_names if name != "label"]
        if "sentence1" in others and "sentence2" in others:
            sentence1_key, sentence2_key = "sentence1", "sentence2"
        elif len(others) >= 2:
            sentence1_key, sentence2_key = others[:2]
        elif others:
            sentence1_key, sentence2_key = others[0], None
        else:
            raise UsageError("argument --train_file: the data has no text column besides the label.")

    padding = "max_length" if data_args.pad_to_max_length else False
    max_seq_length = min(data_args.max_seq_length, tokenizer.model_max_length)

    def preprocess(examples):
        texts = (examples[sentence1_key],) if sentence2_key is None else (examples[sentence1_key], examples[sentence2_key])
        result = tokenizer(*texts, padding=padding, max_length=max_seq_length, truncation=True)
        if label_to_id is not None and "label" in examples:
            result["label"] = [label_to_id[value] if value != -1 else -1 for value in examples["label"]]
        return result

    with training_args.main_process_first(desc="dataset map pre-processing"):
        raw_datasets = raw_datasets.map(preprocess, batched=True, load_from_cache_file=not data_args.overwrite_cache,
                                        desc="Running tokenizer on dataset")

    def limit(dataset, count):
        return dataset if count is None else dataset.select(range(min(count, len(dataset))))

    mnli = data_args.task_name == "mnli"
    train_dataset = limit(raw_datasets["train"], data_args.max_train_samples)
    eval_datasets = {}
    if training_args.do_eval:
        eval_datasets[""] = limit(raw_datasets["validation_matched" if mnli else "validation"], data_args.max_eval_samples)
        if mnli:
            eval_datasets["_mm"] = limit(raw_datasets["validation_mismatched"], data_args.max_eval_samples)

    if data_args.task_name is not None:
        metric = load_metric("glue", data_args.task_name, cache_dir=model_args.cache_dir)
    else:
        metric = load_metric("mse" if is_regression else "accuracy", cache_dir=model_args.cache_dir)

    def compute_metrics(prediction):
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        predictions = np.squeeze(logits) if is_regression else np.argmax(logits, axis=1)
        result = metric(predictions=predictions, references=prediction.label_ids)
        if len(result) > 1:
            result["combined_score"] = float(np.mean(list(result.values())))
        return result

    def predict(trainer):
        splits = {data_args.task_name or "test": "test_matched" if mnli else "test"}
        if mnli:
            splits["mnli-mm"] = "test_mismatched"
        for name, split in splits.items():
            dataset = limit(raw_datasets[split], data_args.max_predict_samples).remove_columns("label")
            predictions = trainer.predict(dataset, metric_key_prefix="predict").predictions
            predictions = np.squeeze(predictions) if is_regression else np.argmax(predictions, axis=1)
            if trainer.is_world_process_zero():
                with open(os.path.join(training_args.output_dir, f"predict_results_{name}.txt"), "w") as writer:
                    writer.write("index\tprediction\n")
                    for index, item in enumerate(predictions):
                        writer.write(f"{index}\t{item:3.3f}\n" if is_regression else f"{index}\t{label_list[item]}\n")

    card_kwargs = {"finetuned_from": path, "tasks": "text-classification"}
    if data_args.task_name is not None:
        card_kwargs.update(language="en", dataset_tags="glue", dataset_args=data_args.task_name,
                           dataset=f"GLUE {data_args.task_name.upper()}")
    collator = default_data_collator if data_args.pad_to_max_length else DataCollatorWithPadding(
        tokenizer, pad_to_multiple_of=8 if training_args.fp16 else None)
    task = Task(
        build_model=build_model,
        train_dataset=train_dataset,
        eval_datasets=eval_datasets,
        trainer_kwargs=dict(data_collator=collator, compute_metrics=compute_metrics, processing_class=tokenizer),
        card_kwargs=card_kwargs,
        metric_key=HEADLINE_METRIC.get(data_args.task_name, "mse" if is_regression else "accuracy"),
        description=f"{path} on {data_args.task_name or data_args.dataset_name or data_args.train_file}",
        auto_class="AutoModelForSequenceClassification",
        predict=predict,
    )
    return run(task, training_args, vcon_args, checkpoint)


if __name__ == "__main__":
    run_main(main)
