"""Block-wise patching: which blocks ``target_blocks`` matches, in which order they hand over, and the
:class:`BlockWise` granularity that wraps each in a :class:`~hf_vcon.layers.block.VConBlock`."""

from __future__ import annotations

from torch import nn

from ..config.targets import find_targets, matches
from ..config.vcon_config import VConConfig
from ..errors import NoTargetModulesError, VConError
from ..layers.block import VConBlock, compressed_copy
from .plan import plan_for, shown
from .state import Granularity, VConState, Wrapped, require_state

_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)


def _repeated_blocks(model: nn.Module) -> list[str]:
    """Names of the children of ``ModuleList`` s: the repeated blocks, shown when ``target_blocks`` is wrong."""
    return [
        f"{name}.{child}" if name else child
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        for child, _ in module.named_children()
    ]


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
            f"{shown(_repeated_blocks(model))}."
        )
    containers = [name for name in names if isinstance(modules[name], _CONTAINERS)]
    if containers:
        raise ValueError(
            f"target_blocks={config.target_blocks!r} matched container(s) {shown(containers)}, which have no forward; "
            f"match the blocks inside, e.g. {shown(_repeated_blocks(model))[:200]}."
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
            f"target_blocks={config.target_blocks!r} matched {shown(empty)}, which hold(s) no Linear/Conv1D that "
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
            f"unknown: {unknown}, missing: {missing}. Matched blocks: {shown(names)}."
        )
    return {name: blocks[name] for name in config.block_order}


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


class BlockWise(Granularity):
    name = "block"
    wraps_blocks = True

    def wrap(self, model: nn.Module, config: VConConfig) -> Wrapped:
        require_transformers_5(model)
        blocks = resolve_blocks(model, config)
        plan = plan_for(model, config, [linear for linears in blocks.values() for linear in linears])
        compressors = dict(zip(plan.names, plan.compressors))
        wrappers = []
        for name, linears in blocks.items():
            block = model.get_submodule(name)
            relative = {linear[len(name) + 1:]: compressors[linear] for linear in linears if linear in compressors}
            wrappers.append(VConBlock(block, compressed_copy(block, relative, config.recompute_every)))
        layers = [layer for wrapper in wrappers for layer in wrapper.compressed_layers()]
        return Wrapped(plan=plan, holder_names=list(blocks), holders=wrappers, layers=layers)

    def layer_wise_state_dict(self, state: VConState, state_dict: dict) -> dict:
        """Every block's g (``{block}.vcon_block.…``) renamed to ``{block}.…``, f dropped: the layout of a layer-wise
        VCON model whose targeted layers are g's, which the exports turn into the merged checkpoint."""
        renamed = {}
        prefixes = [(f"{name}.base_block.", f"{name}.vcon_block.", f"{name}.") for name in state.holder_names]
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
    state = require_state(model, "get_block_betas")
    if not state.blocks:
        raise VConError("get_block_betas needs granularity='block'; this model's VCON is layer-wise (see get_beta).")
    return {name: block.beta for name, block in zip(state.block_names, state.blocks)}
