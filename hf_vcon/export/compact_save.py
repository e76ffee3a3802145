"""Compact checkpoints: the compressed model (β = 0) stored at its compressed size, and loaded back.

``save_pretrained`` of a merged model stays the plain dense format any ``from_pretrained`` reads. The compact
format is smaller and needs hf_vcon to load. A folder holds:

- ``config.json``: the model's transformers config (``architectures`` names the class; no ``quantization_config``);
- ``vcon_compact.json``: the format name and version, the :class:`VConConfig`, and per compressed layer its
  method and options (``module_overrides`` resolved), shape, module type and the names, shapes and dtypes of its
  packed tensors;
- ``vcon_model.safetensors``: every tensor of the model except the compressed layers' weights, under the
  usual state-dict keys, plus each compressed layer's packed tensors under ``<layer>.vcon.<key>`` (low-rank: the
  factors ``A``, ``B``; binary: packed sign bits and scales; prune: kept values and a packed bitmask).

The weights file is deliberately not ``model.safetensors``: a plain ``from_pretrained`` on the folder fails
loudly instead of loading random weights for the compressed layers. What each layer stores is the compressor's
business (:meth:`Compressor.pack` / :meth:`Compressor.unpack`); this module never looks at the method name.
Push a folder with ``huggingface_hub.upload_folder(repo_id=..., folder_path=...)`` and load it by repo id.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any, Union

import torch
from torch import nn

from ..errors import VConError
from ..patching.state import VConState, require_state
from ..patching.tensors import replaced_keys
from ..patching.verbs import check_finite
from ..utils.modules import unwrap_model
from ..utils.peft import ADAPTER_FOLDER, check_not_in_modules_to_save, is_peft_model, without_adapters
from ..version import __version__

FORMAT_NAME = "hf_vcon.compact"
FORMAT_VERSION = 2  # 1: one setting for every layer (the config's); 2: each layer's method and options recorded
COMPACT_CONFIG_NAME = "vcon_compact.json"
COMPACT_WEIGHTS_NAME = "vcon_model.safetensors"
PACKED_INFIX = ".vcon."


# -------------------------------------------------------------------------------------------------- save
def save_compressed(model: nn.Module, output_dir: Union[str, os.PathLike]) -> str:
    """Write the compressed model (β = 0, as :func:`merge_and_unload` would fold it) in the compact format.

    The model is not changed: its latent weights stay, its β stays. Ties between parameters (e.g. an output
    embedding tied to the input one) are stored once.

    Args:
        model: a ``PreTrainedModel`` patched by :func:`apply_vcon` (possibly wrapped by DDP or compile).
        output_dir: the folder to write (created if needed).

    Returns:
        ``output_dir`` as a string.

    Raises:
        VConError: if the model has no VCON layers or NaN/Inf weights, or a compression that changes the model's
            shapes (structured pruning: its merged model is already the small one, for :func:`save_merged`).

    Example:
        >>> import tempfile, torch
        >>> from transformers import BertConfig, BertModel
        >>> from hf_vcon import VConConfig, apply_vcon, load_compressed, save_compressed
        >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
        >>> model = apply_vcon(model, VConConfig(method="lowrank", rank=4))
        >>> folder = save_compressed(model, tempfile.mkdtemp())
        >>> type(load_compressed(folder).encoder.layer[0].output.dense).__name__
        'LowRankLinear'
    """
    from safetensors.torch import save_file

    wrapper, model = model, unwrap_model(model)
    state = require_state(model, "save_compressed")
    check_finite(state)
    _check_shapes_kept(state)
    check_not_in_modules_to_save(model, state.targeted_module_names)
    tensors, layers = _packed_layers(state)
    dropped, renamed = replaced_keys(state)
    aliases = _add_dense_tensors(tensors, state, model, dropped, renamed)

    os.makedirs(output_dir, exist_ok=True)
    save_file(tensors, os.path.join(output_dir, COMPACT_WEIGHTS_NAME), metadata={"format": "pt"})
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    config.save_pretrained(output_dir)
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "hf_vcon_version": __version__,
        "dtype": dtype_name(_model_dtype(model)),
        "weights": COMPACT_WEIGHTS_NAME,
        "vcon_config": state.config.to_dict(),
        "layers": layers,
        "aliases": aliases,
    }
    with open(os.path.join(output_dir, COMPACT_CONFIG_NAME), "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=2, sort_keys=True)
        handle.write("\n")
    if is_peft_model(wrapper):
        wrapper.save_pretrained(os.path.join(output_dir, ADAPTER_FOLDER))
    return os.fspath(output_dir)


def _check_shapes_kept(state: VConState) -> None:
    resized = sorted({layer.compressor.name for layer in state.layers if layer.compressor.changes_shapes})
    if resized:
        raise VConError(
            f"The compact format stores each layer at the shape of the model's config, but method={resized[0]!r} makes "
            "the model smaller: its merged checkpoint is already the compact form, a smaller dense model that plain "
            "from_pretrained loads. Save it with hf_vcon.save_merged(model, folder) or trainer.save_model().")


def _packed_layers(state: VConState) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """Each compressed layer's packed tensors (under ``<layer>.vcon.<key>``) and its manifest entry."""
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}
    with torch.no_grad():
        for name, layer, setting in state.named_layers():
            params = {key: value.detach() for key, value in layer.compressed_params().items()}
            packed = layer.pack(layer.latent_weight().detach(), params)
            layers[name] = {
                "method": setting.method,
                "options": setting.options.to_dict(),
                **layer.describe(),
                "tensors": {key: {"shape": list(value.shape), "dtype": dtype_name(value)} for key, value in packed.items()},
            }
            tensors.update({f"{name}{PACKED_INFIX}{key}": value.contiguous() for key, value in packed.items()})
    return tensors, layers


def _add_dense_tensors(tensors: dict, state: VConState, model: nn.Module, dropped: set, renamed: dict) -> dict[str, str]:
    """Add every other tensor of the model (layer-wise layout) to ``tensors``; tied ones once. Returns the aliases."""
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    own = without_adapters(model, model.state_dict())  # PEFT adapters are saved apart
    for key, value in state.granularity.layer_wise_state_dict(state, own).items():
        if key in dropped:
            continue
        key = renamed.get(key, key)
        identity = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.stride())
        if identity in seen and value.numel():
            aliases[key] = seen[identity]
            continue
        seen[identity] = key
        tensors[key] = value.detach().contiguous()
    return aliases


def dtype_name(tensor_or_dtype: Any) -> str:
    """``torch.bfloat16`` (or a tensor of it) → ``"bfloat16"``."""
    dtype = tensor_or_dtype if isinstance(tensor_or_dtype, torch.dtype) else tensor_or_dtype.dtype
    return str(dtype).removeprefix("torch.")


def _model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's floating-point parameters (the first one's; float32 if it has none)."""
    return next((param.dtype for param in model.parameters() if param.is_floating_point()), torch.float32)
