"""The model card of a VCON-compressed model: what was compressed, how, over how many steps, and how well it does."""

from __future__ import annotations

import os
import platform
from typing import Optional

import torch
from torch import nn

from .state import require_state, unwrap_model
from .summary import VConSummary
from .version import __version__


def _framework_versions() -> dict[str, str]:
    versions = {"hf_vcon": __version__, "PyTorch": torch.__version__, "Python": platform.python_version()}
    for package in ("transformers", "accelerate", "datasets", "peft"):
        try:
            versions[package] = __import__(package).__version__
        except ImportError:
            pass
    return versions


def _setting_text(setting) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in setting.to_dict().items())


def _compression_rows(config, summary: VConSummary, base_model: Optional[str], transition_steps: Optional[int]) -> list[str]:
    q_text = f"{config.transition_steps}" + (f" ({transition_steps} optimizer steps)" if transition_steps is not None else "")
    rows = [
        "| | |",
        "|---|---|",
        f"| base model | {base_model or 'unknown'} |",
        f"| method | {', '.join(summary.methods) or config.method} |",
        f"| setting | {', '.join(summary.settings)} |",
        f"| options | {_setting_text(config.setting)} |",
    ]
    rows += [f"| module_overrides `{pattern}` | {_setting_text(setting)} |" for pattern, setting in config.override_settings]
    rows += [
        f"| transition Q | {q_text} |",
        f"| schedule | {config.schedule} (start step {config.start_step}) |",
        f"| target modules | {config.target_modules!r} (exclude {config.exclude_modules!r}) |",
        f"| targeted layers | {len(summary.layers)} |",
        f"| parameters of targeted layers | {summary.params_before:,} → {summary.params_after:,} |",
        f"| bytes of targeted layers (compact encoding) | {summary.bytes_before:,} → {summary.bytes_after:,} "
        f"({summary.size_ratio:.4f}×) |",
    ]
    return rows


def _format_lines(model: nn.Module, export_format: str, summary: VConSummary,
                  stored_bytes: Optional[tuple[int, int]]) -> list[str]:
    """The checkpoint's format, how to load it, and its measured sizes."""
    model_class = type(model).__name__
    if export_format == "compressed-tensors":
        lines = [
            "compressed-tensors (`quant_method: compressed-tensors`, `format: pack-quantized`): the quantized layers are "
            "stored as packed integer codes with their scales (`weight_packed`, `weight_scale`, `weight_shape`), every "
            "other tensor dense. Load it with the compressed-tensors package installed (no hf_vcon needed):",
            "",
            "```python",
            "# pip install compressed-tensors",
            f"from transformers import {model_class}",
            f'model = {model_class}.from_pretrained("<this repo or folder>", dtype="auto")  # before transformers 4.56: torch_dtype="auto"',
            "```",
            "",
            "vLLM serves such checkpoints (`vllm serve <repo>`) with its weight-only kernels for 4 and 8 bits with "
            "channel or group scales; other widths and per-tensor scales load in transformers only.",
        ]
    else:
        lines = [
            "dense: every weight is a float tensor with the compressed values written in (zeros, ±α, q·s), so any "
            f"`{model_class}.from_pretrained` loads it with no other package; it is no smaller than the original.",
        ]
    if stored_bytes is not None:
        targeted, total = stored_bytes
        lines += ["", "| measured | bytes |", "|---|---|",
                  f"| weights files (all tensors) | {total:,} |",
                  f"| targeted layers as stored | {targeted:,} ({targeted / max(summary.bytes_before, 1):.4f}× their "
                  f"dense {summary.bytes_before:,}) |"]
    return lines


def model_card(
    model: nn.Module,
    summary: VConSummary,
    transition_steps: Optional[int] = None,
    metrics: Optional[dict[str, float]] = None,
    model_name: Optional[str] = None,
    extra_tags: Optional[list[str]] = None,
    export_format: Optional[str] = None,
    stored_bytes: Optional[tuple[int, int]] = None,
) -> str:
    """A Hugging Face model card (``README.md`` text with YAML metadata) for a merged VCON model.

    It states the base model, the method and its options (and every ``module_overrides`` entry), Q and schedule,
    the layers per setting with their sizes before → after, the evaluation metrics and the framework versions;
    tags ``hf_vcon``, ``vcon`` and the methods. With ``export_format`` (``"dense"`` or ``"compressed-tensors"``)
    it says how the weights are stored and how to load them, with ``stored_bytes`` (targeted layers, all tensors)
    as measured in the files.
    """
    from huggingface_hub import ModelCard, ModelCardData

    inner = unwrap_model(model)
    config = require_state(inner, "model_card").config
    base_model = getattr(getattr(inner, "config", None), "_name_or_path", None) or None
    format_tags = ["compressed-tensors"] if export_format == "compressed-tensors" else []
    tags = list(dict.fromkeys(["hf_vcon", "vcon", *summary.methods, "compression", *format_tags, *(extra_tags or [])]))
    card_data = ModelCardData(
        base_model=base_model if base_model and not os.path.isdir(base_model) else None,
        library_name="transformers",
        tags=tags,
        model_name=model_name,
    )
    lines = [
        f"# {model_name or 'VCON-compressed model'}",
        "",
        f"This model was compressed with hf_vcon using Vanishing Contributions (VCON, "
        f"[arXiv 2510.09696](https://arxiv.org/abs/2510.09696)): each targeted layer blended its original and "
        f"compressed forms as β·f(x) + (1−β)·g(x) while fine-tuning, β going from 1 to 0. The weights here are the "
        f"compressed model (β = 0); `from_pretrained` loads them without hf_vcon.",
        "",
        "## Compression",
        "",
        *_compression_rows(config, summary, base_model, transition_steps),
    ]
    lines += ["", "Layers per setting:", "", summary.table(), ""]
    if export_format is not None:
        lines += ["## Checkpoint format", "", *_format_lines(inner, export_format, summary, stored_bytes), ""]
    lines += ["## Evaluation", ""]
    if metrics:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {key} | {value:.6g} |" if isinstance(value, float) else f"| {key} | {value} |" for key, value in sorted(metrics.items())]
    else:
        lines.append("No evaluation was run.")
    lines += ["", "## Framework versions", ""]
    lines += [f"- {name} {version}" for name, version in _framework_versions().items()]
    return str(ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"))
