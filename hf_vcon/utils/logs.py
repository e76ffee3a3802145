"""What a VCON training run reports, and when: which log entries carry ``vcon/*``, the names of the compressed
model's metrics, the metrics of the saved model in a log history, and the warning for a transition longer than
the run."""

from __future__ import annotations

from typing import Optional

COMPRESSED = "compressed"
# Speed and bookkeeping entries of an evaluation, which say nothing about the model.
_NOT_MODEL_METRICS = ("_runtime", "_samples_per_second", "_steps_per_second", "_model_preparation_time")


def is_training_log(logs: dict) -> bool:
    """True for the Trainer's training log entries (``loss`` every ``logging_steps``, ``train_loss`` at the end).

    Only these carry ``vcon/beta``: an evaluation's entry would otherwise record the β of the model it evaluated
    (0 for the compressed model) in the training series that TensorBoard and W&B draw as ``train/vcon/beta``.
    """
    return "loss" in logs or "train_loss" in logs


def compressed_metric_name(metric: str, eval_dataset_names: tuple[str, ...] = ()) -> str:
    """The name of the compressed model's metric for ``metric`` as ``metric_for_best_model`` names it.

    Example:
        >>> compressed_metric_name("loss")
        'eval_compressed_loss'
        >>> compressed_metric_name("eval_accuracy")
        'eval_compressed_accuracy'
        >>> compressed_metric_name("eval_val_loss", ("val",))
        'eval_val_compressed_loss'
    """
    name = metric[len("eval_"):] if metric.startswith("eval_") else metric
    for dataset in sorted(eval_dataset_names, key=len, reverse=True):
        if name.startswith(f"{dataset}_"):
            return f"eval_{dataset}_{COMPRESSED}_{name[len(dataset) + 1:]}"
    return f"eval_{COMPRESSED}_{name}"


def is_compressed_metric(metric: str) -> bool:
    return f"{COMPRESSED}_" in metric


def model_metrics(metrics: dict) -> dict:
    """``metrics`` without the speed and bookkeeping entries (runtime, samples per second, epoch)."""
    return {key: value for key, value in metrics.items() if key != "epoch" and not key.endswith(_NOT_MODEL_METRICS)}


def saved_model_metrics(log_history: list[dict]) -> tuple[dict, Optional[int], bool]:
    """The metrics of the saved (compressed) model at the last evaluation of a Trainer's log history.

    Returns ``(metrics, step, compressed)``: the compressed model's metrics under their plain names
    (``eval_compressed_loss`` → ``eval_loss``) when the evaluation reported them, else the evaluated model's, and
    whether they are the compressed model's. Speed entries are left out.
    """
    for entry in reversed(log_history):
        metrics = {key: value for key, value in entry.items() if key.startswith(("eval_", "test_"))}
        if not metrics:
            continue
        compressed = {key.replace(f"_{COMPRESSED}_", "_", 1): value for key, value in metrics.items()
                      if is_compressed_metric(key)}
        return model_metrics(compressed or metrics), entry.get("step"), bool(compressed)
    return {}, None, False


