"""The layers VCON compresses, ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2), seen in one orientation.

Everything in hf_vcon works on weights in ``nn.Linear`` orientation ``(out_features, in_features)``; ``Conv1D``
stores its weight transposed, ``(in_features, out_features)``. This module is the one place that knows.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

LINEAR_TYPES = (nn.Linear, Conv1D)


def is_conv1d(module: nn.Module) -> bool:
    return isinstance(module, Conv1D)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of a Linear or Conv1D; its full shape even when DeepSpeed ZeRO-3 partitioned
    the weight (the local data is then empty and ``ds_shape`` holds the shape)."""
    rows, cols = tuple(getattr(module.weight, "ds_shape", None) or module.weight.shape)
    return (cols, rows) if is_conv1d(module) else (rows, cols)


def linear_weight(module: nn.Module, stored: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The weight in Linear orientation ``(out, in)``: the parameter itself, or a transposed view for Conv1D.

    ``stored`` is a tensor in the module's own orientation (read from a state dict) to orient instead.
    """
    weight = module.weight if stored is None else stored
    return weight.t() if is_conv1d(module) else weight


def stored_orientation(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` ``(out, in)`` in the orientation ``module`` stores (Conv1D: ``(in, out)``), contiguous."""
    return (weight.t() if is_conv1d(module) else weight).contiguous()


def write_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Copy ``weight`` ``(out, in)`` into ``module``'s parameter, in place."""
    with torch.no_grad():
        module.weight.copy_(weight.t() if is_conv1d(module) else weight)


def resized_like(module: nn.Module, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Module:
    """A new layer of ``module``'s type (``nn.Linear`` or ``Conv1D``) holding ``weight`` ``(out', in')`` and ``bias``
    (copies): the layer with other sizes, as a merge that removes rows or columns builds it."""
    out_features, in_features = weight.shape
    with torch.device("meta"):  # no random initialisation of weights about to be replaced
        layer = Conv1D(out_features, in_features) if is_conv1d(module) else nn.Linear(in_features, out_features)
    layer.weight = nn.Parameter(stored_orientation(module, weight).clone(), requires_grad=module.weight.requires_grad)
    layer.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=module.weight.requires_grad)
    return layer.train(module.training)
