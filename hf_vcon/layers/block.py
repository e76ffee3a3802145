"""Block-wise VCON: a whole block f⁽ⁱ⁾ (say a transformer layer) hands over to its compressed copy g⁽ⁱ⁾.

``VConConfig(granularity="block", target_blocks=…)`` wraps each matched block in a :class:`VConBlock` that
outputs ``β·f(x) + (1−β)·g(x)`` (arXiv 2510.09696, Figure 2). f is the original block, kept as ``base_block``;
g is a deep copy of it, kept as ``vcon_block``, whose ``target_modules`` Linear/Conv1D layers are
:class:`~hf_vcon.layers.linear.VConLinear` pinned at β = 0, i.e. they always compute the compressed layer.

What trains during the transition: every trainable parameter of f **and** of g (the paper's Θ and Θ̃). g's
compressed Linears keep a latent dense weight of their own, trained straight-through for compressions recomputed
from W (exactly as layer-wise VCON trains W, but for g alone); a compression with tensors of its own (low-rank)
trains those and freezes the dense copy it was built from, which g never reads. g's LayerNorms and biases are
copies that train separately from f's. Nothing is shared, so f stays the original block and g becomes the
compressed one. How the two outputs are blended: :mod:`hf_vcon.layers.block_outputs`.

KV caches: while 0 < β < 1, f reads and updates the model's cache and g runs without one, which is exact for
a forward pass that starts with an empty cache (training, evaluation, the prompt of ``generate``);
continuing from a filled cache raises :class:`~hf_vcon.errors.VConError`. At β = 1 only f runs and at β = 0
only g runs, each with the cache, so generation works there.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from ..errors import VConError
from ..utils.modules import replace_module
from .block_outputs import (
    active_collector,
    blend_outputs,
    caches,
    layer_idx,
    map_first_tensor,
    run_recording_apart,
    without_cache,
)
from .factory import make_unit
from .linear import VConLinear
from .protocol import COMPRESSED, DENSE, HoldsBeta, keep_in_graph
from .weight import VConWeight

_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)


class VConBlock(HoldsBeta):
    """``β·f(x) + (1−β)·g(x)`` for a whole block: f the original (``base_block``), g its compressed copy
    (``vcon_block``).

    Only the path with a non-zero weight runs; while training, the other path's trainable parameters get an
    exact zero gradient, so DDP without ``find_unused_parameters`` works at every β. Attributes the model reads
    from its layers (``attention_type``, ``layer_idx``…) are looked up on f.

    Args:
        base_block: the block to wrap; kept as it is.
        compressed_block: g, built by :func:`compressed_copy`.
    """

    def __init__(self, base_block: nn.Module, compressed_block: nn.Module) -> None:
        super().__init__()
        self.base_block = base_block
        self.vcon_block = compressed_block
        self.cache_layer_idx = layer_idx(base_block)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_block", "vcon_block", "_modules"):
                raise
            return getattr(self.base_block, name)

    def compressed_layers(self) -> list:
        """g's compressed units (at β = 0 for good), in ``named_modules()`` order."""
        return [unit for _, unit in _named_units(self.vcon_block)]

    def set_beta(self, beta: float) -> None:
        """Set β, the weight of the original block f, in [0, 1]."""
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta={beta!r} must be in [0, 1].")
        self._store_beta(beta)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.phase == DENSE:  # f alone
            return self._keep_other_in_graph(self.base_block(*args, **kwargs), self.vcon_block)
        if self.phase == COMPRESSED:  # g alone
            return self._keep_other_in_graph(self.vcon_block(*args, **kwargs), self.base_block)
        self._check_cache_is_empty(args, kwargs)
        collector = active_collector()
        out_f, records_f = run_recording_apart(self.base_block, args, kwargs, collector)
        out_g, records_g = run_recording_apart(self.vcon_block, without_cache(args), without_cache(kwargs), collector)
        for key, entries in records_f.items():
            collector[key].extend(blend_outputs(entries, records_g[key], self.vcon_beta))
        return blend_outputs(out_f, out_g, self.vcon_beta)

    def _keep_other_in_graph(self, output: Any, other: nn.Module) -> Any:
        if not self.training:
            return output
        unused = [param for param in other.parameters() if param.requires_grad]
        return map_first_tensor(output, lambda tensor: keep_in_graph(tensor, unused))

    def _check_cache_is_empty(self, args: tuple, kwargs: dict) -> None:
        if self.cache_layer_idx is None:
            return
        for cache in caches(args, kwargs):
            if cache.get_seq_length(self.cache_layer_idx) > 0:
                raise VConError(
                    "Block-wise VCON cannot continue from a filled KV cache while 0 < beta < 1 "
                    f"(beta={self.beta:.4g}): the compressed copy g has no cache of its own. Generate at beta 1 or 0, "
                    "or with use_cache=False."
                )

    # -------------------------------------------------------------------------------------- lifecycle
    def attach_to(self, model: nn.Module, name: str) -> None:
        replace_module(model, name, self)

    def detach_from(self, model: nn.Module, name: str, merge: bool) -> None:
        """Put g with its compressed weights folded into plain layers (``merge``), or the original block f, back."""
        if not merge:
            replace_module(model, name, self.base_block)
            return
        compressed = self.vcon_block
        for unit_name, unit in _named_units(compressed):
            if not unit_name:  # the block is one Linear
                compressed = unit.merged()
                continue
            unit.detach_from(compressed, unit_name, merge=True)
        replace_module(model, name, compressed)

    def extra_repr(self) -> str:
        return f"beta={self.beta:.4g}"


# -------------------------------------------------------------------------------------------- build g
def _named_units(module: nn.Module) -> list[tuple[str, Any]]:
    """The compressed units inside ``module`` with their names (a parametrized weight by its owner's name)."""
    units = []
    for name, child in list(module.named_modules()):
        if isinstance(child, VConLinear):
            units.append((name, child))
        elif isinstance(child, VConWeight):
            owner = name.rsplit(".parametrizations.", 1)[0] if ".parametrizations." in name else ""
            units.append((owner, child))
    return units


def compressed_copy(block: nn.Module, layers: dict[str, Any], recompute_every: int = 1) -> nn.Module:
    """g: a deep copy of ``block`` whose units named in ``layers`` (relative to the block, ``""`` for the block
    itself; each with its compressor) are compressed at β = 0. ``block`` is not mutated.

    A compression whose g never reads the dense copy (low-rank) gets that copy frozen.
    """
    compressed = copy.deepcopy(block)
    units = {name: make_unit(compressed, name, compressor, recompute_every) for name, compressor in layers.items()}
    for name, unit in units.items():
        unit.set_beta(0.0)
        if name:
            unit.attach_to(compressed, name)
        else:
            compressed = unit
        if not unit.compressor.copy_trains_latent_weight:
            unit.weight.requires_grad_(False)
    return compressed


