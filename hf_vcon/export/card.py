"""The model card of a VCON-compressed model: what was compressed, how, over how many steps, on what budget, how
well it does, and how to load it."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import nn

from ..compressors.structured.couplings import resized_config
from ..patching.state import require_state
from ..patching.summary import VConSummary
from ..patching.tensors import config_changes
from ..utils.modules import unwrap_model
from ..version import __version__

# Task heads a card can name in its loading snippet, most specific first (transformers' auto classes).
_AUTO_CLASSES = (
    ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForImageClassification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForTokenClassification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForQuestionAnswering", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES"),
    ("AutoModelForSeq2SeqLM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
    ("AutoModel", "MODEL_MAPPING_NAMES"),
)


def _tuple(value: Union[str, list[str], tuple, None]) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


@dataclass
class CardDetails:
    """What a card says besides the compression: the fields of ``Trainer.create_model_card`` and the run.

    Args:
        finetuned_from: the base model (a Hub id becomes the card's ``base_model``).
        tasks: task identifiers; the first is the card's ``pipeline_tag``.
        dataset_tags: Hub dataset ids (the card's ``datasets``).
        dataset: the datasets' readable names; dataset_args: their configurations (``sst2``).
        language, license: as in the card metadata.
        repo_id: where the model will be loaded from, for the snippet (a Hub repo, else the folder's name).
        training: rows of the training budget (steps, batch, learning rate…).
        steps_trained: the optimizer steps the run made.
        evaluated_step: the step of the evaluation whose metrics the card shows.
        evaluated_compressed: whether those metrics are the compressed (saved) model's.
        comparison: a Markdown table of other arms (dense, post-shot) trained alongside.
        export_format: how the folder stores the weights (``"dense"`` or ``"compressed-tensors"``), if it holds them.
        stored_bytes: (targeted layers, all tensors) as measured in the folder's safetensors files.
    """

    finetuned_from: Optional[str] = None
    tasks: tuple[str, ...] = ()
    dataset_tags: tuple[str, ...] = ()
    dataset: tuple[str, ...] = ()
    dataset_args: tuple[str, ...] = ()
    language: Union[str, list[str], None] = None
    license: Optional[str] = None
    repo_id: Optional[str] = None
    training: dict[str, str] = field(default_factory=dict)
    steps_trained: Optional[int] = None
    evaluated_step: Optional[int] = None
    evaluated_compressed: bool = True
    comparison: Optional[str] = None
    export_format: Optional[str] = None
    stored_bytes: Optional[tuple[int, int]] = None

    @classmethod
    def from_trainer_fields(cls, finetuned_from=None, tasks=None, dataset_tags=None, dataset=None, dataset_args=None,
                            language=None, license=None, **others: Any) -> "CardDetails":
        """From the keywords of ``Trainer.create_model_card`` (strings or lists), plus any field of this class."""
        return cls(finetuned_from=finetuned_from, tasks=_tuple(tasks), dataset_tags=_tuple(dataset_tags),
                   dataset=_tuple(dataset), dataset_args=_tuple(dataset_args), language=language, license=license,
                   **others)


def _framework_versions() -> dict[str, str]:
    versions = {"hf_vcon": __version__, "PyTorch": torch.__version__, "Python": platform.python_version()}
    for package in ("transformers", "accelerate", "datasets", "peft"):
        try:
            versions[package] = __import__(package).__version__
        except ImportError:
            pass
    return versions


def auto_class_name(model: nn.Module) -> str:
    """The transformers auto class that loads ``model``'s class (``AutoModelForSequenceClassification``…), else the
    class's own name."""
    class_name, model_type = type(model).__name__, getattr(getattr(model, "config", None), "model_type", None)
    try:
        from transformers.models.auto import modeling_auto
    except ImportError:
        return class_name
    for auto_name, mapping in _AUTO_CLASSES:
        names = getattr(modeling_auto, mapping, {}).get(model_type)
        if class_name in ((names,) if isinstance(names, str) else tuple(names or ())):
            return auto_name
    return class_name


def _hub_id(name: Optional[str]) -> Optional[str]:
    return name if name and not os.path.isdir(name) and not os.path.isabs(name) else None


def _setting_text(setting) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in setting.to_dict().items())


def _transition_rows(config, transition_steps: Optional[int], steps_trained: Optional[int]) -> list[str]:
    if transition_steps == 0 or config.transition_steps == 0:
        return [f"| transition | none: post-shot, compressed from step {config.start_step} on (Q = 0) |"]
    steps = f" ({transition_steps} optimizer steps)" if transition_steps is not None else ""
    q_text = f"{config.transition_steps}{steps}"
    rows = [f"| transition Q | {q_text} |", f"| schedule | {config.schedule} (start step {config.start_step}) |"]
    end = None if transition_steps is None else config.start_step + transition_steps
    if end is not None and steps_trained is not None and steps_trained < end:
        rows.append(f"| **unfinished** | training stopped at step {steps_trained}, before the transition's end (step "
                    f"{end}): this model is the compressed model (β = 0), which training never ran as such |")
    return rows


def _compression_rows(config, summary: VConSummary, base_model: Optional[str], transition_steps: Optional[int],
                      steps_trained: Optional[int]) -> list[str]:
    rows = [
        "| | |",
        "|---|---|",
        f"| base model | {base_model or 'none given (trained from a config?)'} |",
        f"| method | {', '.join(summary.methods) or config.method} |",
        f"| setting | {', '.join(summary.settings)} |",
        f"| options | {_setting_text(config.setting)} |",
    ]
    rows += [f"| module_overrides `{pattern}` | {_setting_text(setting)} |"
             for pattern, setting in config.override_settings]
    rows += _transition_rows(config, transition_steps, steps_trained)
    rows += [
        f"| target modules | {config.target_modules!r} (exclude {config.exclude_modules!r}) |",
        f"| targeted layers | {len(summary.layers)} |",
        f"| parameters of targeted layers | {summary.params_before:,} → {summary.params_after:,} |",
        f"| bytes of targeted layers (compact encoding) | {summary.bytes_before:,} → {summary.bytes_after:,} "
        f"({summary.size_ratio:.4f}×) |",
    ]
    return rows


def _parameter_count(model: nn.Module, config) -> Optional[int]:
    """The parameters of ``model``'s class built from ``config`` (on the meta device: no memory, no time)."""
    try:
        with torch.device("meta"):
            return sum(param.numel() for param in type(model)._from_config(config).parameters())
    except (AttributeError, TypeError, ValueError, RuntimeError):  # a class transformers cannot build from a config
        return None


def _size_rows(model: nn.Module, state) -> list[str]:
    """Where the compression makes the model smaller (structured pruning): its config sizes and parameters before →
    after, and the speedup measured when it was saved."""
    changes = config_changes(state)
    if not changes:
        return []
    rows = [f"| {key} | {getattr(model.config, key, None) or 'default'} → {value} |" for key, value in changes.items()]
    before, after = _parameter_count(model, model.config), _parameter_count(model, resized_config(model.config, changes))
    if before and after:
        rows.append(f"| parameters of the model | {before:,} → {after:,} ({after / before:.3f}×) |")
    speedup = state.measured_speedup
    rows.append(f"| measured speedup | {speedup if speedup else 'not measured'} |")
    return rows


def _usage_lines(model: nn.Module, repo_id: str, export_format: Optional[str]) -> list[str]:
    auto = auto_class_name(model)
    if export_format == "compressed-tensors":
        return ["## How to use", "", "No hf_vcon is needed: transformers loads the packed weights with the "
                "compressed-tensors package installed.", "", "```python", "# pip install compressed-tensors",
                f"from transformers import {auto}", "",
                f"model = {auto}.from_pretrained({repo_id!r}, dtype=\"auto\")  # transformers < 4.56: torch_dtype=",
                "```", "", *_scheme_lines(model, repo_id)]
    return ["## How to use", "", "No hf_vcon is needed: the folder is a plain transformers checkpoint.", "",
            "```python", f"from transformers import {auto}", "", f"model = {auto}.from_pretrained({repo_id!r})", "```"]


def _scheme_lines(model: nn.Module, repo_id: str) -> list[str]:
    """The quantization schemes of the checkpoint and how vLLM serves them."""
    schemes = sorted({_scheme_name(setting) for setting in require_state(model, "model_card").settings if setting.method == "quant"})
    named = f"Quantization scheme{'s' if len(schemes) > 1 else ''}: {', '.join(schemes)}. " if schemes else ""
    return [named + f"vLLM serves it (`vllm serve {repo_id}`): int4/int8 weight-only (W4A16, W8A16) with channel or "
            "group scales, W8A8 (INT8 or FP8_DYNAMIC, activations quantized per token at run time), FP8 (a static "
            "input scale per layer, observed in training), NVFP4 and NVFP4A16 on GPUs (no CPU kernel in vLLM 0.32), "
            "MXFP4; other integer widths and per-tensor int scales load in transformers only."]


def _integer_only(model: nn.Module) -> bool:
    """No layer has a float format or quantized inputs: the checkpoint is pack-quantized."""
    return not any(getattr(layer.compressor, "compressed_tensors_arguments", lambda: None)() is not None
                   for layer in require_state(model, "model_card").layers)


def _scheme_name(setting) -> str:
    options = setting.options
    if getattr(options, "scheme", None):
        return options.scheme
    activations = getattr(options, "activations", "none")
    weights = {"int": f"int{options.bits}", "fp8": "FP8", "nvfp4": "NVFP4", "mxfp4": "MXFP4"}.get(
        getattr(options, "format", "int"), "int")
    return weights + ("" if activations == "none" else f" weights, {activations} activations")


def _format_lines(export_format: str, summary: VConSummary, stored_bytes: Optional[tuple[int, int]],
                  integer_only: bool = True) -> list[str]:
    """How the checkpoint stores the weights, and their measured sizes."""
    if export_format == "compressed-tensors":
        if integer_only:
            lines = ["compressed-tensors (`quant_method: compressed-tensors`, `format: pack-quantized`): the quantized "
                     "layers are stored as packed integer codes with their scales (`weight_packed`, `weight_scale`, "
                     "`weight_shape`), every other tensor dense."]
        else:
            lines = ["compressed-tensors (`quant_method: compressed-tensors`, `format` in config.json: int-quantized, "
                     "float-quantized, nvfp4-pack-quantized, mxfp4-pack-quantized, pack-quantized, or mixed-precision "
                     "with one per config group): the quantized layers are stored as codes (int8 or FP8 weights, packed "
                     "integers or FP4) with their scales (`weight_scale`, NVFP4's `weight_global_scale`), every other "
                     "tensor dense."]
    else:
        lines = ["dense: every weight is a float tensor with the compressed values written in (zeros, ±α, q·s), so "
                 "plain transformers loads it with no other package."]
    if stored_bytes is not None:
        targeted, total = stored_bytes
        lines += ["", "| measured | bytes |", "|---|---|", f"| weights files (all tensors) | {total:,} |",
                  f"| targeted layers as stored | {targeted:,} ({targeted / max(summary.bytes_before, 1):.4f}× their "
                  f"dense {summary.bytes_before:,}) |"]
    return ["## Checkpoint format", "", *lines]


def _evaluation_lines(metrics: Optional[dict], details: CardDetails) -> list[str]:
    lines = ["## Evaluation", ""]
    if not metrics:
        return lines + ["No evaluation was run."]
    at = f" at step {details.evaluated_step}" if details.evaluated_step is not None else ""
    if details.evaluated_compressed:
        lines.append(f"Metrics of this model (the compressed model, β = 0){at}:")
    else:
        lines.append(f"Metrics of the model being trained{at}, which was not yet the compressed model saved here "
                     "(β > 0): this model itself was not evaluated.")
    lines += ["", "| metric | value |", "|---|---|"]
    lines += [f"| {key} | {value:.6g} |" if isinstance(value, float) else f"| {key} | {value} |"
              for key, value in sorted(metrics.items())]
    return lines


def _training_lines(details: CardDetails) -> list[str]:
    training = dict(details.training)
    if details.dataset or details.dataset_tags:
        configurations = f" ({', '.join(details.dataset_args)})" if details.dataset_args else ""
        training = {"dataset": ", ".join(details.dataset or details.dataset_tags) + configurations, **training}
    if not training:
        return []
    return ["", "## Training", "", "| | |", "|---|---|", *[f"| {key} | {value} |" for key, value in training.items()]]


def _tags(summary: VConSummary, details: CardDetails, extra_tags: Optional[list[str]]) -> list[str]:
    format_tags = ["compressed-tensors"] if details.export_format == "compressed-tensors" else []
    return list(dict.fromkeys(["hf_vcon", "vcon", *summary.methods, "compression", *format_tags, *(extra_tags or [])]))


def _card_data(base_model: Optional[str], tags: list[str], model_name: Optional[str], details: CardDetails):
    from huggingface_hub import ModelCardData

    return ModelCardData(base_model=_hub_id(base_model), library_name="transformers", tags=tags, model_name=model_name,
                         pipeline_tag=details.tasks[0] if details.tasks else None,
                         datasets=list(details.dataset_tags) or None, language=details.language,
                         license=details.license)


_INTRO = ("This model was compressed with hf_vcon using Vanishing Contributions (VCON, "
          "[arXiv 2510.09696](https://arxiv.org/abs/2510.09696)): each targeted layer blended its original and "
          "compressed forms as β·f(x) + (1−β)·g(x) while fine-tuning, β going from 1 to 0. The weights here are the "
          "compressed model (β = 0); `from_pretrained` loads them without hf_vcon.")


def model_card(
    model: nn.Module,
    summary: VConSummary,
    transition_steps: Optional[int] = None,
    metrics: Optional[dict[str, float]] = None,
    model_name: Optional[str] = None,
    extra_tags: Optional[list[str]] = None,
    details: Optional[CardDetails] = None,
) -> str:
    """A Hugging Face model card (``README.md`` text with YAML metadata) for a merged VCON model.

    It states how to load the model (and, with ``details.export_format``, how the weights are stored and their
    measured sizes), the base model, the method and its options (and every ``module_overrides``
    entry), Q and schedule (and whether training stopped before the transition's end), the layers per setting
    with their sizes before → after, the training budget, the evaluation metrics (the compressed model's; speed
    entries left out), a comparison with other arms if given, and the framework versions; its metadata holds
    ``base_model``, ``pipeline_tag``, ``datasets``, ``language``, ``license`` and the tags ``hf_vcon``, ``vcon``
    and the methods.

    Args:
        model: the patched model.
        summary: its :func:`~hf_vcon.vcon_summary`.
        transition_steps: Q in optimizer steps, if known.
        metrics: evaluation metrics to show.
        model_name: the card's title.
        extra_tags: more tags.
        details: the Trainer's card fields and the run (:class:`CardDetails`).

    Returns:
        The card's text.
    """
    from huggingface_hub import ModelCard

    details = details or CardDetails()
    inner = unwrap_model(model)
    state = require_state(inner, "model_card")
    base_model = details.finetuned_from or getattr(getattr(inner, "config", None), "_name_or_path", None) or None
    lines = [
        f"# {model_name or 'VCON-compressed model'}",
        "",
        _INTRO,
        "",
        *_usage_lines(inner, details.repo_id or f"path/to/{model_name or 'this-folder'}", details.export_format),
        "",
        "## Compression",
        "",
        *_compression_rows(state.config, summary, base_model, transition_steps, details.steps_trained),
        *_size_rows(inner, state),
        "",
        "Layers per setting:",
        "",
        summary.table(),
    ]
    lines += ["", *_format_lines(details.export_format, summary, details.stored_bytes,
                                      _integer_only(inner))] if details.export_format else []
    lines += _training_lines(details)
    lines += ["", *_evaluation_lines(metrics, details)]
    if details.comparison:
        lines += ["", "## Comparison", "", details.comparison]
    lines += ["", "## Framework versions", "", *(f"- {name} {version}" for name, version in _framework_versions().items())]
    card_data = _card_data(base_model, _tags(summary, details, extra_tags), model_name, details)
    return str(ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"))
