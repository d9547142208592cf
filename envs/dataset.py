"""Dataset-v0 / DatasetMultiTurn-v0: question-answer tasks read from a data file, scored by a
verifier (``areal_agents.verifiers``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from areal_agents.env import AgentEnv
from areal_agents.errors import ConfigError
from areal_agents.messages import Message, parse_action, system, user
from areal_agents.verifiers import Verifier, averify, resolve

from ._dataset_io import Source, file_tasks, load_rows, tasks_of
from ._task_seeds import SPLITS, SeedSplit, Split, eval_count


class DatasetEnv(AgentEnv[list[Message], Message | str]):
    """A question-answer task per seed, read from a dataset and scored by a verifier.

    ``reset(seed=s)`` picks row ``SeedSplit.row(s, split)`` (see ``envs/_task_seeds.py``):
    a shuffle keyed by ``shuffle_seed``, with held-out eval rows that eval seeds (from
    ``eval_seed_start`` on, by default) never leave and training seeds never reach. The first
    observation is the optional system prompt and the rendered question.

    Each step is one answer, scored by the verifier. The episode ends at the first correct
    answer (score 1) or after ``max_turns`` answers; the reward comes once, on that last
    step: the last answer's score minus ``retry_penalty`` per extra turn. Before the last
    turn a wrong answer gets the verifier's reason back as feedback (a wrong verdict's reason
    never states the expected answer). The last observation says whether the answer was
    right, and why; ``info`` carries ``success``, ``score``, ``verdict_reason``, ``turn``,
    ``answer`` and ``row``.

    Args:
        path: a ``.jsonl``, ``.json`` or ``.parquet`` file (relative to the current directory).
        rows: instead of ``path``: a list of dicts or a ``datasets.Dataset`` split.
        prompt_template: ``str.format`` over the row (``"Q: {question}"``), or a field name.
        answer_field: the field holding the reference answer.
        answer_pattern: a regex whose group 1, searched in the answer field, is the answer
            (e.g. ``"#### (.+)"`` for GSM8K); None: the whole field.
        verifier: a registered verifier name (``math``, ``exact``, ``regex``, ``numeric``,
            ``json_schema``, ``code``) or an object with ``verify(response, answer)``.
        verifier_kwargs: options of a named verifier.
        system_prompt: a system message before each question; None: none.
        split: ``"seed"`` (seeds from ``eval_seed_start`` on are eval), ``"train"``,
            ``"eval"`` or ``"all"`` (no held-out rows).
        eval_fraction, eval_size: how many rows are held out (``eval_size`` wins).
        eval_seed_start: the first eval seed under ``split="seed"``.
        shuffle_seed: keys the row shuffle and the train/eval partition.
        max_turns: answers allowed per episode (1: single-turn).
        retry_penalty: subtracted from the final reward per turn after the first.

    Raises:
        ConfigError: no source or two, a loading error (file, line and fix), a row without
            the answer field or a template field, or bad split options.

    Example:
        >>> import asyncio
        >>> env = DatasetEnv(rows=[{"question": "What is 7 + 5?", "answer": "12"}] * 3,
        ...                  verifier="numeric", eval_size=1)
        >>> obs, info = asyncio.run(env.reset(seed=0))
        >>> obs[0]["content"]
        'What is 7 + 5?'
        >>> _, reward, done, _, info = asyncio.run(env.step("7 + 5 = 12"))
        >>> reward, done, info["success"], info["verdict_reason"]
        (1.0, True, True, 'expected 12, got 12: equal')
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        rows: Source | None = None,
        prompt_template: str = "{question}",
        answer_field: str = "answer",
        answer_pattern: str | None = None,
        verifier: str | Verifier = "math",
        verifier_kwargs: dict[str, Any] | None = None,
        system_prompt: str | None = None,
        split: Split = "seed",
        eval_fraction: float = 0.1,
        eval_size: int | None = None,
        eval_seed_start: int = 1_000_000,
        shuffle_seed: int = 0,
        max_turns: int = 1,
        retry_penalty: float = 0.0,
    ) -> None:
        if (path is None) == (rows is None):
            raise ConfigError(
                "a dataset env needs exactly one data source: path='tasks.jsonl' (.jsonl, "
                ".json or .parquet) or rows=[{...}, ...] / a datasets.Dataset"
            )
        if split not in SPLITS:
            raise ConfigError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
        if max_turns < 1:
            raise ConfigError(f"max_turns must be >= 1, got {max_turns}")
        fields = (prompt_template, answer_field, answer_pattern)
        if path is not None and Path(path).is_file():  # cached: trainers make an env per episode
            stat = Path(path).stat()
            key = (str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)
            self.data, self.prompts, self.answers = file_tasks(key, *fields)
        else:
            self.data = load_rows(path if path is not None else rows)  # type: ignore[arg-type]
            self.prompts, self.answers = tasks_of(self.data, *fields)
        self.verifier = resolve(verifier, verifier_kwargs)
        self.system_prompt, self.split, self.max_turns = system_prompt, split, max_turns
        self.retry_penalty = retry_penalty
        num_eval = 0 if split == "all" else eval_count(len(self.prompts), eval_fraction, eval_size)
        self.seeds = SeedSplit(len(self.prompts), num_eval, shuffle_seed, eval_seed_start)
        self.row, self.turn = 0, 0

    async def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[list[Message], dict[str, Any]]:
        await super().reset(seed=seed)
        task_seed = seed if seed is not None else self.seeds.random_seed(self.np_random, self.split)
        self.row, self.turn = self.seeds.row(task_seed, self.split), 0
        obs = [system(self.system_prompt)] if self.system_prompt is not None else []
        obs.append(user(self.prompts[self.row]))
        return obs, {"row": self.row, "answer": self.answers[self.row]}

    async def step(
        self, action: Message | str
    ) -> tuple[list[Message], float, bool, bool, dict[str, Any]]:
        text = parse_action(action)["content"] or ""
        row, answer = self.row, self.answers[self.row]
        try:
            verdict = await averify(self.verifier, text, answer)
        except ValueError as exc:  # the verifiers' signal for an unusable reference answer
            raise ConfigError(f"{self.data.where(row)}: {exc}") from None
        self.turn += 1
        done = verdict.correct or self.turn >= self.max_turns
        info = {
            "success": verdict.correct, "score": verdict.score, "verdict_reason": verdict.reason,
            "turn": self.turn, "answer": answer, "row": row,
        }  # fmt: skip
        if not done:
            left = self.max_turns - self.turn
            tries = f"{left} {'try' if left == 1 else 'tries'} left"
            return (
                [user(f"Not correct: {verdict.reason}. Try again ({tries}).")],
                0.0,
                False,
                False,
                info,
            )
        reward = verdict.score - self.retry_penalty * (self.turn - 1)
        if verdict.correct:
            feedback = f"Correct: {verdict.reason}."
        else:
            feedback = f"Not correct: {verdict.reason}. The expected answer was {answer}."
        return [user(feedback)], float(reward), True, False, info

    def sample_action(self, agent: str | None = None) -> str:
        """``The answer is <the answer of a random row>`` (right for some tasks)."""
        return f"The answer is {self.answers[self.action_rng.randrange(len(self.answers))]}."
