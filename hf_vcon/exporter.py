"""What a VCON training run writes: the same policy for :class:`~hf_vcon.VConTrainer` and for
:class:`~hf_vcon.VConCallback` in any other Trainer.

- ``checkpoint-N`` folders stay the Trainer's own resumable state (dense weights plus VCON tensors), plus
  ``vcon_config.json``, so that resuming can check them against the model.
- The final folder is the merged compressed model (plain ``from_pretrained`` loads it), ``vcon_config.json``, the
  processing class, ``training_args.bin`` and a model card. Its format is ``export_format``
  (:mod:`hf_vcon.export`): ``"auto"`` writes quantized models (``quant``, ``binary``) as compressed-tensors, the
  others dense.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Optional

import torch
from torch import nn

from .card import model_card
from .errors import VConWarning
from .export import AUTO, resolve_export_format, save_merged, stored_sizes
from .state import require_state
from .summary import VConSummary
from .transitions import transition_of

TRAINING_ARGS_NAME = "training_args.bin"


def latest_eval_metrics(log_history: list[dict]) -> dict[str, float]:
    """The metrics of the last evaluation (``eval_*`` / ``test_*``) in a Trainer's log history."""
    for entry in reversed(log_history):
        metrics = {key: value for key, value in entry.items() if key.startswith("eval_") or key.startswith("test_")}
        if metrics:
            return metrics
    return {}


def warn_if_unfinished(model: nn.Module, stacklevel: int = 3) -> None:
    """Warn when the model to export is not yet the one training is headed for (β > 0, or a ramp not done)."""
    state = require_state(model, "export")
    if state.beta > 0:
        warnings.warn(
            f"Saving the merged compressed model while β = {state.beta:.4g} > 0: it is the compressed model (β = 0), "
            "not the blended model being trained. Train past the transition (transition_steps) for the two to agree.",
            VConWarning,
            stacklevel=stacklevel,
        )
    unfinished = transition_of(state).unfinished(state)
    if unfinished:
        warnings.warn(
            f"Saving a gradual-transition model mid-ramp: {unfinished}. Train past transition_steps first.",
            VConWarning,
            stacklevel=stacklevel,
        )


def write_card(model: nn.Module, output_dir: str, summary: VConSummary, trainer_state: Any = None,
               model_name: Optional[str] = None, tags: Optional[list[str]] = None,
               export_format: Optional[str] = None) -> None:
    """``README.md`` in ``output_dir``: the model card, with Q resolved, metrics from the Trainer's state and, when
    the folder holds the weights, their format and measured sizes."""
    state = require_state(model, "write_card")
    config = state.config
    max_steps = getattr(trainer_state, "max_steps", None) or None
    known = isinstance(config.transition_steps, int) or max_steps
    stored = stored_sizes(output_dir, state.targeted_module_names) if export_format else None
    card = model_card(model, summary, transition_steps=config.resolve_transition_steps(max_steps) if known else None,
                      metrics=latest_eval_metrics(getattr(trainer_state, "log_history", [])),
                      model_name=model_name or os.path.basename(os.path.normpath(output_dir)), extra_tags=tags,
                      export_format=export_format, stored_bytes=stored)
    with open(os.path.join(output_dir, "README.md"), "w", encoding="utf-8") as handle:
        handle.write(card)


def export_run(model: nn.Module, output_dir: str, *, training_args: Any = None, trainer_state: Any = None,
               processing_class: Any = None, state_dict: Optional[dict[str, torch.Tensor]] = None,
               format: str = AUTO) -> VConSummary:
    """Write the final folder of a run (the merged compressed model in ``format``, its configs, processing class,
    card).

    Call it on the process that saves; ``state_dict`` is the full state dict where modules hold shards.
    """
    warn_if_unfinished(model, stacklevel=4)
    resolved = resolve_export_format(model, format)  # raises before anything is written
    os.makedirs(output_dir, exist_ok=True)
    summary = save_merged(model, output_dir, state_dict=state_dict, format=resolved)
    if processing_class is not None:
        processing_class.save_pretrained(output_dir)
    if training_args is not None:
        torch.save(training_args, os.path.join(output_dir, TRAINING_ARGS_NAME))
    write_card(model, output_dir, summary, trainer_state, export_format=resolved)
    return summary


def write_checkpoint_config(model: nn.Module, checkpoint_dir: str) -> None:
    """Add ``vcon_config.json`` to a Trainer checkpoint folder, so resuming can check it fits the model."""
    if os.path.isdir(checkpoint_dir):
        require_state(model, "write_checkpoint_config").config.save_pretrained(checkpoint_dir)
