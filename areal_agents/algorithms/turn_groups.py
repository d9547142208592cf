"""Credit groups of group-relative advantages: by (task, role), (task, role, turn) or
(task, policy, episode).

With ``group_by="role"`` (the default) a sample is compared with the samples of the same task
group (``Sample.group``, the task seed) and role (``Sample.agent``). With ``group_by="turn"``
(AT-GRPO's turn-level grouping) also with the same turn: the *k*-th action of a role is compared
only with *k*-th actions of that role on the same task. This matters when each turn is its own
sample (an env that re-renders the whole prompt every turn, or a split conversation); a merged
multi-turn sample counts as its first turn (``Sample.meta["turns"][0]``, the session's turn
index written by the gateway's tokenization; 0 when absent).

With ``group_by="episode"`` the samples one policy produced in one episode form a group
(key: task group, ``Sample.policy``, ``Sample.meta["episode"]``, the episode id the Trainer
writes into every sample), whatever their agent ids: several seats acting with one policy on
the same state (SolverJudge's ``judge_samples`` K judge seats, which see one answer) are
compared with each other only, not with the seats of the task's other episodes. A group of one
sample gets advantage 0, so this needs several samples of the policy per episode.

Example:
    >>> from areal_agents.samples import Sample
    >>> s = [Sample([1], [1], [0.0], [0], reward=1.0, group="7", meta={"turns": [t]})
    ...      for t in (0, 2, 0, 2)]
    >>> credit_group_ids(s, "role").tolist(), credit_group_ids(s, "turn").tolist()
    ([0, 0, 0, 0], [0, 1, 0, 1])
    >>> v = [Sample([1], [1], [0.0], [0], group="7", agent=a, meta={"episode": e})
    ...      for a, e in (("judge", "x"), ("judge_1", "x"), ("judge", "y"))]
    >>> credit_group_ids(v, "episode").tolist()
    [0, 0, 1]
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Literal

import torch

from areal_agents.samples import Sample

__all__ = ["GROUP_BY", "GroupBy", "credit_group_ids", "episode_of", "turn_of"]

GroupBy = Literal["role", "turn", "episode"]
GROUP_BY: tuple[str, ...] = ("role", "turn", "episode")
"""The valid ``group_by`` values (the one list the algorithms' validation checks)."""


def turn_of(sample: Sample) -> int:
    """The turn a sample's credit is grouped under: its first session turn index (0 if none)."""
    turns = sample.meta.get("turns") or [0]
    return int(turns[0])


def episode_of(sample: Sample) -> str:
    """The episode id a sample's credit is grouped under with ``group_by="episode"``.

    Raises:
        ValueError: the sample has no ``meta["episode"]`` (the Trainer writes it; hand-built
            samples must set it).
    """
    episode = sample.meta.get("episode")
    if episode is None:
        raise ValueError(f"sample of agent {sample.agent!r}, group {sample.group!r} has no "
                         "meta['episode']; group_by='episode' needs the episode id the "
                         "Trainer writes into every sample")
    return str(episode)


def _key(sample: Sample, group_by: str) -> tuple[Hashable, ...]:
    if group_by == "episode":
        return (sample.group, sample.policy, episode_of(sample))
    return (sample.group, sample.agent, turn_of(sample) if group_by == "turn" else 0)


def credit_group_ids(samples: Sequence[Sample], group_by: GroupBy) -> torch.Tensor:
    """Dense ``[N]`` group index per sample, in order of first appearance.

    Args:
        samples: the samples of one batch.
        group_by: ``"role"``: key ``(group, agent)``; ``"turn"``: key ``(group, agent,
            turn)``; ``"episode"``: key ``(group, policy, meta["episode"])``.

    Raises:
        ValueError: an unknown ``group_by``; ``"episode"`` and a sample without
            ``meta["episode"]``.
    """
    if group_by not in GROUP_BY:
        raise ValueError(f"group_by={group_by!r}; choose one of {GROUP_BY}")
    index: dict[tuple[Hashable, ...], int] = {}
    keys = [_key(s, group_by) for s in samples]
    return torch.tensor([index.setdefault(k, len(index)) for k in keys], dtype=torch.long)
