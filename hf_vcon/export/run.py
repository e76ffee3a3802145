"""What a VCON training run writes: the same policy for :class:`~hf_vcon.VConTrainer` and for
:class:`~hf_vcon.VConCallback` in any other Trainer.

- ``checkpoint-N`` folders stay the Trainer's own resumable state (dense weights plus VCON tensors), plus
  ``vcon_config.json``, so that resuming can check them against the model.
- The final folder is the merged compressed model (plain ``from_pretrained`` loads it), ``vcon_config.json``, the
  processing class, ``training_args.bin`` and a model card. Its format is ``export_format``
  (:mod:`hf_vcon.export.merged`): ``"auto"`` writes quantized models (``quant``, ``binary``) as compressed-tensors, the
  others dense.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Optional

import torch
from torch import nn

from ..errors import VConWarning
from ..patching.state import require_state
from ..patching.summary import VConSummary
from ..patching.transitions import transition_of
from ..utils.logs import saved_model_metrics
from .card import CardDetails, model_card
from .merged import AUTO, resolve_export_format, save_merged, stored_sizes, written_format
from .speed import measure_speedup

TRAINING_ARGS_NAME = "training_args.bin"


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


def training_budget(training_args: Any, trainer_state: Any) -> dict[str, str]:
    """The run's budget for the model card: optimizer steps and epochs, batch, learning rate, precision, seed."""
    rows: dict[str, str] = {}
    steps = getattr(trainer_state, "global_step", None)
    if steps:
        epoch = getattr(trainer_state, "epoch", None)
        rows["optimizer steps"] = f"{steps}" + (f" ({epoch:.3g} epochs)" if epoch else "")
    if training_args is None:
        return rows
    per_device, accumulation = training_args.per_device_train_batch_size, training_args.gradient_accumulation_steps
    world = getattr(training_args, "world_size", 1)
    rows["batch"] = (f"{per_device * accumulation * world} ({per_device} per device × {accumulation} accumulation × "
                     f"{world} process{'es' if world > 1 else ''})")
    scheduler = getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type)
    optimizer = getattr(training_args.optim, "value", training_args.optim)
    rows["learning rate"] = f"{training_args.learning_rate:g}, {scheduler} schedule, {optimizer} optimizer"
    rows["precision"] = "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "fp32"
    rows["seed"] = str(training_args.seed)
    return rows


def card_details(trainer_state: Any = None, training_args: Any = None, repo_id: Optional[str] = None,
                 **fields: Any) -> CardDetails:
    """The card's :class:`~hf_vcon.export.card.CardDetails`: the Trainer's card fields plus what the run's state says."""
    _, step, compressed = saved_model_metrics(getattr(trainer_state, "log_history", None) or [])
    if repo_id is None and training_args is not None and getattr(training_args, "push_to_hub", False):
        repo_id = training_args.hub_model_id
    return CardDetails.from_trainer_fields(repo_id=repo_id, training=training_budget(training_args, trainer_state),
                                           steps_trained=getattr(trainer_state, "global_step", None),
                                           evaluated_step=step, evaluated_compressed=compressed, **fields)


def write_card(model: nn.Module, output_dir: str, summary: VConSummary, trainer_state: Any = None,
               model_name: Optional[str] = None, tags: Optional[list[str]] = None,
               details: Optional[CardDetails] = None) -> None:
    """``README.md`` in ``output_dir``: the model card, with Q resolved and the saved model's metrics from the
    Trainer's state."""
    config = require_state(model, "write_card").config
    max_steps = getattr(trainer_state, "max_steps", None) or None
    known = isinstance(config.transition_steps, int) or max_steps
    metrics, _, _ = saved_model_metrics(getattr(trainer_state, "log_history", None) or [])
    card = model_card(model, summary, transition_steps=config.resolve_transition_steps(max_steps) if known else None,
                      metrics=metrics, model_name=model_name or os.path.basename(os.path.normpath(output_dir)),
                      extra_tags=tags, details=details or card_details(trainer_state))
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
    resolve_export_format(model, format)  # raises before anything is written
    os.makedirs(output_dir, exist_ok=True)
    summary = save_merged(model, output_dir, state_dict=state_dict, format=format)
    resolved = written_format(output_dir)  # "auto" falls back to dense where the compressed folder would not load
    state = require_state(model, "export")
    if state_dict is None and any(layer.compressor.changes_shapes for layer in state.layers):
        state.measured_speedup = measure_speedup(model)  # modules holding shards (FSDP, ZeRO-3) cannot run alone
    if processing_class is not None:
        processing_class.save_pretrained(output_dir)
    if training_args is not None:
        torch.save(training_args, os.path.join(output_dir, TRAINING_ARGS_NAME))
    stored = stored_sizes(output_dir, state.targeted_module_names, model)
    write_card(model, output_dir, summary, trainer_state,
               details=card_details(trainer_state, training_args, export_format=resolved, stored_bytes=stored))
    return summary


CHECKPOINT_NOTE = """# VCON training checkpoint: not a model to load

This folder is the Trainer's resumable state of a VCON run: the dense weights of the compressed layers sit under
`…base_layer.weight` next to the VCON tensors (`…vcon_*`), with `vcon_config.json`. Plain `from_pretrained` on it
would initialise every compressed layer at random (it reports them as missing and unexpected keys).

- Resume: `trainer.train(resume_from_checkpoint="<this folder>")` (or the example scripts' `--resume_from_checkpoint`).
- Get the merged compressed model from it: `python -m hf_vcon export <this folder> <output folder>`
  (or `hf_vcon.export_checkpoint`); plain `from_pretrained` loads that folder.
"""


def write_checkpoint_config(model: nn.Module, checkpoint_dir: str) -> None:
    """Add ``vcon_config.json`` to a Trainer checkpoint folder, so resuming can check it fits the model, and a
    ``README.md`` saying that the folder is training state, how to resume from it and how to export it."""
    if not os.path.isdir(checkpoint_dir):
        return
    require_state(model, "write_checkpoint_config").config.save_pretrained(checkpoint_dir)
    with open(os.path.join(checkpoint_dir, "README.md"), "w", encoding="utf-8") as handle:
        handle.write(CHECKPOINT_NOTE)
