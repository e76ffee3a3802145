"""Structured pruning: whole MLP neurons (and, where the config can say so, key/value groups of attention heads)
removed, the same number in every block, so that the merged model is a smaller dense model of the same architecture
that plain ``from_pretrained`` loads (:mod:`hf_vcon.compressors.structured.couplings` says which layers share a unit, per architecture).

The rule. A block's units (its MLP neurons, or its key/value groups) are scored from the latent weights of the
layers coupled through them: unit u scores ``Σ ‖W_p[rows of u]‖² + Σ ‖W_c[:, columns of u]‖²`` over its producers p
(the rows it computes: ``intermediate.dense``, ``gate_proj`` and ``up_proj``, ``c_fc``; ``q/k/v_proj`` for heads) and
consumers c (the columns that read it: ``output.dense``, ``down_proj``, ``c_proj``; ``o_proj``), i.e. the squared L2
norm of its coupled rows and columns. Every block keeps its ``k = units − round(units · sparsity)`` best units (ties:
the earlier index), the same k everywhere, so ``intermediate_size`` (``n_inner``; ``num_key_value_heads``…) can say
the new size. As for unstructured pruning, the mask M is recomputed from the latent weights once per optimizer step
(pruned units can come back), every coupled layer blends ``β·W + (1−β)·W⊙M`` (M zeroes the unit's rows of a
producer, its columns of a consumer) and trains straight-through; ``transition="gmp"`` ramps the sparsities instead.

At β = 0 a removed unit contributes exactly nothing: its consumer columns are zero (a producer's bias may leave it a
non-zero activation, which those zero columns drop). The merged model therefore drops those rows, bias entries and
columns, and gives the same outputs up to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ...errors import UnsupportedLayerError, VConError
from ..base import CompressionStats, WeightCompressor, beta_is_zero
from ..options import CompressorOptions, check_number, option
from ..registry import register_compressor
from ..selection import keep_largest, kept_count
from .couplings import ROWS, Block
from .plan import plan_blocks


@dataclass(frozen=True)
class StructuredOptions(CompressorOptions):
    neuron_sparsity: float = option(0.5, "the fraction of MLP neurons removed from every block, in [0, 1)")
    head_sparsity: float = option(
        0.0, "the fraction of attention key/value groups (with their query heads) removed from every block, in [0, 1); "
             "only for architectures whose config says head_dim (Llama, Mistral, Qwen2, Qwen3)")

    def validate(self) -> None:
        for name in ("neuron_sparsity", "head_sparsity"):
            value = getattr(self, name)
            check_number(name, value, 0.0, 1.0, high_open=True, meaning="the fraction of units removed")
            self._resolve(name, float(value))


class CoupledGroup:
    """One block's coupled layers while training: their VCON units (bound as they are built) and the units kept,
    computed once per version of their weights (an optimizer step) and shared by the layers."""

    def __init__(self, block: Block) -> None:
        self.block = block
        self.units: list[Optional[nn.Module]] = [None] * len(block.names)
        self._cache: Optional[tuple] = None

    def bind(self, index: int, unit: nn.Module) -> None:
        self.units[index] = unit

    def _latent(self) -> list[torch.Tensor]:
        if any(unit is None for unit in self.units):
            raise VConError(f"structured pruning of block {self.block.prefix!r} needs every coupled layer built as a "
                            "VCON unit; patch the model with apply_vcon.")
        return [unit.latent_weight() for unit in self.units]

    def token(self) -> tuple:
        """The units' optimizer steps and the versions of their latent weights: what the kept set depends on (a fused
        optimizer updates weights without bumping their versions; the step tells)."""
        return tuple((unit.optimizer_step, weight._version, weight.data_ptr())
                     for unit, weight in zip(self.units, self._latent()))

    def kept(self, keep: int, given: dict[str, torch.Tensor]) -> torch.Tensor:
        """The boolean ``(units,)`` mask of the ``keep`` best units, from the weights in ``given`` (by layer name,
        ``(out, in)``) and the units' latent weights for the others."""
        names = self.block.names
        if all(name in given for name in names):  # a state dict's full weights: the modules may hold shards
            return self._select(keep, [given[name] for name in names])
        live = self._latent()
        weights = [given.get(name, weight) for name, weight in zip(names, live)]
        key = (keep, self.token())
        cacheable = all(_same_tensor(weight, other) for weight, other in zip(weights, live))
        if cacheable and self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        kept = self._select(keep, weights)
        if cacheable:
            self._cache = (key, kept)
        return kept

    def _select(self, keep: int, weights: list[torch.Tensor]) -> torch.Tensor:
        block = self.block
        scores = torch.zeros(block.units, dtype=torch.float32, device=weights[0].device)
        for weight, along, width in zip(weights, block.along, block.widths):
            squares = torch.linalg.vector_norm(weight.detach(), dim=1 if along == ROWS else 0, dtype=torch.float32)
            scores += squares.square().view(block.units, width).sum(dim=1).to(scores.device)
        return keep_largest(scores.view(1, -1), keep).view(-1)


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a._version == b._version)


@register_compressor("structured")
class StructuredPruner(WeightCompressor):
    """Structured pruning of one coupled layer: its rows (a producer) or columns (a consumer) of the units its block
    keeps. Each layer has its own compressor, bound to its block's :class:`CoupledGroup` by :meth:`bind_layers`."""

    Options = StructuredOptions
    gradual_option = ("neuron_sparsity", "head_sparsity")
    example_options = ({"neuron_sparsity": 0.5},)
    couples_layers = True
    changes_shapes = True

    def __init__(self, options: Optional[StructuredOptions] = None, group: Optional[CoupledGroup] = None,
                 index: int = 0) -> None:
        super().__init__(options)
        self.group, self.index = group, index

    def with_options(self, **changes) -> "StructuredPruner":
        return type(self)(self.options.replace(**changes), self.group, self.index)

    # --------------------------------------------------------------------------------------------- binding
    @classmethod
    def bind_layers(cls, model, names, compressors):
        options, blocks = plan_blocks(model, names, compressors)
        bound = {}
        for block in blocks:
            group = CoupledGroup(block)
            bound.update({name: cls(options, group, index) for index, name in enumerate(block.names)})
        reach = "the MLP layers" + (" and attention projections" if options.head_sparsity > 0 else "")
        outside = {name: f"{name!r} is not one of {reach} that method='structured' couples in a block of this "
                         f"{getattr(getattr(model, 'config', None), 'model_type', 'model')!r} model"
                   for name in names if name not in bound}
        return bound, outside

    def bind_unit(self, unit: nn.Module) -> None:
        if not hasattr(unit, "base_layer"):
            raise UnsupportedLayerError(
                f"method='structured' cannot shrink {self._layer_name()!r}: the model reads its weight directly, so "
                "it cannot be replaced by a smaller layer.")
        self._group().bind(self.index, unit)

    def state_token(self):
        return self.group.token() if self.group is not None else None

    # ------------------------------------------------------------------------------------------ geometry
    def _group(self) -> CoupledGroup:
        if self.group is None:
            raise VConError("method='structured' prunes the coupled layers of a block together: it compresses the "
                            "layers of a model patched by apply_vcon, not a weight on its own.")
        return self.group

    def _layer_name(self) -> str:
        return self._group().block.names[self.index]

    @property
    def _rows(self) -> bool:
        return self._group().block.along[self.index] == ROWS

    def kept_units(self) -> int:
        """k: how many units every block keeps."""
        block = self._group().block
        sparsity = self.options.head_sparsity if block.coupling.kind == "heads" else self.options.neuron_sparsity
        return kept_count(block.units, sparsity)

    def _mask(self, weight: Optional[torch.Tensor], coupled: Optional[dict] = None) -> torch.Tensor:
        """The boolean mask of this layer's rows (producer) or columns (consumer) that C keeps."""
        given = dict(coupled or {})
        if weight is not None:
            given.setdefault(self._layer_name(), weight)
        group = self._group()
        kept, width = group.kept(self.kept_units(), given), group.block.widths[self.index]
        return kept[:, None].expand(kept.shape[0], width).reshape(-1)  # each unit's rows or columns

    def _broadcast(self, mask: torch.Tensor) -> torch.Tensor:
        return mask[:, None] if self._rows else mask[None, :]

    # ------------------------------------------------------------------------------------------- C and β
    def compress(self, weight):
        return weight * self._broadcast(self._mask(weight).to(weight.device))

    def compression_state(self, weight, memo=None, *, frozen=False):
        return self._mask(weight).to(weight.device)

    def blend(self, weight, state, beta):
        keep = self._broadcast(state)
        if beta_is_zero(beta):
            return weight * keep
        return weight * torch.where(keep, 1.0, beta).to(weight.dtype)  # kept: W; removed: β·W

    def kept_mask(self, weight, state):
        return self._broadcast(state).expand_as(weight)

    # ------------------------------------------------------------------------------------ the merged model
    def merged_tensors(self, weight, params, bias, coupled=None):
        index = self._mask(weight, coupled).to(weight.device).nonzero().squeeze(1)
        if self._rows:
            return weight.index_select(0, index), None if bias is None else bias.index_select(0, index)
        return weight.index_select(1, index), bias

    def config_changes(self):
        return self._group().block.config_changes(self.kept_units())

    def setting(self) -> str:
        heads = f", heads {self.options.head_sparsity:.3f}" if self.options.head_sparsity else ""
        return f"neurons {self.options.neuron_sparsity:.3f}{heads}"

    def stats(self, weight, params):
        out_features, in_features = weight.shape
        block = self._group().block
        kept = self.kept_units() * block.widths[self.index]
        after = kept * in_features if self._rows else out_features * kept
        numel, size = weight.numel(), weight.element_size()
        return CompressionStats(numel, after, numel * size, after * size, setting=self.setting(),
                                metrics={"sparsity": 1 - after / numel})

