"""SolverJudge-v0: a solver answers a task, a judge grades the answer (generative reward model)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

from areal_agents.env import MultiAgentEnv
from areal_agents.envs import arithmetic, countdown
from areal_agents.envs._expr import extract_answer
from areal_agents.messages import Message, parse_action, user

AGENTS = ["solver", "judge"]
_VERDICT = re.compile(r"\b(incorrect|correct)\b", re.IGNORECASE)


def parse_verdict(text: str | None) -> str | None:
    """``"correct"``/``"incorrect"`` from the last such word in ``text``, else None."""
    found = _VERDICT.findall(text or "")
    return found[-1].lower() if found else None


class SolverJudge(MultiAgentEnv[list[Message], Message | str]):
    """A solver answers an arithmetic or countdown task; a judge says correct or incorrect.

    Two turns. The solver gets the task (as in ``Arithmetic-v0`` / ``Countdown-v0``) and
    replies. The judge then sees the task in short form and the solver's reply, last, and
    replies ``correct`` or ``incorrect`` (the last such word counts). The solver's reward is
    the judge's verdict (1.0 for ``correct``, else 0.0), mixed with the exact verifier's by
    ``truth_weight``; the judge's reward is 1.0 when its verdict agrees with the exact
    verifier, else 0.0 (also for a reply without a verdict). The final infos carry
    ``verdict``, ``solver_correct`` and ``success``: the solver's true correctness for the
    solver, agreement with the verifier for the judge.

    Args:
        task: ``"arithmetic"`` or ``"countdown"``.
        digits: operand digits (arithmetic).
        operations: operators (arithmetic).
        difficulty: countdown difficulty.
        truth_weight: the solver's reward is ``(1 - w) * verdict + w * truth`` (0: the judge's
            verdict only; 1: ground truth only).
    """

    def __init__(
        self,
        task: Literal["arithmetic", "countdown"] = "arithmetic",
        digits: int = 2,
        operations: str = "+-*",
        difficulty: countdown.Difficulty = "easy",
        truth_weight: float = 0.0,
    ) -> None:
        if not 0.0 <= truth_weight <= 1.0:
            raise ValueError(f"truth_weight must be in [0, 1], got {truth_weight}")
        self.truth_weight = float(truth_weight)
        if task not in ("arithmetic", "countdown"):
            raise ValueError(f"task must be 'arithmetic' or 'countdown', got {task!r}")
        arithmetic.Arithmetic(digits=digits, operations=operations)  # validates the options
        countdown.Countdown(difficulty=difficulty)
        self.task, self.digits, self.operations, self.difficulty = (
            task,
            digits,
            operations,
            difficulty,
        )
        self.possible_agents = list(AGENTS)
        self.agents: list[str] = []
        self.question, self.answer = "", 0
        self.numbers: list[int] = []
        self.solver_text = ""

    async def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, list[Message]], dict[str, dict[str, Any]]]:
        await super().reset(seed=seed)
        self.agents, self.solver_text = list(AGENTS), ""
        if self.task == "arithmetic":
            self.question, self.answer = arithmetic.make_task(
                self.np_random, self.digits, self.operations
            )
            prompt, self._short = arithmetic.prompt(self.question), f"{self.question} = ?"
        else:
            self.numbers, self.answer = countdown.make_task(self.np_random, self.difficulty)
            prompt = countdown.prompt(self.numbers, self.answer)
            self._short = f"Numbers: {' '.join(map(str, self.numbers))}. Target: {self.answer}"
        return {"solver": [user(prompt)]}, {a: {"task": self._short} for a in AGENTS}

    def verify(self, text: str | None) -> bool:
        """The exact verifier: whether the solver's reply solves the task."""
        if self.task == "arithmetic":
            return arithmetic.score(text, self.answer)[0] == 1.0
        return countdown.check(extract_answer(text), self.numbers, self.answer)[0]

    async def step(
        self, actions: Mapping[str, Message | str]
    ) -> tuple[
        dict[str, list[Message]],
        dict[str, float],
        dict[str, bool],
        dict[str, bool],
        dict[str, dict[str, Any]],
    ]:
        flags = dict.fromkeys(AGENTS, False)
        if "solver" in actions:
            self.solver_text = (parse_action(actions["solver"])["content"] or "").strip()
            prompt = (
                f"Judge the solver's answer. Reply 'correct' or 'incorrect'.\nTask: {self._short}\n"
                f"Solver: {self.solver_text[-300:]}"
            )
            return (
                {"judge": [user(prompt)]},
                dict.fromkeys(AGENTS, 0.0),
                flags,
                dict(flags),
                {a: {} for a in AGENTS},
            )
        verdict = parse_verdict(parse_action(actions["judge"])["content"])
        truth = self.verify(self.solver_text)
        w = self.truth_weight
        agreed = verdict is not None and (verdict == "correct") == truth
        rewards = {
            "solver": (1.0 - w) * float(verdict == "correct") + w * float(truth),
            "judge": float(agreed),
        }
        self.agents = []
        success = {"solver": truth, "judge": agreed}
        infos = {
            a: {"verdict": verdict, "solver_correct": truth, "success": success[a]} for a in AGENTS
        }
        return {}, rewards, dict.fromkeys(AGENTS, True), flags, infos

    def sample_action(self, agent: str | None = None) -> str:
        """Solver: a random number or expression; judge: ``correct``/``incorrect``."""
        rng = self.action_rng
        if agent == "judge":
            return rng.choice(["correct", "incorrect"])
        if self.task == "countdown" and self.numbers:
            return f"Answer: {' + '.join(map(str, rng.sample(self.numbers, 2)))}"
        return f"Answer: {rng.choice([self.answer, rng.randint(0, 10**self.digits)])}"
