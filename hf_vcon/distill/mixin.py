"""``DistillationMixin``: distillation from a frozen teacher for any ``transformers.Trainer``.

A callback cannot change the loss, and ``Trainer(compute_loss_func=...)`` sees only the student's outputs and the
labels (not the inputs the teacher needs, nor the attention mask or an example's index in cached logits), so
distillation is a mixin overriding ``compute_loss``: ``class MyTrainer(DistillationMixin, SFTTrainer)``.
:class:`hf_vcon.VConTrainer` is one already.

The distillation terms are normalised the way the Trainer normalises the task loss, so gradient accumulation and
data parallelism do not change what a step optimises: where the Trainer divides the loss by the accumulation steps
(a per-micro-batch mean), they are per-micro-batch means; where the loss counts as already scaled
(``num_items_in_batch`` reaches a model that takes loss kwargs, or ``compute_loss_func``), the distillation term is
a sum over the distilled items divided by ``num_items_in_batch`` (the task loss's own normaliser) and multiplied by
the factor the Trainer applies across devices (``average_tokens_across_devices``).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ..errors import IncompatibleCheckpointError, VConError
from ..utils.logs import is_training_log
from ..utils.modules import unwrap_model
from .cached_logits import TeacherLogits, model_input_names, teacher_inputs
from .losses import DistillationConfig, distill_mask, hidden_state_loss, kd_loss
from .teacher import (
    FeatureCapture,
    build_teacher,
    check_cached_outputs,
    check_same_teacher,
    fingerprint,
    place_teacher,
    shared_outputs,
    teacher_device,
    teacher_dtype_of,
)

DISTILLATION_FILE = "vcon_distillation.json"


def loss_shifts_labels(model: nn.Module) -> bool:
    """Whether ``model``'s loss shifts its labels by one position (causal language models), as transformers decides."""
    model = unwrap_model(model)
    if hasattr(model, "get_base_model"):  # PEFT
        model = model.get_base_model()
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return False
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

        if LOSS_MAPPING.get(getattr(model, "loss_type", None)) is ForCausalLMLoss:
            return True
    except ImportError:  # pragma: no cover - transformers < 4.46
        pass
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return type(model).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()


class DistillationMixin:
    """Distil from a frozen teacher in any ``transformers.Trainer``: ``class MyTrainer(DistillationMixin, Trainer)``.

    Args:
        distillation: the :class:`~hf_vcon.DistillationConfig`; ``None`` trains without distillation.

    The training loss becomes ``(1 − α)·task + α·T²·KL(teacher/T ‖ student/T)`` (+ ``γ·hidden`` when hidden states
    or module outputs are matched); evaluation reports the task loss only. ``trainer.teacher`` is the teacher (eval
    mode, frozen, never wrapped by DDP / FSDP / DeepSpeed, on ``teacher_device`` or the student's device);
    ``distill/task_loss`` and ``distill/kd_loss`` (and ``distill/hidden_loss``) go into the training logs. With
    ``teacher=None`` the teacher is copied from the model here, before ``Trainer.__init__`` (and so before
    :class:`~hf_vcon.VConCallback` patches it). Every ``checkpoint-N`` gets ``vcon_distillation.json``; resuming
    checks that the settings and the teacher (a fingerprint of its weights) are those the checkpoint trained with.

    Example:
        ```python
        class DistilSFTTrainer(DistillationMixin, SFTTrainer):
            pass

        trainer = DistilSFTTrainer(model=model, args=args, train_dataset=ds, callbacks=[VConCallback(vcon_config)],
                                   distillation=DistillationConfig(alpha=0.5, temperature=2.0))
        ```
    """

    def __init__(self, *args: Any, distillation: Optional[DistillationConfig] = None, **kwargs: Any):
        if distillation is not None and not isinstance(distillation, DistillationConfig):
            raise TypeError(f"distillation must be a DistillationConfig, not {type(distillation).__name__}.")
        self.distillation = distillation
        self.__dict__.setdefault("teacher", None)
        # VConTrainer builds the teacher before it patches the model; other Trainers patch later (VConCallback).
        if distillation is not None and self.teacher is None and not distillation.teacher_logits:
            self.teacher = build_teacher(distillation, kwargs.get("model", args[0] if args else None))
        super().__init__(*args, **kwargs)
        if distillation is not None:
            self._prepare_distillation()

    # ------------------------------------------------------------------------------------------ setup
    def _prepare_distillation(self) -> None:
        config = self.distillation
        self.teacher_logits = TeacherLogits(config.teacher_logits, config.verify_teacher_logits) \
            if config.teacher_logits else None
        if self.teacher_logits is not None:
            check_cached_outputs(self.model, self.teacher_logits.width, config.teacher_logits)
        self._shared_outputs = None
        if self.teacher is not None:
            self._shared_outputs = shared_outputs(self.model, self.teacher, self.processing_class)
            place_teacher(self.teacher, config.teacher_device or self.args.device)
        shifts = getattr(self, "_loss_shifts_labels", None)  # transformers 5 decides it once; 4.x: the same rule
        self._shifts_labels = loss_shifts_labels(self.model) if shifts is None else bool(shifts)
        self._features = FeatureCapture(unwrap_model(self.model), self.teacher, config.hidden_modules) \
            if config.hidden_modules is not None and config.hidden_weight > 0 else None
        self._teacher_input_names = model_input_names(self.teacher) if self.teacher is not None else None
        self._teacher_fingerprint = fingerprint(self.teacher) if self.teacher is not None else None
        self._distill_totals: Optional[torch.Tensor] = None
        self._distill_last_logged_step = 0
        # First in line (VConTrainer puts its own before it), so that every reporting callback sees distill/*.
        self.callback_handler.callbacks.insert(0, DistillationCallback(self))

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        column = self.distillation.index_column if self.distillation is not None else None
        if column is not None and self.distillation.teacher_logits and column not in self._signature_columns:
            self._signature_columns.append(column)  # keep the index through remove_unused_columns

    # ------------------------------------------------------------------------------------------- loss
    def compute_loss(self, model: nn.Module, inputs: dict, return_outputs: bool = False,
                     num_items_in_batch: Optional[Any] = None, **kwargs: Any):
        if self.distillation is None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch, **kwargs)
        inputs = dict(inputs)
        indices = inputs.pop(self.distillation.index_column, None)
        if not model.training:  # evaluation: the task loss, comparable with runs without distillation
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch, **kwargs)
        teacher = self._teacher_outputs(inputs, indices)
        student_inputs = {**inputs, "output_hidden_states": True} if self.distillation.hidden_layers else inputs
        with self._recording("student"):
            task, outputs = super().compute_loss(model, student_inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch, **kwargs)
        scaled = self._loss_is_scaled(num_items_in_batch)
        kd, hidden = self._distillation_terms(inputs, outputs, teacher, num_items_in_batch, scaled)
        alpha = self.distillation.alpha
        loss = (1 - alpha) * task + alpha * kd
        if hidden is not None:
            loss = loss + self.distillation.hidden_weight * hidden
        self._note_terms(task, kd, hidden, scaled)
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, *args: Any, **kwargs: Any):
        if self.distillation is not None:
            inputs = {key: value for key, value in inputs.items() if key != self.distillation.index_column}
        return super().prediction_step(model, inputs, *args, **kwargs)

    @contextmanager
    def _recording(self, side: str) -> Iterator[None]:
        if self._features is None:
            yield
            return
        with self._features.recording(side):
            yield

    def _teacher_outputs(self, inputs: dict, indices: Optional[torch.Tensor]) -> dict:
        """``{"logits": …, "hidden_states": …}`` from one teacher forward, or ``{"indices": …}`` to read the cache."""
        if self.teacher_logits is not None:
            if indices is None:
                raise VConError(
                    f"DistillationConfig(teacher_logits=...) reads each example's cached logits by its index, but the "
                    f"batch has no {self.distillation.index_column!r}: train on hf_vcon.add_teacher_index(dataset) "
                    "(the dataset the logits were cached for)."
                )
            return {"indices": indices}
        device = teacher_device(self.teacher)
        dtype = teacher_dtype_of(self.teacher)
        batch = {key: _to(value, device, dtype) for key, value in
                 teacher_inputs(inputs, self._teacher_input_names, (self.distillation.index_column,)).items()}
        if self.distillation.hidden_layers:
            batch["output_hidden_states"] = True
        with torch.no_grad(), self._recording("teacher"):
            outputs = self.teacher(**batch)
        return {"logits": _logits(outputs, "teacher"), "hidden_states": getattr(outputs, "hidden_states", None)}

    def _distillation_terms(self, inputs: dict, outputs: Any, teacher: dict, num_items_in_batch, scaled: bool) -> tuple:
        """The KD term and the hidden-state term (or ``None``), in the Trainer's normalisation (``scaled``: a sum
        over ``num_items_in_batch``, else a micro-batch mean)."""
        student_logits = _logits(outputs, "student")
        covered = None
        if "indices" in teacher:
            teacher["logits"], covered = self.teacher_logits.batch(teacher["indices"], inputs, student_logits)
        if self._shared_outputs is not None:  # a padded vocabulary: the rows both have
            student_logits = student_logits[..., :self._shared_outputs]
            teacher["logits"] = teacher["logits"][..., :self._shared_outputs]
        if student_logits.shape[-1] < 2:
            raise VConError(f"Distillation needs class logits (a softmax over ≥ 2 outputs); this model outputs "
                            f"{student_logits.shape[-1]} (a regression head). Use alpha=0 with hidden_layers, or no "
                            "distillation.")
        mask = distill_mask(student_logits, inputs.get("labels"), self._shifts_labels, inputs.get("shift_labels"),
                            inputs.get("attention_mask"))
        if covered is not None:
            mask = covered if mask is None else mask & covered
        kd = kd_loss(student_logits, teacher["logits"], self.distillation.temperature, mask,
                     reduction="sum" if scaled else "mean")
        items = mask.sum() if mask is not None else student_logits.shape[:-1].numel()
        hidden = self._hidden_term(outputs, teacher, inputs.get("attention_mask"))
        if scaled:
            factor = self._devices_factor(num_items_in_batch) / num_items_in_batch
            kd = kd * factor
            hidden = None if hidden is None else hidden * items * factor
        return kd, hidden

    def _hidden_term(self, outputs: Any, teacher: dict, attention_mask) -> Optional[torch.Tensor]:
        config = self.distillation
        if not config.matches_features:
            return None
        pairs = []
        if config.hidden_layers is not None:
            student_states, teacher_states = getattr(outputs, "hidden_states", None), teacher.get("hidden_states")
            if student_states is None or teacher_states is None:
                raise VConError("hidden_layers: the model returned no hidden_states (output_hidden_states=True); "
                                "use hidden_modules to match module outputs instead.")
            layer_pairs = [(i, i) for i in range(len(student_states))] if config.hidden_layers == "all" \
                else config.hidden_layers
            for s, t in layer_pairs:
                inside = -len(student_states) <= s < len(student_states) and -len(teacher_states) <= t < len(teacher_states)
                if not inside:
                    raise VConError(f"hidden_layers: index pair ({s}, {t}) is outside the student's "
                                    f"{len(student_states)} and the teacher's {len(teacher_states)} hidden states.")
                pairs.append((student_states[s], teacher_states[t]))
        if self._features is not None:
            pairs += self._features.pairs()
        mask = attention_mask.bool() if attention_mask is not None else None
        losses = [hidden_state_loss(s, t, config.hidden_loss, mask) for s, t in pairs]
        return torch.stack(losses).mean()

    def _loss_is_scaled(self, num_items_in_batch) -> bool:
        """Whether the Trainer treats the loss as normalised over the accumulation window (it then does not divide it
        by the accumulation steps), decided exactly as ``Trainer.training_step`` decides it."""
        explicit = getattr(self, "loss_is_scaled_for_ga", None)
        if explicit is not None:
            return bool(explicit)
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                    or self.compute_loss_func is not None)

    def _devices_factor(self, num_items_in_batch) -> int:
        """The factor ``Trainer.compute_loss`` multiplies a normalised loss by, averaging tokens across devices."""
        if not (getattr(self.args, "average_tokens_across_devices", False) and num_items_in_batch is not None
                and (self.model_accepts_loss_kwargs or self.compute_loss_func is not None)):
            return 1
        if self.args.n_gpu > 1:
            return self.args.n_gpu
        tensor_parallel = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
        return self.accelerator.num_processes // tensor_parallel

    # ------------------------------------------------------------------------------------------- logs
    def _note_terms(self, task: torch.Tensor, kd: torch.Tensor, hidden: Optional[torch.Tensor], scaled: bool) -> None:
        """Accumulate the terms as they enter the step's loss (after the Trainer's division for accumulation)."""
        divisor = 1 if scaled else getattr(self, "current_gradient_accumulation_steps",
                                           self.args.gradient_accumulation_steps)
        values = torch.stack([task.detach().float().reshape(()), kd.detach().float().reshape(()),
                              (hidden.detach().float().reshape(()) if hidden is not None
                               else torch.zeros((), device=kd.device))]) / divisor
        self._distill_totals = values if self._distill_totals is None else self._distill_totals + values

    def distillation_log_values(self, step: int) -> dict[str, float]:
        """The mean of each term per optimizer step since the last log (averaged over processes); resets them."""
        if self._distill_totals is None:
            return {}
        totals = self._distill_totals
        if self.accelerator.num_processes > 1:
            totals = self.accelerator.reduce(totals.to(self.args.device), reduction="mean")
        steps = max(step - self._distill_last_logged_step, 1)
        values = (totals / steps).tolist()
        self._distill_totals, self._distill_last_logged_step = None, step
        result = {"distill/task_loss": values[0], "distill/kd_loss": values[1]}
        if self.distillation.matches_features:
            result["distill/hidden_loss"] = values[2]
        return result

    # ---------------------------------------------------------------------------------- checkpoints
    def distillation_record(self) -> dict:
        return {"distillation": self.distillation.to_dict(), "teacher_fingerprint": self._teacher_fingerprint,
                "teacher_logits_examples": len(self.teacher_logits) if self.teacher_logits is not None else None}

    def train(self, resume_from_checkpoint=None, *args: Any, **kwargs: Any):
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
        if isinstance(checkpoint, (str, os.PathLike)):
            check_distillation_checkpoint(os.fspath(checkpoint), self)
        return super().train(resume_from_checkpoint, *args, **kwargs)


def _to(value: Any, device: torch.device, dtype: Optional[torch.dtype]) -> Any:
    if not torch.is_tensor(value):
        return value
    if value.is_floating_point() and dtype is not None:
        return value.to(device=device, dtype=dtype)
    return value.to(device)


def _logits(outputs: Any, side: str) -> torch.Tensor:
    logits = outputs.get("logits") if isinstance(outputs, dict) else getattr(outputs, "logits", None)
    if logits is None:
        raise VConError(f"Distillation matches logits, but the {side}'s output has none ({type(outputs).__name__}).")
    return logits


def check_distillation_checkpoint(checkpoint: str, trainer: DistillationMixin) -> None:
    """Refuse to resume a checkpoint with other distillation settings, another teacher, or with / without distillation.

    Raises:
        IncompatibleCheckpointError: naming the setting that differs.
    """
    path = os.path.join(checkpoint, DISTILLATION_FILE)
    saved = json.load(open(path, encoding="utf-8")) if os.path.isfile(path) else None
    if trainer.distillation is None:
        if saved is not None:
            raise IncompatibleCheckpointError(f"{checkpoint!r} was trained with distillation ({DISTILLATION_FILE}); "
                                              "resume it with the same distillation= settings.")
        return
    if saved is None:
        raise IncompatibleCheckpointError(f"{checkpoint!r} was trained without distillation (it has no "
                                          f"{DISTILLATION_FILE}); resume it without distillation=, or train afresh.")
    current = trainer.distillation_record()
    settings = {k: v for k, v in current["distillation"].items() if k not in ("teacher", "teacher_device")}
    differences = [f"{key}: checkpoint {saved['distillation'].get(key)!r} vs now {value!r}"
                   for key, value in settings.items() if saved["distillation"].get(key) != value]
    if differences:
        raise IncompatibleCheckpointError(f"{checkpoint!r} was trained with other distillation settings "
                                          f"({'; '.join(differences)}); resume with those in its {DISTILLATION_FILE}.")
    if saved.get("teacher_fingerprint") is not None and current["teacher_fingerprint"] is not None:
        check_same_teacher(saved["teacher_fingerprint"], current["teacher_fingerprint"], checkpoint)


class DistillationCallback(TrainerCallback):
    """Adds ``distill/*`` to the training logs and ``vcon_distillation.json`` to every checkpoint."""

    def __init__(self, trainer: DistillationMixin):
        self.trainer = trainer

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or not is_training_log(logs):
            return
        values = self.trainer.distillation_log_values(state.global_step)
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)

    def on_save(self, args, state, control, **kwargs):
        if not args.should_save:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, DISTILLATION_FILE), "w", encoding="utf-8") as handle:
            json.dump(self.trainer.distillation_record(), handle, indent=2)
