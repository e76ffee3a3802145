"""What hf_vcon needs to know of PEFT's adapter layers wherever it meets them: whether a model is a ``PeftModel``,
which modules are adapter layers, a state dict without them. Nothing here needs PEFT installed."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import VConError

ADAPTER_FOLDER = "adapter"


def is_peft_model(model: nn.Module) -> bool:
    """True for a ``peft.PeftModel``."""
    return hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None))


def tuner_layer_type() -> Any:
    """PEFT's ``BaseTunerLayer``, or ``None`` without PEFT."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return None
    return BaseTunerLayer


def adapter_layer_names(model: nn.Module) -> list[str]:
    """The module names of PEFT's adapter layers in ``model``."""
    tuner = tuner_layer_type()
    return [] if tuner is None else [name for name, module in model.named_modules() if isinstance(module, tuner)]


def check_not_inside_vcon(layer: nn.Module) -> None:
    """Raise if an adapter sits inside a VCON layer (its base), where the blend would skip the adapter's update."""
    tuner = tuner_layer_type()
    if tuner is not None and isinstance(layer.base_layer, tuner):
        raise VConError(
            "A PEFT adapter sits inside a VCON layer (LoRA targeted its '.base_layer'), where the blend of weights "
            "would skip the adapter once beta < 1. Put the adapter on the VCON layer itself: "
            "hf_vcon.get_peft_model(model, LoraConfig(target_modules=[<the layer's name>]))."
        )


def without_adapters(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` of a model holding PEFT adapter layers as if they were not there: each adapter layer's
    ``<name>.base_layer.<key>`` under ``<name>.<key>``, its adapter tensors dropped (they are saved apart)."""
    roots = adapter_layer_names(model)
    if not roots:
        return state_dict
    stripped = {}
    for key, value in state_dict.items():
        root = max((root for root in roots if key.startswith(f"{root}.")), key=len, default=None)
        while root is not None:
            rest = key[len(root) + 1:]
            if not rest.startswith("base_layer."):
                break  # an adapter's own tensor
            key = f"{root}.{rest[len('base_layer.'):]}"
            root = max((r for r in roots if key.startswith(f"{r}.") and len(r) < len(root)), key=len, default=None)
        else:
            stripped[key] = value
    return stripped
