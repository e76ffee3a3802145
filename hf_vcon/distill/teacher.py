"""The teacher of distillation: a frozen copy of the model before compression (or the user's model), its placement,
a fingerprint that tells a resumed run whether it was rebuilt identically, and the capture of module outputs that
student and teacher are matched on."""

from __future__ import annotations

import copy
import math
import warnings
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from torch import nn

from ..config.targets import matches
from ..errors import IncompatibleCheckpointError, VConError, VConWarning
from ..patching.distributed import is_zero3_partitioned
from ..patching.state import get_vcon_state
from ..patching.verbs import unload
from ..utils.modules import unwrap_model
from .losses import DistillationConfig

FINGERPRINT_TOLERANCE = 1e-5


def _zero3_error(where: str) -> VConError:
    return VConError(
        f"{where} has parameters partitioned by DeepSpeed ZeRO-3 (zero_optimization.stage = 3): a distillation "
        "teacher is run outside the DeepSpeed engine and needs its full weights. Pass "
        "DistillationConfig(teacher=<a model loaded without ZeRO-3 partitioning, e.g. before the TrainingArguments "
        "that enable ZeRO-3>), use cached logits (DistillationConfig(teacher_logits=...), written by "
        "hf_vcon.cache_teacher_logits), or train with ZeRO stage 2 or DDP."
    )


def frozen_copy(model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers have storage of their own, cast to ``dtype`` as copied
    (so no second full-precision copy is made), frozen, in eval mode. Tied weights stay tied."""
    memo: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if id(tensor) in memo:
                continue
            value = tensor.detach()
            value = value.to(dtype) if dtype is not None and value.is_floating_point() else value
            value = value.clone() if value.data_ptr() == tensor.data_ptr() else value
            memo[id(tensor)] = nn.Parameter(value, requires_grad=False) if isinstance(tensor, nn.Parameter) else value
        teacher = copy.deepcopy(model, memo)
    return freeze(teacher)


def freeze(teacher: nn.Module) -> nn.Module:
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def build_teacher(config: DistillationConfig, model: Optional[nn.Module]) -> Optional[nn.Module]:
    """The teacher for ``config``: ``None`` with cached logits, the user's model (frozen, cast), or a frozen copy of
    ``model`` before compression (a patched model is copied and unloaded: its latent dense model).

    Raises:
        VConError: for a model ZeRO-3 partitioned, or no model to copy.
    """
    if config.teacher_logits is not None:
        return None
    if config.teacher is not None:
        teacher = unwrap_model(config.teacher)
        if any(is_zero3_partitioned(p) for p in teacher.parameters()):
            raise _zero3_error("DistillationConfig.teacher")
        if model is not None and _shares_storage(teacher, unwrap_model(model)):
            raise ValueError("DistillationConfig.teacher shares weights with the model being trained; pass another "
                             "model (or teacher=None for a frozen copy of this one taken before compression).")
        if config.teacher_dtype is not None:
            teacher.to(config.teacher_dtype)
        return freeze(teacher)
    if model is None:
        raise ValueError("DistillationConfig(teacher=None) copies the model before compression, but no model was "
                         "given (model_init is not supported); pass teacher=.")
    model = unwrap_model(model)
    if any(is_zero3_partitioned(p) for p in model.parameters()):
        raise _zero3_error("The model (copied as the teacher by DistillationConfig(teacher=None))")
    teacher = frozen_copy(model, config.teacher_dtype)
    if get_vcon_state(teacher) is not None:
        unload(teacher)  # the latent dense model; the same as the original while nothing has trained
    return teacher


def _shares_storage(first: nn.Module, second: nn.Module) -> bool:
    pointers = {p.data_ptr() for p in second.parameters() if p.numel()}
    return any(p.data_ptr() in pointers for p in first.parameters() if p.numel())


def output_size(model: nn.Module) -> tuple[Optional[str], Optional[int]]:
    """``("vocabulary", rows of the output embeddings)`` for a language model, ``("labels", num_labels)`` for a model
    with a classification head, ``(None, None)`` where the model says neither."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is not None:
        rows = getattr(head, "out_features", None) or getattr(getattr(head, "weight", None), "shape", (None,))[0]
        return ("vocabulary", int(rows)) if rows else (None, None)
    labels = getattr(model, "num_labels", None)
    return ("labels", int(labels)) if isinstance(labels, int) else (None, None)


def shared_outputs(student: nn.Module, teacher: nn.Module, tokenizer: Any = None) -> Optional[int]:
    """How many leading logits the distillation compares: ``None`` (all) when the teacher's outputs are the
    student's, the shared rows when one vocabulary is the other padded to another size (families pad differently).

    A vocabulary of another size counts as padded when ``tokenizer`` (the trainer's ``processing_class``) shows that
    every token it has fits in the shared rows; warns when the two models' configs name different tokenizers.

    Raises:
        VConError: when the outputs differ otherwise (another number of labels, another vocabulary).
    """
    student_kind, student_size = output_size(unwrap_model(student))
    teacher_kind, teacher_size = output_size(unwrap_model(teacher))
    _warn_other_tokenizer(unwrap_model(student), unwrap_model(teacher))
    if None in (student_size, teacher_size) or student_kind != teacher_kind or student_size == teacher_size:
        return None
    shared = min(student_size, teacher_size)
    tokens = len(tokenizer) if tokenizer is not None and hasattr(tokenizer, "__len__") else None
    if student_kind == "vocabulary" and tokens is not None and tokens <= shared:
        return shared
    what = (f"vocabulary of {teacher_size} rows, the student's {student_size}" if student_kind == "vocabulary"
            else f"{teacher_size} labels, the student's {student_size}")
    hint = ("A teacher whose vocabulary is the student's padded to another size is accepted when the trainer's "
            "processing_class shows that its tokens fit in the shared rows"
            + (f" (this one has {tokens} tokens, more than {shared})" if tokens is not None else "")
            if student_kind == "vocabulary" else "The teacher needs the student's head (the same labels)")
    raise VConError(f"The teacher's outputs do not match the student's: its {what}. {hint}.")


def check_cached_outputs(student: nn.Module, width: int, path: str) -> None:
    """Cached teacher logits of ``width`` per row must be the student's outputs (its classes or vocabulary), checked
    when training is set up rather than at its first batch.

    Raises:
        VConError: when the student says how many outputs it has and they are not ``width``.
    """
    kind, size = output_size(unwrap_model(student))
    if size is not None and size != width:
        outputs = f"{size} labels" if kind == "labels" else f"a vocabulary of {size} rows"
        raise VConError(f"The teacher logits cached in {path!r} have {width} logits per row, the student has "
                        f"{outputs}: the cache was written for another model or task. Cache the logits of a teacher "
                        "with the student's outputs (hf_vcon.cache_teacher_logits).")


def _warn_other_tokenizer(student: nn.Module, teacher: nn.Module) -> None:
    names = [getattr(getattr(model, "config", None), "tokenizer_class", None) for model in (student, teacher)]
    if None not in names and names[0] != names[1]:
        warnings.warn(f"The student's config names tokenizer {names[0]!r}, the teacher's {names[1]!r}: distillation "
                      "compares logits token id by token id, which is only right when both use the same "
                      "tokenizer.", VConWarning, stacklevel=4)


def place_teacher(teacher: nn.Module, device: torch.device) -> nn.Module:
    if any(p.device != device for p in teacher.parameters()):
        teacher.to(device)
    return teacher


def teacher_device(teacher: nn.Module) -> torch.device:
    for tensor in teacher.parameters():
        return tensor.device
    return torch.device("cpu")


def teacher_dtype_of(teacher: nn.Module) -> Optional[torch.dtype]:
    for tensor in teacher.parameters():
        if tensor.is_floating_point():
            return tensor.dtype
    return None


# ---------------------------------------------------------------------------------------------- fingerprint
def fingerprint(teacher: nn.Module) -> dict[str, list[float]]:
    """Per tensor of the teacher's state dict: its shape's size, the float64 sum and sum of squares of its values.

    Cheap (two reductions per tensor, on the teacher's device), and equal for the same weights rebuilt the same way;
    a resumed run compares it with the one saved in its checkpoint.
    """
    result = {}
    with torch.no_grad():
        for name, tensor in teacher.state_dict().items():
            values = tensor.detach().double()
            result[name] = [float(tensor.numel()), float(values.sum()), float(values.pow(2).sum())]
    return result


def fingerprint_differences(saved: dict, current: dict, limit: int = 3) -> list[str]:
    """The tensors whose fingerprint differs (at most ``limit`` named, then a count)."""
    names = sorted(set(saved) | set(current))
    different = [name for name in names if name not in saved or name not in current
                 or not all(math.isclose(a, b, rel_tol=FINGERPRINT_TOLERANCE, abs_tol=FINGERPRINT_TOLERANCE)
                            for a, b in zip(saved[name], current[name]))]
    shown = [f"{name!r} ({'missing now' if name not in current else 'new' if name not in saved else 'other values'})"
             for name in different[:limit]]
    return shown + ([f"{len(different) - limit} more"] if len(different) > limit else [])


def check_same_teacher(saved: dict, current: dict, checkpoint: str) -> None:
    """Raise unless the teacher fingerprint saved in ``checkpoint`` matches the teacher of this run.

    Raises:
        IncompatibleCheckpointError: naming the tensors that differ.
    """
    differences = fingerprint_differences(saved, current)
    if differences:
        raise IncompatibleCheckpointError(
            f"The teacher of this run is not the one {checkpoint!r} was trained with: tensors {', '.join(differences)} "
            "differ. Resume with the same teacher (with teacher=None, the model as given to the trainer before "
            "training, loaded as for the original run), or train afresh."
        )


# ------------------------------------------------------------------------------------------ module outputs
def _first_tensor(output: Any) -> torch.Tensor:
    while not torch.is_tensor(output):
        output = output[0] if isinstance(output, (tuple, list)) else output.to_tuple()[0]
    return output


class FeatureCapture:
    """The outputs of named modules of the student and the teacher during one forward each (forward hooks)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, patterns):
        teacher_names = [name for name, _ in teacher.named_modules() if name and matches(name, patterns)]
        if not teacher_names:
            raise ValueError(f"hidden_modules={patterns!r} matches no module of the teacher.")
        student_names = {name for name, _ in student.named_modules()}
        missing = [name for name in teacher_names if name not in student_names]
        if missing:
            raise VConError(
                f"hidden_modules: the student has no module {missing[0]!r} (the teacher has). Under block-wise VCON, "
                "modules inside a block are not the student's (the block blends its outputs): name the blocks "
                "themselves, or use hidden_layers."
            )
        self.names = teacher_names
        self.outputs: dict[str, dict[str, torch.Tensor]] = {"student": {}, "teacher": {}}
        self._active: Optional[str] = None
        for side, model in (("student", student), ("teacher", teacher)):
            for name in teacher_names:
                model.get_submodule(name).register_forward_hook(self._hook(side, name))

    def _hook(self, side: str, name: str):
        def hook(module, inputs, output):
            if self._active == side:  # not during gradient-checkpoint recomputation or evaluation
                self.outputs[side][name] = _first_tensor(output)

        return hook

    @contextmanager
    def recording(self, side: str) -> Iterator[None]:
        self._active = side
        try:
            yield
        finally:
            self._active = None

    def pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        result = [(self.outputs["student"][name], self.outputs["teacher"][name]) for name in self.names]
        self.outputs = {"student": {}, "teacher": {}}
        return result
