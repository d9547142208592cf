"""Safe exact arithmetic: a tokenizer and recursive-descent parser over ``fractions.Fraction``.

Never uses ``eval``. Grammar (usual precedence, left-associative, unary minus)::

    expr   := term (("+" | "-") term)*
    term   := factor (("*" | "/") factor)*
    factor := ("-" | "+") factor | NUMBER | "(" expr ")"

``×``/``x``/``X`` are read as ``*`` and ``÷``/``:`` as ``/``; ``−`` as ``-``. Numbers are
non-negative integers or decimals (``2.5``), read exactly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

MAX_LENGTH = 200  # characters; bounds the work and the recursion depth
_ALIASES = {"×": "*", "x": "*", "X": "*", "÷": "/", ":": "/", "−": "-", "–": "-"}
_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d+)?)|(.))")


class ExprError(ValueError):
    """An expression could not be parsed or evaluated (syntax error, division by zero)."""


@dataclass(frozen=True)
class Parsed:
    """A parsed expression: its exact ``value`` and the number literals it uses, in order."""

    value: Fraction
    numbers: tuple[Fraction, ...]


def tokenize(text: str) -> list[str]:
    """Split ``text`` into number and operator tokens.

    Raises:
        ExprError: an unknown character, or ``text`` longer than ``MAX_LENGTH``.
    """
    if len(text) > MAX_LENGTH:
        raise ExprError(f"expression too long ({len(text)} > {MAX_LENGTH} characters)")
    tokens: list[str] = []
    for number, other in _TOKEN.findall(text.rstrip()):
        if number:
            tokens.append(number)
            continue
        op = _ALIASES.get(other, other)
        if op not in "+-*/()":
            raise ExprError(f"unexpected character {other!r} in expression")
        tokens.append(op)
    return tokens


class _Parser:
    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.pos = 0
        self.numbers: list[Fraction] = []

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str:
        tok = self.peek()
        if tok is None:
            raise ExprError("expression ends too early")
        self.pos += 1
        return tok

    def expr(self) -> Fraction:
        value = self.term()
        while self.peek() in ("+", "-"):
            value = value + self.term() if self.take() == "+" else value - self.term()
        return value

    def term(self) -> Fraction:
        value = self.factor()
        while self.peek() in ("*", "/"):
            op = self.take()
            rhs = self.factor()
            if op == "*":
                value *= rhs
            elif rhs == 0:
                raise ExprError("division by zero")
            else:
                value /= rhs
        return value

    def factor(self) -> Fraction:
        tok = self.take()
        if tok in ("-", "+"):
            inner = self.factor()
            return -inner if tok == "-" else inner
        if tok == "(":
            value = self.expr()
            if self.take() != ")":
                raise ExprError("missing ')'")
            return value
        if tok[0].isdigit():
            number = Fraction(tok)
            self.numbers.append(number)
            return number
        raise ExprError(f"unexpected {tok!r}")


def parse(text: str) -> Parsed:
    """Parse and evaluate ``text`` exactly.

    Raises:
        ExprError: empty input, a syntax error or a division by zero.

    Example:
        >>> parse("(1 + 2) * 3 / 4")
        Parsed(value=Fraction(9, 4), numbers=(Fraction(1, 1), Fraction(2, 1), Fraction(3, 1), Fraction(4, 1)))
    """
    tokens = tokenize(text)
    if not tokens:
        raise ExprError("empty expression")
    parser = _Parser(tokens)
    value = parser.expr()
    if parser.peek() is not None:
        raise ExprError(f"unexpected {parser.peek()!r} after a complete expression")
    return Parsed(value, tuple(parser.numbers))


def evaluate(text: str) -> Fraction:
    """The exact value of ``text`` (see ``parse``)."""
    return parse(text).value


def format_number(value: Fraction) -> str:
    """``7`` for integers, ``7/2`` otherwise."""
    return (
        str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
    )


_ANSWER = re.compile(r"answer\s*[:=]\s*(.+)", re.IGNORECASE)


def extract_answer(text: str | None) -> str | None:
    """The text after the last ``Answer:`` (up to the line end), else the last non-empty line."""
    if not text:
        return None
    found = _ANSWER.findall(text)
    if found:
        return found[-1].strip().rstrip(".") or None
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1].rstrip(".") if lines else None
