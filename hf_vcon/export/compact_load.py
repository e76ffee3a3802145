"""Loading the compact format of :mod:`hf_vcon.export.compact_save` back into a plain inference model (no VCON layers)."""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Union

import torch
from torch import nn

from ..config.settings import LayerSetting, build_options
from ..config.vcon_config import VConConfig
from ..errors import IncompatibleCheckpointError
from ..utils.linears import linear_shape
from ..utils.modules import replace_module
from ..version import __version__
from .compact_save import (
    COMPACT_CONFIG_NAME,
    COMPACT_WEIGHTS_NAME,
    FORMAT_NAME,
    FORMAT_VERSION,
    PACKED_INFIX,
    dtype_name,
)
from .files import architecture_class


def _build_model(model_class: type, config: Any, dtype: Optional[str]) -> nn.Module:
    """The model from ``config`` in the dtype it was saved in, as ``from_pretrained(..., dtype=…)`` builds it
    (buffers such as rotary frequencies stay float32)."""
    if dtype is None:  # format 1 wrote no dtype
        return model_class(config)
    try:
        return model_class._from_config(config, dtype=getattr(torch, dtype))  # transformers 5
    except TypeError:
        return model_class._from_config(config, torch_dtype=getattr(torch, dtype))  # transformers 4




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
    model_class = architecture_class(config, folder)
    weights_file = os.path.join(folder, manifest.get("weights", COMPACT_WEIGHTS_NAME))
    if not os.path.isfile(weights_file):
        raise IncompatibleCheckpointError(f"{COMPACT_CONFIG_NAME} in {folder!r} names {weights_file!r}, which is missing.")
    tensors = load_file(weights_file)
    model = _build_model(model_class, config, manifest.get("dtype"))

    packed = _take_packed(tensors, manifest["layers"], folder)
    _check_dense_keys(model, tensors, manifest, folder)
    model.load_state_dict(tensors, strict=False)
    _check_aliases(model, manifest.get("aliases", {}), folder)

    for name, entry in manifest["layers"].items():
        try:
            compressor = _layer_setting(entry, name, vcon_config).compressor()
            if entry.get("kind", "linear") == "linear":
                _unpack_linear(model, name, compressor, packed[name])
            else:
                _unpack_weight(model, name, entry, compressor, packed[name])
        except (TypeError, ValueError) as error:
            raise IncompatibleCheckpointError(
                f"Layer {name!r} in {folder!r} does not match its {COMPACT_CONFIG_NAME}: {error}"
            ) from None
    return model.eval()


def _unpack_linear(model: nn.Module, name: str, compressor, packed: dict) -> None:
    """A Linear/Conv1D rebuilt by the compressor (the same module with C written in, or a factored one)."""
    module = model.get_submodule(name)
    new = compressor.unpack(packed, module)
    if new is not module:
        replace_module(model, name, new)


def _unpack_weight(model: nn.Module, name: str, entry: dict, compressor, packed: dict) -> None:
    """A parameter (an expert weight: slice by slice) with C written in."""
    parameter = getattr(model.get_submodule(_owner_name(name, entry)), entry["param"])
    out_features, in_features = entry["shape"]
    if entry.get("experts") is None:
        weight = compressor.unpacked_weight(packed, out_features, in_features)
    else:
        slices = [{key.split(".", 1)[1]: value for key, value in packed.items() if key.split(".", 1)[0] == str(index)}
                  for index in range(entry["experts"])]
        weight = torch.stack([compressor.unpacked_weight(part, out_features, in_features) for part in slices])
    with torch.no_grad():
        parameter.copy_(weight.transpose(-1, -2) if entry.get("transposed") else weight)


def _owner_name(name: str, entry: dict) -> str:
    suffix = f".{entry['param']}"
    return name[: -len(suffix)] if name.endswith(suffix) else name


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
            if list(value.shape) != spec["shape"] or dtype_name(value) != spec["dtype"]:
                raise IncompatibleCheckpointError(
                    f"Tensor {full_key!r} in {folder!r} is {dtype_name(value)} {list(value.shape)}, but "
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
        expected.pop(_check_layer_entry(model, name, entry, folder))
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


def _check_layer_entry(model: nn.Module, name: str, entry: dict, folder: str) -> str:
    """Raise unless the model built from config.json has what the manifest lists for ``name``; return its key."""
    linear = entry.get("kind", "linear") == "linear"
    owner_name = name if linear else _owner_name(name, entry)
    try:
        owner = model.get_submodule(owner_name)
    except AttributeError:
        owner = None
    param = getattr(owner, "weight" if linear else entry["param"], None) if owner is not None else None
    if not isinstance(param, torch.Tensor) or param.dim() != (3 if entry.get("experts") else 2):
        raise IncompatibleCheckpointError(f"{COMPACT_CONFIG_NAME} in {folder!r} lists layer {name!r}, which the model lacks.")
    if linear:
        found, recorded = (type(owner).__name__, list(linear_shape(owner))), (entry["module"], entry["shape"])
    else:
        expected = [entry["experts"]] if entry.get("experts") else []
        expected += entry["shape"][::-1] if entry.get("transposed") else entry["shape"]
        found, recorded = ("parameter", list(param.shape)), ("parameter", expected)
    if found != recorded:
        raise IncompatibleCheckpointError(
            f"Layer {name!r} is a {found[0]} of shape {found[1]} in the model built from config.json, but "
            f"{COMPACT_CONFIG_NAME} says {recorded[0]} {recorded[1]}."
        )
    return f"{owner_name}.{'weight' if linear else entry['param']}"


def _check_aliases(model: nn.Module, aliases: dict[str, str], folder: str) -> None:
    """Tied parameters were stored once; the model built from config.json must tie them again."""
    state = model.state_dict()
    for alias, source in aliases.items():
        if alias not in state or source not in state:
            raise IncompatibleCheckpointError(f"Tied tensor {alias!r} → {source!r} in {folder!r} is not in the model.")
        if state[alias].data_ptr() != state[source].data_ptr():
            with torch.no_grad():
                state[alias].copy_(state[source])
