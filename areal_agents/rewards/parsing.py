"""Reading a judge's reply: a score on a scale, a verdict, a ranking of a group's answers.

Every parser returns the value or raises ``JudgeParseError`` naming what was wrong, so a
judge can count the failure and apply its declared policy instead of scoring 0 silently.

Example:
    >>> parse_score("The answer is right. Score: 7/10", 0, 10)
    7.0
    >>> parse_score('{"score": 3}', 1, 5), parse_score("**4**", 1, 5)
    (3.0, 4.0)
    >>> parse_verdict("Verdict: incorrect")
    'incorrect'
    >>> parse_scores("1: 8\\n2: 3", 2, 0, 10)
    [8.0, 3.0]
"""

from __future__ import annotations

import json
import re
from typing import Literal

from areal_agents.errors import AgentsError

__all__ = ["JudgeParseError", "OutOfRange", "parse_score", "parse_scores", "parse_verdict"]

_NUMBER = r"-?\d+(?:\.\d+)?"
_LABELLED = re.compile(rf"(?:score|rating|grade)\s*[:=]?\s*\**\s*({_NUMBER})", re.IGNORECASE)
_FRACTION = re.compile(rf"({_NUMBER})\s*/\s*{_NUMBER}")
_BOLD = re.compile(rf"\*\*\s*({_NUMBER})\s*\**")
_BARE = re.compile(rf"^\s*({_NUMBER})\s*\.?\s*$")
_JSON = re.compile(r"\{[^{}]*\}")
_VERDICT = re.compile(r"\b(correct|incorrect|right|wrong|yes|no)\b", re.IGNORECASE)
_POSITIVE = {"correct", "right", "yes"}
_MEMBER = re.compile(rf"^\s*\[?(?:answer|candidate|#)?\s*(\d+)\]?\s*[:.)=-]\s*\**\s*({_NUMBER})",
                     re.IGNORECASE | re.MULTILINE)


class JudgeParseError(AgentsError, ValueError):
    """A judge's reply holds no value in the expected format."""


class OutOfRange(JudgeParseError):
    """A judge's reply holds a score outside its declared scale."""


def _json_score(text: str) -> float | None:
    for blob in reversed(_JSON.findall(text)):
        try:
            data = json.loads(blob)
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict):
            for key in ("score", "rating", "grade"):
                value = data.get(key)
                if isinstance(value, int | float) and not isinstance(value, bool):
                    return float(value)
    return None


def _find_score(text: str) -> float | None:
    """The score a reply states, by the most explicit form present: JSON ``{"score": x}``,
    ``Score: x`` (last), ``x/N`` (last), ``**x**`` (last), a reply that is only a number."""
    found = _json_score(text)
    if found is not None:
        return found
    for pattern in (_LABELLED, _FRACTION, _BOLD):
        matches = pattern.findall(text)
        if matches:
            return float(matches[-1])
    bare = _BARE.match(text)
    return float(bare.group(1)) if bare else None


def parse_score(text: str | None, low: float, high: float) -> float:
    """The score in ``[low, high]`` a judge's reply states.

    Raises:
        JudgeParseError: no score in a known format (the reply is quoted, shortened).
        OutOfRange: a score outside ``[low, high]``.
    """
    text = text or ""
    value = _find_score(text)
    if value is None:
        raise JudgeParseError(f"no score found in the judge's reply {text[:80]!r}; the rubric "
                              f"should ask for 'Score: <{low:g}-{high:g}>'")
    if not low <= value <= high:
        raise OutOfRange(f"judge score {value:g} is outside the scale [{low:g}, {high:g}]")
    return value


def parse_verdict(text: str | None) -> Literal["correct", "incorrect"]:
    """``"correct"`` or ``"incorrect"`` from the last verdict word of a reply (correct, right,
    yes / incorrect, wrong, no).

    Raises:
        JudgeParseError: no verdict word in the reply.
    """
    found = _VERDICT.findall(text or "")
    if not found:
        raise JudgeParseError(f"no verdict (correct/incorrect) in the judge's reply "
                              f"{(text or '')[:80]!r}")
    return "correct" if found[-1].lower() in _POSITIVE else "incorrect"


def parse_scores(text: str | None, num: int, low: float, high: float) -> list[float]:
    """Scores of candidates ``1..num`` from lines ``<i>: <score>`` (or JSON
    ``{"scores": [...]}``), in candidate order.

    Raises:
        JudgeParseError: a candidate has no score, or an index outside ``1..num``.
        OutOfRange: a score outside ``[low, high]``.
    """
    text = text or ""
    scores: dict[int, float] = {}
    for blob in _JSON.findall(text):
        try:
            data = json.loads(blob)
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict) and isinstance(data.get("scores"), list):
            scores = {i + 1: float(v) for i, v in enumerate(data["scores"])
                      if isinstance(v, int | float)}
    if not scores:
        for index, value in _MEMBER.findall(text):
            scores[int(index)] = float(value)
    missing = [i for i in range(1, num + 1) if i not in scores]
    extra = sorted(set(scores) - set(range(1, num + 1)))
    if missing or extra:
        raise JudgeParseError(f"the judge's reply scores candidates {sorted(scores)}, expected "
                              f"1..{num} (missing {missing}, unknown {extra}): {text[:80]!r}")
    for i, value in scores.items():
        if not low <= value <= high:
            raise OutOfRange(f"judge score {value:g} of candidate {i} is outside the scale "
                             f"[{low:g}, {high:g}]")
    return [scores[i] for i in range(1, num + 1)]
