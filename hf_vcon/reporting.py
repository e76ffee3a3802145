"""What a VCON training run reports, and when: which log entries carry ``vcon/*``, the names of the compressed
model's metrics, the metrics of the saved model in a log history, and the warning for a transition longer than
the run."""

from __future__ import annotations

import warnings
from typing import Optional

from .config import VConConfig
from .errors import VConWarning
from .schedules import beta_at

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


def transition_end(config: VConConfig, max_steps: Optional[int]) -> Optional[int]:
    """The optimizer step at which β reaches 0 (``start_step + Q``); ``None`` if Q is a fraction of an unknown run."""
    if not isinstance(config.transition_steps, int) and not max_steps:
        return None
    return config.start_step + config.resolve_transition_steps(max_steps)


def beta_after(config: VConConfig, steps: int, max_steps: Optional[int]) -> float:
    """β after ``steps`` optimizer steps by the config's schedule (block-wise with ``stagger``, the blocks differ)."""
    if config.transition == "gmp":
        return 0.0
    return beta_at(steps, config.resolve_transition_steps(max_steps), config.start_step, config.schedule)


def warn_if_transition_outlasts_run(config: VConConfig, max_steps: Optional[int], stacklevel: int = 3) -> bool:
    """Warn, before training, when the transition ends after the run's last step; return whether it does."""
    end = transition_end(config, max_steps)
    if not max_steps or end is None or end <= max_steps:
        return False
    left = (f"β = {beta_after(config, max_steps, max_steps):.4g} at the last step" if config.transition != "gmp"
            else "the sparsity ramp unfinished")
    warnings.warn(
        f"The transition ends at optimizer step {end} (start_step {config.start_step} + transition_steps "
        f"{config.transition_steps!r}), after the last of this run's {max_steps} steps: training stops with {left}. "
        "The saved model is the compressed model (β = 0), which training never ran as such. Lower transition_steps "
        "(a float is a fraction of the run, 0.2 by default) or train longer.",
        VConWarning,
        stacklevel=stacklevel,
    )
    return True
