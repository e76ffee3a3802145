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


def modules_to_save_wrappers(model: nn.Module) -> dict[str, nn.Module]:
    """PEFT's ``ModulesToSaveWrapper`` modules of ``model`` by name (a head trained in full beside the adapters,
    ``task_type="SEQ_CLS"``'s classifier), empty without PEFT."""
    try:
        from peft.utils.other import ModulesToSaveWrapper
    except ImportError:
        return {}
    return {name: module for name, module in model.named_modules() if isinstance(module, ModulesToSaveWrapper)}


def check_not_in_modules_to_save(model: nn.Module, targeted_names: list[str]) -> None:
    """Raise if a VCON layer sits in a ``ModulesToSaveWrapper``: PEFT trains a copy of it that VCON never steps (its
    β stays 1), so every export would compress weights the trained model never compressed."""
    for wrapper in modules_to_save_wrappers(model):
        inside = [name for name in targeted_names if name == wrapper or name.startswith(f"{wrapper}.")]
        if inside:
            raise VConError(
                f"VCON layer {inside[0]!r} is inside PEFT's modules_to_save wrapper {wrapper!r} (task_type='SEQ_CLS' "
                "puts the classifier there): PEFT trains a copy of it that VCON does not compress. Leave it out of "
                f"VCON's targets (exclude_modules=[{inside[0].rpartition('.')[2]!r}]) or out of modules_to_save.")


def without_adapters(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` of a model holding PEFT adapter layers as if they were not there, as PEFT's ``unload`` leaves
    the model: each adapter layer's ``<name>.base_layer.<key>`` under ``<name>.<key>``, its adapter tensors dropped
    (they are saved apart); each ``ModulesToSaveWrapper``'s active trained copy under ``<name>.<key>`` (its frozen
    ``original_module`` where no adapter of it is active), its other copies dropped."""
    return _without_modules_to_save(model, _without_adapter_layers(model, state_dict))


def _without_modules_to_save(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    wrappers = modules_to_save_wrappers(model)
    if not wrappers:
        return state_dict
    kept = {name: _kept_prefix(name, wrapper) for name, wrapper in wrappers.items()}
    stripped = {}
    for key, value in state_dict.items():
        root = max((name for name in wrappers if key.startswith(f"{name}.")), key=len, default=None)
        if root is None:
            stripped[key] = value
        elif key.startswith(kept[root]):
            stripped[f"{root}.{key[len(kept[root]):]}"] = value
    return stripped


def _kept_prefix(name: str, wrapper: nn.Module) -> str:
    """The prefix of the keys that PEFT's unload keeps of the wrapper ``name``: its active copy's, or the original's."""
    active = wrapper.active_adapters
    if not active or active[0] not in wrapper.modules_to_save:
        return f"{name}.original_module."
    return f"{name}.modules_to_save.{active[0]}."


def _without_adapter_layers(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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
