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
from datasets import DatasetDict  # noqa: E402
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
    check_cells,
    check_flags,
    check_vcon_fits,
    load_metric,
    load_or_fail,
    parse_args,
    run,
    run_main,
    setup_logging,
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
FILE_FLAGS = {"train": "--train_file", "validation": "--validation_file", "test": "--test_file"}


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
    if do_predict and data_args.test_file is None:
        raise UsageError("argument --test_file: --do_predict needs a --test_file (or a GLUE --task_name).")
    builder = "csv" if data_args.train_file.endswith(".csv") else "json"
    files = {"train": data_args.train_file, "validation": data_args.validation_file, "test": data_args.test_file}
    # Each file on its own: a test file without a label column stays without one (unlabelled test data is usual).
    def load(split, path):
        return load_dataset(builder, data_files={split: path}, cache_dir=model_args.cache_dir)[split]

    return DatasetDict({split: load_or_fail(FILE_FLAGS[split], path, lambda split=split, path=path: load(split, path))
                        for split, path in files.items() if path})


@dataclass
class Labels:
    """The label space: regression, or the label names and how raw labels map to class ids."""

    is_regression: bool
    names: Optional[list] = None
    to_id: Optional[dict] = None  # raw label → class id (own data; GLUE's labels are ids already)

    @property
    def count(self) -> int:
        return 1 if self.is_regression else len(self.names)


def rename_label_column(raw_datasets, data_args: DataTrainingArguments):
    """The data with its label column named ``label`` (in every split that has one).

    Raises:
        UsageError: if ``--label_column_name`` is not a column of the training data.
    """
    label, columns = data_args.label_column_name, raw_datasets["train"].column_names
    if label not in columns:
        raise UsageError(f"argument --label_column_name: column {label!r} is not in the data of "
                         f"{data_source(data_args)[0]}; its columns are {', '.join(columns)}.")
    if label == "label":
        return raw_datasets
    return DatasetDict({split: dataset.rename_column(label, "label") if label in dataset.column_names else dataset
                        for split, dataset in raw_datasets.items()})


def label_space(raw_datasets, data_args: DataTrainingArguments) -> Labels:
    """Regression or classification, and the class names, from the training split."""
    train = raw_datasets["train"]
    if data_args.task_name is not None:
        regression = data_args.task_name == "stsb"
        return Labels(regression, None if regression else train.features["label"].names)
    if train.features["label"].dtype in ("float32", "float64"):
        return Labels(True)
    names = sorted(train.unique("label"))
    for split, dataset in raw_datasets.items():
        unknown = set(dataset.unique("label")) - set(names) - {None} if "label" in dataset.column_names else set()
        if unknown:
            flag, source = data_source(data_args, split)
            raise UsageError(f"argument {flag}: {source!r} has labels that the training data lacks "
                             f"({sorted(unknown)[:5]}); the training labels are {names[:10]}.")
    return Labels(False, names, {value: i for i, value in enumerate(names)})


def data_source(data_args: DataTrainingArguments, split: str = "train") -> tuple[str, str]:
    """The flag that named a split's data and its file or dataset name, for messages."""
    if data_args.task_name is not None:
        return "--task_name", data_args.task_name
    if data_args.dataset_name is not None:
        return "--dataset_name", data_args.dataset_name
    flag = FILE_FLAGS.get(split, "--train_file")
    return flag, getattr(data_args, flag[2:])


def text_keys(raw_datasets, task_name: Optional[str]) -> tuple[str, Optional[str]]:
    """The one or two text columns: the GLUE task's, else sentence1/sentence2, else the first two non-label columns."""
    if task_name is not None:
        return task_to_keys[task_name]
    others = [name for name in raw_datasets["train"].column_names if name != "label"]
    if "sentence1" in others and "sentence2" in others:
        return "sentence1", "sentence2"
    if len(others) >= 2:
        return others[0], others[1]
    if others:
        return others[0], None
    raise UsageError("argument --train_file: the data has no text column besides the label.")


def check_data(raw_datasets, data_args: DataTrainingArguments, keys: tuple[str, Optional[str]]) -> None:
    """Refuse empty text or label cells (a test split may be unlabelled), naming the file, row and column."""
    texts = [key for key in keys if key is not None]
    for split, dataset in raw_datasets.items():
        flag, source = data_source(data_args, split.split("_")[0])
        labelled = "label" in dataset.column_names and not split.startswith("test")
        check_cells(dataset, texts + (["label"] if labelled else []), flag, source)


def load_config_and_tokenizer(model_args: ModelArguments, data_args: DataTrainingArguments, labels: Labels):
    path = model_args.model_name_or_path
    hub = dict(cache_dir=model_args.cache_dir, revision=model_args.model_revision, token=model_args.token,
               trust_remote_code=model_args.trust_remote_code)
    config = load_or_fail("--model_name_or_path", path, lambda: AutoConfig.from_pretrained(
        model_args.config_name or path, num_labels=labels.count, finetuning_task=data_args.task_name, **hub))
    tokenizer = load_or_fail("--tokenizer_name", model_args.tokenizer_name or path, lambda: AutoTokenizer.from_pretrained(
        model_args.tokenizer_name or path, use_fast=model_args.use_fast_tokenizer, **hub))
    if not labels.is_regression:
        config.label2id = {str(name): i for i, name in enumerate(labels.names)}
        config.id2label = {i: str(name) for i, name in enumerate(labels.names)}
    return config, tokenizer, hub


def tokenize(raw_datasets, tokenizer, data_args: DataTrainingArguments, training_args: TrainingArguments,
             keys: tuple[str, Optional[str]], labels: Labels):
    padding = "max_length" if data_args.pad_to_max_length else False
    max_seq_length = min(data_args.max_seq_length, tokenizer.model_max_length)
    first, second = keys

    def preprocess(examples):
        texts = (examples[first],) if second is None else (examples[first], examples[second])
        result = tokenizer(*texts, padding=padding, max_length=max_seq_length, truncation=True)
        if labels.to_id is not None and "label" in examples:
            # -1: an unlabelled row (a test file without labels)
            result["label"] = [-1 if value is None else labels.to_id[value] for value in examples["label"]]
        return result

    with training_args.main_process_first(desc="dataset map pre-processing"):
        return raw_datasets.map(preprocess, batched=True, load_from_cache_file=not data_args.overwrite_cache,
                                desc="Running tokenizer on dataset")


def limit(dataset, count):
    return dataset if count is None else dataset.select(range(min(count, len(dataset))))


def eval_datasets(datasets, data_args: DataTrainingArguments, training_args: TrainingArguments) -> dict:
    mnli = data_args.task_name == "mnli"
    if not training_args.do_eval:
        return {}
    result = {"": limit(datasets["validation_matched" if mnli else "validation"], data_args.max_eval_samples)}
    if mnli:
        result["_mm"] = limit(datasets["validation_mismatched"], data_args.max_eval_samples)
    return result


def metrics_function(data_args: DataTrainingArguments, model_args: ModelArguments, labels: Labels):
    if data_args.task_name is not None:
        metric = load_metric("glue", data_args.task_name, cache_dir=model_args.cache_dir)
    else:
        metric = load_metric("mse" if labels.is_regression else "accuracy", cache_dir=model_args.cache_dir)

    def compute_metrics(prediction):
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        predictions = np.squeeze(logits) if labels.is_regression else np.argmax(logits, axis=1)
        result = metric(predictions=predictions, references=prediction.label_ids)
        if len(result) > 1:
            result["combined_score"] = float(np.mean(list(result.values())))
        return result

    return compute_metrics


def predictor(datasets, data_args: DataTrainingArguments, training_args: TrainingArguments, labels: Labels):
    """``--do_predict``: predictions for the test split(s), labelled or not, written as transformers' script does."""
    mnli = data_args.task_name == "mnli"
    splits = {data_args.task_name or "test": "test_matched" if mnli else "test"}
    if mnli:
        splits["mnli-mm"] = "test_mismatched"

    def predict(trainer):
        for name, split in splits.items():
            dataset = limit(datasets[split], data_args.max_predict_samples)
            if "label" in dataset.column_names:
                dataset = dataset.remove_columns("label")
            predictions = trainer.predict(dataset, metric_key_prefix="predict").predictions
            predictions = np.squeeze(predictions) if labels.is_regression else np.argmax(predictions, axis=1)
            if trainer.is_world_process_zero():
                with open(os.path.join(training_args.output_dir, f"predict_results_{name}.txt"), "w") as writer:
                    writer.write("index\tprediction\n")
                    for index, item in enumerate(predictions):
                        text = f"{item:3.3f}" if labels.is_regression else labels.names[item]
                        writer.write(f"{index}\t{text}\n")

    return predict


def card_fields(model_args: ModelArguments, data_args: DataTrainingArguments) -> dict:
    """The model card's metadata, as transformers' run_glue.py gives it."""
    fields = {"finetuned_from": model_args.model_name_or_path, "tasks": "text-classification"}
    if data_args.task_name is not None:
        fields.update(language="en", dataset_tags="nyu-mll/glue", dataset_args=data_args.task_name,
                      dataset=f"GLUE {data_args.task_name.upper()}")
    elif data_args.dataset_name is not None:
        fields.update(dataset_tags=data_args.dataset_name, dataset=data_args.dataset_name)
        if data_args.dataset_config_name:
            fields["dataset_args"] = data_args.dataset_config_name
    else:
        fields["dataset"] = f"own data ({os.path.basename(data_args.train_file)})"
    return fields


def make_task(datasets, tokenizer, model_args, data_args, training_args, labels: Labels, build_model) -> Task:
    collator = default_data_collator if data_args.pad_to_max_length else DataCollatorWithPadding(
        tokenizer, pad_to_multiple_of=8 if training_args.fp16 else None)
    return Task(
        build_model=build_model,
        train_dataset=limit(datasets["train"], data_args.max_train_samples),
        eval_datasets=eval_datasets(datasets, data_args, training_args),
        trainer_kwargs=dict(data_collator=collator, compute_metrics=metrics_function(data_args, model_args, labels),
                            processing_class=tokenizer),
        card_kwargs=card_fields(model_args, data_args),
        metric_key=HEADLINE_METRIC.get(data_args.task_name, "mse" if labels.is_regression else "accuracy"),
        description=f"{model_args.model_name_or_path} on "
                    f"{data_args.task_name or data_args.dataset_name or data_args.train_file}",
        auto_class="AutoModelForSequenceClassification",
        predict=predictor(datasets, data_args, training_args, labels),
    )


def main(argv: Optional[list[str]] = None) -> dict:
    model_args, data_args, training_args, vcon_args, overwrite, given = parse_args(
        (ModelArguments, DataTrainingArguments, TrainingArguments, VConArguments), argv
    )
    setup_logging(training_args, logger)
    data_args.check()  # every flag is checked before any data or model is loaded
    vcon_config, checkpoint = check_flags(training_args, vcon_args, overwrite)

    raw_datasets = rename_label_column(load_raw_datasets(data_args, model_args, training_args.do_predict), data_args)
    keys = text_keys(raw_datasets, data_args.task_name)
    check_data(raw_datasets, data_args, keys)
    labels = label_space(raw_datasets, data_args)
    config, tokenizer, hub = load_config_and_tokenizer(model_args, data_args, labels)
    check_vcon_fits(lambda: AutoModelForSequenceClassification.from_config(
        config, trust_remote_code=model_args.trust_remote_code), vcon_config, vcon_args)

    def build_model():
        return AutoModelForSequenceClassification.from_pretrained(
            model_args.model_name_or_path, config=config, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
            **hub)

    datasets = tokenize(raw_datasets, tokenizer, data_args, training_args, keys, labels)
    task = make_task(datasets, tokenizer, model_args, data_args, training_args, labels, build_model)
    return run(task, training_args, vcon_args, checkpoint, given)


if __name__ == "__main__":
    run_main(main)
