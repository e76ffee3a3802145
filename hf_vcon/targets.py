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

from .linears import LINEAR_TYPES

ALL_LINEAR = "all-linear"
# Attribute names of classification heads that "all-linear" leaves out (PEFT's SEQ_CLS_HEAD_NAMES).
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


def output_head_names(model: nn.Module) -> set[str]:
    """Module names of the output head: ``get_output_embeddings()`` and a top-level ``classifier``/``score``."""
    heads = []
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    if callable(get_output_embeddings):
        heads.append(get_output_embeddings())
    heads.extend(getattr(model, attribute, None) for attribute in HEAD_ATTRIBUTE_NAMES)
    head_ids = {id(head) for head in heads if isinstance(head, nn.Module)}
    return {name for name, module in model.named_modules() if id(module) in head_ids}


def is_target(name: str, module: nn.Module, target_modules: Targets, exclude_modules: Targets, heads: set[str]) -> bool:
    """True if ``module`` called ``name`` is a Linear/Conv1D that the config targets and does not exclude."""
    if not isinstance(module, LINEAR_TYPES) or matches(name, exclude_modules):
        return False
    if target_modules == ALL_LINEAR:
        return name not in heads
    return matches(name, target_modules)


def find_targets(model: nn.Module, target_modules: Targets, exclude_modules: Optional[Targets] = None) -> list[str]:
    """Names of the modules of ``model`` that VCON would wrap, in ``named_modules()`` order."""
    heads = output_head_names(model) if target_modules == ALL_LINEAR else set()
    return [
        name
        for name, module in model.named_modules()
        if name and is_target(name, module, target_modules, exclude_modules, heads)
    ]


def fused_expert_modules(model: nn.Module) -> list[str]:
    """Names of mixture-of-experts modules holding fused 3-D expert weights (transformers 5), which VCON cannot wrap.

    They are recognised by a 3-D parameter in a module whose name or class name mentions "expert".
    """
    return [
        name
        for name, module in model.named_modules()
        if "expert" in f"{name}.{type(module).__name__}".lower()
        and any(param.dim() == 3 for param in module.parameters(recurse=False))
    ]
