"""From a config to compressors: which modules VCON targets and which compressor each gets, all checked before any
module is replaced (a failure never leaves a half-patched model)."""

from __future__ import annotations

import difflib
import warnings

from torch import nn

from .config import VConConfig
from .errors import NoTargetModulesError, VConWarning
from .linears import LINEAR_TYPES, linear_shape
from .state import Plan
from .targets import ALL_LINEAR, find_targets, fused_expert_modules, matches, matches_pattern

MAX_NAMES_SHOWN = 10


def shown(names: list[str]) -> str:
    """At most ten names, for messages."""
    return f"{names[:MAX_NAMES_SHOWN]}{' …' if len(names) > MAX_NAMES_SHOWN else ''}"


def resolve_targets(model: nn.Module, config: VConConfig) -> list[str]:
    """The Linear/Conv1D modules ``config`` targets, in model order.

    Raises:
        NoTargetModulesError: if there are none, listing some Linear names of the model.
    """
    warn_unmatched_excludes(model, config.exclude_modules)
    names = find_targets(model, config.target_modules, config.exclude_modules)
    if not names:
        linear_names = [name for name, module in model.named_modules() if isinstance(module, LINEAR_TYPES)]
        raise NoTargetModulesError(
            f"target_modules={config.target_modules!r} (exclude_modules={config.exclude_modules!r}) matched no "
            f"Linear/Conv1D module. Some Linear module names of this model: {linear_names[:MAX_NAMES_SHOWN]}"
            f"{' …' if len(linear_names) > MAX_NAMES_SHOWN else ''}."
        )
    return names


def _close_linear_names(entry: str, linear_names: list[str]) -> list[str]:
    """Dotted suffixes of Linear names that ``entry`` may have meant: those under a module ``entry`` names, else the
    closest spellings."""
    suffixes = sorted({".".join(name.split(".")[i:]) for name in linear_names for i in range(len(name.split(".")))},
                      key=lambda suffix: (suffix.count("."), suffix))
    under = [suffix for suffix in suffixes if entry in suffix.split(".")[:-1]]
    return under[:3] or difflib.get_close_matches(entry, suffixes, n=3)


def warn_unmatched_excludes(model: nn.Module, exclude_modules) -> list[str]:
    """Warn for each ``exclude_modules`` entry (or the regex) that names no Linear/Conv1D module; return them.

    Such an entry excludes nothing. The warning says which module it does name, if any (an exclusion names the
    Linear layers themselves, as in PEFT: ``pooler`` names BERT's pooler, not its Linear ``pooler.dense``), and
    the closest Linear names.
    """
    if not exclude_modules:
        return []
    entries = [exclude_modules] if isinstance(exclude_modules, str) else list(exclude_modules)
    all_names = [name for name, _ in model.named_modules() if name]
    linear_names = [name for name, module in model.named_modules() if name and isinstance(module, LINEAR_TYPES)]
    def grammar(entry):  # one list entry on its own, or the regex
        return entry if isinstance(exclude_modules, str) else [entry]

    unmatched = [entry for entry in entries if not any(matches(name, grammar(entry)) for name in linear_names)]
    for entry in unmatched:
        named = [name for name in all_names if matches(name, grammar(entry))]
        what = (f"it names {shown(named)}, not a Linear/Conv1D layer (an exclusion names the layers themselves)"
                if named else "it names no module of this model")
        close = _close_linear_names(entry, linear_names)
        warnings.warn(
            f"exclude_modules entry {entry!r} excludes nothing: {what}. "
            + (f"Did you mean {', '.join(repr(name) for name in close)}?" if close else
               f"Some Linear module names: {shown(linear_names)}."),
            VConWarning,
            stacklevel=5,  # apply_vcon's caller
        )
    return unmatched


def plan_for(model: nn.Module, config: VConConfig, names: list[str]) -> Plan:
    """The setting and compressor of every module in ``names`` (one compressor per distinct setting).

    Raises:
        ValueError: if a ``module_overrides`` pattern matches none of ``names``, or a module cannot take its
            compression (the compressor's ``check_layer`` names it).
    """
    for pattern, _ in config.override_settings:
        if not any(matches_pattern(name, pattern) for name in names):
            raise ValueError(
                f"module_overrides[{pattern!r}] matches none of the {len(names)} targeted modules, e.g. {shown(names)}; "
                "a pattern must match a targeted module's full name or a dotted suffix of it."
            )
    settings = [config.setting_for(name) for name in names]
    by_setting = {setting: setting.compressor() for setting in dict.fromkeys(settings)}
    compressors = [by_setting[setting] for setting in settings]
    for name, compressor in zip(names, compressors):
        compressor.check_layer(name, *linear_shape(model.get_submodule(name)))
    return Plan(names=names, settings=settings, compressors=compressors)


def warn_skipped_experts(model: nn.Module, config: VConConfig) -> None:
    """Warn about mixture-of-experts weights the targets would cover but VCON cannot wrap."""
    experts = [
        name
        for name in fused_expert_modules(model)
        if config.target_modules == ALL_LINEAR or matches(name, config.target_modules)
    ]
    if experts:
        warnings.warn(
            f"{len(experts)} module(s) hold fused 3-D expert weights (e.g. {experts[:3]}), not Linear layers; VCON "
            "skips them and they stay dense.",
            VConWarning,
            stacklevel=3,
        )
