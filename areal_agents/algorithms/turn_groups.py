"""Credit groups of group-relative advantages: by (task, role), or by (task, role, turn).

With ``group_by="role"`` (the default) a sample is compared with the samples of the same task
group (``Sample.group``, the task seed) and role (``Sample.agent``). With ``group_by="turn"``
(AT-GRPO's turn-level grouping) also with the same turn: the *k*-th action of a role is compared
only with *k*-th actions of that role on the same task. This matters when each turn is its own
sample (an env that re-renders the whole prompt every turn, or a split conversation); a merged
multi-turn sample counts as its first turn (``Sample.meta["turns"][0]``, the session's turn
index written by the gateway's tokenization; 0 when absent).

Example:
    >>> from areal_agents.samples import Sample
    >>> s = [Sample([1], [1], [0.0], [0], reward=1.0, group="7", meta={"turns": [t]})
    ...      for t in (0, 2, 0, 2)]
    >>> credit_group_ids(s, "role").tolist(), credit_group_ids(s, "turn").tolist()
    ([0, 0, 0, 0], [0, 1, 0, 1])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from areal_agents.samples import Sample

__all__ = ["GROUP_BY", "GroupBy", "credit_group_ids", "turn_of"]

GroupBy = Literal["role", "turn"]
GROUP_BY: tuple[str, ...] = ("role", "turn")


def turn_of(sample: Sample) -> int:
    """The turn a sample's credit is grouped under: its first session turn index (0 if none)."""
    turns = sample.meta.get("turns") or [0]
    return int(turns[0])


def credit_group_ids(samples: Sequence[Sample], group_by: GroupBy) -> torch.Tensor:
    """Dense ``[N]`` group index per sample, in order of first appearance.

    Args:
        samples: the samples of one batch.
        group_by: ``"role"``: key ``(group, agent)``; ``"turn"``: key ``(group, agent, turn)``.

    Raises:
        ValueError: an unknown ``group_by``.
    """
    if group_by not in GROUP_BY:
        raise ValueError(f"group_by={group_by!r}; choose one of {GROUP_BY}")
    index: dict[tuple[str, str, int], int] = {}
    keys = [(s.group, s.agent, turn_of(s) if group_by == "turn" else 0) for s in samples]
    return torch.tensor([index.setdefault(k, len(index)) for k in keys], dtype=torch.long)
