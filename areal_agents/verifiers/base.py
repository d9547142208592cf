"""The verifier contract: ``Verdict`` (a score and a reason) and the ``Verifier`` protocol."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Protocol, runtime_checkable


@dataclasses.dataclass(frozen=True)
class Verdict:
    """How well a response answers a task.

    Attributes:
        score: in ``[0, 1]``; 1.0 means correct.
        reason: one short human sentence saying why, e.g. ``"expected 3/4, got 0.75: equal"``.
            A verdict below 1.0 never states the expected answer: multi-turn envs show the
            reason to the model as feedback.

    Example:
        >>> Verdict(1.0, "expected 12, got 12: equal").correct
        True
    """

    score: float
    reason: str

    def __post_init__(self) -> None:
        if not 0.0 <= self.score <= 1.0:
            raise ValueError(f"Verdict.score must be in [0, 1], got {self.score!r}")

    @property
    def correct(self) -> bool:
        """Whether the score is 1.0 (full marks)."""
        return self.score >= 1.0


@runtime_checkable
class Verifier(Protocol):
    """Scores a model's response against a task's reference answer.

    ``verify`` never raises for a bad response (empty, unparseable, the wrong type): it
    returns a ``Verdict`` with score 0 and a reason saying what was wrong. A verifier whose
    check waits on I/O (e.g. running code in a sandbox) may also define
    ``async averify(response, answer) -> Verdict``; envs await it when present (see
    ``averify``). Verifiers are small picklable objects whose options are constructor
    keyword arguments.
    """

    def verify(self, response: str, answer: Any) -> Verdict:
        """Score ``response`` against the reference ``answer``."""
        ...


async def averify(verifier: Verifier, response: str, answer: Any) -> Verdict:
    """Run ``verifier`` from async code: ``await verifier.averify(...)`` when it defines one,
    else ``verifier.verify(...)`` inline (the built-in verifiers take milliseconds)."""
    method = getattr(verifier, "averify", None)
    if method is not None and inspect.iscoroutinefunction(method):
        return await method(response, answer)
    return verifier.verify(response, answer)


def shorten(text: str, limit: int = 40) -> str:
    """``text`` on one line, cut to ``limit`` characters with an ellipsis (for reasons)."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
