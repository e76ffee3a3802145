"""Checks that a training checkpoint fits the VCON model it is about to be loaded into.

The Trainer loads checkpoint weights with ``strict=False``; a checkpoint written without VCON (or with another
VCON configuration) would then leave the VCON layers at their current values without a word. These checks
turn that into an :class:`~hf_vcon.IncompatibleCheckpointError` before anything is loaded.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
from torch import nn

from ..config.vcon_config import CONFIG_NAME, VConConfig
from ..errors import IncompatibleCheckpointError
from ..export.files import checkpoint_keys, is_vcon_key, module_key_names
from ..patching.state import require_state
from ..utils.modules import unwrap_model

_SHOWN = 5
FROZEN_STATES_NAME = "vcon_frozen_states.pt"


def _flat(config: VConConfig) -> dict:
    data = config.to_dict()
    data.update(data.pop("options"))  # options by their own names ("rank: checkpoint 4 vs now 2")
    return data


def config_differences(saved: VConConfig, current: VConConfig) -> list[str]:
    """``"<field>: checkpoint <saved> vs now <current>"`` for every field or option that differs (versions aside)."""
    saved_fields, current_fields = _flat(saved), _flat(current)
    return [
        f"{key}: checkpoint {saved_fields.get(key)!r} vs now {current_fields[key]!r}"
        for key in sorted(current_fields)
        if key not in ("hf_vcon_version", "format_version") and saved_fields.get(key) != current_fields[key]
    ]


def verify_checkpoint(checkpoint_dir: str, model: nn.Module) -> None:
    """Raise unless ``checkpoint_dir`` was written from a VCON model with the same configuration and VCON tensors.

    Raises:
        IncompatibleCheckpointError: no ``vcon_config.json``, a different configuration, or VCON tensors that
            are missing from or extra to the checkpoint.
    """
    state = require_state(model, "verify_checkpoint")
    config_file = os.path.join(checkpoint_dir, CONFIG_NAME)
    if not os.path.isfile(config_file):
        raise IncompatibleCheckpointError(
            f"{checkpoint_dir!r} has no {CONFIG_NAME}: it was not written by a VCON training run, and loading it would "
            "leave the VCON layers at their current weights. Resume from a checkpoint of a VConTrainer run."
        )
    differences = config_differences(VConConfig.from_pretrained(checkpoint_dir), state.config)
    if differences:
        raise IncompatibleCheckpointError(
            f"The checkpoint {checkpoint_dir!r} was trained with another VCON configuration ({'; '.join(differences)}). "
            "Resume with the configuration saved in its vcon_config.json."
        )
    saved = checkpoint_keys(checkpoint_dir)
    if saved is None:  # FSDP sharded or .bin checkpoints: the configuration check above is what we can do
        return
    expected = {key for key in unwrap_model(model).state_dict() if is_vcon_key(key)}
    found = {key for key in module_key_names(model, saved, checkpoint_dir).values() if is_vcon_key(key)}
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        raise IncompatibleCheckpointError(
            f"The VCON tensors of {checkpoint_dir!r} do not match the model: {len(missing)} missing "
            f"(e.g. {missing[:_SHOWN]}), {len(unexpected)} unexpected (e.g. {unexpected[:_SHOWN]})."
        )


# ------------------------------------------------------------------------ states held over recompute_every steps
def _on_cpu(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return state.detach().cpu()
    return type(state)(_on_cpu(part) for part in state)


def _on_device(state: Any, device: torch.device) -> Any:
    if isinstance(state, torch.Tensor):
        return state.to(device)
    return type(state)(_on_device(part, device) for part in state)


def save_frozen_states(model: nn.Module, checkpoint_dir: str) -> None:
    """With ``recompute_every > 1``, write the states each layer holds for its current window into the checkpoint
    folder: a resumed run continues that window with them, exactly as the uninterrupted run did (they were computed
    from W at the window's first step, which the checkpoint no longer has). Nothing is written otherwise."""
    state = require_state(model, "save_frozen_states")
    if state.config.recompute_every <= 1 or not os.path.isdir(checkpoint_dir):
        return
    layers = {}
    for name, layer in zip(state.targeted_module_names, state.layers):
        held = layer.frozen_state()
        if held is not None and _is_tensors(held[1]):
            layers[name] = {"window": held[0], "state": _on_cpu(held[1])}
    if layers:
        torch.save({"recompute_every": state.config.recompute_every, "layers": layers},
                   os.path.join(checkpoint_dir, FROZEN_STATES_NAME))


def _is_tensors(state: Any) -> bool:
    if isinstance(state, torch.Tensor):
        return True
    return isinstance(state, (list, tuple)) and all(_is_tensors(part) for part in state)


def restore_frozen_states(model: nn.Module, checkpoint_dir: Optional[str]) -> bool:
    """Give the layers the states :func:`save_frozen_states` wrote into ``checkpoint_dir``; ``False`` if it holds
    none (a checkpoint of another ``recompute_every``, or of an earlier version: the layers then compute theirs)."""
    state = require_state(model, "restore_frozen_states")
    path = None if checkpoint_dir is None else os.path.join(checkpoint_dir, FROZEN_STATES_NAME)
    if path is None or not os.path.isfile(path):
        return False
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved.get("recompute_every") != state.config.recompute_every:
        return False
    for name, layer in zip(state.targeted_module_names, state.layers):
        entry = saved["layers"].get(name)
        if entry is not None:
            layer.restore_frozen_state(entry["window"], _on_device(entry["state"], layer.latent_weight().device))
    return True
