"""The registry of compressions: the names users write (``"prune"``, ``"binary"``, ``"lowrank"``) → their classes.

It imports nothing of hf_vcon, so anything may ask it. Compressions register with :func:`register_compressor`; the
built-in ones when :mod:`hf_vcon.compressors` is imported, third-party ones when their module is imported or, for
installed packages, through the ``hf_vcon.compressors`` entry-point group (``[project.entry-points."hf_vcon.compressors"]
int4 = "my_package.int4"``), loaded the first time a name is looked up or listed.
"""

from __future__ import annotations

from typing import Any, Callable

ENTRY_POINT_GROUP = "hf_vcon.compressors"

_REGISTRY: dict[str, type] = {}
_entry_points_loaded = False


def register_compressor(name: str) -> Callable[[type], type]:
    """Class decorator: make a compressor class available as ``VConConfig(method=name)``.

    Raises:
        ValueError: if ``name`` is not a non-empty identifier-like string, or another class already has it.
    """
    if not isinstance(name, str) or not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"register_compressor({name!r}): a compression name is a non-empty word such as 'int4'.")

    def register(cls: type) -> type:
        known = _REGISTRY.get(name)
        if known is not None and f"{known.__module__}.{known.__qualname__}" != f"{cls.__module__}.{cls.__qualname__}":
            raise ValueError(
                f"register_compressor({name!r}): the name is taken by {known.__module__}.{known.__qualname__}; "
                "choose another name."
            )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return register


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        entry_point.load()  # the module registers its compression on import


def available_compressors() -> tuple[str, ...]:
    """The registered compression names, sorted."""
    _load_entry_points()
    return tuple(sorted(_REGISTRY))


def compressor_class(method: Any) -> type:
    """The class registered as ``method``.

    Raises:
        ValueError: for a name that is not registered, listing the known ones.
    """
    if method not in _REGISTRY:
        _load_entry_points()
    try:
        return _REGISTRY[method]
    except (KeyError, TypeError):
        raise ValueError(f"method={method!r} is not known; use one of: {', '.join(available_compressors())}.") from None
