"""The ``--vcon_distill_*`` / ``--vcon_teacher_*`` flags: distillation from a frozen teacher while compressing
(:class:`hf_vcon.DistillationConfig`), part of every script's ``--vcon_*`` flags."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from hf_vcon import DistillationConfig
from hf_vcon.distill.mixin import DISTILLATION_FILE

from .flags import UsageError

# DistillationConfig field → its flag
FIELD_FLAGS = {
    "alpha": "--vcon_distill_alpha",
    "temperature": "--vcon_distill_temperature",
    "teacher_dtype": "--vcon_teacher_dtype",
    "teacher_device": "--vcon_teacher_device",
    "hidden_layers": "--vcon_distill_hidden_layers",
    "hidden_loss": "--vcon_distill_hidden_loss",
    "hidden_weight": "--vcon_distill_hidden_weight",
}
TEACHER_FLAG = "--vcon_teacher_model_name_or_path"


@dataclass
class VConDistillArguments:
    """Distillation flags; distillation is on when ``--vcon_distill_alpha`` is given."""

    vcon_distill_alpha: Optional[float] = field(
        default=None,
        metadata={"help": "Distil from a frozen teacher while compressing: the loss is (1 − α)·task + "
                          "α·T²·KL(teacher/T ‖ student/T). α in [0, 1]; not given: no distillation."},
    )
    vcon_distill_temperature: float = field(default=2.0, metadata={"help": "T > 0, the distillation temperature."})
    vcon_teacher_model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "The teacher (a Hub model or a folder fine-tuned on the task, e.g. a larger one). "
                          "Default: the model before compression — with --vcon_compare the dense arm's fine-tuned model, else the "
                          "model as loaded from --model_name_or_path (which must then be fine-tuned on the task)."},
    )
    vcon_teacher_dtype: Optional[str] = field(
        default=None, metadata={"help": "Run the teacher in bfloat16 / float16 / float32 (default: as loaded)."}
    )
    vcon_teacher_device: Optional[str] = field(
        default=None, metadata={"help": "Run the teacher on this device, e.g. cuda:1 (default: the student's)."}
    )
    vcon_distill_hidden_layers: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Also match hidden states: all, or indices into output_hidden_states (0 = embeddings, "
                          "i = layer i), e.g. 4 8 12."},
    )
    vcon_distill_hidden_loss: str = field(default="mse", metadata={"help": "mse or cosine, for the hidden states."})
    vcon_distill_hidden_weight: float = field(
        default=1.0, metadata={"help": "γ, the weight of the hidden-state term (mean over the matched layers)."}
    )

    @property
    def distills(self) -> bool:
        return self.vcon_distill_alpha is not None

    def given_distill_flags(self) -> list[str]:
        defaults = {f.name: f.default for f in dataclasses.fields(VConDistillArguments)}
        return [f"--{name}" for name, default in defaults.items() if getattr(self, name) != default]

    def distillation_config(self, teacher: Any = None) -> Optional[DistillationConfig]:
        """The :class:`~hf_vcon.DistillationConfig` of these flags (``None`` without ``--vcon_distill_alpha``).

        Raises:
            UsageError: naming the flag, with DistillationConfig's explanation.
        """
        if not self.distills:
            given = self.given_distill_flags()
            if given:
                raise UsageError(f"argument {given[0]}: it needs --vcon_distill_alpha (distillation is off "
                                 "without it).")
            return None
        layers = self.vcon_distill_hidden_layers
        if layers is not None and layers != ["all"]:
            try:
                layers = [int(value) for value in layers]
            except ValueError:
                raise UsageError(f"argument --vcon_distill_hidden_layers: {layers!r} must be 'all' or integers "
                                 "(indices into the hidden states).") from None
        try:
            return DistillationConfig(
                alpha=self.vcon_distill_alpha, temperature=self.vcon_distill_temperature, teacher=teacher,
                teacher_dtype=self.vcon_teacher_dtype, teacher_device=self.vcon_teacher_device,
                hidden_layers="all" if layers == ["all"] else layers, hidden_loss=self.vcon_distill_hidden_loss,
                hidden_weight=self.vcon_distill_hidden_weight,
            )
        except (TypeError, ValueError) as error:
            flag = next((flag for name, flag in FIELD_FLAGS.items() if str(error).startswith(name)), TEACHER_FLAG)
            raise UsageError(f"argument {flag}: {error}") from None


def distill_field_names() -> set[str]:
    return {f.name for f in dataclasses.fields(VConDistillArguments)}


def check_distill_flags(vcon_args: VConDistillArguments, compressing: bool) -> None:
    """The distillation flags before any data or model is read: valid values, a compression to distil into, and a
    teacher whose config loads.

    Raises:
        UsageError: naming the flag.
    """
    config = vcon_args.distillation_config()
    if config is None:
        return
    if not compressing:
        raise UsageError("argument --vcon_distill_alpha: distillation trains a compressed student; it does not apply "
                         "to --vcon_method none (a dense fine-tune).")
    if vcon_args.vcon_teacher_model_name_or_path:
        from transformers import AutoConfig

        path = vcon_args.vcon_teacher_model_name_or_path
        try:
            AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as error:
            raise UsageError(f"argument {TEACHER_FLAG}: could not load {path!r} ({type(error).__name__}: {error}).") \
                from None


def check_distill_checkpoint(vcon_args: VConDistillArguments, checkpoint: Optional[str]) -> None:
    """Refuse a checkpoint trained with other distillation values, or with / without distillation.

    Raises:
        UsageError: naming the flag whose value differs.
    """
    if checkpoint is None:
        return
    config = vcon_args.distillation_config()
    path = os.path.join(checkpoint, DISTILLATION_FILE)
    if config is None:
        if os.path.isfile(path):
            raise UsageError(f"argument --vcon_distill_alpha: the checkpoint {checkpoint!r} was trained with "
                             f"distillation ({DISTILLATION_FILE}); resume it with the --vcon_distill_* flags it was "
                             "trained with.")
        return
    if not os.path.isfile(path):
        raise UsageError(f"argument --vcon_distill_alpha: the checkpoint {checkpoint!r} was trained without "
                         "distillation; resume it without --vcon_distill_* flags, or train afresh.")
    with open(path, encoding="utf-8") as handle:
        saved = json.load(handle)["distillation"]
    current = config.to_dict()
    different = [name for name in FIELD_FLAGS if name != "teacher_device" and saved.get(name) != current.get(name)]
    if different:
        details = "; ".join(f"{name}: checkpoint {saved.get(name)!r} vs now {current.get(name)!r}"
                            for name in different)
        raise UsageError(f"argument {FIELD_FLAGS[different[0]]}: the checkpoint {checkpoint!r} was trained with other "
                         f"distillation values ({details}).")


def teacher_note(config: Optional[DistillationConfig], teacher_path: Optional[str]) -> str:
    """For the comparison table's title: what the compressed arms distilled from."""
    if config is None:
        return ""
    source = teacher_path or "the dense model"
    return f"; post-shot and VCON distilled from {source} (α = {config.alpha:g}, T = {config.temperature:g})"
