"""``VConCallback`` (β from the optimizer step, for any Trainer) and ``VConTrainer`` (the thin Trainer subclass
that adds compressed evaluation, the merged checkpoint, its model card and ``push_to_hub``).

β is a pure function of ``state.global_step``, the count of optimizer updates, so every micro-batch of one
gradient-accumulation window sees the same β and a resumed run continues with the β it stopped at.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Optional

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from .checkpoint import verify_checkpoint
from .compact import save_compressed
from .config import VConConfig
from .distributed import check_fsdp_plugin, check_sharding, gathered_for_reading, prepare_zero3
from .errors import VConError, VConWarning
from .export import AUTO, check_export_format, resolve_export_format
from .exporter import export_run, write_card, write_checkpoint_config
from .model import apply_vcon, compressed_view, get_beta, release_dense_paths, set_step
from .state import get_vcon_state, unwrap_model
from .summary import VConSummary, vcon_summary


class VConCallback(TrainerCallback):
    """Drive VCON's β from the optimizer step in any ``transformers.Trainer`` (Seq2SeqTrainer, TRL trainers…).

    Pass it at construction, ``Trainer(..., callbacks=[VConCallback(config)])``: the model is patched at the end of
    ``Trainer.__init__`` (before the optimizer exists, so low-rank factors are optimised). β is set at the start of
    every optimizer step, a float ``transition_steps`` is resolved against ``state.max_steps`` when training
    starts, and ``vcon/beta`` plus the compression metrics (``vcon/sparsity``, ``vcon/rank``, ``vcon/bits``,
    ``vcon/size_ratio``) are added to the Trainer's logs.

    It saves as :class:`VConTrainer` does (:mod:`hf_vcon.exporter`): every ``checkpoint-N`` folder gets
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
            ``"dense"`` or ``"compressed-tensors"`` (see :mod:`hf_vcon.export`). Checked when the model is patched.
    """

    def __init__(self, vcon_config: Optional[VConConfig] = None, *, export_at_train_end: bool = True,
                 export_format: str = AUTO) -> None:
        if vcon_config is not None and not isinstance(vcon_config, VConConfig):
            raise TypeError(f"vcon_config must be a VConConfig, not {type(vcon_config).__name__}.")
        check_export_format(export_format)
        self.vcon_config = vcon_config
        self.export_at_train_end = export_at_train_end
        self.export_format = export_format
        self.model: Optional[nn.Module] = None
        self.summary: Optional[VConSummary] = None
        self._summary_version: Optional[int] = None
        self._released = False
        self._last_step: Optional[int] = None

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
        self.export_format = resolve_export_format(inner, self.export_format)
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
        self.update(state.global_step, state.max_steps)

    # ------------------------------------------------------------------------------------------- β
    def update(self, step: int, max_steps: Optional[int]) -> float:
        """Set β for optimizer step ``step`` (a no-op when the step has not changed); return the current β."""
        if step != self._last_step:
            set_step(self.model, step, max_steps)
            self._last_step = step
        return get_beta(self.model)

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        beta = self.update(state.global_step, state.max_steps)
        if beta == 0.0 and not self._released:
            # Low-rank layers now compute only B(Ax): stop updating their dense W and drop its optimizer state.
            release_dense_paths(self.model, optimizer)
            self._released = True

    # ----------------------------------------------------------------------------------------- saving
    def on_save(self, args, state, control, **kwargs):
        if args.should_save and self.model is not None:
            write_checkpoint_config(self.model, os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"))

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
                   processing_class=processing_class or kwargs.get("tokenizer"), format=self.export_format)

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
        if logs is None or self.model is None or get_vcon_state(self.model) is None:
            return
        values = self.log_values()
        logs.update(values)
        # Trainer.log stored a copy in the history before calling the callbacks: keep trainer_state.json complete.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)


class VConTrainer(Trainer):
    """A ``transformers.Trainer`` that fine-tunes with VCON and saves the merged compressed model.

    It takes every ``Trainer`` argument plus:

    Args:
        vcon_config: the :class:`~hf_vcon.VConConfig`; the model is patched here unless it already was (then
            ``vcon_config`` may be omitted). A bad config raises here, before any training step.
        evaluate_compressed: while 0 < β, ``evaluate()`` also reports the compressed model (β = 0 for that
            evaluation only) under ``<prefix>_compressed_*``.
        export_format: the format ``save_model()`` writes: ``"auto"`` (default: compressed-tensors for quantized
            models, ``quant`` and ``binary``, when the model allows it and the package is installed; dense
            otherwise), ``"dense"`` or ``"compressed-tensors"`` (see :mod:`hf_vcon.export`). An impossible choice
            raises here.

    ``train()`` sets β from ``state.global_step`` in ``training_step``; ``save_model()`` writes the merged
    compressed model (plain ``from_pretrained`` loads it) with ``vcon_config.json`` and a model card, while the
    periodic ``checkpoint-N`` folders keep the VCON layers for ``train(resume_from_checkpoint=...)``.

    Example:
        ```python
        trainer = VConTrainer(model=model, args=TrainingArguments("out", max_steps=1000),
                              vcon_config=VConConfig(method="binary", transition_steps=0.2), train_dataset=ds)
        trainer.train()
        trainer.save_model()
        ```
    """

    def __init__(self, *args: Any, vcon_config: Optional[VConConfig] = None, evaluate_compressed: bool = True,
                 export_format: str = AUTO, **kwargs: Any):
        model = kwargs.get("model", args[0] if args else None)
        if model is None:
            raise ValueError("VConTrainer needs model=: model_init (hyperparameter search) is not supported.")
        # save_model() exports, in the format the callback resolves
        self.vcon_callback = VConCallback(vcon_config, export_at_train_end=False, export_format=export_format)
        self.vcon_callback.attach(model)
        self.evaluate_compressed = evaluate_compressed
        self._sharding_checked = False
        super().__init__(*args, **kwargs)
        self._prepare_distribution()
        # First in line, so the vcon/* values it adds to the logs reach every reporting callback.
        self.callback_handler.callbacks.insert(0, self.vcon_callback)
        self._keep_checkpoints_off_the_hub()

    @property
    def vcon_config(self) -> VConConfig:
        return self.vcon_callback.vcon_config

    @property
    def export_format(self) -> str:
        """The format ``save_model()`` writes: ``"dense"`` or ``"compressed-tensors"`` (``"auto"`` resolved)."""
        return self.vcon_callback.export_format

    def _prepare_distribution(self) -> None:
        """Refuse FSDP settings VCON cannot train under (ZeRO-3 is prepared in ``VConCallback.attach``)."""
        if getattr(self, "is_fsdp_enabled", False):
            check_fsdp_plugin(self.accelerator.state.fsdp_plugin)

    def _keep_checkpoints_off_the_hub(self) -> None:
        strategy = getattr(self.args, "hub_strategy", "end")
        strategy = getattr(strategy, "value", strategy)  # HubStrategy is a str Enum
        if self.args.push_to_hub and strategy != "end":
            warnings.warn(
                f"hub_strategy={strategy!r} would push VCON training checkpoints (dense weights plus VCON tensors) as "
                "the model; VConTrainer pushes only the merged compressed model, at the end (hub_strategy='end').",
                VConWarning,
                stacklevel=3,
            )
            self.args.hub_strategy = "end"

    # ------------------------------------------------------------------------------------- training
    def train(self, resume_from_checkpoint=None, *args: Any, **kwargs: Any):
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
        if isinstance(checkpoint, (str, os.PathLike)):
            verify_checkpoint(os.fspath(checkpoint), self.model)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def training_step(self, model: nn.Module, inputs: dict, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self._sharding_checked:  # `model` is the wrapped one: DDP, FSDP, DeepSpeed engine
            check_sharding(model)
            self._sharding_checked = True
        self.vcon_callback.update(self.state.global_step, self.state.max_steps)
        return super().training_step(model, inputs, *args, **kwargs)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval", **kwargs: Any):
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix, **kwargs)
        if self.evaluate_compressed and get_beta(self.model) > 0:
            with compressed_view(self.model):
                metrics.update(super().evaluate(eval_dataset, ignore_keys, f"{metric_key_prefix}_compressed", **kwargs))
        return metrics

    # --------------------------------------------------------------------------------------- saving
    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """Save the merged compressed model to ``output_dir`` (default ``args.output_dir``).

        Checkpoint folders (``checkpoint-N``, written by the Trainer during training) keep the VCON layers and
        ``vcon_config.json`` instead, so that training can resume from them.
        """
        if _internal_call and output_dir is not None and os.path.basename(os.path.normpath(output_dir)).startswith(PREFIX_CHECKPOINT_DIR):
            super().save_model(output_dir, _internal_call=True)  # VConCallback.on_save adds vcon_config.json
            return
        state_dict = self._full_state_dict()  # every rank takes part in the gather
        if self.args.should_save:
            self.vcon_summary = export_run(self.model, output_dir or self.args.output_dir, training_args=self.args,
                                           trainer_state=self.state, processing_class=self.processing_class,
                                           state_dict=state_dict, format=self.export_format)
            self._exported_to = os.path.normpath(output_dir or self.args.output_dir)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=getattr(self.args, "hub_revision", None))

    def save_compressed(self, output_dir: Optional[str] = None) -> Optional[str]:
        """Write the compact checkpoint of the compressed model (:func:`hf_vcon.save_compressed`: low-rank factors,
        packed sign bits, values + bitmask) and the processing class to ``output_dir`` (default ``args.output_dir``).
        ``hf_vcon.load_compressed(output_dir)`` loads it back. Returns the folder on the saving process.

        Raises:
            VConError: under FSDP / DeepSpeed, whose modules hold weight shards (use :meth:`save_model`).
        """
        if getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False):
            raise VConError(
                "save_compressed reads the modules' weights, which FSDP / DeepSpeed shard; save the merged model with "
                "trainer.save_model() instead."
            )
        if not self.args.should_save:
            return None
        folder = save_compressed(self.model, output_dir or self.args.output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(folder)
        return folder

    def _full_state_dict(self) -> Optional[dict]:
        """The full state dict where modules hold shards (FSDP, DeepSpeed); every rank must call this."""
        if getattr(self, "is_fsdp_enabled", False):
            return self.accelerator.get_state_dict(self.model)
        if getattr(self, "is_deepspeed_enabled", False):
            try:
                return self.accelerator.get_state_dict(self.deepspeed)
            except ValueError as error:  # ZeRO-3 without stage3_gather_16bit_weights_on_model_save
                raise VConError(
                    f"The merged VCON model is built from the full weights, which DeepSpeed did not gather ({error}). Set "
                    "stage3_gather_16bit_weights_on_model_save: true in the DeepSpeed config (accelerate: "
                    "zero3_save_16bit_model: true)."
                ) from error
        return None

    def create_model_card(self, model_name: Optional[str] = None, tags=None, **kwargs: Any) -> None:
        """Write the VCON model card (method, setting, Q, sizes, metrics, versions) to ``args.output_dir``."""
        if not self.is_world_process_zero():
            return
        summary = getattr(self, "vcon_summary", None) or self.vcon_callback.summary or vcon_summary(self.model)
        exported_here = getattr(self, "_exported_to", None) == os.path.normpath(self.args.output_dir)
        write_card(self.model, self.args.output_dir, summary, self.state, model_name=model_name,
                   tags=[tags] if isinstance(tags, str) else tags,
                   export_format=self.export_format if exported_here else None)

    def push_to_hub(self, *args: Any, **kwargs: Any):
        """Upload the merged compressed model folder (not the training checkpoints) with its model card."""
        try:
            return super().push_to_hub(*args, **kwargs)
        except Exception as error:
            repo = getattr(self, "hub_model_id", None) or self.args.hub_model_id or os.path.basename(self.args.output_dir)
            raise VConError(
                f"Uploading {self.args.output_dir!r} to the Hub repo {repo!r} failed ({type(error).__name__}: {error}). "
                "The local folder is intact; push it again with trainer.push_to_hub() or huggingface_hub.upload_folder()."
            ) from error
