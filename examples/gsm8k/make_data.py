"""Write ``examples/gsm8k/data/arithmetic.jsonl``: one-digit ``a + b`` / ``a - b`` questions in
the GSM8K row format (``question``; ``answer`` = worked solution + ``#### <number>``).

Every pair ``a, b`` in 0..9 with each operation (200 facts), each in four phrasings
(``PHRASINGS``): 800 rows. The recipe holds 64 rows out (``env_kwargs.eval_size``): evaluation
asks questions never trained on, whose sum or difference the model has mostly seen in another
phrasing (a 0.5M-parameter model does not learn the addition table from the facts it is
shown, but it does learn to read a question it has not seen). Run from the repository root;
the output is deterministic::

    python examples/gsm8k/make_data.py
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).parent / "data" / "arithmetic.jsonl"
PHRASINGS = ("What is {}?", "Compute {}.", "{} = ?", "Find the value of {}.")
OPERANDS = range(10)


def rows() -> list[dict[str, str]]:
    """The 800 rows: for each ``(a, b)``, ``a + b`` then ``a - b``, each in every phrasing."""
    out = []
    for a in OPERANDS:
        for b in OPERANDS:
            for op, value in (("+", a + b), ("-", a - b)):
                for phrasing in PHRASINGS:
                    out.append({"question": phrasing.format(f"{a} {op} {b}"),
                                "answer": f"{a} {op} {b} = {value}\n#### {value}"})
    return out


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    print(f"wrote {len(rows())} rows to {OUT}")
