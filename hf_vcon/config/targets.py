"""Which modules get VCON: PEFT's target grammar as one pure function, plus ``"all-linear"``.

Grammar (as in PEFT's ``LoraConfig``): a list entry matches a module name exactly or as a dotted suffix
(``"query"`` matches ``"bert.encoder.layer.0.attention.self.query"``); a string is a regular expression
``re.fullmatch``-ed against the full module name; ``"all-linear"`` is every Linear/Conv1D but the output head.

The keys of ``module_overrides`` follow PEFT's ``rank_pattern`` rule (:func:`matches_pattern`): a key is a regular
expression that must match the full module name or a dotted suffix of it, so both ``"query"`` and
``r".*attention.*"`` work.
"""

from __future__ import annotations

import re
from typing import Optional, Union

from torch import nn

from ..utils.linears import LINEAR_TYPES
from ..utils.peft import adapter_layer_names

ALL_LINEAR = "all-linear"
# Attribute names of classification heads that "all-linear" leaves out of a plain nn.Module (PEFT's SEQ_CLS_HEAD_NAMES).
HEAD_ATTRIBUTE_NAMES = ("classifier", "score")

Targets = Union[str, list[str], None]


def matches(name: str, targets: Targets) -> bool:
    """True if module ``name`` matches ``targets`` in PEFT's grammar (``"all-linear"`` is resolved by the caller).

    Example:
        >>> matches("bert.encoder.layer.0.attention.self.query", ["query", "value"])
        True
        >>> matches("bert.encoder.layer.0.attention.self.query", r".*layer\\.1\\..*")
        False
    """
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == target or name.endswith(f".{target}") for target in targets)


def matches_pattern(name: str, pattern: str) -> bool:
    """True if regex ``pattern`` matches module ``name`` whole or a dotted suffix of it (PEFT's ``rank_pattern`` rule).

    Example:
        >>> matches_pattern("bert.encoder.layer.0.attention.self.query", "query")
        True
        >>> matches_pattern("bert.encoder.layer.0.attention.self.query", r".*attention.*")
        True
        >>> matches_pattern("bert.encoder.layer.0.attention.self.query", "uery")
        False
    """
    return re.fullmatch(rf"(?:.*\.)?(?:{pattern})", name) is not None


def _head_roots(model: nn.Module) -> set[str]:
    """Names of the modules that form the task head: the output embeddings, and, in a model with a head on top of
    its base model (``base_model_prefix``), every top-level module outside the base model (classifiers, CTC and
    LM heads, distillation heads, sequence summaries…); without a base model, a top-level ``classifier``/``score``."""
    roots: list[nn.Module] = []
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    if callable(get_output_embeddings):
        roots.append(get_output_embeddings())
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    if isinstance(base, nn.Module) and base is not model:
        roots.extend(child for child in model.children() if child is not base)
    else:
        roots.extend(getattr(model, attribute, None) for attribute in HEAD_ATTRIBUTE_NAMES)
    ids = {id(root) for root in roots if isinstance(root, nn.Module)}
    return {name for name, module in model.named_modules() if id(module) in ids}


def _router_roots(model: nn.Module) -> set[str]:
    """Names of mixture-of-experts routers and gates (``gate``, ``router``, ``*_gate`` beside ``experts``)."""
    roots = set()
    for name, module in model.named_modules():
        children = dict(module.named_children())
        if "experts" not in children:
            continue
        for child in children:
            if child in ("gate", "router") or child.endswith("_gate"):
                roots.add(f"{name}.{child}" if name else child)
    return roots


def excluded_by_all_linear(model: nn.Module) -> set[str]:
    """The module names ``"all-linear"`` leaves dense: the task head and the MoE routers (name them in
    ``target_modules`` to compress them on purpose)."""
    return _head_roots(model) | _router_roots(model)


def _under(name: str, roots: set[str]) -> bool:
    return name in roots or any(name.startswith(f"{root}.") for root in roots)


def is_expert_module(name: str, module: nn.Module) -> bool:
    return "expert" in f"{name}.{type(module).__name__}".lower()


def fused_weight_names(module: nn.Module, name: str) -> list[str]:
    """The parameters of ``module`` that are linear maps read directly rather than through a Linear: the 3-D expert
    weights ``(experts, out, in)`` of a mixture-of-experts module, and ``nn.MultiheadAttention``'s input projections."""
    if isinstance(module, nn.MultiheadAttention):
        return [key for key in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
                if getattr(module, key, None) is not None]
    if not is_expert_module(name, module):
        return []
    return [key for key, param in module.named_parameters(recurse=False) if param.dim() == 3 and param.is_floating_point()]


def candidate_targets(model: nn.Module, inside_adapters: bool = False) -> list[tuple[str, str]]:
    """Every ``(name, owner)`` VCON can compress, in model order: Linear/Conv1D modules (``owner`` = the name) and
    fused weights (``<owner>.<parameter>``). What PEFT adapter layers hold (their base layer, their adapters) is
    left out, or is all that is returned with ``inside_adapters``."""
    adapters = set(adapter_layer_names(model))
    found = []
    for name, module in model.named_modules():
        if _under(name, adapters) != inside_adapters:
            continue
        if name and isinstance(module, LINEAR_TYPES):
            found.append((name, name))
        found.extend((f"{name}.{key}" if name else key, name) for key in fused_weight_names(module, name))
    return found


def find_targets(model: nn.Module, target_modules: Targets, exclude_modules: Optional[Targets] = None,
                 inside_adapters: bool = False) -> list[str]:
    """Names of what VCON would compress in ``model``: Linear/Conv1D module names and fused weights'
    ``<owner>.<parameter>`` names, in model order. A fused weight matches the grammar by its own name or its owner's.
    Layers PEFT adapters hold are never targets (``inside_adapters`` returns those the targets would match)."""
    excluded = excluded_by_all_linear(model) if target_modules == ALL_LINEAR else set()
    names = []
    for name, owner in candidate_targets(model, inside_adapters):
        if matches(name, exclude_modules) or (owner != name and matches(owner, exclude_modules)):
            continue
        if target_modules == ALL_LINEAR:
            chosen = not _under(name, excluded)
        else:
            chosen = matches(name, target_modules) or (owner != name and matches(owner, target_modules))
        if chosen:
            names.append(name)
    return names
