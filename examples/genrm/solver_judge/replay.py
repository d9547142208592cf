"""Replay of the starting solver's answers in the judge's training batches (round 6).

As the solver learns, the answers the judge is trained on drift away from those of the
starting solver, on which the judge is graded (``own_answers.py``'s held-out set). With
``--judge-replay f`` a share of each training group's episodes are *replay* episodes: the
judge grades an answer drawn from a pool of the starting solver's answers with known truth
(the ``TRAIN_SEEDS`` answers the judge's warm start samples), the solver does not act, so it
is neither trained on nor paid for them. The pool is disjoint from the held-out set: no pool
answer shares a task seed or a judge prompt with a held-out answer (``disjoint_pool`` drops
the answers whose prompt a held-out answer also has; ``ReplayPool.fill`` refuses overlap).

Which episodes replay: ``round(f * group_size)`` members of every training group, counted per
task seed in the order the episodes reset (the trainer resets each member once); seeds from
``eval_from`` on (evaluation seeds) never replay.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from judge_seats import judge_infos
from own_answers import Answer

from areal_agents.envs.solver_judge import SolverJudge
from areal_agents.episode import Episode
from areal_agents.messages import Message


def disjoint_pool(answers: list[Answer], held_out: list[Answer], by: str = "prompt"
                  ) -> tuple[list[Answer], int]:
    """``answers`` without those whose judge prompt a held-out answer also has, and how many
    were dropped (one-digit tasks repeat, so the same task and reply recur across seeds).
    ``by="seed"`` (a diagnostic: the pool then holds the very judge inputs of held-out
    answers, as the judge's SFT data does) keeps them and only checks the task seeds.

    Raises:
        ValueError: an answer's task seed is also a held-out answer's.

    Example:
        >>> held = [Answer(9, "Answer: 2", "p1", True)]
        >>> disjoint_pool([Answer(1, "Answer: 2", "p1", True), Answer(2, "x", "p2", False)], held)
        ([Answer(seed=2, reply='x', prompt='p2', correct=False)], 1)
    """
    shared = {a.seed for a in answers} & {a.seed for a in held_out}
    if shared:
        raise ValueError(f"pool and held-out answers share task seeds {sorted(shared)[:5]}")
    if by not in ("prompt", "seed"):
        raise ValueError(f"by must be 'prompt' or 'seed', got {by!r}")
    prompts = {a.prompt for a in held_out} if by == "prompt" else set()
    kept = [a for a in answers if a.prompt not in prompts]
    return kept, len(answers) - len(kept)


class ReplayPool:
    """The starting solver's answers that replay episodes grade, and which episodes replay.

    Args:
        fraction: share of each training group's episodes that replay.
        group_size: the trainer's episodes per task seed.
        eval_from: seeds from this one on never replay (the trainer's evaluation seeds).
        seed: seed of the draws from the pool.

    Raises:
        ValueError: ``fraction`` outside [0, 1), or it leaves a group fewer than 2 live
            episodes (the solver's GRPO group would have no advantage).

    Example:
        >>> pool = ReplayPool(0.5, group_size=8, eval_from=100)
        >>> pool.fill([Answer(1, "Answer: 2", "p", True)], held_out=[])
        >>> [pool.draw(7) is not None for _ in range(8)]
        [True, True, True, True, False, False, False, False]
        >>> pool.draw(100) is None  # an evaluation seed
        True
    """

    def __init__(self, fraction: float, group_size: int, eval_from: int, seed: int = 0) -> None:
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"the replay fraction must be in [0, 1), got {fraction}")
        self.per_group = round(fraction * group_size)
        if fraction and group_size - self.per_group < 2:
            raise ValueError(f"replay {fraction} of groups of {group_size} leaves "
                             f"{group_size - self.per_group} live episode(s); the solver needs 2")
        self.fraction, self.group_size, self.eval_from = fraction, group_size, eval_from
        self.answers: list[Answer] = []
        self._rng = random.Random(seed)
        self._resets: dict[int, int] = {}  # task seed -> episodes reset so far

    def fill(self, answers: list[Answer], held_out: list[Answer], by: str = "prompt") -> None:
        """Use ``answers`` (already ``disjoint_pool``-ed with the same ``by``) as the pool.

        Raises:
            ValueError: the pool is empty while episodes should replay, or an answer shares a
                task seed (or with ``by="prompt"`` a judge prompt) with a held-out answer.
        """
        seeds = {a.seed for a in held_out}
        prompts = {a.prompt for a in held_out} if by == "prompt" else set()
        overlap = [a for a in answers if a.seed in seeds or a.prompt in prompts]
        if overlap:
            raise ValueError(f"{len(overlap)} pool answers are in the held-out set (seed or "
                             f"judge prompt), e.g. {overlap[0]}")
        if self.per_group and not answers:
            raise ValueError("an empty replay pool")
        self.answers = list(answers)

    def draw(self, seed: int | None) -> Answer | None:
        """The pool answer the episode reset at task ``seed`` grades, or None (a live episode).

        Raises:
            RuntimeError: an episode should replay but ``fill`` was not called.
        """
        if seed is None or seed >= self.eval_from or not self.per_group:
            return None
        member = self._resets.get(seed, 0)
        self._resets[seed] = member + 1
        if self._resets[seed] >= self.group_size:
            del self._resets[seed]
        if member >= self.per_group:
            return None
        if not self.answers:
            raise RuntimeError("ReplayPool.draw before fill: the pool is empty")
        return self.answers[self._rng.randrange(len(self.answers))]


class ReplaySolverJudge(SolverJudge):
    """SolverJudge whose episode at a task seed the ``pool`` replays starts at the judge: the
    judge seats grade the pool answer (its task re-made from its own seed, the judge prompt the
    env renders checked against the stored one); the solver does not act and gets no reward.
    Replay episodes' infos carry ``replay: True`` (every seat) and the judge seats' usual
    ``verdict``, ``solver_correct`` (the exact verifier on the pool answer) and ``success``.

    Raises (from ``reset``):
        ValueError: the env rendered another judge prompt, or another truth, than stored.
    """

    def __init__(self, pool: ReplayPool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pool = pool
        self.replayed: Answer | None = None

    async def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None
                    ) -> tuple[dict[str, list[Message]], dict[str, dict[str, Any]]]:
        self.replayed = answer = self.pool.draw(seed)
        if answer is None:
            return await super().reset(seed=seed, options=options)
        _, infos = await super().reset(seed=answer.seed, options=options)
        obs, *_ = await super().step({"solver": answer.reply})
        prompt = obs["judge"][0]["content"]
        if prompt != answer.prompt or self.verify(self.solver_text) != answer.correct:
            raise ValueError(f"seed {answer.seed}: the env rendered another judge prompt or "
                             "truth than the pool stored")
        self.agents = list(self.judges)
        return obs, {a: {**info, "replay": True} for a, info in infos.items()}

    async def step(self, actions: Mapping[str, Message | str]) -> tuple[
            dict[str, list[Message]], dict[str, float], dict[str, bool], dict[str, bool],
            dict[str, dict[str, Any]]]:
        obs, rewards, terms, truncs, infos = await super().step(actions)
        if self.replayed is not None:
            rewards.pop("solver", None)
            infos.pop("solver", None)
            for info in infos.values():
                info["replay"] = True
        return obs, rewards, terms, truncs, infos


class ReplayTally:
    """A reward function that adds nothing and counts replay and live episodes: the judge's
    accuracy on each (every judge seat's verdict) and the solver's true accuracy on live
    episodes only (``train/solver/success`` also averages in the replay episodes, where the
    solver did not act: 0). ``take_metrics()`` is logged by the Trainer each step.
    """

    policy: str | None = None  # calls no served model

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.episodes = {True: 0, False: 0}  # replay, live
        self.verdicts = {True: [0, 0], False: [0, 0]}  # agreed, verdicts
        self.solver = [0, 0]  # right, live episodes with a solver answer

    def bind(self, client: Any) -> None:
        """No model to call."""

    def __call__(self, episode: Episode) -> float:
        seats = judge_infos(episode)
        if not seats:
            return 0.0
        replay = bool(seats[0][1].get("replay"))
        self.episodes[replay] += 1
        for _, info in seats:
            self.verdicts[replay][0] += bool(info["success"])
            self.verdicts[replay][1] += 1
        solver = episode.infos.get("solver", {})
        if not replay and "success" in solver:
            self.solver[0] += bool(solver["success"])
            self.solver[1] += 1
        return 0.0

    def take_metrics(self) -> dict[str, float]:
        """``replay/{episodes,share,judge_accuracy}``, ``live/{episodes,judge_accuracy,
        solver_success}`` since the last call (rates only where there is a count)."""
        episodes, verdicts, solver = self.episodes, self.verdicts, self.solver
        self._reset()
        total = episodes[True] + episodes[False]
        out = {"replay/episodes": float(episodes[True]), "live/episodes": float(episodes[False])}
        if total:
            out["replay/share"] = episodes[True] / total
        for replay, name in ((True, "replay"), (False, "live")):
            if verdicts[replay][1]:
                out[f"{name}/judge_accuracy"] = verdicts[replay][0] / verdicts[replay][1]
        if solver[1]:
            out["live/solver_success"] = solver[0] / solver[1]
        return out


def save_pool(folder: Path, answers: list[Answer]) -> None:
    """Write the starting solver's training answers to ``folder/replay_pool.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "replay_pool.json").write_text(json.dumps([dataclasses.asdict(a) for a in answers]))


def load_pool(folder: Path) -> list[Answer]:
    """What ``save_pool`` wrote to ``folder``, or [] when there is nothing."""
    path = folder / "replay_pool.json"
    return [Answer(**a) for a in json.loads(path.read_text())] if path.exists() else []
