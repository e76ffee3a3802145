"""The core below both granularities: what :func:`hf_vcon.apply_vcon` did to a model, and how to find it again.

A patched model carries a :class:`VConState` as ``model.vcon_state``. Its *holders* are the modules that hold β:
the :class:`~hf_vcon.layers.linear.VConLinear` layers (layer-wise) or the :class:`~hf_vcon.layers.block.VConBlock` wrappers
(block-wise). Every verb works on the holders the same way; what differs between the granularities is decided
once, when the model is patched, by the :class:`Granularity` the state keeps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from torch import nn

from ..errors import VConError
from ..utils.modules import unwrap_model

if TYPE_CHECKING:
    from ..config.settings import LayerSetting
    from ..config.vcon_config import VConConfig
    from .plan import Plan

STATE_ATTRIBUTE = "vcon_state"


class Granularity:
    """What one VCON unit is. Implementations: :class:`hf_vcon.patching.layerwise.LayerWise`, :class:`hf_vcon.patching.blockwise.BlockWise`.

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
    measured_speedup: Optional[Any] = None  # the last export's hf_vcon.export.speed.Speedup, for cards written later

    @property
    def blocks(self) -> list[nn.Module]:
        """The :class:`~hf_vcon.layers.block.VConBlock` wrappers of a block-wise model (empty layer-wise)."""
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


