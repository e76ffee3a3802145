"""Planning structured pruning (:mod:`.structured`): which blocks of a model it prunes, checked before any module is
replaced. Every refusal names the model type, the layers or the option at fault and what to do instead; nothing is
ever left silently unpruned."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..selection import kept_count
from .couplings import Block, couplings_for, find_blocks, known_model_types, resized_config

_SHOWN = 6
_OPTION_OF_KIND = {"neurons": "neuron_sparsity", "heads": "head_sparsity"}


def _shown(names: list[str]) -> str:
    return f"{names[:_SHOWN]}{' …' if len(names) > _SHOWN else ''}"


def unknown_architecture(model_type: Any) -> str:
    """Why a model type cannot take structured pruning, and how to declare its coupling."""
    return (
        f"method='structured' does not know which layers of a {model_type!r} model are coupled (known model types: "
        f"{', '.join(known_model_types())}). Declare them before apply_vcon, with the layer-name suffixes of its MLP "
        f"and the config field of its size: hf_vcon.register_coupling({model_type!r}, hf_vcon.NeuronCoupling("
        "producers=('mlp.up_proj',), consumers=('mlp.down_proj',), size_field='intermediate_size')).")


def plan_blocks(model: nn.Module, names: list[str], compressors: list) -> tuple[Any, list[Block]]:
    """The one structured setting of ``model`` and every block it prunes (each coupled layer in ``names``).

    Raises:
        ValueError: the architecture has no declared coupling, or ``head_sparsity`` > 0 where heads cannot be
            removed; the targeted layers have two settings, or leave out a coupled layer; a block's layers do not
            fit the coupling; blocks differ in size; a sparsity removes every unit.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    couplings = couplings_for(model_type)
    if couplings is None:
        raise ValueError(unknown_architecture(model_type))
    options = _one_setting(names, compressors)
    head_couplings = [coupling for coupling in couplings if coupling.kind == "heads"]
    if options.head_sparsity > 0 and not head_couplings:
        raise ValueError(
            f"head_sparsity={options.head_sparsity}: a {model_type!r} model cannot lose attention heads. transformers 5 "
            "has no pruned_heads; a smaller attention is expressible only where the config says head_dim (model types "
            f"{', '.join(known_model_types('heads'))}), while this one derives its head size from hidden_size / "
            "num_attention_heads. Use head_sparsity=0.")
    kinds = ["neurons"] + (["heads"] if options.head_sparsity > 0 else [])
    blocks = []
    for kind in kinds:
        blocks += _blocks_of_kind(model, model_type, [c for c in couplings if c.kind == kind], options)
    _check_targeted(blocks, names)
    _check_expressible(config, model_type, blocks, options)
    return options, blocks


def _check_expressible(config: Any, model_type: Any, blocks: list[Block], options: Any) -> None:
    """Refuse a setting whose smaller config the model type's own validator rejects (e.g. Llama's
    ``hidden_size % num_attention_heads == 0``, checked by ``save_pretrained`` even with an explicit ``head_dim``)."""
    validate = getattr(config, "validate", None)
    if not callable(validate) or not blocks:
        return
    try:
        validate()
    except Exception:  # noqa: BLE001 - a config that fails its own check already: nothing to compare against
        return
    changes = {}
    for block in {block.coupling.kind: block for block in blocks}.values():
        option = getattr(options, _OPTION_OF_KIND[block.coupling.kind])
        changes.update(block.config_changes(kept_count(block.units, option)))
    try:
        resized_config(config, changes).validate()
    except Exception as error:  # noqa: BLE001 - the config's own check, whatever it raises
        raise ValueError(
            f"method='structured' (neuron_sparsity={options.neuron_sparsity}, head_sparsity={options.head_sparsity}) "
            f"would write a {model_type!r} config with {changes}, which transformers refuses: "
            f"{str(error).rstrip('.')}. Choose a sparsity whose kept sizes the config accepts "
            "(for heads: a number of query heads that divides hidden_size).") from error


def _one_setting(names: list[str], compressors: list) -> Any:
    settings = list(dict.fromkeys(compressor.options for compressor in compressors))
    if len(settings) > 1:
        raise ValueError(
            f"method='structured' removes the same number of units from every block (the config holds one size), so "
            f"every coupled layer needs one setting; module_overrides give it {len(settings)}: "
            f"{', '.join(repr(setting) for setting in settings)}.")
    return settings[0]


def _blocks_of_kind(model: nn.Module, model_type: str, couplings: list, options: Any) -> list[Block]:
    """The blocks of the first coupling (of one kind) that the model has, checked."""
    for coupling in couplings:
        blocks = find_blocks(model, coupling)
        if blocks:
            break
    else:
        names = " or ".join(f"{coupling.members()}" for coupling in couplings)
        raise ValueError(f"method='structured': no block of this {model_type!r} model has the layers {names}; "
                         "declare its coupling with hf_vcon.register_coupling.")
    problem = coupling.check_config(getattr(model, "config", None))
    if problem:
        raise ValueError(f"method='structured' cannot write a smaller {model_type!r} model: {problem}.")
    sizes = sorted({block.units for block in blocks})
    if len(sizes) > 1:
        raise ValueError(f"method='structured': the blocks of this model have {sizes} {coupling.kind}; a config "
                         f"holds one size, so every block must have the same number of {coupling.kind}.")
    option = _OPTION_OF_KIND[coupling.kind]
    sparsity = getattr(options, option)
    if kept_count(sizes[0], sparsity) < 1:
        raise ValueError(f"{option}={sparsity} removes all {sizes[0]} {coupling.kind} of every block; use a smaller "
                         f"{option}, which must leave at least one.")
    return blocks


def _check_targeted(blocks: list[Block], names: list[str]) -> None:
    targeted = set(names)
    missing = [name for block in blocks for name in block.names if name not in targeted]
    if missing:
        raise ValueError(
            f"method='structured' removes the same units from every block, so every coupled layer must be targeted, "
            f"with the structured setting; not targeted: {_shown(missing)} (left out by target_modules, "
            "exclude_modules or a module_overrides entry with another method).")
