"""The run itself, as the transformers example scripts do it: one arm (train, save, evaluate, predict, push), or the
three-arm comparison dense → post-shot → VCON with its table. What is checked before is in :mod:`.checks`."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from transformers import Trainer, TrainingArguments, set_seed

from hf_vcon import DistillationConfig, VConConfig, VConTrainer, get_beta, vcon_summary
from hf_vcon.config.schedules import warn_if_transition_outlasts_run
from hf_vcon.patching.summary import human_bytes

from .distill_flags import TEACHER_FLAG, teacher_note
from .flags import UsageError, VConCommonArguments

logger = logging.getLogger("vcon_examples")

# Flags that ask for checkpoints: without one, the arms of a comparison write none (they cannot be resumed).
CHECKPOINT_FLAGS = frozenset({"save_strategy", "save_steps", "save_total_limit", "load_best_model_at_end"})


def setup_logging(training_args: TrainingArguments, *loggers: logging.Logger) -> None:
    """Log to stdout at the process's level (warnings on the main process, errors elsewhere), as transformers'
    scripts do."""
    import sys

    import transformers

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)])
    level = training_args.get_process_log_level()
    for each in (*loggers, logger):
        each.setLevel(level)
    transformers.utils.logging.set_verbosity(level)


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
                 export_format: str = "auto", distillation: Optional[DistillationConfig] = None) -> Trainer:
    """A plain ``Trainer`` for ``config=None`` (the dense reference), else a :class:`~hf_vcon.VConTrainer` saving in
    ``export_format`` (distilling with ``distillation``, if given)."""
    kwargs = dict(model=model, args=args, train_dataset=task.train_dataset if train else None,
                  eval_dataset=task.eval_datasets.get(""), **task.trainer_kwargs)
    if config is None:
        return Trainer(**kwargs)
    return VConTrainer(vcon_config=config, export_format=export_format, distillation=distillation, **kwargs)


def distillation_for(task: Task, vcon_args: Any, single: bool) -> Optional[DistillationConfig]:
    """The flags' :class:`~hf_vcon.DistillationConfig`, the ``--vcon_teacher_model_name_or_path`` model loaded with
    the task's auto class (``None`` without ``--vcon_distill_alpha``)."""
    if not getattr(vcon_args, "distills", False):
        return None
    path = vcon_args.vcon_teacher_model_name_or_path
    teacher = None
    if path:
        import transformers

        auto_class = getattr(transformers, task.auto_class)
        teacher = load_or_fail(TEACHER_FLAG, path, lambda: auto_class.from_pretrained(path))
    elif single:
        logger.warning("Distilling from the model as loaded from --model_name_or_path (copied before compression): it "
                       f"must be fine-tuned on this task; otherwise pass {TEACHER_FLAG}, or use --vcon_compare (the "
                       "dense arm's fine-tuned model is then the teacher).")
    return vcon_args.distillation_config(teacher)


def saved_model_metrics(metrics: dict[str, float], beta: float) -> dict[str, float]:
    """An evaluation's metrics with the saved (compressed) model's under the plain names.

    While β = 0 the compressed model's metrics repeat the plain ones and are dropped. When training stopped
    before β reached 0, ``eval_<metric>`` becomes the compressed model's (what was saved) and the blended model's
    (never saved) is kept as ``eval_blended_<metric>``.
    """
    compressed = {key.replace("_compressed_", "_", 1): value for key, value in metrics.items() if "_compressed_" in key}
    plain = {key: value for key, value in metrics.items() if "_compressed_" not in key}
    if beta == 0 or not compressed:
        return plain
    blended = {key.replace("_", "_blended_", 1): value for key, value in plain.items() if key in compressed}
    return {**plain, **compressed, **blended}


def _evaluate(trainer: Trainer, task: Task, split: str = "eval") -> dict[str, float]:
    beta = get_beta(trainer.model) if isinstance(trainer, VConTrainer) else 0.0
    if beta > 0:
        logger.warning(f"Training stopped at β = {beta:.4g}, before the transition's end: eval_* are the saved "
                       "(compressed) model's metrics, eval_blended_* those of the blended model training ended with.")
    combined: dict[str, float] = {}
    for suffix, dataset in task.eval_datasets.items():
        metrics = saved_model_metrics(trainer.evaluate(eval_dataset=dataset), beta)
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


def _finish(trainer: Trainer, task: Task, args: TrainingArguments, comparison: Optional[str] = None) -> None:
    extra = {"comparison": comparison} if comparison and isinstance(trainer, VConTrainer) else {}
    if args.push_to_hub:
        trainer.push_to_hub(**task.card_kwargs, **extra)
    elif args.should_save:
        trainer.create_model_card(**task.card_kwargs, **extra)


def _arm_args(args: TrainingArguments, output_dir: str, push: bool, checkpoints: bool) -> TrainingArguments:
    arm = copy.copy(args)
    arm.output_dir, arm.push_to_hub = output_dir, push and args.push_to_hub
    if not checkpoints:
        arm.save_strategy = type(args.save_strategy)("no")  # SaveStrategy (IntervalStrategy before 4.47)
    return arm


def _single(task: Task, training_args: TrainingArguments, config: Optional[VConConfig],
            checkpoint: Optional[str], export_format: str, distillation: Optional[DistillationConfig] = None) -> dict:
    set_seed(training_args.seed)
    trainer = make_trainer(task.build_model(), training_args, config, task, export_format=export_format,
                           distillation=distillation)
    _train(trainer, task, checkpoint)
    metrics = _evaluate(trainer, task) if training_args.do_eval else {}
    if training_args.do_predict and task.predict:
        task.predict(trainer)
    _finish(trainer, task, training_args)
    if config is not None and training_args.should_save:
        print(f"\nSaved the merged {config.method} model to {os.path.abspath(training_args.output_dir)}")
    return metrics


def run(task: Task, training_args: TrainingArguments, vcon_args: VConCommonArguments, checkpoint: Optional[str] = None,
        given: frozenset[str] = frozenset()) -> dict:
    """Train, save, evaluate, predict and push as the transformers example scripts do; with ``--vcon_compare``, the
    three arms and their table. ``given`` holds the names of the flags the command line set. Returns the headline
    metrics (the saved model's)."""
    metrics = _run_task(task, training_args, vcon_args, checkpoint, given)
    # The Trainer leaves the process group open; left to interpreter exit, a gloo group aborts a rank now and then
    # (SIGABRT after a successful run), so the script closes it, as accelerate's end_training() does.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return metrics


def _run_task(task: Task, training_args: TrainingArguments, vcon_args: VConCommonArguments,
              checkpoint: Optional[str], given: frozenset[str]) -> dict:
    config = vcon_args.to_vcon_config()
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
        return _single(task, training_args, config, checkpoint, vcon_args.vcon_export_format,
                       distillation_for(task, vcon_args, single=True))
    return compare(task, training_args, config, checkpoints=bool(CHECKPOINT_FLAGS & given),
                   export_format=vcon_args.vcon_export_format,
                   distillation=distillation_for(task, vcon_args, single=False),
                   note=teacher_note(vcon_args.distillation_config() if getattr(vcon_args, "distills", False) else None,
                                     getattr(vcon_args, "vcon_teacher_model_name_or_path", None)))


def planned_steps(trainer: Trainer) -> int:
    """The optimizer steps ``trainer.train()`` will make (``max_steps``, or epochs × updates per epoch)."""
    args = trainer.args
    if args.max_steps > 0:
        return args.max_steps
    batches = len(trainer.get_train_dataloader())
    accumulation = args.gradient_accumulation_steps
    per_epoch = max(batches // accumulation + int(batches % accumulation > 0), 1)
    return math.ceil(args.num_train_epochs * per_epoch)


def _dense_arm(task: Task, training_args: TrainingArguments, config: VConConfig, checkpoints: bool):
    out = training_args.output_dir
    set_seed(training_args.seed)
    dense = make_trainer(task.build_model(), _arm_args(training_args, os.path.join(out, "dense"), False, checkpoints),
                         None, task)
    warn_if_transition_outlasts_run(config, planned_steps(dense), stacklevel=2)  # before any arm trains
    logger.warning("*** Arm 1/3: dense fine-tune (the reference) ***")
    _train(dense, task)
    metrics = _evaluate(dense, task)
    state = {name: tensor.detach().clone() for name, tensor in dense.model.state_dict().items()}
    return metrics, state, sum(p.numel() * p.element_size() for p in dense.model.parameters())


def compare(task: Task, training_args: TrainingArguments, config: VConConfig, checkpoints: bool = False,
            export_format: str = "auto", distillation: Optional[DistillationConfig] = None, note: str = "") -> dict:
    """Dense fine-tune, then post-shot (Q = 0) and VCON each from the dense fine-tuned weights; print the table.
    With ``distillation`` both compressed arms distil (by default from the dense fine-tuned model); ``note`` is added
    to the table's title.

    The dense and post-shot models go to ``<output_dir>/dense`` and ``<output_dir>/post-shot``; the VCON model (the
    product) to ``<output_dir>`` itself, with ``compare_results.json`` (also merged into ``all_results.json``) and
    the table in its model card. The arms write no ``checkpoint-N`` folders unless ``checkpoints`` (a flag such as
    ``--save_strategy`` asked for them). The compressed arms save in ``export_format``.
    """
    out = training_args.output_dir
    results: dict[str, dict] = {}
    results["dense"], dense_state, dense_bytes = _dense_arm(task, training_args, config, checkpoints)

    def from_dense() -> torch.nn.Module:
        set_seed(training_args.seed)
        model = task.build_model()
        model.load_state_dict(dense_state)
        return model

    logger.warning("*** Arm 2/3: post-shot (compress at once, then fine-tune) ***")
    post_config = dataclasses.replace(config, transition_steps=0)
    post = make_trainer(from_dense(), _arm_args(training_args, os.path.join(out, "post-shot"), False, checkpoints),
                        post_config, task, export_format=export_format, distillation=distillation)
    _train(post, task)
    results["post-shot"] = _evaluate(post, task)
    del post

    logger.warning("*** Arm 3/3: VCON (β from 1 to 0 over the transition, then fine-tune) ***")
    vcon = make_trainer(from_dense(), _arm_args(training_args, out, True, checkpoints), config, task,
                        export_format=export_format, distillation=distillation)
    _train(vcon, task)
    results["VCON"] = _evaluate(vcon, task)
    if training_args.do_predict and task.predict:
        task.predict(vcon)
    return _report(task, training_args, config, vcon, results, dense_bytes, note)


def _report(task: Task, training_args: TrainingArguments, config: VConConfig, vcon: Trainer, results: dict,
            dense_bytes: int, note: str = "") -> dict:
    """The comparison's numbers, its table (printed, in compare_results.md and in the model card), the push."""
    out, key = training_args.output_dir, f"eval_{task.metric_key}"
    summary = vcon_summary(vcon.model)
    q = config.resolve_transition_steps(vcon.state.max_steps)
    model_after = dense_bytes - summary.bytes_before + summary.bytes_after
    compare_metrics = {f"{arm.lower().replace('-', '')}_{key}": metrics.get(key) for arm, metrics in results.items()}
    compare_metrics.update(targeted_bytes_before=summary.bytes_before, targeted_bytes_after=summary.bytes_after,
                           model_bytes_before=dense_bytes, model_bytes_after=model_after,
                           transition_steps=q, max_steps=vcon.state.max_steps)
    vcon.save_metrics("compare", compare_metrics)
    table = comparison_table(task, config, summary, results, key, dense_bytes, model_after, q, vcon.state.max_steps,
                             vcon.export_format, note)
    if training_args.should_save:
        with open(os.path.join(out, "compare_results.md"), "w", encoding="utf-8") as handle:
            handle.write(table + "\n")
    _finish(vcon, task, training_args, comparison=table)
    print("\n" + table)
    if training_args.should_save:
        print(where_saved(out, training_args, task.auto_class))
    return compare_metrics


def comparison_table(task, config, summary, results, key, dense_bytes, model_after, q, max_steps,
                     export_format: str = "dense", note: str = "") -> str:
    setting = ", ".join(summary.settings)
    lines = [
        f"VCON comparison: {task.description}; {config.method} ({setting}) on {len(summary.layers)} Linear layers; "
        f"Q = {q} of {max_steps} optimizer steps per arm{note}",
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
