"""The core below both granularities: what :func:`hf_vcon.apply_vcon` did to a model, and how to find it again.

A patched model carries a :class:`VConState` as ``model.vcon_state``. Its *holders* are the modules that hold β:
the :class:`~hf_vcon.layers.VConLinear` layers (layer-wise) or the :class:`~hf_vcon.blocks.VConBlock` wrappers
(block-wise). Every verb works on the holders the same way; what differs between the granularities is decided
once, when the model is patched, by the :class:`Granularity` the state keeps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from torch import nn

from .errors import VConError

if TYPE_CHECKING:
    from .config import VConConfig
    from .settings import LayerSetting

STATE_ATTRIBUTE = "vcon_state"


class Granularity:
    """What one VCON unit is. Implementations: :class:`hf_vcon.layerwise.LayerWise`, :class:`hf_vcon.blocks.BlockWise`.

    ``wrap`` resolves the targets, checks them and builds the holders, without touching the model;
    ``layer_wise_state_dict`` turns the patched model's state dict into the layout of a layer-wise one (the layout
    the exports read).
    """

    name: str
    wraps_blocks: bool = False

    def wrap(self, model: nn.Module, config: "VConConfig") -> "Wrapped":
        raise NotImplementedError

    def layer_wise_state_dict(self, state: "VConState", state_dict: dict) -> dict:
        return dict(state_dict)


@dataclass
class Plan:
    """Which compressor each targeted module gets (checked against the model before anything is replaced)."""

    names: list[str]  # the targeted Linear/Conv1D modules, in model order
    settings: list["LayerSetting"]  # the setting of each, from ``config.setting_for``
    compressors: list  # one compressor per distinct setting, shared by the modules that have it


@dataclass
class Wrapped:
    """What a granularity built: the holders (to put in place of the modules named) and the compressed layers."""

    plan: Plan
    holder_names: list[str]
    holders: list[nn.Module]
    layers: list[nn.Module]


@dataclass
class VConState:
    """What :func:`~hf_vcon.apply_vcon` did to a model, kept on it as ``model.vcon_state``.

    ``targeted_module_names`` are the compressed layers' names in the unpatched model and ``layers`` those layers
    (block-wise: the ones inside the compressed copies g); ``settings`` their method and options in force at the end
    of the transition. ``holders`` / ``holder_names`` are the modules that hold β, in handover order.
    ``compression_version`` grows whenever the compression in force changes (a gradual transition's ramp).
    """

    config: "VConConfig"
    granularity: Granularity = field(repr=False)
    targeted_module_names: list[str]
    layers: list[nn.Module] = field(repr=False)
    settings: list["LayerSetting"] = field(repr=False)
    holder_names: list[str]
    holders: list[nn.Module] = field(repr=False)
    compression_version: int = 0
    audit_pending: bool = False  # the first forward still has to show that no layer is bypassed
    measured_speedup: Optional[Any] = None  # the last export's hf_vcon.speed.Speedup, for cards written later

    @property
    def blocks(self) -> list[nn.Module]:
        """The :class:`~hf_vcon.blocks.VConBlock` wrappers of a block-wise model (empty layer-wise)."""
        return self.holders if self.granularity.wraps_blocks else []

    @property
    def block_names(self) -> list[str]:
        return self.holder_names if self.granularity.wraps_blocks else []

    @property
    def beta(self) -> float:
        """The mean β of the holders: the share of the dense model left (every holder's β when they move together)."""
        return sum(holder.beta for holder in self.holders) / len(self.holders)

    def named_layers(self):
        """``(name, layer, setting)`` of every compressed layer."""
        return zip(self.targeted_module_names, self.layers, self.settings)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel / FSDP / ``torch.compile`` / ``peft.PeftModel`` wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.Module) and hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None)):
            model = model.get_base_model()
        else:
            return model


def holder_paths(model: nn.Module, state: VConState) -> list[str]:
    """Where each holder is now: its name, or where a wrapper moved it (a PEFT adapter wrapping a VCON layer puts it
    at ``<name>.base_layer``)."""
    paths = {id(module): name for name, module in model.named_modules()}
    return [paths.get(id(holder), name) for name, holder in zip(state.holder_names, state.holders)]


def get_vcon_state(model: nn.Module) -> Optional[VConState]:
    """The :class:`VConState` of a model patched by :func:`apply_vcon`, or ``None``."""
    return getattr(unwrap_model(model), STATE_ATTRIBUTE, None)


def require_state(model: nn.Module, verb: str) -> VConState:
    """The model's :class:`VConState`.

    Raises:
        VConError: naming ``verb``, if the model is not patched.
    """
    state = get_vcon_state(model)
    if state is None:
        raise VConError(f"{verb} needs a model patched by apply_vcon(model, config); this model has no VCON layers.")
    return state


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` of ``model`` is."""
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, new)


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
