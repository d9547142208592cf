"""GuessNumber-v0: find a hidden number from higher/lower feedback (multi-turn)."""

from __future__ import annotations

import math
import re
from typing import Any

from areal_agents.env import AgentEnv
from areal_agents.messages import Message, parse_action, user

_INT = re.compile(r"(?<!\d)-?\d{1,12}(?!\d)")  # longer digit runs are no guess


class GuessNumber(AgentEnv[list[Message], Message | str]):
    """Guess a hidden number from higher/lower feedback within a limited number of guesses.

    Each step the agent guesses a whole number (the last integer in its reply); the env
    answers ``Higher.`` or ``Lower.`` with the guesses left. A guess outside the range or a reply
    without a number costs a guess and gets a corrective message. The episode terminates
    on the right guess (reward 1.0) or when the guesses run out (reward 0.0); every other step
    has reward 0.0. With ``max_guesses = ceil(log2(high - low + 2))`` bisection always wins.

    Args:
        low, high: the inclusive range of the hidden number.
        max_guesses: guesses allowed; default: the bisection bound for the range.

    Example:
        >>> import asyncio
        >>> env = GuessNumber()
        >>> _ = asyncio.run(env.reset(seed=0))
        >>> asyncio.run(env.step("50"))[:3]
        ([{'role': 'user', 'content': 'Higher. Guesses left: 6'}], 0.0, False)
    """

    def __init__(self, low: int = 1, high: int = 100, max_guesses: int | None = None) -> None:
        if high < low:
            raise ValueError(f"high must be >= low, got low={low}, high={high}")
        bound = math.ceil(math.log2(high - low + 2))
        self.max_guesses = bound if max_guesses is None else max_guesses
        if self.max_guesses < 1:
            raise ValueError(f"max_guesses must be >= 1, got {max_guesses}")
        self.low, self.high = low, high
        self.secret = low
        self.guesses_left = 0

    async def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[list[Message], dict[str, Any]]:
        await super().reset(seed=seed)
        self.secret = int(self.np_random.integers(self.low, self.high + 1))
        self.guesses_left = self.max_guesses
        task = (
            f"I am thinking of a whole number from {self.low} to {self.high}. "
            f"After each guess I say Higher or Lower. Reply with one number. "
            f"Guesses left: {self.guesses_left}"
        )
        return [user(task)], {"secret": self.secret}

    async def step(
        self, action: Message | str
    ) -> tuple[list[Message], float, bool, bool, dict[str, Any]]:
        numbers = _INT.findall(parse_action(action)["content"] or "")
        guess = int(numbers[-1]) if numbers else None
        self.guesses_left -= 1
        info: dict[str, Any] = {"guess": guess, "guesses_left": self.guesses_left}
        if guess == self.secret:
            return [user(f"Correct! It was {self.secret}.")], 1.0, True, False, info
        if guess is None:
            feedback = f"Reply with one whole number from {self.low} to {self.high}."
        elif not self.low <= guess <= self.high:
            feedback = f"{guess} is out of range: the number is from {self.low} to {self.high}."
        else:
            feedback = "Higher." if guess < self.secret else "Lower."
        if self.guesses_left == 0:
            return (
                [user(f"{feedback} No guesses left; it was {self.secret}.")],
                0.0,
                True,
                False,
                info,
            )
        return [user(f"{feedback} Guesses left: {self.guesses_left}")], 0.0, False, False, info

    def sample_action(self, agent: str | None = None) -> str:
        """A random number in the range."""
        return str(self.action_rng.randint(self.low, self.high))
