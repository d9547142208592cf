"""Arithmetic-v0: multi-digit arithmetic with an ``Answer: <number>`` format (one step)."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from areal_agents.env import AgentEnv
from areal_agents.messages import Message, parse_action, user

OPERATIONS = "+-*/"
_ANSWER = re.compile(r"answer\s*:\s*(-?\d{1,40})\s*\.?\s*$", re.IGNORECASE | re.MULTILINE)


def make_task(
    rng: np.random.Generator, digits: int = 2, operations: str = "+-*"
) -> tuple[str, int]:
    """Draw ``(question, answer)``, e.g. ``("47 * 83", 3901)``; division is always exact."""
    low, high = 10 ** (digits - 1) if digits > 1 else 0, 10**digits
    a, b = (int(x) for x in rng.integers(low, high, size=2))
    op = operations[int(rng.integers(len(operations)))]
    if op == "/":
        b = max(b, 1)
        a = a * b  # the quotient has `digits` digits, the division is exact
        return f"{a} / {b}", a // b
    return f"{a} {op} {b}", {"+": a + b, "-": a - b, "*": a * b}[op]


def prompt(question: str) -> str:
    """The task text; the question comes last."""
    return f"Compute the result. Reply 'Answer: <number>'.\n{question} = ?"


def parse_answer(text: str | None) -> int | None:
    """The integer of the last ``Answer: <int>`` line, or None when the format is not met."""
    found = _ANSWER.findall(text or "")
    return int(found[-1]) if found else None


def score(text: str | None, answer: int, partial_credit: bool = False) -> tuple[float, str]:
    """``(reward, reason)`` for a reply: 1.0 if exactly right, else 0.0 or partial credit.

    Partial credit (when enabled, for well-formatted wrong answers) is half the fraction of
    digit positions, aligned from the right and counting the sign, that match the answer.
    """
    given = parse_answer(text)
    if given is None:
        return 0.0, "no answer found; reply 'Answer: <number>'"
    if given == answer:
        return 1.0, "correct"
    if not partial_credit:
        return 0.0, f"wrong ({given})"
    want, got = str(answer), str(given)
    width = max(len(want), len(got))
    same = sum(x == y for x, y in zip(want.rjust(width), got.rjust(width), strict=True))
    return 0.5 * same / width, f"wrong ({given}), {same}/{width} digits right"


class Arithmetic(AgentEnv[list[Message], Message | str]):
    """Multi-digit arithmetic with an 'Answer: <number>' format and optional partial credit.

    One step: the observation asks for ``a op b`` (last line); the action must contain a line
    ``Answer: <integer>``. Reward 1.0 for the exact result, else 0.0 — or, with
    ``partial_credit``, up to 0.5 for the fraction of right-aligned digits that match.

    Args:
        digits: digits per operand (1-9).
        operations: the operators to draw from, a subset of ``"+-*/"`` (division is exact).
        partial_credit: give partial reward for well-formatted wrong answers.

    Example:
        >>> import asyncio
        >>> env = Arithmetic()
        >>> obs, _ = asyncio.run(env.reset(seed=0))
        >>> obs[0]["content"].splitlines()[-1]
        '86 - 67 = ?'
        >>> asyncio.run(env.step("Answer: 19"))[:3]
        ([{'role': 'user', 'content': 'Correct.'}], 1.0, True)
    """

    def __init__(
        self, digits: int = 2, operations: str = "+-*", partial_credit: bool = False
    ) -> None:
        if not 1 <= digits <= 9:
            raise ValueError(f"digits must be in 1..9, got {digits}")
        if not operations or set(operations) - set(OPERATIONS):
            raise ValueError(
                f"operations must be a non-empty subset of {OPERATIONS!r}, got {operations!r}"
            )
        self.digits = digits
        self.operations = operations
        self.partial_credit = partial_credit
        self.question, self.answer = "", 0

    async def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[list[Message], dict[str, Any]]:
        await super().reset(seed=seed)
        self.question, self.answer = make_task(self.np_random, self.digits, self.operations)
        return [user(prompt(self.question))], {"question": self.question, "answer": self.answer}

    async def step(
        self, action: Message | str
    ) -> tuple[list[Message], float, bool, bool, dict[str, Any]]:
        reward, reason = score(parse_action(action)["content"], self.answer, self.partial_credit)
        feedback = "Correct." if reward == 1.0 else f"Wrong: {reason}."
        return [user(feedback)], reward, True, False, {"reason": reason, "answer": self.answer}

    def sample_action(self, agent: str | None = None) -> str:
        """``Answer: <random integer of a plausible size>``."""
        scale = 10 ** (2 * self.digits)
        return f"Answer: {self.action_rng.randint(-scale // 10, scale)}"
