"""The merged compressed checkpoint: plain ``from_pretrained`` loads it, with no hf_vcon.

Everything here works from a state dict, so that FSDP / ZeRO-3 runs can pass the full state dict gathered on the
main process instead of the sharded tensors the modules hold.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
from torch import nn

from .peft_layers import ADAPTER_FOLDER, is_peft_model, without_adapters
from .state import layer_tensors, replaced_keys, require_state, unwrap_model
from .summary import VConSummary, vcon_summary

def merged_state_dict(model: nn.Module, state_dict: Optional[dict[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """The state dict of ``merge_and_unload(model)`` without touching the model: keys of the base architecture,
    each targeted weight replaced by its compressed form (β = 0).

    Args:
        model: a model patched by :func:`hf_vcon.apply_vcon` (possibly inside DDP/FSDP wrappers).
        state_dict: the model's full state dict, when the modules hold only shards (FSDP, ZeRO-3); defaults
            to ``model.state_dict()``.
    """
    state = require_state(model, "merged_state_dict")
    inner = unwrap_model(model)
    source = without_adapters(inner, state_dict if state_dict is not None else inner.state_dict())
    dropped, renamed = replaced_keys(state)
    layer_wise = state.granularity.layer_wise_state_dict(state, source)
    merged = {renamed.get(key, key): value for key, value in layer_wise.items() if key not in dropped}
    with torch.no_grad():
        for name, layer, weight, params in layer_tensors(state, source):
            merged[layer.merged_key(name)] = layer.stored(layer.compress(weight, params))
    return merged


def save_merged(
    model: nn.Module,
    output_dir: str,
    state_dict: Optional[dict[str, torch.Tensor]] = None,
    **save_kwargs: Any,
) -> VConSummary:
    """Write the merged compressed model (safetensors + ``config.json``) and ``vcon_config.json`` to ``output_dir``.

    The patched model itself is left as it is (training can go on). A ``peft.PeftModel`` writes its compressed base
    model there and its adapters to ``output_dir/adapter`` (load: ``PeftModel.from_pretrained(AutoModel…
    .from_pretrained(output_dir), output_dir + "/adapter")``). Returns the summary of the compression.
    """
    inner = unwrap_model(model)
    state = require_state(inner, "save_merged")
    source = state_dict if state_dict is not None else inner.state_dict()
    inner.save_pretrained(output_dir, state_dict=merged_state_dict(inner, source), **save_kwargs)
    state.config.save_pretrained(output_dir)
    if is_peft_model(model):  # the adapters apart, on the compressed base: PeftModel.from_pretrained(base, adapter/)
        model.save_pretrained(os.path.join(output_dir, ADAPTER_FOLDER))
    return vcon_summary(inner, without_adapters(inner, source))
