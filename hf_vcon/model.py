"""Model-level verbs: ``apply_vcon → set_beta → merge_and_unload | unload``.

Each verb checks everything first and mutates after, so a failure never leaves a half-patched model.
"""

from __future__ import annotations

import dataclasses
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Optional, TypeVar

import torch
from torch import nn

from .compressors import get_compressor
from .config import VConConfig
from .distributed import gathered_for_reading
from .errors import NoTargetModulesError, VConError, VConWarning
from .layers import VConLinear
from .schedules import beta_at, gmp_sparsity
from .targets import ALL_LINEAR, LINEAR_TYPES, find_targets, fused_expert_modules, matches

ModelT = TypeVar("ModelT", bound=nn.Module)

STATE_ATTRIBUTE = "vcon_state"
_MAX_NAMES_SHOWN = 10


@dataclass
class VConState:
    """What :func:`apply_vcon` did to a model, kept on it as ``model.vcon_state``.

    Block-wise (``granularity="block"``), ``layers`` are the compressed layers inside the copies g and
    ``targeted_module_names`` their names in the unpatched model; ``blocks`` / ``block_names`` are the
    :class:`~hf_vcon.blocks.VConBlock` wrappers in handover order.
    """

    config: VConConfig
    targeted_module_names: list[str]
    layers: list[VConLinear] = field(repr=False)
    blocks: list = field(default_factory=list, repr=False)
    block_names: list[str] = field(default_factory=list)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel / FSDP / ``torch.compile`` wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.Module) and hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            return model


def get_vcon_state(model: nn.Module) -> Optional[VConState]:
    """The :class:`VConState` of a model patched by :func:`apply_vcon`, or ``None``."""
    return getattr(unwrap_model(model), STATE_ATTRIBUTE, None)


def require_state(model: nn.Module, verb: str) -> VConState:
    state = get_vcon_state(model)
    if state is None:
        raise VConError(f"{verb} needs a model patched by apply_vcon(model, config); this model has no VCON layers.")
    return state


# --------------------------------------------------------------------------------------------- apply_vcon
def _check_not_wrapped(model: nn.Module) -> None:
    if get_vcon_state(model) is not None or any(isinstance(m, VConLinear) for m in model.modules()):
        raise VConError("This model already has VCON layers; call unload() or merge_and_unload() before apply_vcon again.")
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # peft absent: nothing of it can be in the model
        return
    wrapped = [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    if wrapped or type(model).__name__.startswith("Peft"):
        raise VConError(
            f"This model has PEFT adapter layers (e.g. {wrapped[:3]}); VCON cannot wrap them. Apply VCON to the base "
            "model, or call merge_and_unload() on the PEFT model first."
        )


def _resolve_targets(model: nn.Module, config: VConConfig) -> list[str]:
    names = find_targets(model, config.target_modules, config.exclude_modules)
    if not names:
        linear_names = [name for name, module in model.named_modules() if isinstance(module, LINEAR_TYPES)]
        raise NoTargetModulesError(
            f"target_modules={config.target_modules!r} (exclude_modules={config.exclude_modules!r}) matched no "
            f"Linear/Conv1D module. Some Linear module names of this model: {linear_names[:_MAX_NAMES_SHOWN]}"
            f"{' …' if len(linear_names) > _MAX_NAMES_SHOWN else ''}."
        )
    return names


def _warn_skipped_experts(model: nn.Module, config: VConConfig) -> None:
    experts = [
        name
        for name in fused_expert_modules(model)
        if config.target_modules == ALL_LINEAR or matches(name, config.target_modules)
    ]
    if experts:
        warnings.warn(
            f"{len(experts)} module(s) hold fused 3-D expert weights (e.g. {experts[:3]}), not Linear layers; VCON "
            "skips them and they stay dense.",
            VConWarning,
            stacklevel=3,
        )


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, new)


def apply_vcon(model: ModelT, config: VConConfig) -> ModelT:
    """Wrap the targeted Linear/Conv1D layers of ``model`` with :class:`VConLinear`, in place.

    The model keeps its class (a ``PreTrainedModel`` stays one) and starts at β = 1, where it computes exactly
    what it computed before. The names wrapped are in ``model.vcon_state.targeted_module_names``.
    With ``granularity="block"`` each block of ``config.target_blocks`` is wrapped instead, in a
    :class:`~hf_vcon.blocks.VConBlock` holding the original block and a compressed copy of it.

    Args:
        model: any ``nn.Module``, typically a transformers ``PreTrainedModel``.
        config: the :class:`VConConfig`.

    Returns:
        The same ``model`` object, patched.

    Raises:
        TypeError: if ``config`` is not a VConConfig.
        NoTargetModulesError: if the targets match no Linear/Conv1D module (some existing names are listed).
        ValueError: if a matched layer cannot take the compression (its name is given).
        VConError: if the model already has VCON or PEFT layers.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
        >>> model = apply_vcon(model, VConConfig(method="binary", target_modules=["query", "value"]))
        >>> model.vcon_state.targeted_module_names
        ['encoder.layer.0.attention.self.query', 'encoder.layer.0.attention.self.value']
    """
    if not isinstance(config, VConConfig):
        raise TypeError(f"config must be a VConConfig, not {type(config).__name__}.")
    _check_not_wrapped(model)
    if config.granularity == "block":
        from .blocks import apply_block_vcon  # builds on this module's helpers

        _warn_skipped_experts(model, config)
        return apply_block_vcon(model, config)
    names = _resolve_targets(model, config)
    compressor = get_compressor(config)
    for name in names:
        module = model.get_submodule(name)
        out_features, in_features = VConLinear.orientation(module)
        compressor.check_layer(name, out_features, in_features)
    _warn_skipped_experts(model, config)

    # Build every wrapper before replacing any, so an error while building leaves the model untouched. A weight that
    # ZeRO-3 already partitioned is gathered first: the compressed path's tensors (low-rank factors) are built from
    # the full weight, never from a shard.
    layers = []
    for name in names:
        module = model.get_submodule(name)
        with gathered_for_reading([module.weight]):
            layers.append(VConLinear(module, compressor))
    for name, layer in zip(names, layers):
        _replace_module(model, name, layer)
    setattr(model, STATE_ATTRIBUTE, VConState(config=config, targeted_module_names=names, layers=layers))
    return model


# --------------------------------------------------------------------------------------------------- β
def set_beta(model: nn.Module, beta: float) -> None:
    """Set β (the weight of the original path) on every VCON layer of ``model``, in place.

    Raises:
        ValueError: if ``beta`` is not in [0, 1].
        VConError: if the model has no VCON layers.
    """
    state = require_state(model, "set_beta")
    if not isinstance(beta, (int, float)) or not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta!r} must be a number in [0, 1].")
    for layer in state.blocks or state.layers:  # block-wise: the blocks hold β, g's layers stay at 0
        layer.set_beta(beta)


def set_step(model: nn.Module, step: int, max_steps: Optional[int] = None) -> float:
    """Set β on every VCON layer from optimizer step ``step`` and the model's config; return that β.

    This is the one call training loops make (the trainer calls it with ``state.global_step`` before every
    micro-batch): Q is resolved against ``max_steps`` when ``transition_steps`` is a fraction.

    With ``transition="gmp"`` β is 0 (a hard mask, no blending) and the layers are handed the compression in
    force at this step: the same pruner at sparsity ``s_t`` (:func:`~hf_vcon.schedules.gmp_sparsity`), so the
    compressed model is ``s_t``-sparse until the ramp ends.

    Example:
        >>> from torch import nn
        >>> model = apply_vcon(nn.Sequential(nn.Linear(4, 4)), VConConfig(method="binary", transition_steps=10))
        >>> set_step(model, 3)
        0.7
    """
    state = require_state(model, "set_step")
    config = state.config
    transition_steps = config.resolve_transition_steps(max_steps)
    if state.blocks:  # each block gets the β of its own window (stagger), and the mean is returned
        from .blocks import set_block_step

        return set_block_step(state, step, transition_steps)
    if config.transition == "gmp":
        _set_compression(state, gmp_sparsity(step, config.sparsity, transition_steps, config.start_step))
        beta = 0.0
    else:
        beta = beta_at(step, transition_steps, config.start_step, config.schedule)
    for layer in state.layers:
        layer.set_beta(beta)
        layer.optimizer_step = step
    return beta


def _set_compression(state: VConState, sparsity: float) -> None:
    """Hand every layer the config's compressor at ``sparsity`` (GMP); compressors themselves never see a step."""
    current = state.layers[0].compressor
    if current.config.sparsity == sparsity:
        return
    compressor = get_compressor(dataclasses.replace(state.config, sparsity=sparsity))
    for layer in state.layers:
        layer.compressor = compressor


@contextmanager
def compressed_view(model: nn.Module) -> Iterator[nn.Module]:
    """Within the ``with`` block every VCON layer has β = 0 (the compressed model); each layer's β is restored after.

    Example:
        >>> from torch import nn
        >>> model = apply_vcon(nn.Sequential(nn.Linear(4, 4)), VConConfig(method="binary"))
        >>> with compressed_view(model):
        ...     get_beta(model)
        0.0
        >>> get_beta(model)
        1.0
    """
    state = require_state(model, "compressed_view")
    holders = state.blocks or state.layers  # block-wise: the blocks hold β, g's layers stay at 0
    betas = [holder.beta for holder in holders]
    try:
        for holder in holders:
            holder.set_beta(0.0)
        yield model
    finally:
        for holder, beta in zip(holders, betas):
            holder.set_beta(beta)


def get_beta(model: nn.Module) -> float:
    """The β of the model's VCON layers (they share one unless set one by one); block-wise, the mean over blocks."""
    state = require_state(model, "get_beta")
    if state.blocks:
        from .blocks import mean_beta

        return mean_beta(state)
    return state.layers[0].beta


# --------------------------------------------------------------------------------- after the transition
def _is_distributed(model: nn.Module) -> bool:
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return True
    distributed = torch.distributed
    return distributed.is_available() and distributed.is_initialized() and distributed.get_world_size() > 1


def release_dense_paths(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None, *,
                        freeze: Optional[bool] = None) -> list[str]:
    """Once β = 0, stop training the dense W of layers whose compressed path has tensors of its own (low-rank).

    At β = 0 such a layer already computes only ``B(Ax)``; this drops what W still costs: its gradient and its
    optimizer state (Adam: two full-size moments). Prune and binary layers are left alone: their dense W *is*
    the latent weight they train. W itself stays in the model (checkpoints keep their keys and shapes; the
    merged and compact exports use only the factors). Call it on every rank at the same optimizer step, the
    first one with β = 0 (a trainer does this from ``on_step_begin``); calling it again is harmless.

    DDP with ``find_unused_parameters=False`` registers the trainable parameters when it wraps the model, so
    freezing one later would stall its reducer. Under DDP (the model is wrapped, or a process group of more
    than one rank is initialised) W therefore stays trainable and receives an exact zero gradient (one
    element is read), and a step pre-hook on ``optimizer`` drops that gradient, so the optimizer never updates
    W nor rebuilds its state. Elsewhere W is frozen (``requires_grad=False``) and never read again.

    Args:
        model: a model patched by :func:`apply_vcon`, possibly wrapped (DDP, ``torch.compile``).
        optimizer: the optimizer (or an accelerate ``AcceleratedOptimizer``); the released weights' state is
            removed from it. They stay in its parameter groups, so its ``state_dict`` keeps its layout and
            resuming works.
        freeze: ``True`` to set ``requires_grad=False`` on W, ``False`` to keep it trainable with zero
            gradients; by default ``True`` unless running distributed as above.

    Returns:
        The names of the layers released (empty for methods without a separate dense path).

    Raises:
        VConError: if the model has no VCON layers, or a layer to release still has β > 0.
    """
    if freeze is None:
        freeze = not _is_distributed(model)
    state = require_state(model, "release_dense_paths")
    chosen = [(name, layer) for name, layer in zip(state.targeted_module_names, state.layers)
              if not layer.compressor.straight_through]
    blended = [name for name, layer in chosen if layer.beta != 0.0]
    if blended:
        raise VConError(
            f"release_dense_paths needs beta = 0, but {len(blended)} layer(s) still blend the dense path, e.g. "
            f"{blended[:3]} (beta={get_beta(model)}); call it once the transition is over."
        )
    weights = [layer.weight for _, layer in chosen]
    for _, layer in chosen:
        layer.dense_released = True
        layer.weight.grad = None
        if freeze:
            layer.weight.requires_grad_(False)
    if optimizer is not None and weights:
        _drop_from_optimizer(optimizer, weights)
    return [name for name, _ in chosen]


def _drop_from_optimizer(optimizer, weights: list[torch.Tensor]) -> None:
    inner = optimizer
    # accelerate's AcceleratedOptimizer subclasses Optimizer but only wraps the real one, whose step runs the hooks
    while isinstance(getattr(inner, "optimizer", None), torch.optim.Optimizer):
        inner = inner.optimizer
    for weight in weights:
        inner.state.pop(weight, None)
    released = getattr(inner, "_hf_vcon_released", None)
    if released is None:
        released = inner._hf_vcon_released = {}

        def drop_released_grads(opt, args, kwargs):
            for param in released.values():
                param.grad = None

        inner.register_step_pre_hook(drop_released_grads)
    released.update({id(weight): weight for weight in weights})


# ------------------------------------------------------------------------------------- merge and unload
def _check_finite(state: VConState) -> None:
    bad = [
        name
        for name, layer in zip(state.targeted_module_names, state.layers)
        if not all(torch.isfinite(tensor).all() for tensor in [layer.weight, *layer.compressed_params().values()])
    ]
    if bad:
        raise VConError(
            f"Cannot merge: NaN or Inf in the weights of {len(bad)} VCON layer(s), e.g. {bad[:_MAX_NAMES_SHOWN]}. "
            "The model is unchanged; check the learning rate or load an earlier checkpoint."
        )


def _remove_wrappers(model: nn.Module, state: VConState) -> None:
    for name, layer in zip(state.targeted_module_names, state.layers):
        _replace_module(model, name, layer.base_layer)
    delattr(model, STATE_ATTRIBUTE)


def merge_and_unload(model: ModelT) -> ModelT:
    """Fold the compressed weights (β = 0) into plain ``nn.Linear``/``Conv1D`` modules, in place.

    The result has exactly the state-dict keys and shapes of the unpatched architecture, so ``save_pretrained``
    then plain ``from_pretrained`` loads it without hf_vcon.

    Returns:
        The same ``model`` object, now without VCON layers.

    Raises:
        VConError: if the model has no VCON layers, or any VCON weight is NaN/Inf (the model is left unchanged).
    """
    model = unwrap_model(model)
    state = require_state(model, "merge_and_unload")
    _check_finite(state)
    if state.blocks:
        from .blocks import merge_blocks

        merge_blocks(model, state)
        return model
    with torch.no_grad():
        for layer in state.layers:
            layer.base_layer.weight.copy_(layer.merged_weight())
    _remove_wrappers(model, state)
    return model


def unload(model: ModelT) -> ModelT:
    """Remove the VCON layers, putting the latent dense layers back unchanged (nothing folded), in place.

    Returns:
        The same ``model`` object, now without VCON layers.

    Raises:
        VConError: if the model has no VCON layers.
    """
    model = unwrap_model(model)
    state = require_state(model, "unload")
    if state.blocks:
        from .blocks import unload_blocks

        unload_blocks(model, state)
        return model
    _remove_wrappers(model, state)
    return model

