#!/usr/bin/env python
"""Fine-tune an image classifier with VCON compression: transformers' ``run_image_classification.py`` plus the
``--vcon_*`` flags.

With no arguments it does the whole job offline in a few minutes on a CPU: a small ViT built from a config on the
handwritten-digit images that scikit-learn ships (``--dataset_name sklearn-digits``, the default), a dense fine-tune,
then post-shot and VCON from it, a table of accuracy and size, and the merged compressed model saved to
``vcon-vit-digits-<method>``. Name a Hub dataset and model for the real thing::

    accelerate launch examples/vision/run_image_classification_vcon.py --dataset_name cifar10 \\
        --image_column_name img --model_name_or_path google/vit-base-patch16-224 --ignore_mismatched_sizes \\
        --vcon_method prune --vcon_sparsity 0.9 --output_dir vit-cifar10-prune90

``--vcon_compare`` is on by default here (three arms); ``--no_vcon_compare`` runs the chosen method alone.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # examples/, for vcon_examples

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    TrainingArguments,
    ViTImageProcessor,
)

from vcon_examples import (  # noqa: E402
    Task,
    UsageError,
    VConArguments,
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

DIGITS = "sklearn-digits"
# The offline default's training recipe, put before the user's flags (so any flag given wins) when the data is the
# digits set. A Hub dataset keeps every transformers default, as in run_image_classification.py.
DIGITS_RECIPE = [
    "--learning_rate", "2e-3", "--num_train_epochs", "20", "--per_device_train_batch_size", "64",
    "--per_device_eval_batch_size", "256", "--weight_decay", "0.05", "--logging_steps", "100",
    "--save_strategy", "no", "--report_to", "none", "--do_train", "--do_eval",
]
# The ViT built when --model_name_or_path is not given: 8×8 digits, 2×2 patches.
SMALL_VIT = dict(image_size=8, patch_size=2, num_channels=3, hidden_size=64, num_hidden_layers=4,
                 num_attention_heads=4, intermediate_size=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@dataclass
class DataTrainingArguments:
    dataset_name: Optional[str] = field(
        default=DIGITS,
        metadata={"help": f"A dataset on the Hub, such as cifar10 or imagenet-1k. The default, {DIGITS}, is the 1,797 "
                          "8×8 digit images that scikit-learn ships (offline) and brings its own training recipe "
                          "(learning rate, epochs, batch size; any flag given wins)."},
    )
    dataset_config_name: Optional[str] = field(default=None, metadata={"help": "The dataset's configuration name."})
    train_dir: Optional[str] = field(default=None, metadata={"help": "A folder of training images (imagefolder)."})
    validation_dir: Optional[str] = field(default=None, metadata={"help": "A folder of validation images."})
    train_val_split: Optional[float] = field(
        default=0.15, metadata={"help": "Fraction of train split off for validation when there is no validation split."}
    )
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Keep this many training images."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Keep this many evaluation images."})
    image_column_name: str = field(default="image", metadata={"help": "The column holding the images."})
    label_column_name: str = field(default="label", metadata={"help": "The column holding the labels."})


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "A model on the Hub or a folder, such as google/vit-base-patch16-224. Not given: a small ViT "
                          "built from a config (--model_type, --config_overrides), trained from scratch."},
    )
    model_type: str = field(default="vit", metadata={"help": "The architecture built from a config without a model."})
    config_overrides: Optional[str] = field(
        default=None, metadata={"help": "Config settings for a model built from a config, e.g. hidden_size=32,num_hidden_layers=2"}
    )
    config_name: Optional[str] = field(default=None, metadata={"help": "Config name or path, if not the model's."})
    cache_dir: Optional[str] = field(default=None, metadata={"help": "Where to store downloads from the Hub."})
    model_revision: str = field(default="main", metadata={"help": "Model version: branch, tag or commit id."})
    image_processor_name: Optional[str] = field(default=None, metadata={"help": "Image processor name or path."})
    token: Optional[str] = field(default=None, metadata={"help": "Hub token for private models and datasets."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run code from the Hub repos named."})
    ignore_mismatched_sizes: bool = field(
        default=False, metadata={"help": "Load a model whose classifier has another number of labels (a new head)."}
    )


@dataclass
class VisionVConArguments(VConArguments):
    vcon_compare: bool = field(
        default=True,
        metadata={"help": "Run the three arms (dense fine-tune, then post-shot and VCON from it) and print their table; "
                          "on by default here, --no_vcon_compare runs the chosen --vcon_method alone."},
    )


def with_recipe(argv: list[str]) -> list[str]:
    """``argv`` preceded by the digits recipe (and a default --output_dir) when the data is the offline digits set."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flag in ("--dataset_name", "--train_dir", "--validation_dir", "--vcon_method"):
        pre.add_argument(flag)
    known, _ = pre.parse_known_args(argv)
    if (known.dataset_name or DIGITS) != DIGITS or known.train_dir or known.validation_dir:
        return argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        return argv
    return ["--output_dir", f"vcon-vit-digits-{known.vcon_method or 'prune'}", *DIGITS_RECIPE, *argv]


def load_digits_dataset():
    """The scikit-learn digits (1,797 8×8 grey images, 16 levels) as a ``DatasetDict`` with an image and a label column."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
    from PIL import Image as PILImage
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = [PILImage.fromarray(np.round(image * (255 / 16)).astype(np.uint8)) for image in digits.images]
    features = Features({"image": Image(), "label": ClassLabel(names=[str(d) for d in range(10)])})
    return DatasetDict(train=Dataset.from_dict({"image": images, "label": digits.target.tolist()}, features=features))


def load_data(data_args: DataTrainingArguments, model_args: ModelArguments, seed: int):
    from datasets import load_dataset

    if data_args.train_dir or data_args.validation_dir:
        if data_args.dataset_name != DIGITS:
            raise UsageError("argument --dataset_name: give either --dataset_name or --train_dir/--validation_dir.")
        data_files = {}
        for split, flag, folder in (("train", "--train_dir", data_args.train_dir),
                                    ("validation", "--validation_dir", data_args.validation_dir)):
            if folder is not None:
                if not os.path.isdir(folder):
                    raise UsageError(f"argument {flag}: {folder!r} is not a folder.")
                data_files[split] = os.path.join(folder, "**")
        dataset = load_or_fail("--train_dir", data_files, lambda: load_dataset("imagefolder", data_files=data_files,
                                                                              cache_dir=model_args.cache_dir))
    elif data_args.dataset_name == DIGITS:
        dataset = load_digits_dataset()
    else:
        dataset = load_or_fail(
            "--dataset_name", data_args.dataset_name,
            lambda: load_dataset(data_args.dataset_name, data_args.dataset_config_name, cache_dir=model_args.cache_dir,
                                 token=model_args.token),
            hint=f"Without internet, run with no --dataset_name (the offline {DIGITS} set) or use --train_dir.",
        )
    first = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
    for flag, column in (("--image_column_name", data_args.image_column_name),
                         ("--label_column_name", data_args.label_column_name)):
        if column not in first.column_names:
            raise UsageError(f"argument {flag}: column {column!r} is not in the data; its columns are "
                             f"{', '.join(first.column_names)}.")
    if "train" not in dataset:
        raise UsageError("argument --train_dir: the data has no train split.")
    label = data_args.label_column_name
    if "validation" not in dataset and data_args.train_val_split:
        from datasets import ClassLabel

        if not isinstance(dataset["train"].features[label], ClassLabel):
            dataset = dataset.class_encode_column(label)
        split = dataset["train"].train_test_split(data_args.train_val_split, seed=seed, stratify_by_column=label)
        dataset["train"], dataset["validation"] = split["train"], split["test"]
    for split, limit in (("train", data_args.max_train_samples), ("validation", data_args.max_eval_samples)):
        if limit is not None and split in dataset:
            dataset[split] = dataset[split].shuffle(seed=seed).select(range(min(limit, len(dataset[split]))))
    return dataset


def label_maps(dataset, label: str) -> tuple[list[str], dict, dict]:
    labels = dataset["train"].features[label].names
    return labels, {name: str(i) for i, name in enumerate(labels)}, {str(i): name for i, name in enumerate(labels)}


def pretrained_model(model_args: ModelArguments, data_args: DataTrainingArguments, dataset, label: str):
    """The config, image processor and model builder of ``--model_name_or_path``."""
    labels, label2id, id2label = label_maps(dataset, label)
    path = model_args.model_name_or_path
    hub = dict(cache_dir=model_args.cache_dir, revision=model_args.model_revision, token=model_args.token,
               trust_remote_code=model_args.trust_remote_code)
    config = load_or_fail("--model_name_or_path", path, lambda: AutoConfig.from_pretrained(
        model_args.config_name or path, num_labels=len(labels), label2id=label2id, id2label=id2label,
        finetuning_task="image-classification", **hub))
    processor_name = model_args.image_processor_name or path
    image_processor = load_or_fail("--image_processor_name", processor_name,
                                   lambda: AutoImageProcessor.from_pretrained(processor_name, **hub))

    def build_model():
        return AutoModelForImageClassification.from_pretrained(
            path, config=config, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes, **hub)

    return config, image_processor, build_model, f"{path} on {data_args.dataset_name or data_args.train_dir}"


def model_from_config(model_args: ModelArguments, data_args: DataTrainingArguments, dataset, label: str):
    """The config (``--model_type``, ``--config_overrides``), image processor and model builder of a model trained
    from scratch."""
    labels, label2id, id2label = label_maps(dataset, label)
    config = AutoConfig.for_model(model_args.model_type, **(SMALL_VIT if model_args.model_type == "vit" else {}))
    if model_args.config_overrides:
        try:
            config.update_from_string(model_args.config_overrides)
        except ValueError as error:
            raise UsageError(f"argument --config_overrides: {error}") from None
    config.num_labels, config.label2id, config.id2label = len(labels), label2id, id2label
    if model_args.image_processor_name:
        image_processor = load_or_fail("--image_processor_name", model_args.image_processor_name,
                                       lambda: AutoImageProcessor.from_pretrained(model_args.image_processor_name))
    else:
        size = getattr(config, "image_size", 224)
        image_processor = ViTImageProcessor(size={"height": size, "width": size}, image_mean=[0.5] * 3,
                                            image_std=[0.5] * 3)

    def build_model():
        return AutoModelForImageClassification.from_config(config)

    description = f"a {model_args.model_type} built from a config on {data_args.dataset_name or data_args.train_dir}"
    return config, image_processor, build_model, description


def prepare_images(dataset, data_args: DataTrainingArguments, image_processor, label: str):
    """Images → ``pixel_values`` with the model's image processor: once for the digits, on the fly otherwise."""
    image_column = data_args.image_column_name

    def transform(batch):
        images = [image.convert("RGB") for image in batch[image_column]]
        return {"pixel_values": image_processor(images, return_tensors="pt")["pixel_values"], "labels": batch[label]}

    for split in dataset:
        if data_args.dataset_name == DIGITS and not (data_args.train_dir or data_args.validation_dir):
            # 1,797 tiny images: preprocess once instead of every epoch.
            dataset[split] = dataset[split].map(transform, batched=True, remove_columns=dataset[split].column_names)
            dataset[split].set_format("torch")
        else:
            dataset[split].set_transform(transform)
    return dataset


def collate(examples):
    return {"pixel_values": torch.stack([example["pixel_values"] for example in examples]),
            "labels": torch.tensor([example["labels"] for example in examples])}


def card_fields(model_args: ModelArguments, data_args: DataTrainingArguments) -> dict:
    fields = dict(finetuned_from=model_args.model_name_or_path, tasks="image-classification",
                  tags=["image-classification", "vision"])
    if data_args.train_dir or data_args.validation_dir:
        fields["dataset"] = "own image folders"
    elif data_args.dataset_name == DIGITS:
        fields["dataset"] = "scikit-learn digits (1,797 8×8 images)"
    else:
        fields.update(dataset_tags=data_args.dataset_name, dataset=data_args.dataset_name)
        if data_args.dataset_config_name:
            fields["dataset_args"] = data_args.dataset_config_name
    return fields


def make_task(dataset, model_args, data_args, training_args, image_processor, build_model, description) -> Task:
    accuracy = load_metric("accuracy", cache_dir=model_args.cache_dir)

    def compute_metrics(prediction):
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        return accuracy(predictions=np.argmax(logits, axis=1), references=prediction.label_ids)

    return Task(
        build_model=build_model,
        train_dataset=dataset["train"],
        eval_datasets={"": dataset["validation"]} if training_args.do_eval and "validation" in dataset else {},
        trainer_kwargs=dict(data_collator=collate, compute_metrics=compute_metrics, processing_class=image_processor),
        card_kwargs=card_fields(model_args, data_args),
        metric_key="accuracy",
        description=description,
        auto_class="AutoModelForImageClassification",
    )


def main(argv: Optional[list[str]] = None) -> dict:
    argv = with_recipe(list(sys.argv[1:] if argv is None else argv))
    model_args, data_args, training_args, vcon_args, overwrite, given = parse_args(
        (ModelArguments, DataTrainingArguments, TrainingArguments, VisionVConArguments), argv
    )
    setup_logging(training_args, logger)
    vcon_config, checkpoint = check_flags(training_args, vcon_args, overwrite)  # before any data or model is loaded
    training_args.remove_unused_columns = False  # the image column is turned into pixel_values on the fly
    if data_args.dataset_name == DIGITS and not model_args.model_name_or_path and training_args.device.type == "cpu":
        # A model this small runs fastest on one thread, and many times faster than on threads that share busy cores.
        torch.set_num_threads(1)

    dataset = load_data(data_args, model_args, training_args.seed)
    label = data_args.label_column_name
    build = pretrained_model if model_args.model_name_or_path else model_from_config
    config, image_processor, build_model, description = build(model_args, data_args, dataset, label)
    check_vcon_fits(lambda: AutoModelForImageClassification.from_config(
        config, trust_remote_code=model_args.trust_remote_code), vcon_config, vcon_args)
    dataset = prepare_images(dataset, data_args, image_processor, label)
    task = make_task(dataset, model_args, data_args, training_args, image_processor, build_model, description)
    return run(task, training_args, vcon_args, checkpoint, given)


if __name__ == "__main__":
    run_main(main)
