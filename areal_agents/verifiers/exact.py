"""``exact``: the response equals the answer after normalisation (case, whitespace)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from .base import Verdict, shorten

Whitespace = Literal["collapse", "strip", "keep"]


def normalize(
    text: str,
    case_sensitive: bool = False,
    whitespace: Whitespace = "collapse",
    trailing: str = ".",
) -> str:
    """``text`` as compared: whitespace collapsed (``"collapse"``: runs become one space, ends
    stripped), stripped (``"strip"``) or kept (``"keep"``); ``trailing`` characters removed
    from the end; lower-cased unless ``case_sensitive``.

    Example:
        >>> normalize("  The   Eiffel Tower. ")
        'the eiffel tower'
    """
    if whitespace == "collapse":
        text = " ".join(text.split())
    elif whitespace == "strip":
        text = text.strip()
    if trailing:
        text = text.rstrip(trailing)
        if whitespace != "keep":
            text = text.rstrip()
    return text if case_sensitive else text.casefold()


def accepted(answer: Any) -> list[str]:
    """The accepted answers: a list/tuple of strings, or one value (as ``str``)."""
    if isinstance(answer, Sequence) and not isinstance(answer, str):
        return [str(a) for a in answer]
    return [str(answer)]


class ExactVerifier:
    """Score 1 when the response (or the part after ``answer_prefix``) equals the answer.

    Both sides are normalised with ``normalize``. The answer may be a list of accepted
    strings.

    Args:
        case_sensitive: compare case too.
        whitespace: ``"collapse"`` (default), ``"strip"`` or ``"keep"``; see ``normalize``.
        trailing: characters ignored at the end of both sides (default ``"."``).
        answer_prefix: compare only the text after the last occurrence of this marker, e.g.
            ``"Answer:"``; a response without it scores 0.

    Example:
        >>> ExactVerifier(answer_prefix="Answer:").verify("I think... Answer: Paris.", "paris")
        Verdict(score=1.0, reason="expected 'paris', got 'Paris.': equal")
    """

    def __init__(
        self,
        case_sensitive: bool = False,
        whitespace: Whitespace = "collapse",
        trailing: str = ".",
        answer_prefix: str | None = None,
    ) -> None:
        if whitespace not in ("collapse", "strip", "keep"):
            raise ValueError(
                f"whitespace must be 'collapse', 'strip' or 'keep', got {whitespace!r}"
            )
        if answer_prefix == "":
            raise ValueError("answer_prefix must be a non-empty marker such as 'Answer:' or None")
        self.case_sensitive, self.whitespace = case_sensitive, whitespace
        self.trailing, self.answer_prefix = trailing, answer_prefix

    def _norm(self, text: str) -> str:
        return normalize(text, self.case_sensitive, self.whitespace, self.trailing)

    def verify(self, response: str, answer: Any) -> Verdict:
        """See the class docstring."""
        text = response if isinstance(response, str) else ""
        if not text.strip():
            return Verdict(0.0, "empty response")
        if self.answer_prefix is not None:
            _, marker, tail = text.rpartition(self.answer_prefix)
            if not marker:
                return Verdict(0.0, f"no {self.answer_prefix!r} in the response")
            text = tail
        return compare(self._norm, text.strip(), answer)


def compare(norm: Any, got: str, answer: Any) -> Verdict:
    """The verdict of ``got`` against the accepted answers, each normalised by ``norm``."""
    if not norm(got):
        return Verdict(0.0, "the answer part of the response is empty")
    for want in accepted(answer):
        if norm(got) == norm(want):
            return Verdict(1.0, f"expected {want!r}, got {shorten(got)!r}: equal")
    return Verdict(0.0, f"got {shorten(got)!r}: not the expected answer")
