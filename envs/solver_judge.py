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
"""The seats with ``judge_samples=1`` (the default)."""
_VERDICT = re.compile(r"\b(incorrect|correct)\b", re.IGNORECASE)


def judge_seats(judge_samples: int) -> list[str]:
    """The judge seats of ``SolverJudge(judge_samples=K)``: ``judge``, ``judge_1``, ...

    Example:
        >>> judge_seats(1), judge_seats(3)
        (['judge'], ['judge', 'judge_1', 'judge_2'])
    """
    return ["judge", *(f"judge_{k}" for k in range(1, judge_samples))]


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

    With ``judge_samples=K > 1`` the judge is asked K times on the same transcript: K judge
    seats (``judge``, ``judge_1``, ..., ``judge_{K-1}``; map them all to one policy) get the
    same prompt in the same step and act together, each verdict is its own judge sample with
    its own agreement reward and infos (``verdict``, ``success``), and the solver's verdict
    term is the *mean* verdict (the share of the K that said ``correct``). Every final info
    also carries ``verdicts`` (the K verdicts, in seat order); the solver's ``verdict`` is the
    ``judge`` seat's.

    With ``judge_sees_reference=True`` the judge's prompt also carries the gold answer, a
    ``Reference: <answer>`` line between the task and the solver's reply (see
    ``judge_prompt``), so judging can be a comparison (a reference-guided judge). Arithmetic:
    the reference is the correct result. Countdown: the reference is the target, which the
    task line already names; the judge must still check that the solver's expression uses
    the given numbers and reaches it. Off by default: the prompt is then unchanged.

    Args:
        task: ``"arithmetic"`` or ``"countdown"``.
        digits: operand digits (arithmetic).
        operations: operators (arithmetic).
        difficulty: countdown difficulty.
        truth_weight: the solver's reward is ``(1 - w) * verdict + w * truth`` (0: the judge's
            verdict only; 1: ground truth only).
        judge_samples: K, the judge verdicts per solver answer (judge seats).
        judge_sees_reference: put the gold answer in the judge's prompt.

    Example:
        >>> SolverJudge(judge_samples=3).possible_agents
        ['solver', 'judge', 'judge_1', 'judge_2']
    """

    def __init__(
        self,
        task: Literal["arithmetic", "countdown"] = "arithmetic",
        digits: int = 2,
        operations: str = "+-*",
        difficulty: countdown.Difficulty = "easy",
        truth_weight: float = 0.0,
        judge_samples: int = 1,
        judge_sees_reference: bool = False,
    ) -> None:
        if not isinstance(judge_sees_reference, bool):
            raise ValueError(f"judge_sees_reference must be a bool, got {judge_sees_reference!r}")
        self.judge_sees_reference = judge_sees_reference
        if isinstance(judge_samples, bool) or not isinstance(judge_samples, int) \
                or judge_samples < 1:
            raise ValueError(f"judge_samples must be an int >= 1, got {judge_samples!r}")
        self.judges = judge_seats(judge_samples)
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
        self.possible_agents = ["solver", *self.judges]
        self.agents: list[str] = []
        self.question, self.answer = "", 0
        self.numbers: list[int] = []
        self.solver_text = ""

    async def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, list[Message]], dict[str, dict[str, Any]]]:
        await super().reset(seed=seed)
        self.agents, self.solver_text = list(self.possible_agents), ""
        if self.task == "arithmetic":
            self.question, self.answer = arithmetic.make_task(
                self.np_random, self.digits, self.operations
            )
            prompt, self._short = arithmetic.prompt(self.question), f"{self.question} = ?"
        else:
            self.numbers, self.answer = countdown.make_task(self.np_random, self.difficulty)
            prompt = countdown.prompt(self.numbers, self.answer)
            self._short = f"Numbers: {' '.join(map(str, self.numbers))}. Target: {self.answer}"
        return {"solver": [user(prompt)]}, {a: {"task": self._short} for a in self.agents}

    def judge_prompt(self, reply: str) -> str:
        """The judge's prompt for the solver's ``reply`` to the current task (its last 300
        characters), with a ``Reference:`` line when ``judge_sees_reference``.

        Example:
            >>> import asyncio
            >>> env = SolverJudge(digits=1, operations="+", judge_sees_reference=True)
            >>> _ = asyncio.run(env.reset(seed=0))
            >>> print(env.judge_prompt("Answer: 3"))  # doctest: +ELLIPSIS
            Judge the solver's answer. Reply 'correct' or 'incorrect'.
            Task: ... + ... = ?
            Reference: ...
            Solver: Answer: 3
        """
        reference = f"Reference: {self.answer}\n" if self.judge_sees_reference else ""
        return (f"Judge the solver's answer. Reply 'correct' or 'incorrect'.\n"
                f"Task: {self._short}\n{reference}Solver: {reply[-300:]}")

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
        everyone = self.possible_agents
        flags = dict.fromkeys(everyone, False)
        if "solver" in actions:
            self.solver_text = (parse_action(actions["solver"])["content"] or "").strip()
            prompt = self.judge_prompt(self.solver_text)
            return (
                {j: [user(prompt)] for j in self.judges},
                dict.fromkeys(everyone, 0.0),
                flags,
                dict(flags),
                {a: {} for a in everyone},
            )
        verdicts = [parse_verdict(parse_action(actions[j])["content"]) for j in self.judges]
        truth = self.verify(self.solver_text)
        agreed = [v is not None and (v == "correct") == truth for v in verdicts]
        said = sum(v == "correct" for v in verdicts) / len(verdicts)
        w = self.truth_weight
        rewards = {"solver": (1.0 - w) * said + w * float(truth),
                   **{j: float(a) for j, a in zip(self.judges, agreed, strict=True)}}
        self.agents = []
        infos: dict[str, dict[str, Any]] = {
            "solver": {"verdict": verdicts[0], "solver_correct": truth, "success": truth}}
        for j, v, a in zip(self.judges, verdicts, agreed, strict=True):
            infos[j] = {"verdict": v, "solver_correct": truth, "success": a}
        for info in infos.values():
            info["verdicts"] = list(verdicts)
        return {}, rewards, dict.fromkeys(everyone, True), flags, infos

    def sample_action(self, agent: str | None = None) -> str:
        """Solver: a random number or expression; judge: ``correct``/``incorrect``."""
        rng = self.action_rng
        if agent is not None and agent in self.judges:
            return rng.choice(["correct", "incorrect"])
        if self.task == "countdown" and self.numbers:
            return f"Answer: {' + '.join(map(str, rng.sample(self.numbers, 2)))}"
        return f"Answer: {rng.choice([self.answer, rng.randint(0, 10**self.digits)])}"
