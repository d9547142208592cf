"""Write ``examples/code/data/functions.jsonl``: tiny coding tasks with unit tests.

Each row asks for a one-line function ``<name>(<arg>)`` that adds, subtracts or multiplies its
argument by a digit, stated in words (``Write g(n) in Python: return n times 7.``); ``tests``
is a list of three asserts (the ``code`` verifier's answer). Names ``f g h`` x arguments
``x n y`` x operations ``plus minus times`` x digits ``1..9``: 243 rows. Run from the
repository root; the output is deterministic::

    python examples/code/make_data.py
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).parent / "data" / "functions.jsonl"
OPS = {"plus": lambda a, k: a + k, "minus": lambda a, k: a - k, "times": lambda a, k: a * k}
INPUTS = (0, 2, 5)


def rows() -> list[dict[str, object]]:
    """The 243 rows, in a fixed order."""
    out = []
    for name in "fgh":
        for arg in ("x", "n", "y"):
            for word, op in OPS.items():
                for k in range(1, 10):
                    tests = [f"assert {name}({a}) == {op(a, k)}" for a in INPUTS]
                    out.append({"question": f"Write {name}({arg}) in Python: return {arg} "
                                            f"{word} {k}.", "tests": tests})
    return out


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    print(f"wrote {len(rows())} rows to {OUT}")
