"""Algorithms whose advantages vary along a sequence: REINFORCE++ (discounted returns) and PPO
(GAE with a critic). Both take verl's KL-in-reward as a per-token penalty."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from areal_agents.algorithms import advantages as adv_fns
from areal_agents.algorithms.aggregation import loss_weights, stat_weights
from areal_agents.algorithms.losses import value_loss
from areal_agents.algorithms.objects import PolicyGradient, _check_rows
from areal_agents.samples import Sample, TokenBatch, collate


@dataclass
class ReinforcePlusPlus(PolicyGradient):
    """REINFORCE++: returns whitened over the whole batch (optionally group-centred first).

    Per token, ``A[b, t] = (G[b, t] - c_b - mu) / (sigma + eps)`` where ``G`` is the discounted
    return of the terminal reward (minus ``kl_coef * KL`` per token with ``kl_in_reward``),
    ``c_b`` the (group, role) mean with ``group_baseline`` (REINFORCE++-baseline) and ``mu``,
    ``sigma`` the batch mean and std of the sequences' returns (see
    ``advantages.reinforce_pp_token_advantages``). With ``gamma=1`` and no KL in the reward a
    sequence has one advantage, ``(r - c - mu) / (sigma + eps)``: that is what the per-sample
    ``advantages(samples)`` returns (``gamma`` and ``kl_in_reward`` need ``prepare``).

    Deliberate difference from verl: verl whitens the token-level returns over all generated
    tokens of the batch, so long responses dominate the mean and std; here ``mu`` and ``sigma``
    are taken over sequences (each sequence's return from its first generated token counts
    once), so the normalisation does not depend on response lengths.

    Attributes:
        group_baseline: subtract the (group, role) mean return first; then the estimator is
            group-relative and needs ``group_size >= 2``.
        gamma: discount per generated token in ``(0, 1]`` (observation tokens are skipped).
        eps: added to ``sigma``.

    Example:
        >>> from areal_agents.samples import Sample
        >>> s = [Sample([1], [1], [0.0], [0], reward=r) for r in (1.0, 0.0)]
        >>> [round(a, 3) for a in ReinforcePlusPlus().advantages(s)]
        [0.707, -0.707]
    """

    group_baseline: bool = False
    gamma: float = 1.0
    eps: float = 1e-6

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.gamma <= 1:
            raise ValueError(f"ReinforcePlusPlus.gamma must be in (0, 1], got {self.gamma}")
        if self.gamma != 1 and self.baseline == "ema":
            raise ValueError(f"ReinforcePlusPlus.gamma={self.gamma} needs baseline='group' (the "
                             "EMA baseline is per sequence); set gamma=1 or baseline='group'")

    @property
    def group_relative(self) -> bool:
        return self.group_baseline and self.baseline == "group"

    def _group_advantages(self, rewards: torch.Tensor, gids: torch.Tensor) -> torch.Tensor:
        return adv_fns.reinforce_pp_advantages(
            rewards, gids if self.group_baseline else None, eps=self.eps
        )

    def _batch_advantages(self, batch: TokenBatch, samples: Sequence[Sample]) -> torch.Tensor:
        kl = self._reward_kl(batch)
        if self.baseline == "ema" or (self.gamma == 1 and kl is None):
            return super()._batch_advantages(batch, samples)
        adv = adv_fns.reinforce_pp_token_advantages(
            torch.tensor(self.rewards(samples), dtype=torch.float64), batch.loss_mask,
            adv_fns.group_ids(samples) if self.group_baseline else None,
            token_penalty=None if kl is None else self.kl_coef * kl, gamma=self.gamma,
            eps=self.eps,
        )  # fmt: skip
        return adv.float()


@dataclass
class PPO(PolicyGradient):
    """PPO with a critic: GAE advantages per token, returns for the clipped value loss.

    ``prepare`` reads critic values from ``batch.values`` (``[B, T]``, the critic's estimate
    before each token; zeros if unset, i.e. discounted returns) and sets ``advantages`` and
    ``returns``. ``value_loss`` is separate from ``loss`` because ``LossFn`` carries no values.
    With ``kl_in_reward`` the token rewards carry ``-kl_coef * KL`` (as verl's PPO). Samples
    with per-turn rewards (``Sample.token_rewards``, collated into ``batch.token_rewards``)
    give GAE each turn's reward at that turn's last generated token; others their scalar
    reward at their last generated token.

    Attributes:
        gamma, gae_lambda: GAE discount and λ. adv_norm: whiten advantages over the batch.
        value_clip_eps: value-loss clip (``None`` disables clipping).
    """

    gamma: float = 1.0
    gae_lambda: float = 0.95
    adv_norm: bool = True
    value_clip_eps: float | None = 0.2

    @property
    def group_relative(self) -> bool:
        return False

    def _token_advantages(
        self, rewards: torch.Tensor, values: torch.Tensor | None, loss_mask: torch.Tensor,
        penalty: torch.Tensor | None = None, turn_rewards: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        v = torch.zeros(loss_mask.shape, device=loss_mask.device) if values is None else values
        if turn_rewards is None:
            token_rewards = adv_fns.terminal_rewards(rewards.to(v), loss_mask)
        else:  # ``rewards`` is then what shaping adds to each sample's reward
            token_rewards = turn_rewards.to(v) + adv_fns.terminal_rewards(rewards.to(v), loss_mask)
        if penalty is not None:
            token_rewards = token_rewards - penalty.to(token_rewards)
        adv, ret = adv_fns.gae(
            token_rewards, v, loss_mask, gamma=self.gamma, gae_lambda=self.gae_lambda
        )
        if self.adv_norm:
            adv = adv_fns.masked_whiten(adv, loss_mask)
        return adv, ret

    def advantages(  # type: ignore[override]
        self, samples: Sequence[Sample], values: Sequence[Sequence[float]] | None = None
    ) -> list[list[float]]:
        """Per-token GAE advantages, one list per sample aligned with its ``token_ids``.

        ``values[i][t]`` is the critic value for sample i token t (zeros when omitted).
        ``kl_in_reward`` is not applied here (it needs reference log-probs): see ``prepare``.
        """
        batch = collate(samples)
        v = None
        if values is not None:
            v = torch.zeros(batch.loss_mask.shape)
            for i, row in enumerate(values):
                v[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
        r, turn_rewards = self._rewards(batch, samples)
        adv, _ = self._token_advantages(r, v, batch.loss_mask, turn_rewards=turn_rewards)
        return [adv[i, : len(s)].tolist() for i, s in enumerate(samples)]

    def _rewards(self, batch: TokenBatch, samples: Sequence[Sample],
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(rewards, None)``, or with per-turn rewards ``(shaped - raw rewards, [B, T])``."""
        r = torch.tensor(self.rewards(samples))
        if batch.token_rewards is None:
            return r, None
        return r - torch.tensor([float(s.reward) for s in samples]), batch.token_rewards

    def prepare(self, batch: TokenBatch, samples: Sequence[Sample]) -> TokenBatch:
        """Sets ``advantages``, ``returns``, ``loss_weights`` and ``stat_weights`` (all
        ``[B, T]``); see ``PolicyGradient.prepare`` for ``kl_in_reward``'s inputs."""
        _check_rows(batch, samples)
        r, turn_rewards = self._rewards(batch, samples)
        kl = self._reward_kl(batch)
        adv, ret = self._token_advantages(
            r, batch.values, batch.loss_mask, None if kl is None else self.kl_coef * kl,
            turn_rewards,
        )
        return replace(
            batch, advantages=adv.float(), returns=ret.float(),
            loss_weights=loss_weights(batch.loss_mask, self.aggregation, self.loss_norm_len),
            stat_weights=stat_weights(batch.loss_mask),
        )  # fmt: skip

    def value_loss(
        self, values: torch.Tensor, mb: TokenBatch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Clipped value loss of new critic ``values`` ``[b, t]`` vs ``mb.returns``, clipped
        around ``mb.values``; additive over micro-batches like ``loss`` (``vf_clip_frac`` is a
        per-token mean under ``mb.stat_weights``).

        Raises:
            ValueError: ``prepare`` was not applied.
        """
        if mb.returns is None or mb.loss_weights is None:
            raise ValueError("micro-batch has no returns; call PPO.prepare(batch, samples) first")
        old = mb.values if mb.values is not None else torch.zeros_like(values)
        return value_loss(
            values, old, mb.returns, mb.loss_mask, mb.loss_weights,
            value_clip_eps=self.value_clip_eps, stat_weights=mb.stat_weights,
        )  # fmt: skip
