"""Knowledge distillation from a teacher while VCON compresses the student: the configuration and the maths.

The training loss is

    L = (1 − α)·L_task + α·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)) + γ·mean_l d(h_s^l, h_t^l)

with z_t, z_s the teacher's and the student's logits (per example for classifiers, per token for language models,
over the positions the labels keep), T the temperature (the T² factor keeps the gradient's scale independent of T,
Hinton et al. 2015) and, optionally, d an MSE or cosine distance between hidden states or module outputs of chosen
layers (γ = ``hidden_weight``). Everything here is a pure function of tensors; the Trainer side
(:class:`hf_vcon.DistillationMixin`) runs the teacher and adds the terms to the Trainer's loss.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

HIDDEN_LOSSES = ("cosine", "mse")
TEACHER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}
IGNORE_INDEX = -100

HiddenLayers = Union[None, str, Sequence[Union[int, Sequence[int]]]]


def _number(name: str, value: Any, low: float, high: float = math.inf, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite number.")
    if value < low or (low_open and value == low) or value > high:
        bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]" if math.isfinite(high) else f"> {low:g}"
        raise ValueError(f"{name}={value!r} must be in {bounds}.")
    return float(value)


def teacher_dtype(value: Union[None, str, torch.dtype]) -> Optional[torch.dtype]:
    """``"bfloat16"`` / ``"bf16"`` / ``torch.bfloat16`` → ``torch.bfloat16`` (and float16, float32); ``None`` stays.

    Raises:
        ValueError: naming ``teacher_dtype`` and the accepted values.
    """
    if value is None or isinstance(value, torch.dtype) and value in TEACHER_DTYPES.values():
        return value
    if isinstance(value, str):
        name = _DTYPE_ALIASES.get(value.lower(), value.lower())
        if name in TEACHER_DTYPES:
            return TEACHER_DTYPES[name]
    raise ValueError(f"teacher_dtype={value!r} is not supported; use one of {', '.join(TEACHER_DTYPES)} "
                     "(or torch.float32 / torch.bfloat16 / torch.float16), or None to keep the student's dtype.")


def _layer_pairs(value: HiddenLayers) -> Union[None, str, tuple[tuple[int, int], ...]]:
    """``hidden_layers`` → ``"all"``, ``None``, or (student index, teacher index) pairs."""
    if value is None or value == "all":
        return value
    if isinstance(value, str) or not isinstance(value, Sequence) or not value:
        raise ValueError(f"hidden_layers={value!r} must be 'all', a non-empty list of hidden-state indices (the "
                         "same index in student and teacher) or of (student, teacher) index pairs, or None.")
    pairs = []
    for entry in value:
        pair = (entry, entry) if isinstance(entry, int) else tuple(entry) if isinstance(entry, Sequence) else None
        if pair is None or len(pair) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) for i in pair):
            raise ValueError(f"hidden_layers entry {entry!r} must be an int or a (student, teacher) pair of ints.")
        pairs.append(pair)
    return tuple(pairs)


@dataclass
class DistillationConfig:
    """Distillation from a frozen teacher during VCON's transition (and after it).

    Args:
        alpha: α, the weight of the distillation term: the loss is ``(1 − α)·task + α·T²·KL``. 0 trains on the task
            loss only (the teacher still runs: the run equals one without distillation, bit for bit); 1 is pure
            distillation (oBERT's recipes use 1, nn_pruning ≈ 0.9).
        temperature: T > 0, applied to both logits before the softmax.
        teacher: the teacher model (any model with the student's inputs and logits, e.g. a larger fine-tuned one).
            ``None`` (default) copies the student as it is before compression: when the trainer patches the model
            the copy is taken first; a model that arrives patched is copied and unloaded
            (:func:`hf_vcon.unload`: its latent dense weights, equal to the original only if nothing trained yet).
            The copy has storage of its own (never a view of the weights being trained). The teacher is put in
            eval mode, frozen, kept out of DDP / FSDP / DeepSpeed, and is ``trainer.teacher``.
        teacher_dtype: cast the teacher to ``"bfloat16"`` / ``"float16"`` / ``"float32"`` (halves its memory in 16
            bits; the copy is made in that dtype, so a full-precision second copy never exists). ``None``: as given.
        teacher_device: where the teacher runs (e.g. ``"cuda:1"``); inputs go there and its outputs come back.
            ``None``: the student's device (each rank its own copy under DDP).
        teacher_logits: a file written by :func:`hf_vcon.cache_teacher_logits`: the teacher's logits for every
            example of a fixed training set, read instead of running a teacher (no teacher is built). The training
            examples must carry their index in the cached set under ``index_column``
            (:func:`hf_vcon.add_teacher_index`).
        index_column: the column (dict key) holding an example's index in ``teacher_logits``.
        verify_teacher_logits: check every batch against a checksum of the inputs each cached row was computed
            from, so that shuffled, re-tokenized or other data raises instead of distilling wrong targets.
        hidden_layers: match hidden states too: ``"all"``, a list of indices into ``output_hidden_states``
            (0 = the embeddings, i = the output of layer i; the same index in student and teacher), or
            (student, teacher) index pairs for a teacher of another depth. Hidden sizes must agree.
        hidden_modules: match the outputs of these modules (attention outputs, say) by name, in PEFT's grammar
            (names or dotted suffixes, or one regex ``re.fullmatch``-ed against full names), e.g.
            ``r".*layer\\.\\d+\\.attention\\.output"``; each must exist under the same name in student and teacher.
        hidden_loss: the distance d: ``"mse"`` (mean squared error over positions and features) or ``"cosine"``
            (mean over positions of 1 − cos), as in the VCON authors' research script.
        hidden_weight: γ, the weight of the mean distance over matched layers.

    Raises:
        ValueError: for a value out of range, naming the field and what it accepts.

    Example:
        >>> DistillationConfig(alpha=0.9, temperature=2.0).alpha
        0.9
    """

    alpha: float = 0.5
    temperature: float = 2.0
    teacher: Optional[nn.Module] = None
    teacher_dtype: Union[None, str, torch.dtype] = None
    teacher_device: Union[None, str, torch.device] = None
    teacher_logits: Optional[str] = None
    index_column: str = "teacher_index"
    verify_teacher_logits: bool = True
    hidden_layers: HiddenLayers = None
    hidden_modules: Union[None, str, Sequence[str]] = None
    hidden_loss: str = "mse"
    hidden_weight: float = 1.0

    def __post_init__(self) -> None:
        self.alpha = _number("alpha", self.alpha, 0.0, 1.0)
        self.temperature = _number("temperature", self.temperature, 0.0, low_open=True)
        self.hidden_weight = _number("hidden_weight", self.hidden_weight, 0.0)
        self.teacher_dtype = teacher_dtype(self.teacher_dtype)
        if self.teacher is not None and not isinstance(self.teacher, nn.Module):
            raise TypeError(f"teacher must be a torch.nn.Module (a loaded model), not {type(self.teacher).__name__}; "
                            "load it first, e.g. AutoModelForSequenceClassification.from_pretrained(path).")
        if self.teacher_device is not None:
            try:
                self.teacher_device = torch.device(self.teacher_device)
            except (RuntimeError, TypeError):
                raise ValueError(f"teacher_device={self.teacher_device!r} is not a device; use e.g. 'cuda:1' or "
                                 "'cpu', or None for the student's device.") from None
        if self.hidden_loss not in HIDDEN_LOSSES:
            raise ValueError(f"hidden_loss={self.hidden_loss!r} is not known; use one of {', '.join(HIDDEN_LOSSES)}.")
        self.hidden_layers = _layer_pairs(self.hidden_layers)
        if isinstance(self.hidden_modules, str) or self.hidden_modules is None:
            modules_ok = self.hidden_modules is None or bool(self.hidden_modules)
        else:
            self.hidden_modules = list(self.hidden_modules)
            names = self.hidden_modules
            modules_ok = bool(names) and all(isinstance(name, str) and name for name in names)
        if not modules_ok:
            raise ValueError(f"hidden_modules={self.hidden_modules!r} must be module names, one regex, or None.")
        if not isinstance(self.index_column, str) or not self.index_column:
            raise ValueError(f"index_column={self.index_column!r} must be a non-empty column name.")
        self._check_teacher_source()

    def _check_teacher_source(self) -> None:
        if self.teacher_logits is None:
            return
        if not isinstance(self.teacher_logits, (str, os.PathLike)):
            raise TypeError(f"teacher_logits must be the path of a file from cache_teacher_logits, not "
                            f"{type(self.teacher_logits).__name__}.")
        self.teacher_logits = os.fspath(self.teacher_logits)
        if not os.path.isfile(self.teacher_logits):
            raise ValueError(f"teacher_logits={self.teacher_logits!r} does not exist; write it with "
                             "hf_vcon.cache_teacher_logits(teacher, dataset, path) first.")
        given = [name for name in ("teacher", "teacher_dtype", "teacher_device") if getattr(self, name) is not None]
        if given:
            raise ValueError(f"{given[0]} has no effect with teacher_logits (cached logits replace the teacher); "
                             f"pass one of them only.")
        if self.matches_features:
            raise ValueError("hidden_layers / hidden_modules need a teacher that runs: teacher_logits caches logits "
                             "only. Pass teacher= (or leave it None for a copy of the model) instead.")

    @property
    def matches_features(self) -> bool:
        """Whether hidden states or module outputs are matched (a teacher must run)."""
        return (self.hidden_layers is not None or self.hidden_modules is not None) and self.hidden_weight > 0

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able fields (the teacher is described by its class and ``name_or_path``, not serialised)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "teacher"}
        values["teacher_dtype"] = str(self.teacher_dtype).replace("torch.", "") if self.teacher_dtype else None
        values["teacher_device"] = str(self.teacher_device) if self.teacher_device is not None else None
        if isinstance(self.hidden_layers, tuple):
            values["hidden_layers"] = [list(pair) for pair in self.hidden_layers]
        values["teacher"] = None if self.teacher is None else describe_model(self.teacher)
        return values


def describe_model(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", "") or getattr(config, "name_or_path", "")
    return f"{type(model).__name__}({name})" if name else type(model).__name__


# --------------------------------------------------------------------------------------------- the losses
def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
            mask: Optional[torch.Tensor] = None, reduction: str = "mean") -> torch.Tensor:
    """The distillation term ``T²·KL(p_t ‖ p_s)``, ``p = softmax(z / T)`` over the last dimension, per item.

    ``KL(p_t ‖ p_s) = Σ_c p_t,c·(log p_t,c − log p_s,c)``, computed in float32 whatever the logits' dtype; classes
    the teacher gives probability 0 (logit −inf) contribute 0.

    Args:
        student_logits: ``(..., classes)``; every leading index is one item (an example, or a token).
        teacher_logits: the same shape as ``student_logits``.
        temperature: T > 0.
        mask: bool ``(...)``: the items that count (the label mask of a language model); ``None``: all of them.
        reduction: ``"mean"`` over the items that count, ``"sum"``, or ``"none"`` (per item, 0 where masked).

    Returns:
        A scalar (``"mean"``, ``"sum"``) or the per-item values.

    Example:
        >>> z = torch.tensor([[2.0, 0.0]])
        >>> float(kd_loss(z, z))
        0.0
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape; the teacher must have the student's outputs.")
    if teacher_logits.requires_grad:  # a teacher trained too: let autograd differentiate both sides
        per_item = _kd_per_item(student_logits, teacher_logits.to(student_logits.device), temperature)
    else:
        per_item = _ChunkedKD.apply(student_logits, teacher_logits, float(temperature))
    if mask is not None:
        per_item = torch.where(mask.to(per_item.device), per_item, 0.0)
    if reduction == "none":
        return per_item
    total = per_item.sum()
    if reduction == "sum":
        return total
    count = per_item.numel() if mask is None else mask.sum()
    return total / torch.clamp(torch.as_tensor(count, device=total.device), min=1)


def _kd_per_item(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T²·KL(p_t ‖ p_s)`` per item in float32 (teacher logits on the student's device)."""
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    p_teacher = log_p_teacher.exp()
    return torch.where(p_teacher > 0, p_teacher * (log_p_teacher - log_p_student), 0.0).sum(-1) * temperature**2


# Items per chunk: at most this many logits at a time, and at most an eighth of the items, so that the float32
# temporaries of a chunk stay well under one logits-sized tensor.
_CHUNK_ELEMENTS = 1 << 22
_MIN_CHUNKS = 8


def _chunks(items: int, classes: int) -> list[slice]:
    size = max(1, min(_CHUNK_ELEMENTS // max(classes, 1), math.ceil(items / _MIN_CHUNKS)))
    return [slice(start, start + size) for start in range(0, items, size)]


class _ChunkedKD(torch.autograd.Function):
    """``T²·KL(p_t ‖ p_s)`` per item of ``(..., classes)`` logits, a chunk of items at a time, saving nothing for
    backward but the logits themselves: its gradient ``T·(p_s − p_t)`` (times the incoming gradient) is recomputed
    chunk by chunk. Beyond the inputs, the peak is the gradient (one logits-sized tensor, not a view, so that
    autograd adds the task loss's gradient into it in place) and a chunk's float32 temporaries, where the plain
    computation keeps several float32 logits-sized tensors alive."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
        flat_student, flat_teacher = _items(student), _items(teacher)
        per_item = torch.empty(flat_student.shape[0], dtype=torch.float32, device=student.device)
        for part in _chunks(*flat_student.shape):
            per_item[part] = _kd_per_item(flat_student[part], flat_teacher[part].to(student.device), temperature)
        ctx.save_for_backward(student, teacher)
        ctx.temperature = temperature
        return per_item.reshape(student.shape[:-1])

    @staticmethod
    def backward(ctx, grad_per_item: torch.Tensor):
        student, teacher = ctx.saved_tensors
        temperature = ctx.temperature
        flat_student, flat_teacher = _items(student), _items(teacher)
        grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
        flat_grad, flat_incoming = grad.view(flat_student.shape), grad_per_item.reshape(-1)
        for part in _chunks(*flat_student.shape):
            p_student = F.softmax(flat_student[part].float() / temperature, dim=-1)
            p_teacher = F.softmax(flat_teacher[part].to(student.device).float() / temperature, dim=-1)
            flat_grad[part] = p_student.sub_(p_teacher).mul_(flat_incoming[part, None] * temperature)
        return grad, None, None


def _items(logits: torch.Tensor) -> torch.Tensor:
    """``(..., classes)`` logits as ``(items, classes)`` (a view where the layout allows)."""
    return logits.reshape(-1, logits.shape[-1])


def distill_mask(logits: torch.Tensor, labels: Optional[torch.Tensor], shifts_labels: bool,
                 shift_labels: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                 ignore_index: int = IGNORE_INDEX) -> Optional[torch.Tensor]:
    """Which items of ``logits`` the distillation term counts: ``None`` (all) or a bool mask of ``logits.shape[:-1]``.

    - Per-example logits ``(batch, classes)``: every example (unlabelled ones too).
    - Per-token logits ``(batch, tokens, vocab)`` with labels ``(batch, tokens)``: the tokens whose label is not
      ``ignore_index``. For causal language models (``shifts_labels``, as transformers' loss does) the logits at
      position t predict token t + 1, so position t counts when ``labels[t + 1]`` does and the last position never;
      ``shift_labels`` (given by padding-free collators) is used as is.
    - Per-token logits without labels: the positions ``attention_mask`` keeps (all if there is none).
    """
    if logits.dim() < 3:
        return None
    if shift_labels is not None:
        return shift_labels != ignore_index
    if labels is not None and labels.shape == logits.shape[:-1]:
        if not shifts_labels:
            return labels != ignore_index
        mask = torch.zeros_like(labels, dtype=torch.bool)
        mask[..., :-1] = labels[..., 1:] != ignore_index
        return mask
    if attention_mask is not None and attention_mask.shape == logits.shape[:-1]:
        return attention_mask.bool()
    return None


def hidden_state_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "mse",
                      mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The distance between a student's and a teacher's hidden states ``(..., features)``, in float32.

    ``"mse"``: the mean over the positions that count and the features of ``(h_s − h_t)²``; ``"cosine"``: the mean
    over those positions of ``1 − cos(h_s, h_t)``. ``mask`` (bool, ``h.shape[:-1]``) keeps positions; ``None``: all.

    Example:
        >>> h = torch.ones(2, 3, 4)
        >>> float(hidden_state_loss(h, h)), float(hidden_state_loss(h, 2 * h, "cosine"))
        (0.0, 0.0)
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student hidden states {tuple(student.shape)} and teacher hidden states "
                         f"{tuple(teacher.shape)} differ in shape; match layers of the same width.")
    student, teacher = student.float(), teacher.float().to(student.device)
    if kind == "mse":
        per_position = (student - teacher).pow(2).mean(-1)
    elif kind == "cosine":
        per_position = 1 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)
    else:
        raise ValueError(f"hidden_loss={kind!r} is not known; use one of {', '.join(HIDDEN_LOSSES)}.")
    if mask is None or mask.shape != per_position.shape:
        return per_position.mean()
    mask = mask.to(per_position.device)
    return torch.where(mask, per_position, 0.0).sum() / torch.clamp(mask.sum(), min=1)
