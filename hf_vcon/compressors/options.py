"""The base of every compression's options: a small frozen dataclass, validated on construction.

A compression declares its options next to its maths, as ``Options`` on its class::

    @dataclass(frozen=True)
    class RoundingOptions(CompressorOptions):
        step: float = option(0.05, "the grid spacing of C = step·round(W/step), > 0")

        def validate(self):
            check_number("step", self.step, low=0.0, low_open=True)

Each field's ``help`` documents it once: for the API docs, ``VConConfig``'s errors and the example scripts'
``--vcon_<field>`` flags. Errors name the field, show the value and give the accepted values.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, Optional


def option(default: Any, help: str) -> Any:
    """A dataclass field of an options class, with its one-line documentation."""
    return dataclasses.field(default=default, metadata={"help": help})


def is_number(value: Any) -> bool:
    """True for an int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not known; use one of: {', '.join(choices)}.")


def check_number(name: str, value: Any, low: Optional[float] = None, high: Optional[float] = None, *,
                 low_open: bool = False, high_open: bool = False, integer: bool = False, meaning: str = "") -> None:
    """Raise ``ValueError`` unless ``value`` is a (finite) number in the interval given, an int if ``integer``."""
    low_text = "-inf" if low is None else f"{low:g}"
    high_text = "inf" if high is None else f"{high:g}"
    interval = ("(" if low_open else "[") + f"{low_text}, {high_text}" + (")" if high_open else "]")
    kind = "an int" if integer else "a number"
    ok = (isinstance(value, int) and not isinstance(value, bool)) if integer else is_number(value)
    ok = ok and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise ValueError(f"{name}={value!r} must be {kind} in {interval}{': ' + meaning if meaning else ''}.")


@dataclass(frozen=True)
class CompressorOptions:
    """Options of one compression. Subclasses add fields made with :func:`option` and override :meth:`validate`,
    which may resolve defaults with :meth:`_resolve`."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check the fields (raise ``ValueError`` / ``TypeError`` naming the field); resolve defaults."""

    def _resolve(self, name: str, value: Any) -> None:
        """Set a field while validating (the dataclass is frozen): a default that depends on other fields."""
        object.__setattr__(self, name, value)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def field_help(cls) -> dict[str, str]:
        """Each option's one-line documentation, by name."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}

    @classmethod
    def field_types(cls) -> dict[str, Any]:
        """Each option's type with ``Optional`` removed (``float``, ``int``, ``str``, ``bool``), by name."""
        hints = typing.get_type_hints(cls)
        types = {}
        for name in cls.field_names():
            hint = hints[name]
            arguments = [arg for arg in typing.get_args(hint) if arg is not type(None)]
            types[name] = arguments[0] if typing.get_origin(hint) is typing.Union and len(arguments) == 1 else hint
        return types

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "CompressorOptions":
        """A validated copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)
