"""From a config to compressors: which modules VCON targets and which compressor each gets, all checked before any
module is replaced (a failure never leaves a half-patched model)."""

from __future__ import annotations

import warnings

from torch import nn

from .config import VConConfig
from .errors import NoTargetModulesError, VConWarning
from .linears import LINEAR_TYPES
from .state import Plan
from .targets import ALL_LINEAR, find_targets, matches_pattern
from .units import unit_shape

MAX_NAMES_SHOWN = 10


def shown(names: list[str]) -> str:
    """At most ten names, for messages."""
    return f"{names[:MAX_NAMES_SHOWN]}{' …' if len(names) > MAX_NAMES_SHOWN else ''}"


def resolve_targets(model: nn.Module, config: VConConfig) -> list[str]:
    """The Linear/Conv1D modules ``config`` targets, in model order.

    Raises:
        NoTargetModulesError: if there are none, listing some Linear names of the model.
    """
    names = find_targets(model, config.target_modules, config.exclude_modules)
    if not names:
        linear_names = [name for name, module in model.named_modules() if isinstance(module, LINEAR_TYPES)]
        raise NoTargetModulesError(
            f"target_modules={config.target_modules!r} (exclude_modules={config.exclude_modules!r}) matched no "
            f"Linear/Conv1D module. Some Linear module names of this model: {linear_names[:MAX_NAMES_SHOWN]}"
            f"{' …' if len(linear_names) > MAX_NAMES_SHOWN else ''}."
        )
    return names


def plan_for(model: nn.Module, config: VConConfig, names: list[str]) -> Plan:
    """The setting and compressor of every module in ``names`` (one compressor per distinct setting).

    With ``target_modules="all-linear"``, a layer that its compression cannot take (an N:M pattern that does not
    divide its inputs, a low-rank factorisation that would not be smaller) stays dense, with a warning naming it;
    a layer targeted by name raises instead.

    Raises:
        ValueError: if a ``module_overrides`` pattern matches none of ``names``, or a layer targeted by name cannot
            take its compression (the compressor's ``check_layer`` names it).
        NoTargetModulesError: if every layer "all-linear" found is left dense.
    """
    for pattern, _ in config.override_settings:
        if not any(matches_pattern(name, pattern) for name in names):
            raise ValueError(
                f"module_overrides[{pattern!r}] matches none of the {len(names)} targeted modules, e.g. {shown(names)}; "
                "a pattern must match a targeted module's full name or a dotted suffix of it."
            )
    settings = [config.setting_for(name) for name in names]
    by_setting = {setting: setting.compressor() for setting in dict.fromkeys(settings)}
    kept, skipped = [], []
    for name, setting in zip(names, settings):
        try:
            by_setting[setting].check_layer(name, *unit_shape(model, name))
        except ValueError as error:
            if config.target_modules != ALL_LINEAR:
                raise
            skipped.append((name, str(error)))
            continue
        kept.append((name, setting))
    _warn_skipped(skipped, kept)
    return Plan(names=[name for name, _ in kept], settings=[setting for _, setting in kept],
                compressors=[by_setting[setting] for _, setting in kept])


def _warn_skipped(skipped: list[tuple[str, str]], kept: list) -> None:
    if not skipped:
        return
    reasons = "; ".join(f"{name}: {reason}" for name, reason in skipped[:3])
    if not kept:
        raise NoTargetModulesError(f"target_modules='all-linear' found no layer its compression can take: {reasons}")
    warnings.warn(
        f"target_modules='all-linear': {len(skipped)} layer(s) cannot take their compression and stay dense "
        f"({reasons}{' …' if len(skipped) > 3 else ''}).",
        VConWarning,
        stacklevel=4,
    )
