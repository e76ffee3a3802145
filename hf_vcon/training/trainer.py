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
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ..config.vcon_config import VConConfig
from ..distill.losses import DistillationConfig
from ..distill.mixin import DistillationMixin
from ..distill.teacher import build_teacher
from ..errors import VConError, VConWarning
from ..export.compact_save import save_compressed
from ..export.files import SAFE_WEIGHTS_NAME, module_key_names
from ..export.merged import AUTO, stored_sizes, written_format
from ..export.run import card_details, export_run, write_card
from ..patching.distributed import check_fsdp_plugin, check_sharding
from ..patching.state import require_state
from ..patching.summary import vcon_summary
from ..patching.verbs import compressed_view, get_beta
from ..utils.logs import compressed_metric_name, is_compressed_metric
from ..utils.modules import unwrap_model
from .callback import VConCallback
from .resume import verify_checkpoint

__all__ = ["VConCallback", "VConTrainer"]


class VConTrainer(DistillationMixin, Trainer):
    """A ``transformers.Trainer`` that fine-tunes with VCON and saves the merged compressed model.

    It takes every ``Trainer`` argument plus:

    Args:
        vcon_config: the :class:`~hf_vcon.VConConfig`; the model is patched here unless it already was (then
            ``vcon_config`` may be omitted). A bad config raises here, before any training step.
        evaluate_compressed: every ``evaluate()`` also reports the compressed model, the one ``save_model()``
            writes, under ``<prefix>_compressed_*`` (while 0 < β it is evaluated at β = 0 for that evaluation only;
            at β = 0 it is the model evaluated, and its metrics are repeated under those names). Both sets are in
            the one log entry and the one ``on_evaluate`` call of each evaluation. ``metric_for_best_model`` then
            names the compressed model's metric (``"loss"`` is read as ``"eval_compressed_loss"``, ``"accuracy"``
            as ``"eval_compressed_accuracy"``), so that ``load_best_model_at_end``, ``save_strategy="best"`` and
            early stopping compare checkpoints by the model that is saved.
        export_format: the format ``save_model()`` writes: ``"auto"`` (default: compressed-tensors for quantized
            models, ``quant`` and ``binary``, when the model allows it and the package is installed; dense
            otherwise), ``"dense"`` or ``"compressed-tensors"`` (see :mod:`hf_vcon.export.merged`). An impossible choice
            raises here.
        distillation: a :class:`~hf_vcon.DistillationConfig` to distil from a frozen teacher while compressing
            (:class:`~hf_vcon.DistillationMixin`): by default the model as given, copied before it is patched; it is
            ``trainer.teacher``.

    ``train()`` sets β from ``state.global_step`` in ``training_step``; ``save_model()`` writes the merged
    compressed model (plain ``from_pretrained`` loads it) with ``vcon_config.json`` and a model card, while the
    periodic ``checkpoint-N`` folders keep the VCON layers for ``train(resume_from_checkpoint=...)``
    (:func:`hf_vcon.export_checkpoint` turns one into the merged model).

    Example:
        ```python
        trainer = VConTrainer(model=model, args=TrainingArguments("out", max_steps=1000),
                              vcon_config=VConConfig(method="binary", transition_steps=0.2), train_dataset=ds)
        trainer.train()
        trainer.save_model()
        ```
    """

    def __init__(self, *args: Any, vcon_config: Optional[VConConfig] = None, evaluate_compressed: bool = True,
                 export_format: str = AUTO, distillation: Optional[DistillationConfig] = None, **kwargs: Any):
        model = kwargs.get("model", args[0] if args else None)
        if model is None:
            raise ValueError("VConTrainer needs model=: model_init (hyperparameter search) is not supported.")
        if distillation is not None:
            if not isinstance(distillation, DistillationConfig):
                raise TypeError(f"distillation must be a DistillationConfig, not {type(distillation).__name__}.")
            self.teacher = build_teacher(distillation, model)  # the model as given, before it is patched
        # save_model() exports, in the format the callback resolves
        self.vcon_callback = VConCallback(vcon_config, export_at_train_end=False, export_format=export_format)
        self.vcon_callback.attach(model)
        self.evaluate_compressed = evaluate_compressed
        self.vcon_callback.evaluates_compressed = evaluate_compressed
        self._sharding_checked = False
        self._evaluating = False
        super().__init__(*args, distillation=distillation, **kwargs)
        self._prepare_distribution()
        # First in line, so the vcon/* values it adds to the logs reach every reporting callback.
        self.callback_handler.callbacks.insert(0, self.vcon_callback)
        self._keep_checkpoints_off_the_hub()
        self._compare_checkpoints_by_the_compressed_model()

    @property
    def vcon_config(self) -> VConConfig:
        return self.vcon_callback.vcon_config

    @property
    def export_format(self) -> str:
        """The format ``save_model()`` writes: ``"dense"`` or ``"compressed-tensors"`` (``"auto"`` resolved when the
        trainer is built; after ``save_model()``, what the folder holds: ``"auto"`` falls back to dense where the
        compressed-tensors folder would not load back)."""
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

    def _compare_checkpoints_by_the_compressed_model(self) -> None:
        """Point ``metric_for_best_model`` at the compressed model's metric (the saved model's), like with like."""
        metric = self.args.metric_for_best_model
        if not metric or not self.evaluate_compressed or is_compressed_metric(metric):
            return
        names = tuple(self.eval_dataset) if isinstance(self.eval_dataset, dict) else ()
        # greater_is_better was derived from the name TrainingArguments was given; the new name keeps its meaning.
        self.args.metric_for_best_model = compressed_metric_name(metric, names)

    # ------------------------------------------------------------------------------------- training
    def train(self, resume_from_checkpoint=None, *args: Any, **kwargs: Any):
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
        if isinstance(checkpoint, (str, os.PathLike)):
            verify_checkpoint(os.fspath(checkpoint), self.model)
        self.vcon_callback.resume_dir = os.fspath(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else None
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """The Trainer's loading, with the saved keys renamed to the model's own first: transformers 5 saves some
        architectures (ViT…) under legacy names that its resume would not match, leaving the model as it was."""
        target = model if model is not None else self.model
        weights = os.path.join(resume_from_checkpoint, SAFE_WEIGHTS_NAME)
        sharded = getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False)
        if sharded or not os.path.isfile(weights):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        from safetensors.torch import load_file

        saved = load_file(weights, device="cpu")
        names = module_key_names(target, saved, resume_from_checkpoint)
        if all(key == name for key, name in names.items()):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        result = unwrap_model(target).load_state_dict({names[key]: value for key, value in saved.items()}, strict=False)
        self._issue_warnings_after_load(result)

    def training_step(self, model: nn.Module, inputs: dict, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self._sharding_checked:  # `model` is the wrapped one: DDP, FSDP, DeepSpeed engine
            check_sharding(model)
            self._sharding_checked = True
        self.vcon_callback.update(self.state.global_step, self.state.max_steps)
        return super().training_step(model, inputs, *args, **kwargs)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval", **kwargs: Any):
        """``Trainer.evaluate``, plus the compressed model's metrics under ``<prefix>_compressed_*``."""
        evaluating, self._evaluating = self._evaluating, True
        try:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix, **kwargs)
        finally:
            self._evaluating = evaluating

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix: str = "eval", *args: Any, **kwargs: Any):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix,
                                         *args, **kwargs)
        if not (self._evaluating and self.evaluate_compressed):  # predict() reports the model as it is
            return output
        prefix = f"{metric_key_prefix}_"
        if get_beta(self.model) > 0:
            with compressed_view(self.model):
                compressed = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                                     f"{prefix}compressed", *args, **kwargs).metrics
        else:  # the model evaluated is the compressed one
            compressed = {f"{prefix}compressed_{key[len(prefix):]}": value for key, value in output.metrics.items()
                          if key.startswith(prefix)}
        output.metrics.update(compressed)
        return output

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
                                           state_dict=state_dict, format=self.vcon_callback.requested_format)
            self._exported_to = os.path.normpath(output_dir or self.args.output_dir)
            self.vcon_callback.export_format = written_format(self._exported_to)
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

    def create_model_card(self, model_name: Optional[str] = None, tags=None, comparison: Optional[str] = None,
                          **card_fields: Any) -> None:
        """Write the VCON model card to ``args.output_dir``: how to load it, method, setting, Q, sizes, the training
        budget, the saved model's metrics, versions.

        Args:
            model_name: the card's title (default: the folder's name).
            tags: more tags.
            comparison: a Markdown table of other arms trained alongside (dense, post-shot), shown as is.
            card_fields: ``Trainer.create_model_card``'s ``language``, ``license``, ``finetuned_from``, ``tasks``,
                ``dataset_tags``, ``dataset`` and ``dataset_args``; they become the card's metadata
                (``base_model``, ``pipeline_tag``, ``datasets``…).
        """
        if not self.is_world_process_zero():
            return
        summary = getattr(self, "vcon_summary", None) or self.vcon_callback.summary or vcon_summary(self.model)
        repo_id = getattr(self, "hub_model_id", None) if self.args.push_to_hub else None
        if getattr(self, "_exported_to", None) == os.path.normpath(self.args.output_dir):  # the folder holds weights
            names = require_state(self.model, "create_model_card").targeted_module_names
            card_fields.update(export_format=self.export_format,
                               stored_bytes=stored_sizes(self.args.output_dir, names, self.model))
        details = card_details(self.state, self.args, repo_id=repo_id, comparison=comparison, **card_fields)
        write_card(self.model, self.args.output_dir, summary, self.state, model_name=model_name,
                   tags=[tags] if isinstance(tags, str) else tags, details=details)

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
