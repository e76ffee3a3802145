"""Compression settings: a method and its options, for the whole model or per module (``module_overrides``).

A :class:`LayerSetting` is what one targeted module is compressed with. ``VConConfig`` holds the base setting and
the overrides; the patching verbs resolve each module's setting with :meth:`VConConfig.setting_for` and build one
compressor per distinct setting.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..compressors import Compressor, CompressorOptions, available_compressors, compressor_class


@dataclass(frozen=True)
class LayerSetting:
    """A compression method and its validated options."""

    method: str
    options: CompressorOptions

    def compressor(self) -> Compressor:
        return compressor_class(self.method)(self.options)

    def to_dict(self) -> dict[str, Any]:
        """``{"method": …, <option>: …}``: how summaries, model cards and manifests show the setting."""
        return {"method": self.method, **self.options.to_dict()}


def option_owners(name: str) -> list[str]:
    """The registered methods that have an option called ``name``."""
    return [method for method in available_compressors() if name in compressor_class(method).Options.field_names()]


def build_options(method: str, values: dict[str, Any], where: str = "") -> CompressorOptions:
    """The validated options of ``method`` from ``values``.

    Raises:
        TypeError: for a name that is not an option of ``method`` (saying which method it belongs to, if any).
        ValueError / TypeError: from the options' own checks; ``where`` (e.g. ``"module_overrides['.*query']: "``)
            is put in front of every message.
    """
    options_class = compressor_class(method).Options
    for name, value in values.items():
        if name not in options_class.field_names():
            raise unexpected_option(name, value, method, where)
    try:
        return options_class(**values)
    except (TypeError, ValueError) as error:
        raise type(error)(where + str(error)) from None


def unexpected_option(name: str, value: Any, method: str, where: str = "") -> Exception:
    """The error for ``name`` given with ``method``: a ``ValueError`` if it is another method's option, else a
    ``TypeError`` (an unknown keyword), listing ``method``'s options."""
    owners = option_owners(name)
    if owners:
        return ValueError(f"{where}{name}={value!r} only applies to method='{owners[0]}', but method={method!r}; "
                          f"remove {name} or set method='{owners[0]}'.")
    accepted = ", ".join(compressor_class(method).Options.field_names()) or "none"
    return TypeError(f"{where}{name!r} is not an option of method={method!r} (its options: {accepted}) nor a "
                     "VConConfig field.")


def parse_overrides(overrides: Any, base: LayerSetting) -> tuple[tuple[str, LayerSetting], ...]:
    """``module_overrides`` as ``(pattern, setting)`` pairs, in order, each validated.

    An entry without ``"method"`` changes options of the base method (the others keep the base values); an entry
    with another ``"method"``, or with an option that defines the whole setting (``scheme``), starts from that
    method's defaults.

    Raises:
        TypeError / ValueError: naming ``module_overrides[<pattern>]`` and what is wrong.
    """
    if overrides is None:
        return ()
    if not isinstance(overrides, dict) or not overrides:
        raise TypeError(
            f"module_overrides={overrides!r} must be a non-empty dict of module-name patterns to settings, e.g. "
            "{r'.*attention.*': {'sparsity': 0.5}}."
        )
    return tuple((pattern, _override_setting(pattern, values, base)) for pattern, values in overrides.items())


def _override_setting(pattern: Any, values: Any, base: LayerSetting) -> LayerSetting:
    where = f"module_overrides[{pattern!r}]: "
    if not isinstance(pattern, str) or not pattern:
        raise TypeError(f"{where}a key must be a non-empty module-name pattern (a string).")
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{where}the key is not a valid regular expression: {err}.") from None
    if not isinstance(values, dict) or not values or not all(isinstance(key, str) for key in values):
        raise TypeError(f"{where}the setting must be a non-empty dict of option names to values, e.g. {{'sparsity': 0.5}}.")
    values = dict(values)
    method = values.pop("method", base.method)
    try:
        compressor_class(method)
    except ValueError as error:
        raise ValueError(where + str(error)) from None
    # an option that defines the whole setting (quant's preset ``scheme``) starts from the method's defaults too
    defining = getattr(compressor_class(method).Options, "defining_options", ())
    if method == base.method and not any(name in values for name in defining):
        return LayerSetting(method, build_options(method, {**base.options.to_dict(), **values}, where))
    return LayerSetting(method, build_options(method, values, where))
