"""A griffe extension for the docs build: read a Google-style ``Example:`` section as ``Examples:``.

hf_vcon's docstrings follow Napoleon's Google style, where ``Example:`` and ``Examples:`` name the same section.
Griffe knows only the plural, and would render the singular's doctest lines as Markdown prose (where
``d["a"]["b"]`` reads as a reference link). The package is left as it is; the docs build reads it this way.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_SINGULAR = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


class NapoleonExampleSections(griffe.Extension):
    """Rewrite each docstring's ``Example:`` header line to ``Examples:`` before the docstring is parsed."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _SINGULAR.sub(r"\1Examples:", obj.docstring.value)
