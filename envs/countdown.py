"""Countdown-v0: reach a target number from given numbers with + - * / (one step)."""

from __future__ import annotations

from collections import Counter
from fractions import Fraction
from typing import Any, Literal

import numpy as np

from areal_agents.env import AgentEnv
from areal_agents.envs._expr import ExprError, extract_answer, parse
from areal_agents.messages import Message, parse_action, user

Difficulty = Literal["easy", "medium", "hard"]
# difficulty -> (how many numbers, largest number, most numbers the hidden solution uses)
LEVELS: dict[str, tuple[int, int, int]] = {
    "easy": (3, 10, 2),
    "medium": (4, 25, 3),
    "hard": (5, 50, 4),
}


def make_task(rng: np.random.Generator, difficulty: Difficulty = "medium") -> tuple[list[int], int]:
    """Draw ``(numbers, target)``; the target is reachable with at most all numbers.

    The target is built by combining a random subset of the numbers with random operations
    that keep every intermediate value a positive integer, so every task is solvable.
    """
    if difficulty not in LEVELS:
        raise ValueError(f"difficulty must be one of {sorted(LEVELS)}, got {difficulty!r}")
    count, largest, used = LEVELS[difficulty]
    while True:
        numbers = [int(n) for n in rng.integers(1, largest + 1, size=count)]
        order = rng.permutation(count)[: int(rng.integers(2, used + 1))]
        value = numbers[order[0]]
        for i in order[1:]:
            n = numbers[i]
            ops = ["+", "*"] + (["-"] if value > n else []) + (["/"] if value % n == 0 else [])
            op = ops[int(rng.integers(len(ops)))]
            value = {"+": value + n, "*": value * n, "-": value - n, "/": value // max(n, 1)}[op]
        if 10 <= value <= 999 and value not in numbers:
            return numbers, value


def prompt(numbers: list[int], target: int) -> str:
    """The task text; the target comes last."""
    nums = " ".join(str(n) for n in numbers)
    return (
        f"Numbers: {nums}. Use each number at most once with + - * / and parentheses "
        f"to write an expression equal to the target. Reply 'Answer: <expression>'.\n"
        f"Target: {target}"
    )


def check(expression: str | None, numbers: list[int], target: int) -> tuple[bool, str]:
    """Verify ``expression`` exactly; returns ``(correct, reason)``."""
    if not expression:
        return False, "no expression found; reply 'Answer: <expression>'"
    try:
        parsed = parse(expression)
    except ExprError as exc:
        return False, f"invalid expression: {exc}"
    if any(n.denominator != 1 for n in parsed.numbers):
        return False, "only the given whole numbers may be used"
    extra = Counter(int(n) for n in parsed.numbers) - Counter(numbers)
    if extra:
        return False, f"uses numbers not given (or too often): {sorted(extra.elements())}"
    if parsed.value != Fraction(target):
        return False, f"the expression equals {parsed.value}, not {target}"
    return True, "correct"


class Countdown(AgentEnv[list[Message], Message | str]):
    """Reach a target from given numbers with + - * / (exact verifier, difficulty option).

    One step: the observation lists the numbers and the target (last); the action contains
    ``Answer: <expression>`` (or the expression as the last line). Reward 1.0 if the
    expression uses only the given numbers (each at most once) and equals the target exactly,
    else 0.0. The expression is parsed by a safe recursive-descent parser, never ``eval``.

    Args:
        difficulty: ``"easy"`` (3 numbers <= 10), ``"medium"`` (4 numbers <= 25) or
            ``"hard"`` (5 numbers <= 50).

    Example:
        >>> import asyncio
        >>> env = Countdown(difficulty="easy")
        >>> obs, info = asyncio.run(env.reset(seed=0))
        >>> obs[0]["content"].splitlines()[-1], info["numbers"]
        ('Target: 13', [9, 7, 6])
        >>> asyncio.run(env.step("Answer: 7 + 6"))[1]
        1.0
    """

    def __init__(self, difficulty: Difficulty = "medium") -> None:
        if difficulty not in LEVELS:
            raise ValueError(f"difficulty must be one of {sorted(LEVELS)}, got {difficulty!r}")
        self.difficulty = difficulty
        self.numbers: list[int] = []
        self.target = 0

    async def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[list[Message], dict[str, Any]]:
        await super().reset(seed=seed)
        self.numbers, self.target = make_task(self.np_random, self.difficulty)
        info = {"numbers": list(self.numbers), "target": self.target}
        return [user(prompt(self.numbers, self.target))], info

    async def step(
        self, action: Message | str
    ) -> tuple[list[Message], float, bool, bool, dict[str, Any]]:
        text = parse_action(action)["content"]
        expression = extract_answer(text)
        correct, reason = check(expression, self.numbers, self.target)
        info = {"correct": correct, "reason": reason, "expression": expression}
        return (
            [user("Correct." if correct else f"Wrong: {reason}.")],
            float(correct),
            True,
            False,
            info,
        )

    def sample_action(self, agent: str | None = None) -> str:
        """A random expression over the current numbers (usually wrong)."""
        rng = self.action_rng
        nums = [str(n) for n in (self.numbers or [1, 2])]
        rng.shuffle(nums)
        expr = nums[0]
        for n in nums[1 : rng.randint(2, len(nums))]:
            expr = f"({expr} {rng.choice('+-*/')} {n})"
        return f"Answer: {expr}"
