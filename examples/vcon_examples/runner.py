"""The run itself, as the transformers example scripts do it: output-folder safety, one arm (train, save, evaluate,
predict, push), or the three-arm comparison dense → post-shot → VCON with its table."""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from transformers import Trainer, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from hf_vcon import VConConfig, VConError, VConTrainer, apply_vcon, vcon_summary
from hf_vcon.export import resolve_export_format
from hf_vcon.summary import human_bytes

from .flags import UsageError, VConCommonArguments

logger = logging.getLogger("vcon_examples")

MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "vcon_config.json")


# ------------------------------------------------------------------------------------------ output folder
def check_output_dir(training_args: TrainingArguments, overwrite: bool, allow_resume: bool = True) -> Optional[str]:
    """Refuse to overwrite a saved model; return the last ``checkpoint-N`` to resume from, if any.

    Raises:
        UsageError: if ``--output_dir`` holds a model, or is not empty and holds no checkpoint, unless ``overwrite``.
    """
    out = training_args.output_dir
    if not training_args.do_train or overwrite or not os.path.isdir(out) or not os.listdir(out):
        return None
    saved = [name for name in MODEL_FILES if os.path.isfile(os.path.join(out, name))]
    if saved:
        raise UsageError(
            f"argument --output_dir: {out!r} already holds a model ({saved[0]}); pass --overwrite_output_dir to "
            "replace it, or choose another --output_dir."
        )
    last = get_last_checkpoint(out) if allow_resume else None
    if last is None:
        raise UsageError(
            f"argument --output_dir: {out!r} exists and is not empty; pass --overwrite_output_dir to write into it "
            "anyway, or choose another --output_dir."
        )
    logger.warning(f"Resuming from {last}; pass --overwrite_output_dir to train from scratch instead.")
    return last


def load_or_fail(flag: str, value: Any, load: Callable[[], Any], hint: str = "") -> Any:
    """``load()``, with a failure (no Hub, a wrong name or path) re-raised as a :class:`UsageError` naming ``flag``."""
    try:
        return load()
    except (OSError, ValueError, FileNotFoundError, ConnectionError) as error:
        raise UsageError(f"argument {flag}: could not load {value!r} ({type(error).__name__}: {error}). {hint}".strip()) from None


# -------------------------------------------------------------------------------------------------- running
@dataclass
class Task:
    """What a script hands to :func:`run`: how to build its model and everything its Trainer needs."""

    build_model: Callable[[], torch.nn.Module]  # a fresh model each call (from the Hub, a path, or a config)
    train_dataset: Any
    eval_datasets: dict[str, Any]  # metric-key suffix ("" for the main set, "_mm" for MNLI mismatched) → dataset
    trainer_kwargs: dict[str, Any]  # data_collator, compute_metrics, processing_class
    card_kwargs: dict[str, Any]  # finetuned_from, tasks, dataset… for the model card and push_to_hub
    metric_key: str  # the headline metric, such as "accuracy"
    description: str  # e.g. "ViT (config) on sklearn digits"
    auto_class: str = "AutoModel"  # the transformers class that loads the saved model, for the printed hint
    predict: Optional[Callable[[Trainer], None]] = None  # --do_predict


def make_trainer(model, args: TrainingArguments, config: Optional[VConConfig], task: Task, train: bool = True,
                 export_format: str = "auto") -> Trainer:
    """A plain ``Trainer`` for ``config=None`` (the dense reference), else a :class:`~hf_vcon.VConTrainer` saving in
    ``export_format``."""
    kwargs = dict(model=model, args=args, train_dataset=task.train_dataset if train else None,
                  eval_dataset=task.eval_datasets.get(""), **task.trainer_kwargs)
    if config is None:
        return Trainer(**kwargs)
    return VConTrainer(vcon_config=config, export_format=export_format, **kwargs)


def _evaluate(trainer: Trainer, task: Task, split: str = "eval") -> dict[str, float]:
    combined: dict[str, float] = {}
    for suffix, dataset in task.eval_datasets.items():
        metrics = trainer.evaluate(eval_dataset=dataset)
        metrics["eval_samples"] = len(dataset)
        combined.update({f"{key}{suffix}": value for key, value in metrics.items()})
    trainer.log_metrics(split, combined)
    trainer.save_metrics(split, combined)
    return combined


def _train(trainer: Trainer, task: Task, checkpoint: Optional[str] = None) -> dict[str, float]:
    result = trainer.train(resume_from_checkpoint=checkpoint)
    metrics = dict(result.metrics, train_samples=len(task.train_dataset))
    trainer.save_model()  # VConTrainer: the merged compressed model
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    return metrics


def _finish(trainer: Trainer, task: Task, args: TrainingArguments) -> None:
    if args.push_to_hub:
        trainer.push_to_hub(**task.card_kwargs)
    elif args.should_save:
        trainer.create_model_card(**task.card_kwargs)


def _arm_args(args: TrainingArguments, output_dir: str) -> TrainingArguments:
    arm = copy.copy(args)
    arm.output_dir, arm.push_to_hub = output_dir, False
    return arm


def run(task: Task, training_args: TrainingArguments, vcon_args: VConCommonArguments, checkpoint: Optional[str] = None) -> dict:
    """Train, save, evaluate, predict and push as the transformers example scripts do; with ``--vcon_compare``, the
    three arms and their table. Returns the headline metrics."""
    config = vcon_args.to_vcon_config()
    export_format = vcon_args.vcon_export_format
    if config is not None and training_args.do_train:
        check_export_format(task, config, export_format)  # before any arm trains
    if not training_args.do_train:
        logger.warning("No --do_train: evaluating the model as loaded (for example a merged VCON model), uncompressed.")
        trainer = make_trainer(task.build_model(), training_args, None, task, train=False)
        metrics = _evaluate(trainer, task) if training_args.do_eval else {}
        if training_args.do_predict and task.predict:
            task.predict(trainer)
        return metrics
    if config is None or not vcon_args.vcon_compare:
        if vcon_args.vcon_compare:
            logger.warning("--vcon_method none: no compression to compare; running the dense fine-tune only.")
        set_seed(training_args.seed)
        trainer = make_trainer(task.build_model(), training_args, config, task, export_format=export_format)
        _train(trainer, task, checkpoint)
        metrics = _evaluate(trainer, task) if training_args.do_eval else {}
        if training_args.do_predict and task.predict:
            task.predict(trainer)
        _finish(trainer, task, training_args)
        if config is not None and training_args.should_save:
            print(f"\nSaved the merged {config.method} model to {os.path.abspath(training_args.output_dir)}")
        return metrics
    return compare(task, training_args, config, export_format)


def compare(task: Task, training_args: TrainingArguments, config: VConConfig, export_format: str = "auto") -> dict:
    """Dense fine-tune, then post-shot (Q = 0) and VCON each from the dense fine-tuned weights; print the table.

    The dense and post-shot models go to ``<output_dir>/dense`` and ``<output_dir>/post-shot``; the VCON model (the
    product) to ``<output_dir>`` itself, with ``compare_results.json`` (also merged into ``all_results.json``).
    """
    out = training_args.output_dir
    key = f"eval_{task.metric_key}"
    results: dict[str, dict] = {}

    logger.warning("*** Arm 1/3: dense fine-tune (the reference) ***")
    set_seed(training_args.seed)
    dense = make_trainer(task.build_model(), _arm_args(training_args, os.path.join(out, "dense")), None, task)
    _train(dense, task)
    results["dense"] = _evaluate(dense, task)
    dense_state = {name: tensor.detach().clone() for name, tensor in dense.model.state_dict().items()}
    dense_bytes = sum(p.numel() * p.element_size() for p in dense.model.parameters())
    del dense

    def from_dense() -> torch.nn.Module:
        set_seed(training_args.seed)
        model = task.build_model()
        model.load_state_dict(dense_state)
        return model

    logger.warning("*** Arm 2/3: post-shot (compress at once, then fine-tune) ***")
    post_config = dataclasses.replace(config, transition_steps=0)
    post = make_trainer(from_dense(), _arm_args(training_args, os.path.join(out, "post-shot")), post_config, task,
                        export_format=export_format)
    _train(post, task)
    results["post-shot"] = _evaluate(post, task)
    del post

    logger.warning("*** Arm 3/3: VCON (β from 1 to 0 over the transition, then fine-tune) ***")
    vcon = make_trainer(from_dense(), training_args, config, task, export_format=export_format)
    _train(vcon, task)
    results["VCON"] = _evaluate(vcon, task)
    if training_args.do_predict and task.predict:
        task.predict(vcon)
    summary = vcon_summary(vcon.model)
    q = config.resolve_transition_steps(vcon.state.max_steps)

    model_after = dense_bytes - summary.bytes_before + summary.bytes_after
    compare_metrics = {f"{arm.lower().replace('-', '')}_{key}": metrics.get(key) for arm, metrics in results.items()}
    compare_metrics.update(targeted_bytes_before=summary.bytes_before, targeted_bytes_after=summary.bytes_after,
                           model_bytes_before=dense_bytes, model_bytes_after=model_after,
                           transition_steps=q, max_steps=vcon.state.max_steps)
    vcon.save_metrics("compare", compare_metrics)
    table = comparison_table(task, config, summary, results, key, dense_bytes, model_after, q, vcon.state.max_steps,
                             vcon.export_format)
    if training_args.should_save:
        with open(os.path.join(out, "compare_results.md"), "w", encoding="utf-8") as handle:
            handle.write(table + "\n")
    _finish(vcon, task, training_args)
    print("\n" + table)
    if training_args.should_save:
        print(where_saved(out, training_args, task.auto_class))
    return compare_metrics


def check_export_format(task: Task, config: VConConfig, export_format: str) -> None:
    """Raise a :class:`UsageError` now if ``--vcon_export_format compressed-tensors`` cannot write this model."""
    if export_format != "compressed-tensors":
        return
    try:
        resolve_export_format(apply_vcon(task.build_model(), config), export_format)
    except VConError as error:
        raise UsageError(f"argument --vcon_export_format: {error}") from None


def comparison_table(task, config, summary, results, key, dense_bytes, model_after, q, max_steps,
                     export_format: str = "dense") -> str:
    setting = ", ".join(summary.settings)
    lines = [
        f"VCON comparison: {task.description}; {config.method} ({setting}) on {len(summary.layers)} Linear layers; "
        f"Q = {q} of {max_steps} optimizer steps per arm",
        "",
        f"| arm | {key} | compressed layers | whole model |",
        "|---|---|---|---|",
    ]
    for arm, metrics in results.items():
        value = metrics.get(key)
        value_text = f"{value:.4f}" if isinstance(value, float) else "n/a"
        if arm == "dense":
            sizes = f"{human_bytes(summary.bytes_before)} | {human_bytes(dense_bytes)}"
        else:
            sizes = (f"{human_bytes(summary.bytes_before)} → {human_bytes(summary.bytes_after)} | "
                     f"{human_bytes(dense_bytes)} → {human_bytes(model_after)}")
        lines.append(f"| {arm} | {value_text} | {sizes} |")
    lines.append("")
    stored = ("as compressed-tensors (packed integers; from_pretrained loads it with the compressed-tensors package)"
              if export_format == "compressed-tensors" else "dense so that plain from_pretrained loads it")
    lines.append(f"Sizes are the compact encoding (zeros skipped, packed bits, low-rank factors); the saved merged model "
                 f"is stored {stored}.")
    return "\n".join(lines)


def where_saved(out: str, training_args: TrainingArguments, auto_class: str) -> str:
    path = os.path.abspath(out)
    if training_args.push_to_hub:
        return f"Saved the merged VCON model to {path} and pushed it to the Hub."
    return (
        f"Saved the merged VCON model to {path} (dense and post-shot arms in its dense/ and post-shot/ folders).\n"
        f"Load it without hf_vcon: from transformers import {auto_class}; {auto_class}.from_pretrained({path!r})\n"
        f"Push it: hf upload <your-name>/<repo> {path}   (or rerun with --push_to_hub --hub_model_id <your-name>/<repo>)"
    )
