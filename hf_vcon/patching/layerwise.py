"""Layer-wise VCON (the default, ``granularity="layer"``): every targeted Linear/Conv1D becomes a
:class:`~hf_vcon.layers.linear.VConLinear` that blends its weights (a :class:`~hf_vcon.layers.weight.VConWeight` where the
weight is read directly), and holds its own β."""

from __future__ import annotations

from torch import nn

from ..config.vcon_config import VConConfig
from ..layers.factory import make_unit, unit_weight
from .distributed import gathered_for_reading
from .plan import plan_for, resolve_targets
from .state import Granularity, Wrapped


class LayerWise(Granularity):
    name = "layer"

    def wrap(self, model: nn.Module, config: VConConfig) -> Wrapped:
        plan = plan_for(model, config, resolve_targets(model, config))
        layers = []
        for name, compressor in zip(plan.names, plan.compressors):
            # A weight that ZeRO-3 partitioned is gathered first: the compressed path's tensors (low-rank factors)
            # are built from the full weight, never from a shard.
            with gathered_for_reading([unit_weight(model, name)]):
                layers.append(make_unit(model, name, compressor, config.recompute_every))
        return Wrapped(plan=plan, holder_names=list(plan.names), holders=list(layers), layers=layers)
