"""From a config to compressors: which modules VCON targets and which compressor each gets, all checked before any
module is replaced (a failure never leaves a half-patched model)."""

from __future__ import annotations

import difflib
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from ..config.targets import ALL_LINEAR, candidate_targets, find_targets, matches, matches_pattern
from ..config.vcon_config import VConConfig
from ..errors import NoTargetModulesError, UnsupportedLayerError, VConError, VConWarning
from ..layers.factory import unit_shape, unit_weight
from ..utils.linears import LINEAR_TYPES
from ..utils.peft import adapter_layer_names

if TYPE_CHECKING:
    from ..config.settings import LayerSetting

@dataclass
class Plan:
    """Which compressor each targeted module gets (checked against the model before anything is replaced)."""

    names: list[str]  # the targeted Linear/Conv1D modules, in model order
    settings: list["LayerSetting"]  # the setting of each, from ``config.setting_for``
    compressors: list  # one compressor per distinct setting, shared by the modules that have it


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
    if config.target_modules != ALL_LINEAR:
        inside = [name for name in adapter_layer_names(model) if matches(name, config.target_modules)]
        inside += find_targets(model, config.target_modules, config.exclude_modules, inside_adapters=True)
        if inside:
            raise VConError(
                f"target_modules={config.target_modules!r} matches layers that PEFT adapters hold, e.g. {shown(inside)}; "
                "VCON cannot compress under an adapter. Apply VCON first and put the adapters on top "
                "(hf_vcon.get_peft_model), or target other layers."
            )
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
    candidates = candidate_targets(model)
    linear_names = [name for name, _ in candidates]

    def grammar(entry):  # one list entry on its own, or the regex
        return entry if isinstance(exclude_modules, str) else [entry]

    unmatched = [entry for entry in entries
                 if not any(matches(name, grammar(entry)) or (owner != name and matches(owner, grammar(entry)))
                            for name, owner in candidates)]
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

    With ``target_modules="all-linear"``, a layer whose shape cannot take its compression at all
    (:class:`~hf_vcon.errors.UnsupportedLayerError`: an N:M pattern that does not divide its inputs, a layer too
    small to factorise) stays dense, with a warning naming it; a layer targeted by name raises instead, and so does
    a setting that does not fit a layer (a rank too large for it).

    Raises:
        ValueError: if a ``module_overrides`` pattern matches none of ``names``, a layer targeted by name cannot
            take its compression (the compressor's ``check_layer`` names it), or a compression that couples layers
            cannot compress the targeted ones together (its ``bind_layers`` says why).
        UnsupportedLayerError: if no layer "all-linear" found can take its compression.
    """
    for pattern, _ in config.override_settings:
        if not any(matches_pattern(name, pattern) for name in names):
            raise ValueError(
                f"module_overrides[{pattern!r}] matches none of the {len(names)} targeted modules, e.g. {shown(names)}; "
                "a pattern must match a targeted module's full name or a dotted suffix of it."
            )
    _check_no_shared_weight(model, names)
    settings = [config.setting_for(name) for name in names]
    by_setting = {setting: setting.compressor() for setting in dict.fromkeys(settings)}
    kept, skipped = [], []
    for name, setting in zip(names, settings):
        try:
            by_setting[setting].check_layer(name, *unit_shape(model, name))
        except UnsupportedLayerError as error:
            if config.target_modules != ALL_LINEAR:
                raise
            skipped.append((name, str(error)))
            continue
        kept.append((name, setting, by_setting[setting]))
    kept = _bound(model, config, kept)
    _warn_skipped(skipped, kept)
    return Plan(names=[name for name, _, _ in kept], settings=[setting for _, setting, _ in kept],
                compressors=[compressor for _, _, compressor in kept])


def _check_no_shared_weight(model: nn.Module, names: list[str]) -> None:
    """Refuse a targeted layer whose weight is also another module's (a tied output head shares the input
    embeddings): VCON would compress the embeddings with it in every export, while the trained model reads them
    dense. Untying first keeps both: the model then has a head of its own to compress."""
    targeted = {id(unit_weight(model, name)): name for name in names}
    for key, parameter in model.named_parameters(remove_duplicate=False):
        name = targeted.get(id(parameter))
        owner = key.rpartition(".")[0]
        if name is not None and not _is_inside(key, name) and not any(_is_inside(key, other) for other in names):
            raise VConError(
                f"The targeted layer {name!r} shares its weight with {key!r} (tied embeddings): compressing it would "
                f"compress {owner!r} too, in every export, while the trained model reads it dense. Leave it out "
                f"(exclude_modules=[{name!r}]), or give the layer a weight of its own before apply_vcon (clone it and "
                "set tie_word_embeddings=False in the config, which changes the outputs of models that rescale a "
                "tied head, such as T5)."
            )


def _is_inside(key: str, name: str) -> bool:
    """Whether the parameter ``key`` is what the target ``name`` compresses: a weight of the layer ``name``, or the
    weight ``name`` itself (fused experts, MultiheadAttention projections)."""
    return key == name or key.startswith(f"{name}.")


def _bound(model: nn.Module, config: VConConfig, kept: list[tuple]) -> list[tuple]:
    """``kept`` with each layer of a compression that couples layers given its own compressor (``bind_layers``).

    A layer outside such a compression's reach (not in any of its groups) is left out under ``"all-linear"``, for it
    was never a candidate (structured pruning takes the MLP layers, not the attention's), and raises when named.
    """
    classes = list(dict.fromkeys(type(compressor) for _, _, compressor in kept if compressor.couples_layers))
    for cls in classes:
        mine = [(name, compressor) for name, _, compressor in kept if type(compressor) is cls]
        bound, outside = cls.bind_layers(model, [name for name, _ in mine], [compressor for _, compressor in mine])
        if outside and config.target_modules != ALL_LINEAR:
            raise UnsupportedLayerError(f"{next(iter(outside.values()))}; remove it from target_modules "
                                        f"({len(outside)} such layer(s): {shown(list(outside))}).")
        kept = [(name, setting, bound.get(name, compressor)) for name, setting, compressor in kept
                if name not in outside]
    return kept


def _warn_skipped(skipped: list[tuple[str, str]], kept: list) -> None:
    if not skipped:
        return
    reasons = "; ".join(f"{name}: {reason}" for name, reason in skipped[:3])
    if not kept:
        raise UnsupportedLayerError(f"{skipped[0][1]} No layer that target_modules='all-linear' found can take it.")
    warnings.warn(
        f"target_modules='all-linear': {len(skipped)} layer(s) cannot take their compression and stay dense "
        f"({reasons}{' …' if len(skipped) > 3 else ''}).",
        VConWarning,
        stacklevel=4,
    )
