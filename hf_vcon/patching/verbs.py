"""Model-level verbs: ``apply_vcon → set_beta / set_step → merge_and_unload | unload``.

Each verb checks everything first and mutates after, so a failure never leaves a half-patched model. The
granularity (layer-wise or block-wise) is chosen once, by :func:`apply_vcon`; the verbs then act on the model's
β holders (:mod:`hf_vcon.patching.state`) whatever it is.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, TypeVar

import torch
from torch import nn

from ..config.vcon_config import VConConfig
from ..errors import VConError
from ..layers.protocol import ForwardAudit, VConUnit
from ..utils.modules import unwrap_model
from ..utils.peft import is_peft_model
from .blockwise import BlockWise
from .layerwise import LayerWise
from .plan import MAX_NAMES_SHOWN
from .state import STATE_ATTRIBUTE, VConState, get_vcon_state, holder_paths, require_state
from .tensors import config_changes
from .transitions import set_state_step, transition_of

ModelT = TypeVar("ModelT", bound=nn.Module)

GRANULARITIES = {"layer": LayerWise(), "block": BlockWise()}


# --------------------------------------------------------------------------------------------- apply_vcon
def _check_not_wrapped(model: nn.Module) -> None:
    if get_vcon_state(model) is not None or any(isinstance(m, VConUnit) for m in model.modules()):
        raise VConError("This model already has VCON layers; call unload() or merge_and_unload() before apply_vcon again.")


def apply_vcon(model: ModelT, config: VConConfig) -> ModelT:
    """Wrap the targeted Linear/Conv1D layers of ``model`` with :class:`VConLinear`, in place.

    The model keeps its class (a ``PreTrainedModel`` stays one) and starts at β = 1, where it computes exactly
    what it computed before. The names wrapped are in ``model.vcon_state.targeted_module_names``, each layer's
    method and options (``module_overrides`` resolved) in ``model.vcon_state.settings``. With
    ``granularity="block"`` each block of ``config.target_blocks`` is wrapped instead, in a
    :class:`~hf_vcon.layers.block.VConBlock` holding the original block and a compressed copy of it.

    Args:
        model: any ``nn.Module``, typically a transformers ``PreTrainedModel``.
        config: the :class:`VConConfig`.

    Returns:
        The same ``model`` object, patched.

    Raises:
        TypeError: if ``config`` is not a VConConfig.
        NoTargetModulesError: if the targets match no Linear/Conv1D module (some existing names are listed).
        ValueError: if a matched layer cannot take its compression (its name is given), or a ``module_overrides``
            pattern matches no targeted module.
        VConError: if the model already has VCON layers, or a target is a PEFT adapter layer or inside one.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
        >>> model = apply_vcon(model, VConConfig(method="binary", target_modules=["query", "value"]))
        >>> model.vcon_state.targeted_module_names
        ['encoder.layer.0.attention.self.query', 'encoder.layer.0.attention.self.value']
    """
    if not isinstance(config, VConConfig):
        raise TypeError(f"config must be a VConConfig, not {type(config).__name__}.")
    inner = unwrap_model(model)  # a PeftModel: its base model, whose adapter layers are left alone
    _check_not_wrapped(inner)
    _apply(inner, config)
    return model


def _apply(model: nn.Module, config: VConConfig) -> None:
    granularity = GRANULARITIES[config.granularity]
    wrapped = granularity.wrap(model, config)  # every check and every wrapper, before the model is touched
    for name, holder in zip(wrapped.holder_names, wrapped.holders):
        holder.attach_to(model, name)
    state = VConState(config=config, granularity=granularity, targeted_module_names=list(wrapped.plan.names),
                      layers=wrapped.layers, settings=list(wrapped.plan.settings), holder_names=wrapped.holder_names,
                      holders=wrapped.holders)
    transition_of(state).prepare(state)
    setattr(model, STATE_ATTRIBUTE, state)
    _audit_first_forward(model, state)


def _audit_first_forward(model: nn.Module, state: VConState) -> None:
    """Check, at the model's first forward, that no VCON layer is bypassed: model code that reads a layer's weight
    directly instead of calling it (and that :mod:`hf_vcon.layers.factory` did not recognise) would never see the blend. Such
    a layer raises :class:`VConError` naming it, at every forward, instead of giving a silently wrong result.

    The hooks find the state on the model they run on, so a deep copy audits itself; once a forward passed they do
    nothing, and :func:`merge_and_unload` / :func:`unload` remove them.
    """
    state.audit_pending = True
    model.register_forward_pre_hook(_audit_start)
    model.register_forward_hook(_audit_finish, always_call=True)


def _audit_start(module: nn.Module, args) -> None:
    state = getattr(module, STATE_ATTRIBUTE, None)
    if state is not None and state.audit_pending and ForwardAudit.active is None:
        ForwardAudit.active = ForwardAudit()


def _audit_finish(module: nn.Module, args, output) -> None:
    state = getattr(module, STATE_ATTRIBUTE, None)
    if state is None or not state.audit_pending or ForwardAudit.active is None:
        return
    audit, ForwardAudit.active = ForwardAudit.active, None
    bypassed = [name for name, layer in zip(state.targeted_module_names, state.layers) if id(layer) in audit.read - audit.ran]
    if bypassed:
        raise VConError(
            f"The model read the weight of VCON layer(s) {bypassed[:MAX_NAMES_SHOWN]} without calling them, so their "
            "blend β·W + (1−β)·C was bypassed. Exclude them (exclude_modules=[...]) and report the model type to "
            "hf_vcon, so that it parametrizes such weights instead."
        )
    state.audit_pending = False


def _remove_audit(model: nn.Module) -> None:
    for hooks, function in ((model._forward_pre_hooks, _audit_start), (model._forward_hooks, _audit_finish)):
        for key in [key for key, hook in hooks.items() if hook is function]:
            del hooks[key]


# --------------------------------------------------------------------------------------------------- β
def set_beta(model: nn.Module, beta: float) -> None:
    """Set β (the weight of the original path) on every β holder of ``model`` (layers, or blocks), in place.

    Raises:
        ValueError: if ``beta`` is not in [0, 1].
        VConError: if the model has no VCON layers.
    """
    state = require_state(model, "set_beta")
    if not isinstance(beta, (int, float)) or not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta!r} must be a number in [0, 1].")
    for holder in state.holders:
        holder.set_beta(beta)


def set_step(model: nn.Module, step: int, max_steps: Optional[int] = None) -> float:
    """Put the model where its transition has it at optimizer step ``step``; return the (mean) β.

    This is the one call training loops make (the trainer calls it with ``state.global_step`` before every
    micro-batch): Q is resolved against ``max_steps`` when ``transition_steps`` is a fraction. Each block gets the β
    of its own window with ``stagger=True``. With ``transition="gmp"`` β is 0 (a hard mask, no blending) and each
    layer is handed its compression at the sparsity of this step (:func:`~hf_vcon.config.schedules.gmp_sparsity`).

    Example:
        >>> from torch import nn
        >>> model = apply_vcon(nn.Sequential(nn.Linear(4, 4)), VConConfig(method="binary", transition_steps=10))
        >>> set_step(model, 3)
        0.7
    """
    return set_state_step(require_state(model, "set_step"), step, max_steps)


@contextmanager
def compressed_view(model: nn.Module) -> Iterator[nn.Module]:
    """Within the ``with`` block every β holder has β = 0 (the compressed model); each one's β is restored after.

    Example:
        >>> from torch import nn
        >>> model = apply_vcon(nn.Sequential(nn.Linear(4, 4)), VConConfig(method="binary"))
        >>> with compressed_view(model):
        ...     get_beta(model)
        0.0
        >>> get_beta(model)
        1.0
    """
    holders = require_state(model, "compressed_view").holders
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
    return require_state(model, "get_beta").beta


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
    optimizer state (Adam: two full-size moments). Layers of compressions recomputed from W (prune, binary) are
    left alone: their dense W *is* the latent weight they train. W itself stays in the model (checkpoints keep
    their keys and shapes; the merged and compact exports use only the factors). Call it on every rank at the
    same optimizer step, the first one with β = 0 (a trainer does this from ``on_step_begin``); calling it again
    is harmless.

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
              if layer.compressor.releases_dense_path]
    blended = [name for name, layer in chosen if layer.beta != 0.0]
    if blended:
        raise VConError(
            f"release_dense_paths needs beta = 0, but {len(blended)} layer(s) still blend the dense path, e.g. "
            f"{blended[:3]} (beta={get_beta(model)}); call it once the transition is over."
        )
    weights = [layer.weight for _, layer in chosen if layer.weight.requires_grad]
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
def check_finite(state: VConState) -> None:
    """Raise :class:`VConError` naming the layers whose weights hold NaN or Inf."""
    bad = [
        name
        for name, layer in zip(state.targeted_module_names, state.layers)
        if not all(torch.isfinite(tensor).all() for tensor in [layer.weight, *layer.compressed_params().values()])
    ]
    if bad:
        raise VConError(
            f"Cannot merge: NaN or Inf in the weights of {len(bad)} VCON layer(s), e.g. {bad[:MAX_NAMES_SHOWN]}. "
            "The model is unchanged; check the learning rate or load an earlier checkpoint."
        )


def merge_and_unload(model: ModelT) -> ModelT:
    """Fold the compressed weights (β = 0) into plain ``nn.Linear``/``Conv1D`` modules, in place.

    The result has exactly the state-dict keys of the unpatched architecture, and its shapes; where the compression
    removes rows or columns (structured pruning) the layers are smaller and ``model.config`` says their sizes. So
    ``save_pretrained`` then plain ``from_pretrained`` loads it without hf_vcon.

    Returns:
        The model without VCON layers: the same object (inside DDP / compile wrappers, the wrapped model; a
        ``peft.PeftModel`` stays one, its adapters now on the plain compressed layers).

    Raises:
        VConError: if the model has no VCON layers, or any VCON weight is NaN/Inf (the model is left unchanged).
    """
    inner = unwrap_model(model)
    state = require_state(inner, "merge_and_unload")
    check_finite(state)
    changes = config_changes(state)
    with torch.no_grad():
        for path, holder in zip(holder_paths(inner, state), state.holders):
            holder.detach_from(inner, path, merge=True)
    for key, value in changes.items():
        setattr(inner.config, key, value)
    delattr(inner, STATE_ATTRIBUTE)
    _remove_audit(inner)
    return model if is_peft_model(model) else inner


def unload(model: ModelT) -> ModelT:
    """Remove the VCON layers, putting the latent dense layers (or original blocks) back unchanged, in place.

    Returns:
        The same ``model`` object, now without VCON layers.

    Raises:
        VConError: if the model has no VCON layers.
    """
    inner = unwrap_model(model)
    state = require_state(inner, "unload")
    for path, holder in zip(holder_paths(inner, state), state.holders):
        holder.detach_from(inner, path, merge=False)
    delattr(inner, STATE_ATTRIBUTE)
    _remove_audit(inner)
    return model if is_peft_model(model) else inner
