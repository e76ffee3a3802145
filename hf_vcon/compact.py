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

from .config import VConConfig
from .errors import IncompatibleCheckpointError
from .linears import linear_shape
from .model import check_finite
from .settings import LayerSetting, build_options
from .state import VConState, replace_module, require_state, unwrap_model
from .version import __version__

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
        VConError: if the model has no VCON layers or NaN/Inf weights.

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

    model = unwrap_model(model)
    state = require_state(model, "save_compressed")
    check_finite(state)
    tensors, layers = _packed_layers(state)
    dropped, renamed = _replaced_keys(state)
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
        "weights": COMPACT_WEIGHTS_NAME,
        "vcon_config": state.config.to_dict(),
        "layers": layers,
        "aliases": aliases,
    }
    with open(os.path.join(output_dir, COMPACT_CONFIG_NAME), "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=2, sort_keys=True)
        handle.write("\n")
    return os.fspath(output_dir)


def _packed_layers(state: VConState) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """Each compressed layer's packed tensors (under ``<layer>.vcon.<key>``) and its manifest entry."""
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}
    with torch.no_grad():
        for name, layer, setting in state.named_layers():
            params = {key: value.detach() for key, value in layer.compressed_params().items()}
            packed = layer.compressor.pack(layer.latent_weight().detach(), params)
            layers[name] = {
                "method": setting.method,
                "options": setting.options.to_dict(),
                "module": type(layer.base_layer).__name__,
                "shape": [layer.out_features, layer.in_features],
                "tensors": {key: {"shape": list(value.shape), "dtype": _dtype_name(value)} for key, value in packed.items()},
            }
            tensors.update({f"{name}{PACKED_INFIX}{key}": value.contiguous() for key, value in packed.items()})
    return tensors, layers


def _replaced_keys(state: VConState) -> tuple[set[str], dict[str, str]]:
    """The patched model's keys the packed form replaces, and the base layers' other keys under their plain names."""
    dropped, renamed = set(), {}
    for name, layer in zip(state.targeted_module_names, state.layers):
        for local_key in layer.state_dict(keep_vars=True):
            if local_key.startswith("base_layer.") and local_key != "base_layer.weight":
                renamed[f"{name}.{local_key}"] = f"{name}.{local_key[len('base_layer.'):]}"
            else:  # the latent weight and the compressed path's own tensors: replaced by the packed form
                dropped.add(f"{name}.{local_key}")
    return dropped, renamed


def _add_dense_tensors(tensors: dict, state: VConState, model: nn.Module, dropped: set, renamed: dict) -> dict[str, str]:
    """Add every other tensor of the model (layer-wise layout) to ``tensors``; tied ones once. Returns the aliases."""
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, value in state.granularity.layer_wise_state_dict(state, model.state_dict()).items():
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


def _dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


# -------------------------------------------------------------------------------------------------- load
def load_compressed(path_or_repo_id: Union[str, os.PathLike], **hub_kwargs: Any) -> nn.Module:
    """Load a folder written by :func:`save_compressed` as a plain inference model (no VCON layers).

    The model class comes from ``config.json``. Low-rank layers become :class:`LowRankLinear` modules (two thin
    Linears); binary and pruned layers become their original ``nn.Linear``/``Conv1D`` with the unpacked
    weights. The result computes what the merged dense model computes, in eval mode.

    Args:
        path_or_repo_id: a local folder, or a Hub repo id (downloaded with ``huggingface_hub.snapshot_download``).
        hub_kwargs: passed to ``snapshot_download`` (``revision``, ``token``, ``cache_dir``…).

    Returns:
        The model, an instance of the class named in ``config.json``.

    Raises:
        IncompatibleCheckpointError: if the folder is not in this format (or a newer version of it), or its
            files do not match its configuration (missing, extra or mis-shaped tensors, a layer the model lacks).
    """
    import transformers
    from safetensors.torch import load_file

    folder = _resolve_folder(path_or_repo_id, hub_kwargs)
    manifest = _read_manifest(folder)
    vcon_config = VConConfig.from_dict(manifest["vcon_config"])
    config = transformers.AutoConfig.from_pretrained(folder)
    architecture = (getattr(config, "architectures", None) or [None])[0]
    model_class = getattr(transformers, architecture, None) if architecture else None
    if model_class is None:
        raise IncompatibleCheckpointError(
            f"config.json in {folder!r} names architecture {architecture!r}, which transformers "
            f"{transformers.__version__} does not provide."
        )
    weights_file = os.path.join(folder, manifest.get("weights", COMPACT_WEIGHTS_NAME))
    if not os.path.isfile(weights_file):
        raise IncompatibleCheckpointError(f"{COMPACT_CONFIG_NAME} in {folder!r} names {weights_file!r}, which is missing.")
    tensors = load_file(weights_file)
    model = model_class(config)

    packed = _take_packed(tensors, manifest["layers"], folder)
    _check_dense_keys(model, tensors, manifest, folder)
    model.load_state_dict(tensors, strict=False)
    _check_aliases(model, manifest.get("aliases", {}), folder)

    replacements = []
    for name, entry in manifest["layers"].items():
        module = model.get_submodule(name)  # existence checked by _check_dense_keys
        try:
            compressor = _layer_setting(entry, name, vcon_config).compressor()
            replacements.append((name, compressor.unpack(packed[name], module)))
        except (TypeError, ValueError) as error:
            raise IncompatibleCheckpointError(
                f"Layer {name!r} in {folder!r} does not match its {COMPACT_CONFIG_NAME}: {error}"
            ) from None
    for name, new in replacements:
        if new is not model.get_submodule(name):
            replace_module(model, name, new)
    return model.eval()


def _layer_setting(entry: dict, name: str, vcon_config: VConConfig) -> LayerSetting:
    """The layer's recorded method and options (format 2), or the config's setting for it (format 1)."""
    if "method" not in entry:
        return vcon_config.setting_for(name)
    return LayerSetting(entry["method"], build_options(entry["method"], dict(entry.get("options") or {})))


def _resolve_folder(path_or_repo_id: Union[str, os.PathLike], hub_kwargs: dict) -> str:
    path = os.fspath(path_or_repo_id)
    if os.path.isdir(path):
        return path
    from huggingface_hub import snapshot_download

    patterns = ["*.json", COMPACT_WEIGHTS_NAME]
    return snapshot_download(path, allow_patterns=patterns, **hub_kwargs)


def _read_manifest(folder: str) -> dict:
    file = os.path.join(folder, COMPACT_CONFIG_NAME)
    if not os.path.isfile(file):
        raise IncompatibleCheckpointError(
            f"No {COMPACT_CONFIG_NAME} in {folder!r}: it was not written by hf_vcon.save_compressed (a merged dense "
            "checkpoint loads with plain from_pretrained)."
        )
    with open(file, encoding="utf-8") as handle:
        manifest = json.load(handle)
    version = manifest.get("format_version")
    if manifest.get("format") != FORMAT_NAME or not isinstance(version, int):
        raise IncompatibleCheckpointError(f"{file!r} is not an {FORMAT_NAME} manifest (format={manifest.get('format')!r}).")
    if version > FORMAT_VERSION:
        raise IncompatibleCheckpointError(
            f"{file!r} has format_version {version}, written by hf_vcon {manifest.get('hf_vcon_version', '?')}; this "
            f"hf_vcon {__version__} reads up to version {FORMAT_VERSION}. Upgrade hf_vcon."
        )
    for key in ("vcon_config", "layers"):
        if not isinstance(manifest.get(key), dict):
            raise IncompatibleCheckpointError(f"{file!r} lacks its {key!r} section.")
    return manifest


def _take_packed(tensors: dict[str, torch.Tensor], layers: dict, folder: str) -> dict[str, dict[str, torch.Tensor]]:
    """Move each layer's packed tensors out of ``tensors``, checking them against the manifest."""
    packed: dict[str, dict[str, torch.Tensor]] = {}
    for name, entry in layers.items():
        packed[name] = {}
        for key, spec in entry["tensors"].items():
            full_key = f"{name}{PACKED_INFIX}{key}"
            if full_key not in tensors:
                raise IncompatibleCheckpointError(f"{COMPACT_WEIGHTS_NAME} in {folder!r} lacks tensor {full_key!r}.")
            value = tensors.pop(full_key)
            if list(value.shape) != spec["shape"] or _dtype_name(value) != spec["dtype"]:
                raise IncompatibleCheckpointError(
                    f"Tensor {full_key!r} in {folder!r} is {_dtype_name(value)} {list(value.shape)}, but "
                    f"{COMPACT_CONFIG_NAME} says {spec['dtype']} {spec['shape']}."
                )
            packed[name][key] = value
    stray = sorted(key for key in tensors if PACKED_INFIX in key)
    if stray:
        raise IncompatibleCheckpointError(
            f"{COMPACT_WEIGHTS_NAME} in {folder!r} has packed tensors no layer of {COMPACT_CONFIG_NAME} lists: {stray[:5]}."
        )
    return packed


def _check_dense_keys(model: nn.Module, tensors: dict[str, torch.Tensor], manifest: dict, folder: str) -> None:
    expected = model.state_dict()
    for name, entry in manifest["layers"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            module = None
        if not isinstance(module, nn.Module) or not hasattr(module, "weight") or module.weight.dim() != 2:
            raise IncompatibleCheckpointError(f"{COMPACT_CONFIG_NAME} in {folder!r} lists layer {name!r}, which the model lacks.")
        if list(linear_shape(module)) != entry["shape"] or type(module).__name__ != entry["module"]:
            raise IncompatibleCheckpointError(
                f"Layer {name!r} is a {type(module).__name__} of shape {list(linear_shape(module))} in the model "
                f"built from config.json, but {COMPACT_CONFIG_NAME} says {entry['module']} {entry['shape']}."
            )
        expected.pop(f"{name}.weight")
    for alias in manifest.get("aliases", {}):
        expected.pop(alias, None)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    wrong = sorted(key for key in set(expected) & set(tensors) if expected[key].shape != tensors[key].shape)
    if missing or extra or wrong:
        raise IncompatibleCheckpointError(
            f"{COMPACT_WEIGHTS_NAME} in {folder!r} does not match the model built from config.json: missing "
            f"{missing[:5]}, unexpected {extra[:5]}, wrong shape {wrong[:5]}."
        )


def _check_aliases(model: nn.Module, aliases: dict[str, str], folder: str) -> None:
    """Tied parameters were stored once; the model built from config.json must tie them again."""
    state = model.state_dict()
    for alias, source in aliases.items():
        if alias not in state or source not in state:
            raise IncompatibleCheckpointError(f"Tied tensor {alias!r} → {source!r} in {folder!r} is not in the model.")
        if state[alias].data_ptr() != state[source].data_ptr():
            with torch.no_grad():
                state[alias].copy_(state[source])
