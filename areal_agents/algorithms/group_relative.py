"""Group-relative algorithms, one scalar advantage per sequence: GRPO, Dr.GRPO, RLOO, DAPO
(dynamic sampling, overlong penalty) and GSPO (sequence-level ratio)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from areal_agents.algorithms import advantages as adv_fns
from areal_agents.algorithms.aggregation import Aggregation
from areal_agents.algorithms.filtering import drop_zero_variance_groups, shaped_rewards
from areal_agents.algorithms.objects import PolicyGradient
from areal_agents.samples import Sample


@dataclass
class GRPO(PolicyGradient):
    """Group-relative policy optimisation: ``A = (r - mean_g) / (std_g + eps)`` per (group, role).

    Example:
        >>> from areal_agents.samples import Sample
        >>> s = [Sample([1, 2], [0, 1], [0.0, -1.0], [-1, 0], reward=r, group="g") for r in (1, 0)]
        >>> [round(a, 3) for a in GRPO().advantages(s)]
        [0.707, -0.707]
    """

    std_normalize: bool = True
    eps: float = 1e-6
    aggregation: Aggregation = "seq-mean-token-mean"

    def _group_advantages(self, rewards: torch.Tensor, gids: torch.Tensor) -> torch.Tensor:
        return adv_fns.grpo_advantages(
            rewards, gids, std_normalize=self.std_normalize, eps=self.eps
        )


@dataclass
class DrGRPO(GRPO):
    """Dr.GRPO: group mean baseline without std normalisation, token sums (no length norm)."""

    std_normalize: bool = False
    aggregation: Aggregation = "seq-mean-token-sum"


@dataclass
class RLOO(PolicyGradient):
    """REINFORCE leave-one-out: ``A_i = r_i - mean of the other rewards in its group``.

    Example:
        >>> from areal_agents.samples import Sample
        >>> s = [Sample([1], [1], [0.0], [0], reward=r, group="g") for r in (3.0, 1.0, 2.0)]
        >>> RLOO().advantages(s)
        [1.5, -1.5, 0.0]
    """

    def _group_advantages(self, rewards: torch.Tensor, gids: torch.Tensor) -> torch.Tensor:
        return adv_fns.rloo_advantages(rewards, gids)


@dataclass
class DAPO(GRPO):
    """DAPO: clip-higher, token-mean, dynamic sampling and the soft overlong penalty.

    Attributes:
        dynamic_sampling: ``filter`` drops (group, role) groups with zero reward variance.
        max_response_len, overlong_buffer_len, overlong_penalty_factor: the overlong penalty
            (off unless both lengths are set); applied in ``rewards`` before advantages/filter.

    Example:
        >>> from areal_agents.samples import Sample
        >>> s = [Sample([1, 2], [0, 1], [0.0, -1.0], [-1, 0], reward=r, group=g)
        ...      for g, r in (("a", 1), ("a", 1), ("b", 1), ("b", 0))]
        >>> kept, dropped = DAPO().filter(s)
        >>> [x.group for x in kept], dropped["zero_reward_variance"]
        (['b', 'b'], 2)
    """

    clip_eps_high: float | None = 0.28
    aggregation: Aggregation = "token-mean"
    dynamic_sampling: bool = True
    max_response_len: int | None = None
    overlong_buffer_len: int | None = None
    overlong_penalty_factor: float = 1.0

    def rewards(self, samples: Sequence[Sample]) -> list[float]:
        return shaped_rewards(
            samples,
            max_response_len=self.max_response_len,
            overlong_buffer_len=self.overlong_buffer_len,
            penalty_factor=self.overlong_penalty_factor,
        )

    def filter(self, samples: Sequence[Sample]) -> tuple[list[Sample], dict[str, int]]:
        if not self.dynamic_sampling:
            return list(samples), {}
        return drop_zero_variance_groups(samples, self.rewards(samples))


@dataclass
class GSPO(GRPO):
    """GSPO: sequence-level (length-normalised) importance ratio with a tight clip.

    Deliberate difference from verl: verl's GSPO loss always aggregates with
    ``seq-mean-token-mean`` whatever ``loss_agg_mode`` says; here GSPO honours ``aggregation``
    like every algorithm (its default, inherited from GRPO, is ``seq-mean-token-mean``, so the
    defaults agree).
    """

    clip_eps: float = 3e-4
    clip_eps_high: float | None = 4e-4
    sequence_level: ClassVar[bool] = True
