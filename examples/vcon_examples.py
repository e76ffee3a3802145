"""What the example scripts share: the ``--vcon_*`` flags, argument parsing with clear errors, output-folder safety,
metrics from ``evaluate`` with an offline fallback, and the run itself — one arm, or the three-arm comparison
dense → post-shot → VCON with its table.

The scripts put this folder on ``sys.path`` so that ``python examples/<task>/<script>.py`` runs from a clone.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from transformers import HfArgumentParser, Trainer, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from hf_vcon import VConConfig, VConTrainer, available_compressors, vcon_summary

logger = logging.getLogger(__name__)

NONE_METHOD = "none"
MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "vcon_config.json")
_REGEX_CHARS = re.compile(r"[*+?\[\](){}|^$\\]")


class UsageError(Exception):
    """Bad input found before training: the message names the flag; the script exits with code 2."""


def run_main(main: Callable[[Optional[Sequence[str]]], Any], argv: Optional[Sequence[str]] = None) -> Any:
    """Call ``main(argv)``; a :class:`UsageError` becomes ``<script>: error: <message>`` on stderr and exit code 2."""
    try:
        return main(argv)
    except UsageError as error:
        print(f"{os.path.basename(sys.argv[0])}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


# ------------------------------------------------------------------------------------------- the VCON flags
def _modules_arg(values: Optional[list[str]]) -> Any:
    """CLI values → VConConfig's target grammar: one regex-looking value is a regex, "all-linear" stays, else a list."""
    if not values:
        return None
    if len(values) == 1 and (values[0] == "all-linear" or _REGEX_CHARS.search(values[0])):
        return values[0]
    return list(values)


def _transition_steps(text: str) -> Any:
    """"100" → 100 optimizer steps, "0.2" → a fraction of the run, "0" → 0 (post-shot)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise UsageError(
            f"argument --vcon_transition_steps: {text!r} is not a number; give an int (optimizer steps), a float "
            "in (0, 1] (a fraction of the run) or 0 (post-shot)."
        ) from None


@dataclass
class VConArguments:
    """The ``--vcon_*`` flags; each maps to the :class:`hf_vcon.VConConfig` field of the same name without the prefix."""

    vcon_method: str = field(
        default="prune",
        metadata={"help": "The compression: prune, binary or lowrank; or none for a dense fine-tune (the reference)."},
    )
    vcon_transition_steps: str = field(
        default="0.2",
        metadata={"help": "Q, over which β goes 1 → 0: an int is optimizer steps, a float in (0, 1] a fraction of the "
                          "run, 0 the post-shot baseline (compress at once)."},
    )
    vcon_start_step: int = field(default=0, metadata={"help": "β stays 1 until this optimizer step."})
    vcon_schedule: str = field(default="linear", metadata={"help": "β's shape: linear (the paper), cosine or cubic."})
    vcon_sparsity: Optional[float] = field(
        default=None, metadata={"help": "prune: the fraction of weights set to zero (default 0.9)."}
    )
    vcon_prune_pattern: Optional[str] = field(
        default=None, metadata={"help": "prune: layer (default), row, or N:M such as 2:4."}
    )
    vcon_rank: Optional[int] = field(default=None, metadata={"help": "lowrank: the rank of every layer."})
    vcon_rank_ratio: Optional[float] = field(
        default=None, metadata={"help": "lowrank: the rank as a fraction of min(in, out) of each layer."}
    )
    vcon_binary_scale: Optional[str] = field(
        default=None, metadata={"help": "binary: tensor (one mean|W| per weight, default) or channel."}
    )
    vcon_target_modules: Optional[list[str]] = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "Modules to compress: names or dotted suffixes (query value), one regex re.fullmatch-ed "
                          "against full module names, or all-linear (every Linear except the head; the default)."},
    )
    vcon_exclude_modules: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules to leave dense, in the same grammar."}
    )
    vcon_compare: bool = field(
        default=False,
        metadata={"help": "Run the three arms: a dense fine-tune, then post-shot (Q = 0) and VCON each from the dense "
                          "fine-tuned model, and print their table. The VCON model is the one saved in --output_dir."},
    )

    def to_vcon_config(self) -> Optional[VConConfig]:
        """The :class:`VConConfig` of these flags (``None`` for ``--vcon_method none``).

        Raises:
            UsageError: naming the ``--vcon_…`` flag(s), with VConConfig's own explanation.
        """
        fields = {f.name[len("vcon_"):]: getattr(self, f.name) for f in dataclasses.fields(VConArguments)}
        fields.pop("compare")
        if self.vcon_method == NONE_METHOD:
            given = [f"--vcon_{name}" for name in ("sparsity", "prune_pattern", "rank", "rank_ratio", "binary_scale")
                     if fields[name] is not None]
            if given:
                raise UsageError(f"argument {given[0]}: it does not apply to --vcon_method none (a dense fine-tune).")
            return None
        fields["transition_steps"] = _transition_steps(fields["transition_steps"])
        fields["target_modules"] = _modules_arg(fields["target_modules"])
        fields["exclude_modules"] = _modules_arg(fields["exclude_modules"])
        try:
            return VConConfig(**fields)
        except (TypeError, ValueError) as error:
            message = str(error)
            # VConConfig names its fields; name the flags that set them.
            named = [name for name in fields if re.search(rf"(?<![\w-]){name}(?!\w)", message)]
            flags = "/".join(f"--vcon_{name}" for name in sorted(named, key=message.find)) or "--vcon_method"
            if "method=" in message and "is not known" in message:
                message = message.rstrip(".") + f", or {NONE_METHOD} (a dense fine-tune)."
            raise UsageError(f"argument {flags}: {message}") from None


@dataclass
class OverwriteArguments:
    """``--overwrite_output_dir``, which transformers 5 removed from ``TrainingArguments``."""

    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace a model already saved in --output_dir (never replaced otherwise)."}
    )


def _has_overwrite_flag() -> bool:
    return "overwrite_output_dir" in {f.name for f in dataclasses.fields(TrainingArguments)}


def parse_args(dataclass_types: Sequence[type], argv: Optional[Sequence[str]] = None) -> tuple:
    """Parse ``argv`` (default ``sys.argv[1:]``; one ``.json`` path reads the flags from that file) into the dataclasses.

    Returns their instances in order, then ``overwrite_output_dir`` (a bool) last. Without ``--do_train``,
    ``--do_eval`` or ``--do_predict`` the run trains and evaluates (the transformers scripts need both flags).
    """
    types = list(dataclass_types)
    if not _has_overwrite_flag():
        types.append(OverwriteArguments)
    parser = HfArgumentParser(types, allow_abbrev=False)
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        parsed = parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    else:
        parsed = parser.parse_args_into_dataclasses(args=argv)
    parsed = list(parsed)
    overwrite = parsed.pop().overwrite_output_dir if not _has_overwrite_flag() else None
    training_args = next(item for item in parsed if isinstance(item, TrainingArguments))
    if overwrite is None:
        overwrite = training_args.overwrite_output_dir
    if not (training_args.do_train or training_args.do_eval or training_args.do_predict):
        training_args.do_train = training_args.do_eval = True
    return (*parsed, overwrite)


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


# ---------------------------------------------------------------------------------------------- metrics
def _local_metric(name: str, config: Optional[str]) -> Callable[..., dict]:
    """The metrics of ``evaluate.load(name, config)`` for accuracy, mse and the GLUE tasks, computed here."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import f1_score, matthews_corrcoef

    def compute(predictions, references) -> dict:
        predictions, references = np.asarray(predictions), np.asarray(references)
        if name == "mse":
            return {"mse": float(np.mean((predictions - references) ** 2))}
        if name == "glue" and config == "stsb":
            return {"pearson": float(pearsonr(predictions, references)[0]),
                    "spearmanr": float(spearmanr(predictions, references)[0])}
        if name == "glue" and config == "cola":
            return {"matthews_correlation": float(matthews_corrcoef(references, predictions))}
        result = {"accuracy": float((predictions == references).mean())}
        if name == "glue" and config in ("mrpc", "qqp"):
            result["f1"] = float(f1_score(y_true=references, y_pred=predictions))
        return result

    return compute


_warned_offline = False


def load_metric(name: str, config: Optional[str] = None, cache_dir: Optional[str] = None) -> Callable[..., dict]:
    """``evaluate.load(name, config).compute``; where the Hub cannot be reached, a local implementation of the same
    metric (accuracy, mse, and every GLUE task's), saying so once."""
    global _warned_offline
    try:
        import evaluate

        metric = evaluate.load(name, config, cache_dir=cache_dir)
        return metric.compute
    except Exception as error:  # evaluate raises FileNotFoundError / ConnectionError / OSError offline
        if name not in ("accuracy", "mse", "glue"):
            raise
        if not _warned_offline:
            label = f"{name!r}" + (f", {config!r}" if config else "")
            logger.warning(
                f"evaluate.load({label}) failed ({type(error).__name__}); the Hub is probably unreachable. Using hf_vcon "
                f"examples' local implementation of the same metric."
            )
            _warned_offline = True
        return _local_metric(name, config)


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


def make_trainer(model, args: TrainingArguments, config: Optional[VConConfig], task: Task, train: bool = True) -> Trainer:
    """A plain ``Trainer`` for ``config=None`` (the dense reference), else a :class:`~hf_vcon.VConTrainer`."""
    kwargs = dict(model=model, args=args, train_dataset=task.train_dataset if train else None,
                  eval_dataset=task.eval_datasets.get(""), **task.trainer_kwargs)
    if config is None:
        return Trainer(**kwargs)
    return VConTrainer(vcon_config=config, **kwargs)


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


def run(task: Task, training_args: TrainingArguments, vcon_args: VConArguments, checkpoint: Optional[str] = None) -> dict:
    """Train, save, evaluate, predict and push as the transformers example scripts do; with ``--vcon_compare``, the
    three arms and their table. Returns the headline metrics."""
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
        set_seed(training_args.seed)
        trainer = make_trainer(task.build_model(), training_args, config, task)
        _train(trainer, task, checkpoint)
        metrics = _evaluate(trainer, task) if training_args.do_eval else {}
        if training_args.do_predict and task.predict:
            task.predict(trainer)
        _finish(trainer, task, training_args)
        if config is not None and training_args.should_save:
            print(f"\nSaved the merged {config.method} model to {os.path.abspath(training_args.output_dir)}")
        return metrics
    return compare(task, training_args, config)


def compare(task: Task, training_args: TrainingArguments, config: VConConfig) -> dict:
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
    post = make_trainer(from_dense(), _arm_args(training_args, os.path.join(out, "post-shot")), post_config, task)
    _train(post, task)
    results["post-shot"] = _evaluate(post, task)
    del post

    logger.warning("*** Arm 3/3: VCON (β from 1 to 0 over the transition, then fine-tune) ***")
    vcon = make_trainer(from_dense(), training_args, config, task)
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
    table = comparison_table(task, config, summary, results, key, dense_bytes, model_after, q, vcon.state.max_steps)
    if training_args.should_save:
        with open(os.path.join(out, "compare_results.md"), "w", encoding="utf-8") as handle:
            handle.write(table + "\n")
    _finish(vcon, task, training_args)
    print("\n" + table)
    if training_args.should_save:
        print(where_saved(out, training_args, task.auto_class))
    return compare_metrics


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return ""


def comparison_table(task, config, summary, results, key, dense_bytes, model_after, q, max_steps) -> str:
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
            sizes = f"{_size(summary.bytes_before)} | {_size(dense_bytes)}"
        else:
            sizes = (f"{_size(summary.bytes_before)} → {_size(summary.bytes_after)} | "
                     f"{_size(dense_bytes)} → {_size(model_after)}")
        lines.append(f"| {arm} | {value_text} | {sizes} |")
    lines.append("")
    lines.append("Sizes are the compact encoding (zeros skipped, packed bits, low-rank factors); the saved merged model "
                 "is stored dense so that plain from_pretrained loads it.")
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
