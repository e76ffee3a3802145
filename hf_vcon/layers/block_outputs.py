"""What block-wise VCON does with a block's outputs: blend f's and g's, keep KV caches to f, record apart.

Outputs other than the hidden state (transformers 5 layers return a tensor; tuples and ``ModelOutput`` s are
blended entry by entry): every floating-point tensor of the same shape in both outputs is blended with the
same β, anything else (``Cache`` objects, integers) is f's. Attention weights and hidden states that
transformers records with ``output_attentions`` / ``output_hidden_states`` hooks are recorded from f and
from g separately (:func:`run_recording_apart`) and the blend of the two is what the model returns.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn
from transformers.cache_utils import Cache

try:  # transformers 5 records attentions / hidden states with forward hooks and a context-local collector
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # older transformers return them from the layers
    _active_collector = None


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


def map_first_tensor(output: Any, function: Callable[[torch.Tensor], torch.Tensor]) -> Any:
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


def caches(args: tuple, kwargs: dict) -> list[Cache]:
    return [value for value in (*args, *kwargs.values()) if isinstance(value, Cache)]


def without_cache(arguments: Any) -> Any:
    """``args`` / ``kwargs`` with every ``Cache`` replaced by ``None`` (g must not update f's cache)."""
    if isinstance(arguments, dict):
        return {key: None if isinstance(value, Cache) else value for key, value in arguments.items()}
    return tuple(None if isinstance(value, Cache) else value for value in arguments)


def active_collector() -> Optional[dict]:
    """transformers 5's collector of recorded outputs for the forward pass in progress, if any."""
    return _active_collector.get() if _active_collector is not None else None


def run_recording_apart(module: nn.Module, args: tuple, kwargs: dict, collector: Optional[dict]):
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


def layer_idx(block: nn.Module) -> Optional[int]:
    """The KV-cache layer index the block's attention uses (transformers sets ``layer_idx`` on it), if any."""
    for module in block.modules():
        index = getattr(module, "layer_idx", None)
        if isinstance(index, int) and not isinstance(index, bool):
            return index
    return None
