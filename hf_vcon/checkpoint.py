"""Checks that a training checkpoint fits the VCON model it is about to be loaded into.

The Trainer loads checkpoint weights with ``strict=False``; a checkpoint written without VCON (or with another
VCON configuration) would then leave the VCON layers at their current values without a word. These checks
turn that into an :class:`~hf_vcon.IncompatibleCheckpointError` before anything is loaded.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from torch import nn

from .config import CONFIG_NAME, VConConfig
from .errors import IncompatibleCheckpointError
from .state import require_state, unwrap_model

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_SHOWN = 5

WRAPPER_KEY_PARTS = (".base_layer.", ".vcon_", ".base_block.", ".parametrizations.")


def is_vcon_key(key: str) -> bool:
    """True for state-dict keys of the kinds a VCON-patched model adds (``….base_layer.…``, ``….vcon_…``, block-wise
    ``….base_block.…`` / ``….vcon_block.…``, parametrized weights ``….parametrizations.…``). A model may have
    parametrizations of its own (weight norm): use it to compare two patched models, not to tell a plain one apart."""
    return any(part in key for part in WRAPPER_KEY_PARTS)


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


def checkpoint_keys(checkpoint_dir: str) -> Optional[set[str]]:
    """Tensor names in a safetensors checkpoint (single file or sharded), or ``None`` if it has none."""
    index = os.path.join(checkpoint_dir, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as handle:
            return set(json.load(handle)["weight_map"])
    single = os.path.join(checkpoint_dir, SAFE_WEIGHTS_NAME)
    if os.path.isfile(single):
        from safetensors import safe_open

        with safe_open(single, framework="pt") as handle:
            return set(handle.keys())
    return None


def module_key_names(model: nn.Module, keys, folder: str = "") -> dict[str, str]:
    """Each saved key → the model's own key. transformers 5 saves some architectures (ViT…) under their legacy names
    and renames them back in ``from_pretrained``, but not when a Trainer resumes; this does the same renaming
    (transformers 4 renames nothing).

    Raises:
        IncompatibleCheckpointError: for a tensor stored in a layout transformers converts (fused or split weights).
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:
        return {key: key for key in keys}
    transforms = get_model_conversion_mapping(unwrap_model(model))
    renamings = [transform for transform in transforms if isinstance(transform, WeightRenaming)]
    converters = [transform for transform in transforms if isinstance(transform, WeightConverter)]
    names = {}
    for key in keys:
        new_key, converted = rename_source_key(key, renamings, converters)
        if converted is not None:
            raise IncompatibleCheckpointError(
                f"Tensor {key!r} of {folder!r} is stored in a layout that transformers converts when loading (fused or "
                "split weights), which hf_vcon does not do for a training checkpoint."
            )
        names[key] = new_key
    return names


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


def architecture_class(config, folder: str) -> type:
    """The transformers class ``config.architectures`` names (the model ``config.json`` in ``folder`` describes).

    Raises:
        IncompatibleCheckpointError: if it names none, or one this transformers does not provide.
    """
    import transformers

    architecture = (getattr(config, "architectures", None) or [None])[0]
    model_class = getattr(transformers, architecture, None) if architecture else None
    if model_class is None:
        raise IncompatibleCheckpointError(
            f"config.json in {folder!r} names architecture {architecture!r}, which transformers "
            f"{transformers.__version__} does not provide."
        )
    return model_class
