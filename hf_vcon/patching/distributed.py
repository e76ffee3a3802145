"""VCON under DDP, FSDP (1 and 2) and DeepSpeed ZeRO-3, through the engines the Trainer already uses.

- **DDP** needs one thing here: DDP broadcasts every parameter (``vcon_A``/``vcon_B`` included) from rank 0 when it
  wraps the model, β is a function of the optimizer step, and a path that contributes nothing still gets an exact
  zero gradient (``layers.keep_in_graph``), so ``find_unused_parameters`` can stay off. But the ranks see different
  data, so the input observers of static activation scales (FP8, NVFP4: each layer's running max|x|) differ:
  :func:`sync_input_observers` makes them agree, one all-reduce (MAX) of all observers stacked per optimizer step
  (the trainer's step hook calls it), so every rank, the checkpoints and the export hold the max over all ranks' data.
  DDP's buffer broadcast (``broadcast_buffers``, on by default) copies rank 0's buffers to every rank before the first
  forward after a synchronised backward, that is right after this merge, where they agree already; the micro-batches
  of an accumulation window run under ``no_sync`` without it, so each rank's observations of all of them reach the
  merge.
- **FSDP** gathers a unit's weights for its forward; a VCON layer computes its mask / scale / blend there, from the
  full W, provided W and the layer's ``vcon_*`` tensors are gathered by the same unit. :func:`check_sharding`
  refuses a wrapping that shards a VCON layer's ``base_layer`` as a unit of its own; :func:`check_fsdp_plugin`
  refuses FSDP1 without ``use_orig_params`` (its flat parameters hide the ``vcon_*`` parameters from the layer).
- **ZeRO-3** gathers a module's *own* parameters before its forward; :func:`prepare_zero3` marks the module that
  reads each VCON unit's weights as a ZeRO-3 leaf (a ``VConLinear`` itself, with W in its child ``base_layer``; the
  owner of a ``VConWeight``: fused experts, ``nn.MultiheadAttention``), so that W is gathered with them, and
  :func:`gathered_for_reading` gathers W when :func:`hf_vcon.apply_vcon` builds the low-rank factors from a model
  that ``from_pretrained`` already partitioned.

The merged checkpoint is built from a full state dict on the main process (``VConTrainer.save_model``).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from ..errors import VConError
from ..layers.linear import VConLinear
from ..layers.protocol import VConUnit
from .state import get_vcon_state


def sync_input_observers(model: nn.Module) -> None:
    """Under torch.distributed (more than one process), set every layer's input observer to its maximum over the
    ranks: one ``all_reduce(MAX)`` of all observers stacked, on their device. Every rank must call it (a
    collective); a no-op in one process or for a model with no observer. Running maxima merge exactly by their
    maximum, so after the call each rank holds what one process seeing all ranks' inputs would hold."""
    distributed = torch.distributed
    if not (distributed.is_available() and distributed.is_initialized() and distributed.get_world_size() > 1):
        return
    state = get_vcon_state(model)
    observers = [layer.input_observer for layer in (state.layers if state is not None else [])
                 if getattr(layer, "input_observer", None) is not None]
    if not observers:
        return
    stacked = torch.stack(observers)
    distributed.all_reduce(stacked, op=distributed.ReduceOp.MAX)
    with torch.no_grad():
        for observer, merged in zip(observers, stacked.unbind()):
            observer.copy_(merged)


def is_zero3_partitioned(tensor: torch.Tensor) -> bool:
    """True for a parameter that DeepSpeed ZeRO-3 partitioned (it carries a ``ds_id``)."""
    return hasattr(tensor, "ds_id")


@contextmanager
def gathered_for_reading(tensors: Iterable[torch.Tensor]) -> Iterator[None]:
    """Within the block, ZeRO-3-partitioned ``tensors`` hold their full values on every rank (read-only).

    A no-op for ordinary tensors; with partitioned ones, every rank must enter the block (it all-gathers).
    """
    partitioned = [tensor for tensor in tensors if is_zero3_partitioned(tensor)]
    if not partitioned:
        yield
        return
    import deepspeed  # only reachable when DeepSpeed partitioned the tensors, so it is installed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


def prepare_zero3(model: nn.Module) -> None:
    """Mark, for every VCON unit of ``model``, the class of the module whose forward reads its weights
    (:meth:`~hf_vcon.layers.protocol.VConUnit.fetched_with`) as a DeepSpeed ZeRO-3 leaf module, before
    ``deepspeed.initialize``.

    ZeRO-3 fetches a module's own parameters before its forward. A ``VConLinear`` reads its ``base_layer``'s weight
    without calling ``base_layer``; a ``VConWeight`` is a parametrization that the owner's forward reads (fused
    experts, ``nn.MultiheadAttention``), and no forward of its own ever runs. Either way the module that runs must be
    fetched as one leaf, with W and the ``vcon_*`` tensors under it.
    """
    from deepspeed.utils import set_z3_leaf_modules

    classes = zero3_leaf_classes(model)
    if classes:
        set_z3_leaf_modules(model, classes)


def zero3_leaf_classes(model: nn.Module) -> list[type]:
    """The module classes :func:`prepare_zero3` marks as ZeRO-3 leaves, one rule for every kind of VCON unit."""
    units = [module for module in model.modules() if isinstance(module, VConUnit)]
    return list(dict.fromkeys(type(unit.fetched_with()) for unit in units))


def _shard_unit_types() -> tuple[type, ...]:
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return (FullyShardedDataParallel, FSDPModule)


def check_sharding(model: nn.Module) -> None:
    """Raise if FSDP made a VCON layer's ``base_layer`` a unit of its own (outside its forward W is only a shard).

    Call it on the wrapped model (``VConTrainer`` does, at its first training step).

    Raises:
        VConError: naming the layer and the wrapping to use instead.
    """
    if not torch.distributed.is_available():
        return
    units = _shard_unit_types()
    for name, module in model.named_modules():
        if isinstance(module, VConLinear) and isinstance(module.base_layer, units):
            raise VConError(
                f"FSDP sharded the base layer of the VCON layer {name!r} as a unit of its own "
                f"({type(module.base_layer).__name__}); VCON reads that weight next to the layer's vcon_* tensors, so "
                "both must be gathered by the same unit. Wrap whole transformer blocks (fsdp_config "
                "auto_wrap_policy='TRANSFORMER_BASED_WRAP', transformer_layer_cls_to_wrap=[...]) or the VConLinear "
                "modules themselves, not single Linear layers (e.g. SIZE_BASED_WRAP with a small min_num_params)."
            )


def check_fsdp_plugin(plugin: Any) -> None:
    """Raise for FSDP settings VCON cannot train under: FSDP1 without ``use_orig_params``.

    Args:
        plugin: accelerate's ``FullyShardedDataParallelPlugin`` (``fsdp_version``, ``use_orig_params``).

    Raises:
        VConError: with the setting to change.
    """
    if plugin is None or getattr(plugin, "fsdp_version", 1) != 1:
        return
    if not getattr(plugin, "use_orig_params", True):
        raise VConError(
            "FSDP1 with use_orig_params=False flattens each unit's parameters, hiding the vcon_* parameters of the VCON "
            "layers (and needs one requires_grad per unit). Set fsdp_config use_orig_params=true (accelerate: "
            "fsdp_use_orig_params: true), or use FSDP2 (fsdp_version: 2)."
        )
