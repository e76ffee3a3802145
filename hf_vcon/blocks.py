"""Block-wise VCON: a whole block f⁽ⁱ⁾ (say a transformer layer) hands over to its compressed copy g⁽ⁱ⁾.

``VConConfig(granularity="block", target_blocks=…)`` wraps each matched block in a :class:`VConBlock` that
outputs ``β·f(x) + (1−β)·g(x)`` (arXiv 2510.09696, Figure 2). f is the original block, kept as ``base_block``;
g is a deep copy of it, kept as ``vcon_block``, whose ``target_modules`` Linear/Conv1D layers are
:class:`~hf_vcon.layers.VConLinear` pinned at β = 0, i.e. they always compute the compressed layer.

What trains during the transition: every trainable parameter of f **and** of g (the paper's Θ and Θ̃). g's
compressed Linears keep a latent dense weight of their own, trained straight-through for prune and binary
(exactly as layer-wise VCON trains W, but for g alone); low-rank g trains its factors B, A and freezes the
dense copy it was factorised from, which g never reads. g's LayerNorms and biases are copies that train
separately from f's. Nothing is shared, so f stays the original block and g becomes the compressed one.

Outputs other than the hidden state (transformers 5 layers return a tensor; tuples and ``ModelOutput`` s are
blended entry by entry): every floating-point tensor of the same shape in both outputs is blended with the
same β, anything else (``Cache`` objects, integers) is f's. Attention weights and hidden states that
transformers records with ``output_attentions`` / ``output_hidden_states`` hooks are recorded from f and
from g separately and the blend of the two is what the model returns, one entry per block as usual.
KV caches: while 0 < β < 1, f reads and updates the model's cache and g runs without one, which is exact for
a forward pass that starts with an empty cache (training, evaluation, the prompt of ``generate``);
continuing from a filled cache raises :class:`~hf_vcon.errors.VConError`. At β = 1 only f runs and at β = 0
only g runs, each with the cache, so generation works there.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Optional

import torch
from torch import nn
from transformers.cache_utils import Cache

from .compressors import Compressor, get_compressor
from .config import VConConfig
from .errors import NoTargetModulesError, VConError
from .layers import VConLinear, _keep_in_graph
from .model import STATE_ATTRIBUTE, VConState, _replace_module
from .schedules import beta_at, staggered_beta_at
from .targets import find_targets, matches

try:  # transformers 5 records attentions / hidden states with forward hooks and a context-local collector
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # older transformers return them from the layers
    _active_collector = None

_MAX_NAMES_SHOWN = 10
_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)


class VConBlock(nn.Module):
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
        self.beta = 1.0
        self.cache_layer_idx = _layer_idx(base_block)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_block", "vcon_block", "_modules"):
                raise
            return getattr(self.base_block, name)

    def compressed_layers(self) -> list[VConLinear]:
        """g's compressed Linear layers (at β = 0 for good), in ``named_modules()`` order."""
        return [module for module in self.vcon_block.modules() if isinstance(module, VConLinear)]

    def set_beta(self, beta: float) -> None:
        """Set β, the weight of the original block f, in [0, 1]."""
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta={beta!r} must be in [0, 1].")
        self.beta = float(beta)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.beta == 1.0:  # f alone
            return self._keep_other_in_graph(self.base_block(*args, **kwargs), self.vcon_block)
        if self.beta == 0.0:  # g alone
            return self._keep_other_in_graph(self.vcon_block(*args, **kwargs), self.base_block)
        self._check_cache_is_empty(args, kwargs)
        collector = _active_collector.get() if _active_collector is not None else None
        out_f, records_f = _run_recording_apart(self.base_block, args, kwargs, collector)
        g_args, g_kwargs = _without_cache(args), _without_cache(kwargs)
        out_g, records_g = _run_recording_apart(self.vcon_block, g_args, g_kwargs, collector)
        for key, entries in records_f.items():
            collector[key].extend(blend_outputs(entries, records_g[key], self.beta))
        return blend_outputs(out_f, out_g, self.beta)

    def _keep_other_in_graph(self, output: Any, other: nn.Module) -> Any:
        if not self.training:
            return output
        unused = [param for param in other.parameters() if param.requires_grad]
        return _map_first_tensor(output, lambda tensor: _keep_in_graph(tensor, unused))

    def _check_cache_is_empty(self, args: tuple, kwargs: dict) -> None:
        if self.cache_layer_idx is None:
            return
        for cache in _caches(args, kwargs):
            if cache.get_seq_length(self.cache_layer_idx) > 0:
                raise VConError(
                    "Block-wise VCON cannot continue from a filled KV cache while 0 < beta < 1 "
                    f"(beta={self.beta:.4g}): the compressed copy g has no cache of its own. Generate at beta 1 or 0, "
                    "or with use_cache=False."
                )

    def extra_repr(self) -> str:
        return f"beta={self.beta:.4g}"


# ------------------------------------------------------------------------------------------ outputs
def blend_outputs(out_f: Any, out_g: Any, beta: float) -> Any:
    """β·f + (1−β)·g on every floating-point tensor found at the same place in both outputs; the rest is f's.

    Handles tensors, tuples, lists, dicts and ``ModelOutput`` s; the same object in both (a shared input
    recorded twice) is returned as is.
    """
    if out_f is out_g or out_f is None or out_g is None:
        return out_f
    if isinstance(out_f, torch.Tensor):
        if isinstance(out_g, torch.Tensor) and out_f.is_floating_point() and out_f.shape == out_g.shape:
            return beta * out_f + (1.0 - beta) * out_g
        return out_f
    if isinstance(out_f, (tuple, list)) and isinstance(out_g, (tuple, list)) and len(out_f) == len(out_g):
        blended = [blend_outputs(a, b, beta) for a, b in zip(out_f, out_g)]
        return type(out_f)(*blended) if hasattr(out_f, "_fields") else type(out_f)(blended)
    if isinstance(out_f, dict) and isinstance(out_g, dict):
        return type(out_f)(**{key: blend_outputs(value, out_g.get(key), beta) for key, value in out_f.items()})
    return out_f


def _map_first_tensor(output: Any, function: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``output`` with ``function`` applied to its hidden state: the tensor itself or the first entry."""
    if isinstance(output, torch.Tensor):
        return function(output)
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor) and not hasattr(output, "_fields"):
        return (function(output[0]), *output[1:])
    if isinstance(output, dict) and output:
        key = next(iter(output))
        if isinstance(output[key], torch.Tensor):
            output[key] = function(output[key])
    return output


def _caches(args: tuple, kwargs: dict) -> list[Cache]:
    return [value for value in (*args, *kwargs.values()) if isinstance(value, Cache)]


def _without_cache(arguments: Any) -> Any:
    """``args`` / ``kwargs`` with every ``Cache`` replaced by ``None`` (g must not update f's cache)."""
    if isinstance(arguments, dict):
        return {key: None if isinstance(value, Cache) else value for key, value in arguments.items()}
    return tuple(None if isinstance(value, Cache) else value for value in arguments)


def _run_recording_apart(module: nn.Module, args: tuple, kwargs: dict, collector: Optional[dict]):
    """Run ``module``; what transformers' output hooks record meanwhile goes to a private copy of ``collector``.

    Returns the output and, per recorded key, the entries the module added (to be blended, then appended).
    """
    if not collector:
        return module(*args, **kwargs), {}
    private = {key: list(value) if isinstance(value, list) else value for key, value in collector.items()}
    token = _active_collector.set(private)
    try:
        output = module(*args, **kwargs)
    finally:
        _active_collector.reset(token)
    added = {key: private[key][len(value):] for key, value in collector.items() if isinstance(value, list)}
    return output, added


def _layer_idx(block: nn.Module) -> Optional[int]:
    """The KV-cache layer index the block's attention uses (transformers sets ``layer_idx`` on it), if any."""
    for module in block.modules():
        index = getattr(module, "layer_idx", None)
        if isinstance(index, int) and not isinstance(index, bool):
            return index
    return None


# -------------------------------------------------------------------------------------------- build g
def compressed_copy(block: nn.Module, linear_names: list[str], compressor: Compressor) -> nn.Module:
    """g: a deep copy of ``block`` whose Linear/Conv1D layers named ``linear_names`` (relative to the block,
    ``""`` for the block itself) are :class:`VConLinear` at β = 0. ``block`` is not mutated.

    A compressor that builds C from tensors of its own (low-rank) never reads the dense copy: it is frozen.
    """
    compressed = copy.deepcopy(block)
    for name in linear_names:
        layer = VConLinear(compressed.get_submodule(name), compressor)
        layer.set_beta(0.0)
        if not compressor.straight_through:
            layer.weight.requires_grad_(False)
        if name:
            _replace_module(compressed, name, layer)
        else:
            compressed = layer
    return compressed


def _repeated_blocks(model: nn.Module) -> list[str]:
    """Names of the children of ``ModuleList`` s: the repeated blocks, shown when ``target_blocks`` is wrong."""
    return [
        f"{name}.{child}" if name else child
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        for child, _ in module.named_children()
    ]


def _shown(names: list[str]) -> str:
    return f"{names[:_MAX_NAMES_SHOWN]}{' …' if len(names) > _MAX_NAMES_SHOWN else ''}"


def resolve_blocks(model: nn.Module, config: VConConfig) -> dict[str, list[str]]:
    """The matched blocks in handover order, each with the full names of the Linear layers g compresses.

    Raises:
        NoTargetModulesError: if ``target_blocks`` matches no module.
        ValueError: if it matches a container, a module with no targeted Linear/Conv1D inside, or blocks nested in
            one another; or if ``block_order`` does not name every matched block exactly once.
    """
    modules = dict(model.named_modules())
    names = [name for name in modules if name and matches(name, config.target_blocks)]
    if not names:
        raise NoTargetModulesError(
            f"target_blocks={config.target_blocks!r} matched no module. Repeated blocks of this model: "
            f"{_shown(_repeated_blocks(model))}."
        )
    containers = [name for name in names if isinstance(modules[name], _CONTAINERS)]
    if containers:
        raise ValueError(
            f"target_blocks={config.target_blocks!r} matched container(s) {_shown(containers)}, which have no forward; "
            f"match the blocks inside, e.g. {_shown(_repeated_blocks(model))[:200]}."
        )
    nested = [(outer, inner) for outer in names for inner in names if inner.startswith(f"{outer}.")]
    if nested:
        outer, inner = nested[0]
        raise ValueError(
            f"target_blocks={config.target_blocks!r} matched {inner!r} inside {outer!r}; blocks must not contain one "
            "another. Anchor the pattern, e.g. r'model\\.layers\\.\\d+'."
        )
    linears = find_targets(model, config.target_modules, config.exclude_modules)
    blocks = {name: [l for l in linears if l == name or l.startswith(f"{name}.")] for name in names}
    empty = [name for name, inside in blocks.items() if not inside]
    if empty:
        raise ValueError(
            f"target_blocks={config.target_blocks!r} matched {_shown(empty)}, which hold(s) no Linear/Conv1D that "
            f"target_modules={config.target_modules!r} (exclude_modules={config.exclude_modules!r}) selects: not "
            "blocks VCON can compress. Match whole layers, or widen target_modules."
        )
    if config.block_order is None:
        return blocks
    unknown = [name for name in config.block_order if name not in blocks]
    missing = [name for name in names if name not in config.block_order]
    if unknown or missing:
        raise ValueError(
            f"block_order must name every block that target_blocks matched, once, by its full name; "
            f"unknown: {unknown}, missing: {missing}. Matched blocks: {_shown(names)}."
        )
    return {name: blocks[name] for name in config.block_order}


# ----------------------------------------------------------------------------------------- lifecycle
def require_transformers_5(model: nn.Module) -> None:
    """Block-wise VCON of a transformers model needs transformers 5: 4.x records hidden states / attentions with
    hooks on every layer of the block's class, which would record f and g both; the blend of those records is
    written for 5.x. Plain ``nn.Module`` models have no such records."""
    import transformers

    if isinstance(model, transformers.PreTrainedModel) and int(transformers.__version__.split(".")[0]) < 5:
        raise VConError(
            f"granularity='block' needs transformers >= 5 (installed: {transformers.__version__}); use "
            "granularity='layer' (the default) or upgrade transformers."
        )


def apply_block_vcon(model: nn.Module, config: VConConfig) -> nn.Module:
    """Block-wise :func:`hf_vcon.apply_vcon` (called by it for ``granularity="block"``): checks, then mutates."""
    require_transformers_5(model)
    blocks = resolve_blocks(model, config)
    compressor = get_compressor(config)
    for linears in blocks.values():
        for name in linears:
            compressor.check_layer(name, *VConLinear.orientation(model.get_submodule(name)))
    # Build every wrapper before replacing any, so an error while building leaves the model untouched.
    wrappers = {}
    for name, linears in blocks.items():
        relative = [linear[len(name) + 1:] for linear in linears]
        block = model.get_submodule(name)
        wrappers[name] = VConBlock(block, compressed_copy(block, relative, compressor))
    for name, wrapper in wrappers.items():
        _replace_module(model, name, wrapper)
    state = VConState(
        config=config,
        targeted_module_names=[linear for linears in blocks.values() for linear in linears],
        layers=[layer for wrapper in wrappers.values() for layer in wrapper.compressed_layers()],
        blocks=list(wrappers.values()),
        block_names=list(wrappers),
    )
    setattr(model, STATE_ATTRIBUTE, state)
    return model


def set_block_step(state: VConState, step: int, transition_steps: int) -> float:
    """Give every block the β of its window at optimizer ``step`` (Q = ``transition_steps``); return their mean."""
    config, count = state.config, len(state.blocks)
    for index, block in enumerate(state.blocks):
        if config.stagger:
            beta = staggered_beta_at(step, transition_steps, index, count, config.start_step, config.schedule)
        else:
            beta = beta_at(step, transition_steps, config.start_step, config.schedule)
        block.set_beta(beta)
    for layer in state.layers:  # g's layers know the optimizer step as layer-wise ones do (β stays 0)
        layer.optimizer_step = step
    return mean_beta(state)


def mean_beta(state: VConState) -> float:
    """The mean β over the blocks: the share of the dense model left (every block's β without stagger)."""
    return sum(block.beta for block in state.blocks) / len(state.blocks)


def merge_blocks(model: nn.Module, state: VConState) -> None:
    """Replace every :class:`VConBlock` by g with its compressed weights folded into plain Linear/Conv1D."""
    with torch.no_grad():
        for layer in state.layers:
            layer.base_layer.weight.copy_(layer.merged_weight())
    for name, block in zip(state.block_names, state.blocks):
        compressed = block.vcon_block
        for layer_name, layer in list(compressed.named_modules()):
            if isinstance(layer, VConLinear):
                layer.weight.requires_grad_(any(p.requires_grad for p in layer.parameters()))
                if layer_name:
                    _replace_module(compressed, layer_name, layer.base_layer)
                else:
                    compressed = layer.base_layer
        _replace_module(model, name, compressed)
    delattr(model, STATE_ATTRIBUTE)


def unload_blocks(model: nn.Module, state: VConState) -> None:
    """Put every original block f back; g is dropped."""
    for name, block in zip(state.block_names, state.blocks):
        _replace_module(model, name, block.base_block)
    delattr(model, STATE_ATTRIBUTE)


def compressed_blocks_state_dict(state: VConState, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` with every block's g (``{block}.vcon_block.…``) renamed to ``{block}.…`` and f dropped.

    The result has the layout of a layer-wise VCON model whose targeted layers are g's: what the layer-wise
    export turns into the merged checkpoint.
    """
    renamed = {}
    prefixes = [(f"{name}.base_block.", f"{name}.vcon_block.", f"{name}.") for name in state.block_names]
    for key, value in state_dict.items():
        for original, compressed, block in prefixes:
            if key.startswith(original):
                break
            if key.startswith(compressed):
                renamed[block + key[len(compressed):]] = value
                break
        else:
            renamed[key] = value
    return renamed


def get_block_betas(model: nn.Module) -> dict[str, float]:
    """β of every block of a block-wise model, by block name, in handover order.

    Raises:
        VConError: if the model has no VCON blocks.

    Example:
        >>> from torch import nn
        >>> from hf_vcon import VConConfig, apply_vcon, set_step
        >>> model = nn.Sequential(*(nn.Sequential(nn.Linear(4, 4), nn.ReLU()) for _ in range(2)))
        >>> config = VConConfig(method="binary", granularity="block", target_blocks=r"\\d", stagger=True,
        ...                     transition_steps=4)
        >>> model = apply_vcon(model, config)
        >>> set_step(model, 1)  # block 0 half-way through its window [0, 2], block 1 waiting for [2, 4]; the mean
        0.75
        >>> get_block_betas(model)
        {'0': 0.5, '1': 1.0}
    """
    from .model import require_state

    state = require_state(model, "get_block_betas")
    if not state.blocks:
        raise VConError("get_block_betas needs granularity='block'; this model's VCON is layer-wise (see get_beta).")
    return {name: block.beta for name, block in zip(state.block_names, state.blocks)}
