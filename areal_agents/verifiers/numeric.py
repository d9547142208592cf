"""``numeric``: the response's number equals the answer within a tolerance."""

from __future__ import annotations

import math
import re
from decimal import Decimal
from fractions import Fraction
from typing import Any, Literal

from .base import Verdict, shorten

_DIGITS = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"
# a sign, digits with optional thousands commas and decimals, an exponent, an optional "/ q"
_NUMBER = re.compile(
    rf"(?<![\w.])([-+−]?)({_DIGITS})(?:[eE]([-+]?\d+))?(?:\s*/\s*({_DIGITS})(?![\d.]))?"
)
_BOXED = re.compile(r"\\boxed\s*\{([^{}]*(?:\{[^{}]*\}[^{}]*)*)\}")


def parse_numbers(text: str) -> list[tuple[str, Fraction]]:
    """Every number in ``text`` as ``(matched text, exact value)``, in order.

    Accepts ``1,234`` (thousands commas), ``-2.5e3``, ``.5``, ``3/4`` and the Unicode minus.

    Example:
        >>> [str(v) for _, v in parse_numbers("between 1,234 and -2.5e3, or 3/4")]
        ['1234', '-2500', '3/4']
    """
    found = []
    for m in _NUMBER.finditer(text):
        sign, digits, exponent, denominator = m.groups()
        value = Fraction(digits.replace(",", ""))
        if exponent is not None:
            value *= Fraction(10) ** int(exponent)
        if denominator is not None:
            below = Fraction(denominator.replace(",", ""))
            if below == 0:
                continue
            value /= below
        found.append((m.group(0).strip(), -value if sign in ("-", "−") else value))
    return found


def extract_number(
    text: str, pick: Literal["last", "first"] = "last"
) -> tuple[str, Fraction] | None:
    """The response's answer number: inside the last ``\\boxed{...}`` when there is one, else
    the last (or first) number of the text; None when there is no number."""
    boxed = _BOXED.findall(text)
    numbers = parse_numbers(boxed[-1] if boxed else text)
    if not numbers:
        return None
    return numbers[-1] if pick == "last" else numbers[0]


def reference_number(answer: Any) -> Fraction:
    """The reference answer as an exact number.

    Raises:
        ValueError: ``answer`` is not a number or a string holding exactly one number.
    """
    if isinstance(answer, bool):
        raise ValueError(f"the reference answer {answer!r} is a bool, not a number")
    if isinstance(answer, int | Fraction):
        return Fraction(answer)
    if isinstance(answer, float) and math.isfinite(answer):
        return Fraction(repr(answer))  # 0.1 is 1/10, not the binary float's exact value
    numbers = parse_numbers(str(answer)) if isinstance(answer, str) else []
    if len(numbers) != 1:
        raise ValueError(
            f"the reference answer {answer!r} is not one number; fix the dataset's answer "
            "field or use another verifier"
        )
    return numbers[0][1]


class NumericVerifier:
    """Score 1 when the response's number equals the answer within ``abs_tol`` / ``rel_tol``.

    The response's number is the one inside the last ``\\boxed{...}``, else its last (or
    first, ``pick="first"``) number. Values are exact fractions, so ``3/4`` equals ``0.75``
    with zero tolerance.

    Args:
        abs_tol: absolute tolerance.
        rel_tol: tolerance relative to the answer's magnitude.
        pick: which number of the response counts when there is no ``\\boxed{}``.

    Example:
        >>> NumericVerifier().verify("So the total is 1,000.", "1000")
        Verdict(score=1.0, reason='expected 1000, got 1,000: equal')
    """

    def __init__(
        self, abs_tol: float = 1e-6, rel_tol: float = 1e-9, pick: Literal["last", "first"] = "last"
    ) -> None:
        if abs_tol < 0 or rel_tol < 0:
            raise ValueError(f"tolerances must be >= 0, got abs_tol={abs_tol}, rel_tol={rel_tol}")
        if pick not in ("last", "first"):
            raise ValueError(f"pick must be 'last' or 'first', got {pick!r}")
        self.abs_tol, self.rel_tol, self.pick = abs_tol, rel_tol, pick

    def verify(self, response: str, answer: Any) -> Verdict:
        """See the class docstring. Raises ``ValueError`` only for an unusable ``answer``."""
        want = reference_number(answer)
        text = response if isinstance(response, str) else ""
        if not text.strip():
            return Verdict(0.0, "empty response: no number to compare")
        got = extract_number(text, self.pick)
        if got is None:
            return Verdict(0.0, f"no number found in the response {shorten(text)!r}")
        shown, value = got
        if value == want:
            return Verdict(1.0, f"expected {_show(want)}, got {shown}: equal")
        if abs(float(value - want)) <= max(self.abs_tol, self.rel_tol * abs(float(want))):
            return Verdict(1.0, f"expected {_show(want)}, got {shown}: equal within tolerance")
        return Verdict(0.0, f"got {shown}: not equal to the expected answer")


def _show(value: Fraction) -> str:
    """``12``, ``0.75`` (a terminating decimal) or ``1/3``."""
    if value.denominator == 1:
        return str(value.numerator)
    den = value.denominator
    for prime in (2, 5):
        while den % prime == 0:
            den //= prime
    if den != 1:
        return str(value)
    return format(Decimal(value.numerator) / Decimal(value.denominator), "f")
