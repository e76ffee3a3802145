"""``VConCallback``: VCON's β from the optimizer step, for any ``transformers.Trainer`` (Seq2SeqTrainer, TRL…).

β is a pure function of ``state.global_step``, the count of optimizer updates, so every micro-batch of one
gradient-accumulation window sees the same β and a resumed run continues with the β it stopped at.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

from torch import nn
from transformers import TrainerCallback
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..config.schedules import warn_if_transition_outlasts_run
from ..config.vcon_config import VConConfig
from ..errors import VConError, VConWarning
from ..export.merged import AUTO, check_export_format, resolve_export_format, written_format
from ..export.run import export_run, write_checkpoint_config
from ..patching.distributed import gathered_for_reading, prepare_zero3, sync_input_observers
from ..patching.state import get_vcon_state
from ..patching.summary import VConSummary, vcon_summary
from ..patching.verbs import apply_vcon, get_beta, release_dense_paths, set_step
from ..utils.logs import is_training_log
from ..utils.modules import unwrap_model
from .resume import restore_frozen_states, save_frozen_states


class VConCallback(TrainerCallback):
    """Drive VCON's β from the optimizer step in any ``transformers.Trainer`` (Seq2SeqTrainer, TRL trainers…).

    Pass it at construction, ``Trainer(..., callbacks=[VConCallback(config)])``: the model is patched at the end of
    ``Trainer.__init__`` (before the optimizer exists, so low-rank factors are optimised). β is set at the start of
    every optimizer step, a float ``transition_steps`` is resolved against ``state.max_steps`` when training
    starts (with a warning if the transition would end after the run's last step), and after every optimizer step
    the model is put at its new step, so that the logs, evaluations and checkpoints of step N all see the model of
    step N. ``vcon/beta`` plus the compression metrics (``vcon/sparsity``, ``vcon/rank``, ``vcon/bits``,
    ``vcon/size_ratio``) are added to the Trainer's training logs (not to evaluation entries, whose model may be
    the compressed one).

    Evaluation in a plain Trainer reports the model being trained: while 0 < β, the blended model. Use
    :class:`VConTrainer` to also report the compressed model (``eval_compressed_*``) and to pick the best
    checkpoint by it.

    It saves as :class:`VConTrainer` does (:mod:`hf_vcon.export.run`): every ``checkpoint-N`` folder gets
    ``vcon_config.json``, and when ``train()`` ends the merged compressed model, its configs, processing class and
    model card are written to ``args.output_dir``. A plain ``Trainer.save_model()`` called after that writes the
    Trainer's resumable training state there instead (dense weights plus VCON tensors, which plain
    ``from_pretrained`` cannot use): with the callback, let ``train()`` write the model, or call
    :func:`hf_vcon.save_merged`.

    Args:
        vcon_config: the configuration; may be omitted if the model was patched with :func:`hf_vcon.apply_vcon`.
        export_at_train_end: write the merged model to ``args.output_dir`` when training ends (on the saving
            process; not under FSDP / DeepSpeed, whose modules hold shards: use :class:`VConTrainer` there).
        export_format: the merged model's format: ``"auto"`` (default: compressed-tensors for quantized models,
            ``quant`` and ``binary``, when the model allows it and the package is installed; dense otherwise),
            ``"dense"`` or ``"compressed-tensors"`` (see :mod:`hf_vcon.export.merged`). Checked when the model is patched.
    """

    def __init__(self, vcon_config: Optional[VConConfig] = None, *, export_at_train_end: bool = True,
                 export_format: str = AUTO) -> None:
        if vcon_config is not None and not isinstance(vcon_config, VConConfig):
            raise TypeError(f"vcon_config must be a VConConfig, not {type(vcon_config).__name__}.")
        self.vcon_config = vcon_config
        check_export_format(export_format)
        self.export_at_train_end = export_at_train_end
        self.export_format = export_format
        self.requested_format = export_format  # what save_model writes under: "auto" may still fall back to dense
        self.model: Optional[nn.Module] = None
        self.summary: Optional[VConSummary] = None
        self._summary_version: Optional[int] = None
        self._released = False
        self._last_step: Optional[int] = None
        self._beta = 1.0
        self.resume_dir: Optional[str] = None  # the checkpoint a run resumes from, when the trainer knows it
        self.evaluates_compressed = False  # VConTrainer reports eval_compressed_* and compares checkpoints by them

    # ------------------------------------------------------------------------------------------ setup
    def attach(self, model: nn.Module) -> nn.Module:
        """Patch ``model`` with this callback's config unless it is patched already (then the configs must agree)."""
        inner = unwrap_model(model)
        state = get_vcon_state(inner)
        if state is None:
            if self.vcon_config is None:
                raise ValueError("vcon_config is required: the model was not patched with apply_vcon.")
            apply_vcon(inner, self.vcon_config)
        elif self.vcon_config is not None and state.config != self.vcon_config:
            raise ValueError(
                f"vcon_config={self.vcon_config} differs from the config the model was patched with ({state.config}); "
                "pass one of them only."
            )
        self.vcon_config = get_vcon_state(inner).config
        self.model = inner
        # An impossible format (a missing package, GPT-2's Conv1D) is an error now, not after training.
        self.export_format = resolve_export_format(inner, self.requested_format, before_training=True)
        if is_deepspeed_zero3_enabled():
            prepare_zero3(inner)  # before deepspeed.initialize, which the Trainer calls in train()
        self.summary = self._summary_from_full_weights(inner)
        return inner

    def _summary_from_full_weights(self, model: nn.Module) -> VConSummary:
        """The compression's summary, taken before the Trainer shards the model (FSDP, ZeRO-3) for training.

        It describes the compression's shape (kept weights, bits, rank), which training does not change; taken here
        it never reads a shard, and no rank has to join a gather when logging. Weights that ZeRO-3 partitioned at
        load time are gathered for it.
        """
        state = get_vcon_state(model)
        self._summary_version = state.compression_version
        with gathered_for_reading([tensor for layer in state.layers for tensor in layer.parameters()]):
            return vcon_summary(model)

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is not None and self.model is None:
            self.attach(model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and get_vcon_state(model) is None:
            raise VConError(
                "VConCallback was added after the Trainer was built, too late to patch the model before its optimizer "
                "exists. Pass it as Trainer(..., callbacks=[VConCallback(config)]) or call apply_vcon(model, config) first."
            )
        if model is not None and unwrap_model(model) is not self.model:
            self.model = unwrap_model(model)
            self.summary = None
        self._last_step = None
        self._released = False
        if state.global_step > 0 and self.vcon_config.recompute_every > 1:
            # the resumed window's states, as the interrupted run held them (a plain Trainer does not tell callbacks
            # where it resumed from: the checkpoint of this step in output_dir is the one it picks by default)
            default = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            restore_frozen_states(self.model, self.resume_dir or default)
        self.update(state.global_step, state.max_steps)
        if state.global_step < state.max_steps:
            warn_if_transition_outlasts_run(self.vcon_config, state.max_steps, stacklevel=4)
        if args.load_best_model_at_end and not self.evaluates_compressed and self.vcon_config.transition_steps:
            warnings.warn(
                "load_best_model_at_end with VConCallback compares checkpoints by the model being trained, the blended "
                "one while 0 < β, but saves the compressed model; use VConTrainer, which compares them by the "
                "compressed model's metrics (eval_compressed_*).",
                VConWarning,
                stacklevel=4,
            )

    # ------------------------------------------------------------------------------------------- β
    def update(self, step: int, max_steps: Optional[int]) -> float:
        """Set β for optimizer step ``step`` (a no-op when the step has not changed: every micro-batch of a window
        calls it, and it then touches no layer); return the current β. Under torch.distributed the ranks' input
        observers are merged here too, once per step (:func:`~hf_vcon.patching.distributed.sync_input_observers`): at
        the end of each optimizer step, so that the logs, checkpoints and export of the step agree on every rank."""
        if step != self._last_step:
            sync_input_observers(self.model)
            self._beta = set_step(self.model, step, max_steps)
            self._last_step = step
        return self._beta

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        beta = self.update(state.global_step, state.max_steps)
        if beta == 0.0 and not self._released:
            # Low-rank layers now compute only B(Ax): stop updating their dense W and drop its optimizer state.
            release_dense_paths(self.model, optimizer)
            self._released = True

    def on_step_end(self, args, state, control, **kwargs):
        # global_step has just grown: the logs, evaluation and checkpoint of this step see the model of this step.
        self.update(state.global_step, state.max_steps)

    # ----------------------------------------------------------------------------------------- saving
    def on_save(self, args, state, control, **kwargs):
        if args.should_save and self.model is not None:
            checkpoint_dir = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            write_checkpoint_config(self.model, checkpoint_dir)
            save_frozen_states(self.model, checkpoint_dir)

    def on_train_end(self, args, state, control, processing_class=None, **kwargs):
        self.update(state.global_step, state.max_steps)  # the model as it stands after the last update
        if not self.export_at_train_end or not args.should_save:
            return
        if getattr(args, "fsdp", None) or getattr(args, "deepspeed", None):
            warnings.warn(
                "VConCallback does not export the merged model under FSDP / DeepSpeed (its modules hold shards); use "
                "VConTrainer, whose save_model() gathers the full weights.",
                VConWarning,
                stacklevel=2,
            )
            return
        export_run(self.model, args.output_dir, training_args=args, trainer_state=state,
                   processing_class=processing_class or kwargs.get("tokenizer"), format=self.requested_format)
        self.export_format = written_format(args.output_dir)

    # ----------------------------------------------------------------------------------------- logs
    def log_values(self) -> dict[str, float]:
        """``vcon/beta`` and the compression metrics of the compressed path."""
        state = get_vcon_state(self.model)
        if self.summary is None or state.compression_version != self._summary_version:
            # Computed again only when the compression changes (a gradual transition's ramp), not at every log.
            self.summary = vcon_summary(self.model)
            self._summary_version = state.compression_version
        metrics = {f"vcon/{key}": value for key, value in self.summary.metrics().items()}
        return {"vcon/beta": get_beta(self.model), **metrics, "vcon/size_ratio": self.summary.size_ratio}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or self.model is None or get_vcon_state(self.model) is None or not is_training_log(logs):
            return
        values = self.log_values()
        logs.update(values)
        # Trainer.log stored a copy in the history before calling the callbacks: keep trainer_state.json complete.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)
