"""The tensors and state-dict keys a patched model's units own, as the summary and the exports read them."""

from __future__ import annotations

from typing import Any, Optional

from ..errors import VConError
from .state import VConState


def layer_tensors(state: VConState, state_dict: Optional[dict] = None):
    """``(name, unit, W, params)`` of every compressed unit: W in Linear orientation (``(out, in)``, or
    ``(experts, out, in)``) and the compressed path's tensors, read from the units themselves or, when the modules
    hold only shards (FSDP, ZeRO-3), from a full ``state_dict`` of the patched model."""
    if state_dict is None:
        for name, layer in zip(state.targeted_module_names, state.layers):
            params = {key: value.detach() for key, value in layer.compressed_params().items()}
            yield name, layer, layer.latent_weight().detach(), params
        return
    source = state.granularity.layer_wise_state_dict(state, state_dict)
    for name, layer in zip(state.targeted_module_names, state.layers):
        latent_key, param_keys = layer.state_keys(name)
        params = {key: source[full_key] for key, full_key in param_keys.items()}
        yield name, layer, layer.oriented(source[latent_key]), params


def replaced_keys(state: VConState) -> tuple[set[str], dict[str, str]]:
    """The (layer-wise) state-dict keys only the patched model has, and keys it holds under other names."""
    dropped: set[str] = set()
    renamed: dict[str, str] = {}
    for name, layer in zip(state.targeted_module_names, state.layers):
        unit_dropped, unit_renamed = layer.replaced_keys(name)
        dropped |= unit_dropped
        renamed.update(unit_renamed)
    return dropped, renamed


def config_changes(state: VConState) -> dict[str, Any]:
    """The model-config fields the merged model has other values in (``{"intermediate_size": 1536}`` after structured
    pruning; empty for compressions that keep the shapes), gathered from every unit's compressor.

    Raises:
        VConError: if two units ask for different values of one field.
    """
    changes: dict[str, Any] = {}
    for name, layer in zip(state.targeted_module_names, state.layers):
        for key, value in layer.compressor.config_changes().items():
            if changes.setdefault(key, value) != value:
                raise VConError(f"The merged model cannot have one {key}: layer {name!r} needs {value}, another "
                                f"{changes[key]}.")
    return changes
