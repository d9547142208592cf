"""``code_solver``: the scripted player whose answers the tiny model imitates in the SFT warm
start (``trainer.warm_start.players: {agent: "solver:code_solver"}``; ``run.py`` puts this
folder on ``sys.path``; with the CLI, set ``PYTHONPATH=examples/code``)."""

from __future__ import annotations

import re
from typing import Any

SYMBOLS = {"plus": "+", "minus": "-", "times": "*"}
_TASK = re.compile(r"Write (\w+)\((\w+)\) in Python: return \2 (plus|minus|times) (\d+)\.")


def code_solver(observation: Any) -> str:
    """The one-line solution of a ``functions.jsonl`` question (``pass`` when none matches).

    Example:
        >>> code_solver("Write g(n) in Python: return n times 7.")
        'def g(n): return n * 7'
    """
    text = observation if isinstance(observation, str) else " ".join(
        str(m.get("content") or "") for m in observation)
    found = _TASK.search(text)
    if not found:
        return "pass"
    name, arg, word, k = found.groups()
    return f"def {name}({arg}): return {arg} {SYMBOLS[word]} {k}"
