"""The compressed units: which kind of VCON a targeted name gets, and its shape.

A targeted Linear/Conv1D becomes a :class:`~hf_vcon.layers.linear.VConLinear` (the fast path: one matmul, nothing kept for
backward) unless the module that owns it reads its weight directly instead of calling it (``nn.MultiheadAttention``
and its ``out_proj``, WavLM's attention): then, as for fused weights (``<owner>.<parameter>``: 3-D expert weights,
MHA's input projections), the weight itself is parametrized with a :class:`~hf_vcon.layers.weight.VConWeight`.
"""

from __future__ import annotations

import functools
import inspect
import re
from typing import Union

from torch import nn

from ..compressors import Compressor
from ..errors import UnsupportedLayerError
from ..utils.linears import LINEAR_TYPES, linear_shape
from .linear import VConLinear
from .weight import VConWeight

Unit = Union[VConLinear, VConWeight]
_NOT_MATH = r"(?!\s*\.\s*(?:dtype|device|shape|size|ndim|dim|is_\w+|requires_grad)\b)"


@functools.lru_cache(maxsize=None)
def reads_weight_directly(owner_class: type, child: str) -> bool:
    """True if the source of ``owner_class`` uses ``self.<child>.weight`` for more than its dtype, device, shape or
    type (T5 reads ``self.wo.weight.dtype``, which the VCON layer's latent weight answers)."""
    pattern = re.compile(rf"(?<!isinstance\()self\.{re.escape(child)}\.weight\b{_NOT_MATH}")
    for klass in owner_class.__mro__:
        if klass in (nn.Module, object):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        if pattern.search(source):
            return True
    return False


def _resolve(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """``(owner, parameter)`` of a fused-weight name, or ``(module, "")`` of a module name."""
    try:
        return model.get_submodule(name), ""
    except AttributeError:
        owner_name, _, param = name.rpartition(".")
        return model.get_submodule(owner_name), param


def _parent(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name.rpartition(".")[0])


def unit_weight(model: nn.Module, name: str) -> nn.Parameter:
    """The parameter ``name`` compresses."""
    owner, param = _resolve(model, name)
    return getattr(owner, param or "weight")


def unit_shape(model: nn.Module, name: str) -> tuple[int, int]:
    """``(out_features, in_features)`` of what ``name`` compresses (of each expert, for an expert weight)."""
    owner, param = _resolve(model, name)
    if not param:
        return linear_shape(owner)
    weight = getattr(owner, param)
    shape = tuple(getattr(weight, "ds_shape", None) or weight.shape)
    out_features, in_features = shape[-2:]
    return (in_features, out_features) if getattr(owner, "is_transposed", False) else (out_features, in_features)


def make_unit(model: nn.Module, name: str, compressor: Compressor, recompute_every: int = 1) -> Unit:
    """The VCON unit for ``name`` (not attached yet: :meth:`attach_to` puts it in the model)."""
    unit = _new_unit(model, name, compressor, recompute_every)
    compressor.bind_unit(unit)
    return unit


def _check_inputs_quantizable(name: str, compressor: Compressor) -> None:
    """A parametrized weight is multiplied by model code, where no VCON layer sees (and quantizes) its input."""
    if getattr(compressor, "quantizes_inputs", False):
        raise UnsupportedLayerError(
            f"{name!r} is a weight the model multiplies itself (fused experts, attention projections): its inputs "
            f"cannot be quantized; give it activations='none' (module_overrides) or leave it out (exclude_modules).")


def _new_unit(model: nn.Module, name: str, compressor: Compressor, recompute_every: int) -> Unit:
    owner, param = _resolve(model, name)
    if param:
        _check_inputs_quantizable(name, compressor)
        return VConWeight(owner, param, compressor, transposed=getattr(owner, "is_transposed", False) and
                          getattr(owner, param).dim() == 3, recompute_every=recompute_every)
    if not isinstance(owner, LINEAR_TYPES):
        raise TypeError(f"{name!r} is a {type(owner).__name__}, not a Linear/Conv1D or a fused weight.")
    parent = _parent(model, name) if "." in name else model
    if isinstance(owner, nn.Linear) and reads_weight_directly(type(parent), name.rpartition(".")[2]):
        _check_inputs_quantizable(name, compressor)
        return VConWeight(owner, "weight", compressor, recompute_every=recompute_every)
    return VConLinear(owner, compressor, recompute_every=recompute_every)
