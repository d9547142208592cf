"""One small object per RL algorithm: a typed config whose methods call the pure functions.

Every object offers ``advantages(samples)``, ``filter(samples)``, ``prepare(batch, samples)``,
``loss(logprobs, entropy, micro_batch)`` (a ``LossFn``; the object itself is callable as one)
and the flags ``needs_proximal`` / ``needs_reference`` telling the trainer which extra
log-probs to compute before ``prepare`` and the update, and ``group_relative`` (groups of one
are refused by :func:`check_group_size`). This module holds the shared base; the estimators
with one scalar advantage per sequence live in ``group_relative``, REINFORCE++ and PPO in
``token_level``, CISPO and SAPO in ``soft_clip``, the name table in ``registry``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import ClassVar, Literal, get_args

import torch

from areal_agents.algorithms import advantages as adv_fns
from areal_agents.algorithms.aggregation import (
    AGGREGATIONS,
    Aggregation,
    loss_weights,
    stat_weights,
    weighted_sum,
)
from areal_agents.algorithms.kl import KLEstimator, reward_kl
from areal_agents.algorithms.losses import CapMode, kl_penalty, ppo_policy_loss
from areal_agents.algorithms.turn_groups import GROUP_BY, GroupBy, credit_group_ids
from areal_agents.errors import ConfigError
from areal_agents.samples import Sample, TokenBatch


@dataclass
class PolicyGradient:
    """Shared config and behaviour of the policy-gradient algorithms (use a subclass).

    Attributes:
        clip_eps: ε_low of the PPO clip (ratio clipped to ``[1 - ε_low, 1 + ε_high]``).
        clip_eps_high: ε_high (clip-higher, DAPO); ``None`` means ``clip_eps``.
        dual_clip_c: dual-clip bound ``c > 1`` for negative advantages; ``None`` disables it.
        kl_coef: β of the KL penalty to the reference policy (0 disables it).
        kl_estimator: ``"k1"``, ``"k2"``, ``"k3"`` (clamped) or ``"abs"``, or verl's names
            ``"kl"``, ``"mse"``, ``"low_var_kl"`` (see :mod:`areal_agents.algorithms.kl`).
        kl_in_reward: put the KL penalty in the reward instead of the loss (verl's
            ``use_kl_in_reward``): ``prepare`` subtracts ``kl_coef * KL`` per token (from
            ``batch.ref_logprobs`` and the proximal, else behaviour, log-probs) before the
            advantages; sequence-level estimators see ``r - kl_coef * sum_t KL_t``. The loss
            then has no KL term (``kl`` is still logged).
        entropy_coef: entropy bonus coefficient (subtracted from the loss).
        behave_imp_weight_cap: cap on π_prox/π_behave; ``None`` disables it.
        behave_imp_weight_mode: ``"mask"`` drops tokens above the cap, ``"clamp"`` clamps them.
        aggregation: how token losses are combined (see ``aggregation.loss_weights``).
        loss_norm_len: the constant length ``L`` of ``"seq-mean-token-sum-norm"`` (Dr.GRPO's
            ``MAX_TOKENS``; set it to the generation budget). ``None`` uses each batch's longest
            generated row, which is not constant across batches.
        decoupled: use the decoupled objective (trainer recomputes proximal log-probs).
        baseline: ``"group"`` (per (group, agent) statistics) or ``"ema"`` (per-role moving
            average, for self-play without groups; the object keeps the state).
        ema_decay: EMA factor for ``baseline="ema"``.
        group_by: the groups of ``baseline="group"``: ``"role"`` (task, role), ``"turn"``
            (task, role, turn: AT-GRPO's turn-level credit) or ``"episode"`` (task, policy,
            episode: the samples of one episode's seats that share a policy, e.g. K judge
            verdicts on one answer); see ``algorithms.turn_groups``.
    """

    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    dual_clip_c: float | None = None
    kl_coef: float = 0.0
    kl_estimator: KLEstimator = "k3"
    kl_in_reward: bool = False
    entropy_coef: float = 0.0
    behave_imp_weight_cap: float | None = 5.0
    behave_imp_weight_mode: CapMode = "mask"
    aggregation: Aggregation = "token-mean"
    loss_norm_len: int | None = None
    decoupled: bool = True
    baseline: Literal["group", "ema"] = "group"
    ema_decay: float = 0.9
    ema_baselines: dict[str, float] = field(default_factory=dict, repr=False)
    group_by: GroupBy = "role"

    sequence_level: ClassVar[bool] = False

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(
                f"{name}.aggregation={self.aggregation!r}; choose one of {AGGREGATIONS}"
            )
        if self.kl_estimator not in get_args(KLEstimator):
            raise ValueError(
                f"{name}.kl_estimator={self.kl_estimator!r}; choose one of "
                f"{get_args(KLEstimator)}"
            )
        if self.loss_norm_len is not None and self.loss_norm_len < 1:
            raise ValueError(f"{name}.loss_norm_len must be >= 1 (or None), got "
                             f"{self.loss_norm_len}")
        if self.behave_imp_weight_mode not in get_args(CapMode):
            raise ValueError(f"{name}.behave_imp_weight_mode must be 'mask' or 'clamp'")
        if self.baseline not in ("group", "ema"):
            raise ValueError(f"{name}.baseline={self.baseline!r}; choose 'group' or 'ema'")
        if self.group_by not in GROUP_BY:
            raise ValueError(f"{name}.group_by={self.group_by!r}; choose one of {GROUP_BY}")
        if self.clip_eps <= 0 or (self.clip_eps_high is not None and self.clip_eps_high <= 0):
            raise ValueError(f"{name}.clip_eps and clip_eps_high must be > 0")
        if self.dual_clip_c is not None and self.dual_clip_c <= 1:
            raise ValueError(f"{name}.dual_clip_c must be > 1 (or None), got {self.dual_clip_c}")
        if self.behave_imp_weight_cap is not None and self.behave_imp_weight_cap <= 0:
            raise ValueError(f"{name}.behave_imp_weight_cap must be > 0 (or None)")

    @property
    def needs_proximal(self) -> bool:
        """Whether the trainer must set ``batch.prox_logprobs`` before training."""
        return self.decoupled

    @property
    def needs_reference(self) -> bool:
        """Whether the trainer must set ``batch.ref_logprobs`` (a KL penalty is on); with
        ``kl_in_reward`` before ``prepare``."""
        return self.kl_coef > 0

    @property
    def group_relative(self) -> bool:
        """Whether advantages compare samples of one (task group, role) group with each other,
        so that a group of one gets ``A = 0`` (see :func:`check_group_size`)."""
        return self.baseline == "group"

    # -- data side ---------------------------------------------------------------------------
    def rewards(self, samples: Sequence[Sample]) -> list[float]:
        """The (possibly shaped) scalar reward of each sample."""
        return [float(s.reward) for s in samples]

    def _group_advantages(self, rewards: torch.Tensor, gids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(
            "PolicyGradient is the shared base; use GRPO, DrGRPO, RLOO, ReinforcePlusPlus, PPO, "
            "DAPO or GSPO (or subclass it and define _group_advantages)"
        )

    def _scalar_advantages(
        self, rewards: torch.Tensor, samples: Sequence[Sample]
    ) -> torch.Tensor:
        """``[N]`` advantages of ``[N]`` float64 rewards (updates the EMA, ``baseline="ema"``)."""
        if self.baseline == "ema":
            roles = [s.agent for s in samples]
            adv, new = adv_fns.ema_advantages(rewards, roles, self.ema_baselines,
                                              decay=self.ema_decay)
            # only this batch's roles: policies sharing this object may prepare concurrently
            self.ema_baselines.update({role: new[role] for role in roles})
            return adv
        return self._group_advantages(rewards, credit_group_ids(samples, self.group_by))

    def advantages(self, samples: Sequence[Sample]) -> list[float]:
        """Per-sample scalar advantages (with ``baseline="ema"`` this also updates the EMA).

        ``kl_in_reward`` is not applied here (it needs reference log-probs): see ``prepare``.
        """
        r = torch.tensor(self.rewards(samples), dtype=torch.float64)
        return self._scalar_advantages(r, samples).tolist()

    def _reward_kl(self, batch: TokenBatch) -> torch.Tensor | None:
        """``[B, T]`` per-token KL to subtract from the reward (``kl_in_reward``), else None."""
        if not (self.kl_in_reward and self.kl_coef > 0):
            return None
        if batch.ref_logprobs is None:
            raise ValueError(
                f"{type(self).__name__}.kl_in_reward needs batch.ref_logprobs before prepare(); "
                "compute reference log-probs first (needs_reference is True) or set "
                "kl_in_reward=False"
            )
        logp = batch.prox_logprobs if batch.prox_logprobs is not None else batch.old_logprobs
        return reward_kl(logp, batch.ref_logprobs, batch.loss_mask, self.kl_estimator)

    def _batch_advantages(self, batch: TokenBatch, samples: Sequence[Sample]) -> torch.Tensor:
        """``[B, T]`` advantages: scalar per sample (rewards minus ``kl_coef`` times the
        sequence's summed KL with ``kl_in_reward``), broadcast over generated tokens."""
        r = torch.tensor(self.rewards(samples), dtype=torch.float64)
        kl = self._reward_kl(batch)
        if kl is not None:
            r = r - self.kl_coef * kl.sum(-1)
        adv = self._scalar_advantages(r, samples).float()
        return adv_fns.broadcast_advantages(adv, batch.loss_mask)

    def state_dict(self) -> dict[str, dict[str, float]]:
        """The state learned while training (JSON-ready): ``{"ema_baselines": {agent: b}}``."""
        return {"ema_baselines": dict(self.ema_baselines)}

    def load_state_dict(self, state: dict[str, dict[str, float]]) -> None:
        """Restore what ``state_dict`` returned (a missing entry means empty).

        Raises:
            ValueError: ``state`` has keys ``state_dict`` never writes.
        """
        unknown = sorted(set(state) - {"ema_baselines"})
        if unknown:
            raise ValueError(f"{type(self).__name__}.load_state_dict: unknown keys {unknown}; "
                             "expected only 'ema_baselines'")
        self.ema_baselines = {str(a): float(b)
                              for a, b in state.get("ema_baselines", {}).items()}

    def filter(self, samples: Sequence[Sample]) -> tuple[list[Sample], dict[str, int]]:
        """Samples to train on and counts of dropped ones by reason (this one keeps all)."""
        return list(samples), {}

    def prepare(self, batch: TokenBatch, samples: Sequence[Sample]) -> TokenBatch:
        """A copy of ``batch`` with ``advantages``, ``loss_weights`` (the aggregation) and
        ``stat_weights`` (token mean, for logged statistics) set, all ``[B, T]``.

        ``samples`` must be the samples ``batch`` was collated from, in order. With
        ``kl_in_reward`` (and ``kl_coef > 0``) ``batch.ref_logprobs`` must already be set, and
        ``batch.prox_logprobs`` too when ``needs_proximal`` (else the behaviour log-probs are
        used).

        Raises:
            ValueError: ``len(samples) != batch.batch_size``, or ``kl_in_reward`` without
                ``batch.ref_logprobs``.
        """
        _check_rows(batch, samples)
        return replace(
            batch,
            advantages=self._batch_advantages(batch, samples),
            loss_weights=loss_weights(batch.loss_mask, self.aggregation, self.loss_norm_len),
            stat_weights=stat_weights(batch.loss_mask),
        )

    # -- loss side ---------------------------------------------------------------------------
    def _policy_loss(
        self, logprobs: torch.Tensor, prox: torch.Tensor, mb: TokenBatch, w: torch.Tensor,
        sw: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The policy-gradient term and its stats (PPO clip; CISPO and SAPO override this)."""
        assert mb.advantages is not None
        return ppo_policy_loss(
            logprobs, prox, mb.old_logprobs, mb.advantages, mb.loss_mask, w,
            clip_eps=self.clip_eps, clip_eps_high=self.clip_eps_high,
            dual_clip_c=self.dual_clip_c, behave_imp_weight_cap=self.behave_imp_weight_cap,
            behave_imp_weight_mode=self.behave_imp_weight_mode,
            sequence_level=self.sequence_level, stat_weights=sw,
        )  # fmt: skip

    def loss(
        self, logprobs: torch.Tensor, entropy: torch.Tensor, mb: TokenBatch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``LossFn``: this micro-batch's share of ``pg + β·KL − c_ent·H``.

        Uses ``mb.prox_logprobs`` when set, else ``mb.old_logprobs`` as the proximal policy.
        The loss is weighted by ``mb.loss_weights`` (the aggregation); the KL term is left out
        with ``kl_in_reward`` (``prepare`` put it in the advantages). Stats (0-d, additive over
        micro-batches): ``pg_loss`` (the policy term), ``num_loss_tokens``, ``weight_sum`` (sum
        of loss weights), ``num_imp_weight_capped`` and, as plain per-token means under
        ``mb.stat_weights`` whatever the aggregation, every ratio-like statistic: ``kl``,
        ``entropy``, ``imp_weight``, ``imp_weight_capped_frac``, ``approx_kl_prox`` and the
        policy loss's own (``clip_frac``, ``dual_clip_frac`` for the PPO clip).

        Raises:
            ValueError: ``prepare`` was not applied, or a KL penalty is on without
                ``mb.ref_logprobs``.
        """
        if mb.advantages is None or mb.loss_weights is None or mb.stat_weights is None:
            raise ValueError(
                f"micro-batch has no advantages/loss_weights/stat_weights; call "
                f"{type(self).__name__}.prepare(batch, samples) on the full batch before "
                "splitting it"
            )
        prox = mb.prox_logprobs if mb.prox_logprobs is not None else mb.old_logprobs
        m = mb.loss_mask != 0
        w = torch.where(m, mb.loss_weights, 0.0)
        sw = torch.where(m, mb.stat_weights, 0.0)
        loss, stats = self._policy_loss(logprobs, prox, mb, w, sw)
        kl = loss.new_zeros(())
        if self.kl_coef > 0:
            if mb.ref_logprobs is None:
                raise ValueError(
                    f"{type(self).__name__}.kl_coef={self.kl_coef} needs mb.ref_logprobs; compute "
                    "reference log-probs (needs_reference is True) or set kl_coef=0"
                )
            kl_tok = kl_penalty(logprobs, mb.ref_logprobs, self.kl_estimator)
            if not self.kl_in_reward:
                loss = loss + self.kl_coef * weighted_sum(kl_tok, w)
            kl = weighted_sum(kl_tok.detach(), sw)
        if self.entropy_coef:
            loss = loss - self.entropy_coef * weighted_sum(entropy, w)
        stats["kl"] = kl.detach()
        stats["entropy"] = weighted_sum(entropy.detach(), sw)
        stats["num_loss_tokens"] = m.sum().float()
        stats["weight_sum"] = w.sum().detach()
        return loss, stats

    __call__ = loss


def _check_rows(batch: TokenBatch, samples: Sequence[Sample]) -> None:
    if len(samples) != batch.batch_size:
        raise ValueError(
            f"prepare() got {len(samples)} samples for a batch of {batch.batch_size} rows; pass "
            "the samples the batch was collated from (after filter())"
        )


def check_group_size(algorithm: object, group_size: int) -> None:
    """Refuse a group-relative estimator with groups of one, which silently makes every
    advantage 0 (nothing is learnt).

    Objects without a ``group_relative`` flag (user-defined algorithms) are not checked.

    Raises:
        ConfigError: ``algorithm.group_relative`` and ``group_size < 2`` (names the fixes).

    Example:
        >>> from areal_agents.algorithms import GRPO
        >>> check_group_size(GRPO(baseline="ema"), 1)  # per-role moving average: fine
        >>> check_group_size(GRPO(), 1)
        Traceback (most recent call last):
        ...
        areal_agents.errors.ConfigError: GRPO compares each episode with the others of its ...
    """
    if getattr(algorithm, "group_relative", False) and group_size < 2:
        name = type(algorithm).__name__
        raise ConfigError(
            f"{name} compares each episode with the others of its task group, so "
            f"group_size={group_size} makes every advantage 0; set group_size >= 2, or "
            f"{name}(baseline='ema') (per-role moving-average baseline), or use "
            "ReinforcePlusPlus (batch-normalised, group_baseline=False)"
        )
