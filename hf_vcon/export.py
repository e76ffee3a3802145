"""Export: the merged compressed checkpoint (plain ``from_pretrained`` loads it) and its model card.

Everything here works from a state dict, so that FSDP / ZeRO-3 runs can pass the full state dict gathered on the
main process instead of the sharded tensors the modules hold.
"""

from __future__ import annotations

import os
import platform
from typing import Any, Iterator, Optional

import torch
from torch import nn

from .model import VConState, get_beta, require_state, unwrap_model
from .summary import LayerSummary, VConSummary
from .version import __version__

WRAPPER_KEY_PARTS = (".base_layer.", ".vcon_", ".base_block.")


def is_vcon_key(key: str) -> bool:
    """True for state-dict keys that only a VCON-patched model has (``….base_layer.…``, ``….vcon_…``, and
    block-wise ``….base_block.…`` / ``….vcon_block.…``)."""
    return any(part in key for part in WRAPPER_KEY_PARTS)


def layer_wise_state_dict(state: VConState, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A block-wise state dict in layer-wise form: each block's g under the block's own name, f dropped."""
    if not state.blocks:
        return dict(state_dict)
    from .blocks import compressed_blocks_state_dict

    return compressed_blocks_state_dict(state, state_dict)


def _layer_tensors(state: VConState, state_dict: dict[str, torch.Tensor]) -> Iterator[tuple[str, Any, torch.Tensor, dict]]:
    """(name, layer, W ``(out, in)``, compressed params) of every VCON layer, read from ``state_dict``."""
    for name, layer in zip(state.targeted_module_names, state.layers):
        weight = state_dict[f"{name}.base_layer.weight"]
        params = {key: state_dict[f"{name}.vcon_{key}"] for key in layer.compressed_params()}
        yield name, layer, (weight.t() if layer.is_conv1d else weight), params


def merged_state_dict(model: nn.Module, state_dict: Optional[dict[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """The state dict of ``merge_and_unload(model)`` without touching the model: keys of the base architecture,
    each targeted weight replaced by its compressed form (β = 0).

    Args:
        model: a model patched by :func:`hf_vcon.apply_vcon` (possibly inside DDP/FSDP wrappers).
        state_dict: the model's full state dict, when the modules hold only shards (FSDP, ZeRO-3); defaults
            to ``model.state_dict()``.
    """
    state = require_state(model, "merged_state_dict")
    source = layer_wise_state_dict(state, state_dict if state_dict is not None else unwrap_model(model).state_dict())
    merged = {key: value for key, value in source.items() if not is_vcon_key(key)}
    with torch.no_grad():
        for name, layer, weight, params in _layer_tensors(state, source):
            compressed = layer.compressor.compressed_weight(weight, params)
            merged[f"{name}.weight"] = (compressed.t() if layer.is_conv1d else compressed).contiguous()
            if f"{name}.base_layer.bias" in source:
                merged[f"{name}.bias"] = source[f"{name}.base_layer.bias"]
    return merged


def summary_from_state_dict(model: nn.Module, state_dict: Optional[dict[str, torch.Tensor]] = None) -> VConSummary:
    """:func:`hf_vcon.vcon_summary` computed from a (full) state dict instead of the modules."""
    state = require_state(model, "summary_from_state_dict")
    source = layer_wise_state_dict(state, state_dict if state_dict is not None else unwrap_model(model).state_dict())
    layers = tuple(
        LayerSummary(name=name, shape=tuple(weight.shape), stats=layer.compressor.stats(weight, params))
        for name, layer, weight, params in _layer_tensors(state, source)
    )
    return VConSummary(method=state.config.method, beta=get_beta(model), layers=layers)


def save_merged(
    model: nn.Module,
    output_dir: str,
    state_dict: Optional[dict[str, torch.Tensor]] = None,
    **save_kwargs: Any,
) -> VConSummary:
    """Write the merged compressed model (safetensors + ``config.json``) and ``vcon_config.json`` to ``output_dir``.

    The patched model itself is left as it is (training can go on). Returns the summary of the compression.
    """
    inner = unwrap_model(model)
    state = require_state(inner, "save_merged")
    source = state_dict if state_dict is not None else inner.state_dict()
    inner.save_pretrained(output_dir, state_dict=merged_state_dict(inner, source), **save_kwargs)
    state.config.save_pretrained(output_dir)
    return summary_from_state_dict(inner, source)


# ------------------------------------------------------------------------------------------- model card
def _framework_versions() -> dict[str, str]:
    versions = {"hf_vcon": __version__, "PyTorch": torch.__version__, "Python": platform.python_version()}
    for package in ("transformers", "accelerate", "datasets", "peft"):
        try:
            versions[package] = __import__(package).__version__
        except ImportError:
            pass
    return versions


def model_card(
    model: nn.Module,
    summary: VConSummary,
    transition_steps: Optional[int] = None,
    metrics: Optional[dict[str, float]] = None,
    model_name: Optional[str] = None,
    extra_tags: Optional[list[str]] = None,
) -> str:
    """A Hugging Face model card (``README.md`` text with YAML metadata) for a merged VCON model.

    It states the base model, method and setting, Q and schedule, the parameter count and bytes of the targeted
    layers before → after, the evaluation metrics and the framework versions; tags ``hf_vcon``, ``vcon`` and the
    method.
    """
    from huggingface_hub import ModelCard, ModelCardData

    inner = unwrap_model(model)
    config = require_state(inner, "model_card").config
    base_model = getattr(getattr(inner, "config", None), "_name_or_path", None) or None
    tags = list(dict.fromkeys(["hf_vcon", "vcon", config.method, "compression", *(extra_tags or [])]))
    card_data = ModelCardData(
        base_model=base_model if base_model and not os.path.isdir(base_model) else None,
        library_name="transformers",
        tags=tags,
        model_name=model_name,
    )
    q_text = f"{config.transition_steps}" + (f" ({transition_steps} optimizer steps)" if transition_steps is not None else "")
    lines = [
        f"# {model_name or 'VCON-compressed model'}",
        "",
        f"This model was compressed with hf_vcon using Vanishing Contributions (VCON, "
        f"[arXiv 2510.09696](https://arxiv.org/abs/2510.09696)): each targeted layer blended its original and "
        f"compressed forms as β·f(x) + (1−β)·g(x) while fine-tuning, β going from 1 to 0. The weights here are the "
        f"compressed model (β = 0), stored densely so that `from_pretrained` loads them without hf_vcon.",
        "",
        "## Compression",
        "",
        "| | |",
        "|---|---|",
        f"| base model | {base_model or 'unknown'} |",
        f"| method | {config.method} |",
        f"| setting | {', '.join(summary.settings)} |",
        f"| transition Q | {q_text} |",
        f"| schedule | {config.schedule} (start step {config.start_step}) |",
        f"| target modules | {config.target_modules!r} (exclude {config.exclude_modules!r}) |",
        f"| targeted layers | {len(summary.layers)} |",
        f"| parameters of targeted layers | {summary.params_before:,} → {summary.params_after:,} |",
        f"| bytes of targeted layers (compact encoding) | {summary.bytes_before:,} → {summary.bytes_after:,} "
        f"({summary.bytes_after / max(summary.bytes_before, 1):.4f}×) |",
        "",
        "## Evaluation",
        "",
    ]
    if metrics:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {key} | {value:.6g} |" if isinstance(value, float) else f"| {key} | {value} |" for key, value in sorted(metrics.items())]
    else:
        lines.append("No evaluation was run.")
    lines += ["", "## Framework versions", ""]
    lines += [f"- {name} {version}" for name, version in _framework_versions().items()]
    return str(ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"))
