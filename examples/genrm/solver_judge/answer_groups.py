"""Advantage groups per solver answer: the judge's K verdicts on one answer, compared.

With ``SolverJudge(judge_samples=K)`` the judge is asked K times on the same transcript (seats
``judge``, ``judge_1``, ...; all mapped to one policy). The Trainer's GRPO groups samples by
(task seed, agent id), so each seat's group would mix the *different* answers of the task's
episodes, and the baseline would mostly reflect which answers were easy to judge.
``AnswerGroupedGRPO`` with ``per_answer=True`` (set for the judge's policy only, through
``Policy(algorithm_params={"per_answer": True})``) keys the groups by (task seed, episode)
instead: the K verdicts on one answer form one group, whatever their seats, so a verdict's
advantage is its reward minus the mean reward of the verdicts on the *same* answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from areal_agents.algorithms import GRPO
from areal_agents.episode import Episode
from areal_agents.samples import Sample


def is_judge_seat(agent_id: str) -> bool:
    """Whether ``agent_id`` is one of SolverJudge's judge seats (``judge``, ``judge_<k>``)."""
    return agent_id == "judge" or agent_id.startswith("judge_")


def judge_infos(episode: Episode) -> list[tuple[str, dict[str, Any]]]:
    """``(seat, final info)`` of each judge seat of a finished SolverJudge episode that
    carries a verdict (``solver_correct`` set), in seat order."""
    return [(a, info) for a, info in episode.infos.items()
            if is_judge_seat(a) and "solver_correct" in info]


def answer_group_ids(samples: Sequence[Sample]) -> torch.Tensor:
    """Dense ``[N]`` group index per sample, keyed by ``(sample.group, meta["episode"])``
    (the episode id the Trainer writes into every sample), in order of first appearance.

    Example:
        >>> s = [Sample([1], [1], [0.0], [0], group="7", agent=a, meta={"episode": e})
        ...      for a, e in (("judge", "x"), ("judge_1", "x"), ("judge", "y"))]
        >>> answer_group_ids(s).tolist()
        [0, 0, 1]

    Raises:
        ValueError: a sample without ``meta["episode"]`` (its answer is unknown).
    """
    index: dict[tuple[str, str], int] = {}
    ids = []
    for s in samples:
        episode = s.meta.get("episode")
        if episode is None:
            raise ValueError(f"sample of agent {s.agent!r}, group {s.group!r} has no "
                             "meta['episode']; per-answer groups need the Trainer's episode ids")
        ids.append(index.setdefault((s.group, str(episode)), len(index)))
    return torch.tensor(ids, dtype=torch.long)


@dataclass
class AnswerGroupedGRPO(GRPO):
    """GRPO that can group a policy's samples per episode (per solver answer).

    Attributes:
        per_answer: with ``baseline="group"``, key the groups by (task seed, episode) (see
            ``answer_group_ids``) instead of (task seed, agent); off, this is plain GRPO.

    Example:
        >>> s = [Sample([1], [1], [0.0], [0], reward=r, group="7", agent=a, meta={"episode": e})
        ...      for a, e, r in (("judge", "x", 1.0), ("judge_1", "x", 0.0),
        ...                      ("judge", "y", 1.0), ("judge_1", "y", 1.0))]
        >>> AnswerGroupedGRPO(per_answer=True, std_normalize=False).advantages(s)
        [0.5, -0.5, 0.0, 0.0]
    """

    per_answer: bool = False

    def _scalar_advantages(self, rewards: torch.Tensor, samples: Sequence[Sample]
                           ) -> torch.Tensor:
        if not self.per_answer or self.baseline != "group":
            return super()._scalar_advantages(rewards, samples)
        return self._group_advantages(rewards, answer_group_ids(samples))
