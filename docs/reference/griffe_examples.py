"""Griffe extension for the API reference: read a Google ``Example:`` section as ``Examples:``.

Our docstrings (STYLE.md 11) open their runnable example with ``Example:``; Griffe's Google
parser only knows the plural, so without this the ``>>>`` lines render as nested block quotes
instead of a highlighted code block.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", re.M)


class ExampleSections(griffe.Extension):
    """Rename each ``Example:`` section heading of a docstring to ``Examples:``."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
