"""The merged compressed checkpoint: plain ``from_pretrained`` loads it, with no hf_vcon.

Everything here works from a state dict, so that FSDP / ZeRO-3 runs can pass the full state dict gathered on the
main process instead of the sharded tensors the modules hold.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from torch import nn

from .state import config_changes, layer_tensors, replaced_keys, require_state, resized_config, unwrap_model
from .summary import VConSummary, vcon_summary

def merged_state_dict(model: nn.Module, state_dict: Optional[dict[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """The state dict of ``merge_and_unload(model)`` without touching the model: keys of the base architecture,
    each targeted weight replaced by its compressed form (β = 0), smaller where the compression removes rows or
    columns (structured pruning; :func:`~hf_vcon.state.config_changes` gives the config that fits it).

    Args:
        model: a model patched by :func:`hf_vcon.apply_vcon` (possibly inside DDP/FSDP wrappers).
        state_dict: the model's full state dict, when the modules hold only shards (FSDP, ZeRO-3); defaults
            to ``model.state_dict()``.
    """
    state = require_state(model, "merged_state_dict")
    source = state_dict if state_dict is not None else unwrap_model(model).state_dict()
    dropped, renamed = replaced_keys(state)
    layer_wise = state.granularity.layer_wise_state_dict(state, source)
    merged = {renamed.get(key, key): value for key, value in layer_wise.items() if key not in dropped}
    with torch.no_grad():
        tensors = list(layer_tensors(state, source))
        latent = {name: weight for name, _, weight, _ in tensors}  # coupled compressions read their group here
        for name, layer, weight, params in tensors:
            merged.update(layer.merged_state(name, weight, params, merged, latent))
    return merged


@contextmanager
def _config_of_merged_model(model: nn.Module, changes: dict) -> Iterator[None]:
    """Within the block ``model.config`` is a copy with the merged model's sizes, so that ``save_pretrained`` writes
    ``config.json`` once, as transformers writes it, with the sizes of the tensors it saves."""
    if not changes:
        yield
        return
    config = model.config
    model.config = resized_config(config, changes)
    try:
        yield
    finally:
        model.config = config


def save_merged(
    model: nn.Module,
    output_dir: str,
    state_dict: Optional[dict[str, torch.Tensor]] = None,
    **save_kwargs: Any,
) -> VConSummary:
    """Write the merged compressed model (safetensors + ``config.json``) and ``vcon_config.json`` to ``output_dir``.

    The patched model itself is left as it is (training can go on); where the compression changes the model's sizes
    (structured pruning), ``config.json`` says the new ones. Returns the summary of the compression.
    """
    inner = unwrap_model(model)
    state = require_state(inner, "save_merged")
    source = state_dict if state_dict is not None else inner.state_dict()
    with _config_of_merged_model(inner, config_changes(state)):
        inner.save_pretrained(output_dir, state_dict=merged_state_dict(inner, source), **save_kwargs)
    state.config.save_pretrained(output_dir)
    return vcon_summary(inner, source)
