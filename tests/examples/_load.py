"""Import an example script (``examples/<name>/<file>.py``; examples are not a package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load_example(folder: str, module: str) -> ModuleType:
    """The module ``examples/<folder>/<module>.py``, with its folder importable (cached)."""
    name = f"_example_{folder}_{module}"
    if name in sys.modules:
        return sys.modules[name]
    path = EXAMPLES / folder / f"{module}.py"
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
