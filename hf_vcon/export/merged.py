"""The merged compressed checkpoint: plain ``from_pretrained`` loads it, with no hf_vcon.

Two formats (``format=`` of :func:`save_merged`, ``export_format=`` of the trainer):

- ``"dense"``: every weight stored as a float tensor, C written in (zeros, ±α, q·s values): any transformers
  loads it, no other package needed; no smaller than the original.
- ``"compressed-tensors"``: the quantized layers (``quant``, ``binary``) stored as packed integers and scales
  (:mod:`hf_vcon.export.compressed_tensors`); ``from_pretrained`` loads it with the compressed-tensors package installed, vLLM
  serves it.
- ``"auto"`` (the default) is compressed-tensors when some compressed layer has integer weights, the model can be
  written in it (nn.Linear layers, no tied quantized head) and the package is installed; dense otherwise.

Everything here works from a state dict, so that FSDP / ZeRO-3 runs can pass the full state dict gathered on the
main process instead of the sharded tensors the modules hold.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from torch import nn

from ..compressors.structured.couplings import resized_config
from ..errors import VConError, VConWarning
from ..patching.state import require_state
from ..patching.summary import VConSummary, vcon_summary
from ..patching.tensors import config_changes, layer_tensors, replaced_keys
from ..utils.modules import unwrap_model
from ..utils.peft import ADAPTER_FOLDER, check_not_in_modules_to_save, is_peft_model, without_adapters
from . import compressed_tensors as export_ct
from .verify import load_problem

DENSE = "dense"
COMPRESSED_TENSORS = export_ct.FORMAT_NAME
AUTO = "auto"
EXPORT_FORMATS = (AUTO, COMPRESSED_TENSORS, DENSE)


def merged_state_dict(model: nn.Module, state_dict: Optional[dict[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """The state dict of ``merge_and_unload(model)`` without touching the model: keys of the base architecture,
    each targeted weight replaced by its compressed form (β = 0), smaller where the compression removes rows or
    columns (structured pruning; :func:`~hf_vcon.patching.tensors.config_changes` gives the config that fits it).

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
        tensors = list(layer_tensors(state, source))
        latent = {name: weight for name, _, weight, _ in tensors}  # coupled compressions read their group here
        for name, layer, weight, params in tensors:
            merged.update(layer.merged_state(name, weight, params, merged, latent))
    return merged


def check_export_format(export_format: Any, field: str = "export_format") -> None:
    """Raise ``ValueError`` unless ``export_format`` is one of :data:`EXPORT_FORMATS`."""
    if export_format not in EXPORT_FORMATS:
        raise ValueError(f"{field}={export_format!r} is not known; use one of: {', '.join(EXPORT_FORMATS)}.")


def resolve_export_format(model: nn.Module, export_format: str = AUTO, *, warn: bool = True,
                          before_training: bool = False) -> str:
    """The format :func:`save_merged` writes for ``model``: ``"dense"`` or ``"compressed-tensors"``; with
    ``before_training``, the format it will write once trained (static input scales not yet observed are no obstacle:
    every training forward observes them).

    Raises:
        ValueError: for an unknown ``export_format``.
        VConError: for ``"compressed-tensors"`` when the model cannot be written in it (no integer layers, GPT-2
            style Conv1D layers, a tied quantized head) or the package is missing, naming the extra to install; for
            any format, when a VCON layer sits in a PEFT ``modules_to_save`` wrapper (no export can be right).
    """
    check_export_format(export_format)
    inner = unwrap_model(model)
    state = require_state(inner, "save_merged")
    check_not_in_modules_to_save(inner, state.targeted_module_names)
    if export_format == DENSE:
        return DENSE
    problems = export_ct.blockers(inner, state, before_training=before_training)
    if export_format == COMPRESSED_TENSORS:
        if problems:
            raise VConError(f"export_format='{COMPRESSED_TENSORS}' cannot write this model: {'; '.join(problems)}. "
                            "Use export_format='dense'.")
        export_ct.require_library()
        return COMPRESSED_TENSORS
    if problems:
        if warn and export_ct.integer_layer_names(state):
            warnings.warn(f"Saving the merged model dense: {'; '.join(problems)}.", VConWarning, stacklevel=3)
        return DENSE
    if not export_ct.is_available():
        if warn:
            warnings.warn(
                f"The quantized layers will be saved dense (float weights, no smaller): the {COMPRESSED_TENSORS} "
                f"format needs the compressed-tensors package (pip install '{export_ct.EXTRA}'). Pass "
                "export_format='dense' to silence this.", VConWarning, stacklevel=3)
        return DENSE
    return COMPRESSED_TENSORS
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
    *,
    format: str = AUTO,
    **save_kwargs: Any,
) -> VConSummary:
    """Write the merged compressed model (safetensors + ``config.json``) and ``vcon_config.json`` to ``output_dir``.

    The patched model itself is left as it is (training can go on); where the compression changes the model's sizes
    (structured pruning), ``config.json`` says the new ones. A ``peft.PeftModel`` writes its compressed base model
    there and its adapters to ``output_dir/adapter`` (load: ``PeftModel.from_pretrained(AutoModel…
    .from_pretrained(output_dir), output_dir + "/adapter")``).

    Args:
        model: a model patched by :func:`hf_vcon.apply_vcon` (possibly wrapped).
        output_dir: the folder to write.
        state_dict: the model's full state dict, when its modules hold only shards (FSDP, ZeRO-3).
        format: ``"auto"`` (default), ``"dense"`` or ``"compressed-tensors"`` (see this module's docstring).
        save_kwargs: passed to ``save_pretrained`` (``max_shard_size``, ``safe_serialization``…).

    Returns:
        The summary of the compression.

    Raises:
        VConError: if ``format="compressed-tensors"`` cannot be written (checked before anything is written).

    Example:
        >>> import tempfile, json, os
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from hf_vcon import VConConfig, apply_vcon, save_merged
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
        ...                                      num_hidden_layers=1, num_attention_heads=2))
        >>> model = apply_vcon(model, VConConfig(method="quant", bits=4, transition_steps=0))
        >>> folder = tempfile.mkdtemp()
        >>> _ = save_merged(model, folder, format="compressed-tensors")
        >>> json.load(open(os.path.join(folder, "config.json")))["quantization_config"]["format"]
        'pack-quantized'
    """
    check_export_format(format, "format")
    inner = unwrap_model(model)
    state = require_state(inner, "save_merged")
    resolved = resolve_export_format(inner, format)
    source = state_dict if state_dict is not None else inner.state_dict()
    merged = merged_state_dict(inner, source)
    with _config_of_merged_model(inner, config_changes(state)):
        if resolved == COMPRESSED_TENSORS:
            resolved = _save_verified_compressed_tensors(inner, state, output_dir, source, merged, explicit=format ==
                                                         COMPRESSED_TENSORS, **save_kwargs)
        if resolved == DENSE:
            inner.save_pretrained(output_dir, state_dict=merged, **save_kwargs)
    state.config.save_pretrained(output_dir)
    if is_peft_model(model):  # the adapters apart, on the compressed base: PeftModel.from_pretrained(base, adapter/)
        model.save_pretrained(os.path.join(output_dir, ADAPTER_FOLDER))
    return vcon_summary(inner, without_adapters(inner, source))


def _save_verified_compressed_tensors(model: nn.Module, state, output_dir: str, source: dict, merged: dict, *,
                                     explicit: bool, **save_kwargs: Any) -> str:
    """Write the compressed-tensors folder apart, check that plain transformers loads it back to ``merged``
    (:func:`~hf_vcon.export.verify.load_problem`) and only then move it to ``output_dir``. The format the folder
    holds is returned: ``"dense"`` when the check failed under ``"auto"`` (nothing written yet; warned, naming why).

    Raises:
        VConError: when the check fails under an explicit ``"compressed-tensors"`` (nothing written).
    """
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent, prefix=".hf_vcon-") as folder:
        export_ct.save_compressed_tensors(model, state, folder, source, merged, **save_kwargs)
        with export_ct.one_process():  # only this process saves: the others are not there to join a collective
            problem = load_problem(export_ct.architecture_class(model), folder, merged)
        if problem is None:
            os.makedirs(output_dir, exist_ok=True)
            for file in os.listdir(folder):
                shutil.move(os.path.join(folder, file), os.path.join(output_dir, file))
            return COMPRESSED_TENSORS
    reason = f"the {COMPRESSED_TENSORS} checkpoint of this {type(model).__name__} does not load back: {problem}"
    if explicit:
        raise VConError(f"export_format='{COMPRESSED_TENSORS}' cannot write this model: {reason}. Use "
                        "export_format='dense'.")
    warnings.warn(f"Saving the merged model dense: {reason}.", VConWarning, stacklevel=4)
    return DENSE


def written_format(output_dir: str) -> str:
    """The format of the merged checkpoint in ``output_dir``: ``"compressed-tensors"`` when its ``config.json`` has a
    compressed-tensors ``quantization_config``, ``"dense"`` otherwise."""
    with open(os.path.join(output_dir, "config.json"), encoding="utf-8") as handle:
        entry = json.load(handle).get("quantization_config") or {}
    return COMPRESSED_TENSORS if entry.get("quant_method") == "compressed-tensors" else DENSE


def stored_sizes(output_dir: str, layer_names: list[str], model: Optional[nn.Module] = None) -> tuple[int, int]:
    """Bytes of the tensors of ``layer_names`` (weights, packed codes, scales…) and of all tensors, as stored in the
    safetensors files of ``output_dir`` (read from their headers). With ``model``, the layers are also found under
    the names transformers 5 saves them with where it writes an older layout (ViT's ``encoder.layer.0.attention.
    attention.query`` for ``layers.0.attention.q_proj``)."""
    from safetensors import safe_open

    itemsize = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1}
    names = set(layer_names) | (set(checkpoint_names(model, layer_names)) if model is not None else set())
    prefixes = tuple(f"{name}." for name in names)  # a module, or a weight (experts)
    targeted = total = 0
    for file in sorted(os.listdir(output_dir)):
        if not file.endswith(".safetensors"):
            continue
        with safe_open(os.path.join(output_dir, file), framework="pt") as handle:
            for key in handle.keys():
                view = handle.get_slice(key)
                size = itemsize[view.get_dtype()]
                for dimension in view.get_shape():
                    size *= dimension
                total += size
                if (key in names or key.startswith(prefixes)) and key.rsplit(".", 1)[-1] != "bias":
                    targeted += size
    return targeted, total


def checkpoint_names(model: nn.Module, layer_names: list[str]) -> list[str]:
    """The names transformers 5's ``save_pretrained`` stores the weights of ``layer_names`` under where it reverts the
    model's weight conversions (renamed modules, fused experts split per expert); ``layer_names`` where it does not."""
    inner = unwrap_model(model)
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4.x: only vision-language models are saved under other names
        return [_legacy_name(inner, name) for name in layer_names]
    layers = _layers_by_name(inner)
    # Shapes without data: the conversions split and rename tensors, they never read them.
    probe = {layers[name].merged_key(name): torch.empty(tuple(layers[name].weight.shape), device="meta")
             for name in layer_names if name in layers}
    try:
        reverted = revert_weight_conversion(inner, probe)
    except Exception:  # a conversion that needs tensors beside the targeted ones: the model's own names
        return list(layer_names)
    return [key.removesuffix(".weight") for key in reverted]


def _legacy_name(model: nn.Module, name: str) -> str:
    """``name`` as transformers 4.x saves it: its ``_checkpoint_conversion_mapping`` reversed, the first pattern
    that matches applied (as its ``save_pretrained`` does)."""
    for pattern, replacement in {value: key for key, value in
                                 (getattr(model, "_checkpoint_conversion_mapping", None) or {}).items()}.items():
        renamed, count = re.subn(pattern, re.sub(r"\(.*\)", "", replacement.lstrip("^")), name)
        if count:
            return renamed
    return name


def _layers_by_name(model: nn.Module) -> dict[str, nn.Module]:
    state = require_state(model, "stored_sizes")
    return dict(zip(state.targeted_module_names, state.layers))
