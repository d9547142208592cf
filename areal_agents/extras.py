"""Optional dependencies: import one, or fail with one line naming the extra that installs it.

The extras are declared in ``pyproject.toml`` (``plot``, ``tensorboard``, ``lora``, ...)::

    plt_module = require("matplotlib", "plot", "areal-agents plot")

Example:
    >>> missing_message("matplotlib", "plot", "areal-agents plot")
    'areal-agents plot needs matplotlib, which is not installed: pip install "areal-agents[plot]"'
"""

from __future__ import annotations

import importlib
from types import ModuleType


def missing_message(module: str, extra: str, purpose: str) -> str:
    """The one-line message for ``purpose`` missing ``module`` (from extra ``extra``)."""
    return (f"{purpose} needs {module}, which is not installed: "
            f'pip install "areal-agents[{extra}]"')


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module``.

    Args:
        module: the top-level module (``"matplotlib"``).
        extra: the ``areal-agents`` extra that installs it (``"plot"``).
        purpose: what needs it, starting the message (``"areal-agents plot"``).

    Raises:
        ModuleNotFoundError: it is not installed (``missing_message``); ``.name`` is ``module``.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:  # it, or one of its own dependencies, is absent
        raise ModuleNotFoundError(missing_message(module, extra, purpose), name=module) from exc
