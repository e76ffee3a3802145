"""The files and state-dict keys of a saved folder: which weights a checkpoint holds, under which module names,
which of them a VCON-patched model adds, and the model class its config.json names."""

from __future__ import annotations

import json
import os
from typing import Optional

from torch import nn

from ..errors import IncompatibleCheckpointError
from ..utils.modules import unwrap_model

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_SHOWN = 5

WRAPPER_KEY_PARTS = (".base_layer.", ".vcon_", ".base_block.", ".parametrizations.")


def is_vcon_key(key: str) -> bool:
    """True for state-dict keys of the kinds a VCON-patched model adds (``….base_layer.…``, ``….vcon_…``, block-wise
    ``….base_block.…`` / ``….vcon_block.…``, parametrized weights ``….parametrizations.…``). A model may have
    parametrizations of its own (weight norm): use it to compare two patched models, not to tell a plain one apart."""
    return any(part in key for part in WRAPPER_KEY_PARTS)


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
