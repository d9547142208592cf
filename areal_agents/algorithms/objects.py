"""One small object per RL algorithm: a typed config whose methods call the pure functions.

Every object offers ``advantages(samples)``, ``filter(samples)``, ``prepare(batch, samples)``,
``loss(logprobs, entropy, micro_batch)`` (a ``LossFn``; the object itself is callable as one)
and the flags ``needs_proximal`` / ``needs_reference`` telling the trainer which extra
log-probs to compute before the update.
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
    weighted_sum,
)
from areal_agents.algorithms.filtering import drop_zero_variance_groups, shaped_rewards
from areal_agents.algorithms.losses import (
    CapMode,
    KLEstimator,
    kl_penalty,
    ppo_policy_loss,
    value_loss,
)
from areal_agents.samples import Sample, TokenBatch, collate


@dataclass
class PolicyGradient:
    """Shared config and behaviour of the policy-gradient algorithms (use a subclass).

    Attributes:
        clip_eps: ε_low of the PPO clip (ratio clipped to ``[1 - ε_low, 1 + ε_high]``).
        clip_eps_high: ε_high (clip-higher, DAPO); ``None`` means ``clip_eps``.
        dual_clip_c: dual-clip bound ``c > 1`` for negative advantages; ``None`` disables it.
        kl_coef: β of the KL penalty to the reference policy (0 disables it).
        kl_estimator: ``"k1"``, ``"k2"`` or ``"k3"``.
        entropy_coef: entropy bonus coefficient (subtracted from the loss).
        behave_imp_weight_cap: cap on π_prox/π_behave; ``None`` disables it.
        behave_imp_weight_mode: ``"mask"`` drops tokens above the cap, ``"clamp"`` clamps them.
        aggregation: how token losses are combined (see ``aggregation.loss_weights``).
        decoupled: use the decoupled objective (trainer recomputes proximal log-probs).
        baseline: ``"group"`` (per (group, agent) statistics) or ``"ema"`` (per-role moving
            average, for self-play without groups; the object keeps the state).
        ema_decay: EMA factor for ``baseline="ema"``.
    """

    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    dual_clip_c: float | None = None
    kl_coef: float = 0.0
    kl_estimator: KLEstimator = "k3"
    entropy_coef: float = 0.0
    behave_imp_weight_cap: float | None = 5.0
    behave_imp_weight_mode: CapMode = "mask"
    aggregation: Aggregation = "token-mean"
    decoupled: bool = True
    baseline: Literal["group", "ema"] = "group"
    ema_decay: float = 0.9
    ema_baselines: dict[str, float] = field(default_factory=dict, repr=False)

    sequence_level: ClassVar[bool] = False

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(
                f"{name}.aggregation={self.aggregation!r}; choose one of {AGGREGATIONS}"
            )
        if self.kl_estimator not in get_args(KLEstimator):
            raise ValueError(
                f"{name}.kl_estimator={self.kl_estimator!r}; choose 'k1', 'k2' or 'k3'"
            )
        if self.behave_imp_weight_mode not in get_args(CapMode):
            raise ValueError(f"{name}.behave_imp_weight_mode must be 'mask' or 'clamp'")
        if self.baseline not in ("group", "ema"):
            raise ValueError(f"{name}.baseline={self.baseline!r}; choose 'group' or 'ema'")
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
        """Whether the trainer must set ``batch.ref_logprobs`` (a KL penalty is on)."""
        return self.kl_coef > 0

    # -- data side ---------------------------------------------------------------------------
    def rewards(self, samples: Sequence[Sample]) -> list[float]:
        """The (possibly shaped) scalar reward of each sample."""
        return [float(s.reward) for s in samples]

    def _group_advantages(self, rewards: torch.Tensor, gids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(
            "PolicyGradient is the shared base; use GRPO, DrGRPO, RLOO, ReinforcePlusPlus, PPO, "
            "DAPO or GSPO (or subclass it and define _group_advantages)"
        )

    def advantages(self, samples: Sequence[Sample]) -> list[float]:
        """Per-sample scalar advantages (with ``baseline="ema"`` this also updates the EMA)."""
        r = torch.tensor(self.rewards(samples), dtype=torch.float64)
        if self.baseline == "ema":
            adv, self.ema_baselines = adv_fns.ema_advantages(
                r, [s.agent for s in samples], self.ema_baselines, decay=self.ema_decay
            )
        else:
            adv = self._group_advantages(r, adv_fns.group_ids(samples))
        return adv.tolist()

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
        """A copy of ``batch`` with ``advantages`` ``[B, T]`` and ``loss_weights`` ``[B, T]`` set.

        ``samples`` must be the samples ``batch`` was collated from, in order.

        Raises:
            ValueError: ``len(samples) != batch.batch_size``.
        """
        _check_rows(batch, samples)
        adv = torch.tensor(self.advantages(samples), dtype=torch.float32)
        return replace(
            batch,
            advantages=adv_fns.broadcast_advantages(adv, batch.loss_mask),
            loss_weights=loss_weights(batch.loss_mask, self.aggregation),
        )

    # -- loss side ---------------------------------------------------------------------------
    def loss(
        self, logprobs: torch.Tensor, entropy: torch.Tensor, mb: TokenBatch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``LossFn``: this micro-batch's share of ``pg + β·KL − c_ent·H``.

        Uses ``mb.prox_logprobs`` when set, else ``mb.old_logprobs`` as the proximal policy.
        Stats (additive over micro-batches): ``pg_loss``, ``clip_frac``, ``dual_clip_frac``,
        ``imp_weight``, ``imp_weight_capped_frac``, ``num_imp_weight_capped``,
        ``approx_kl_prox``, ``kl``, ``entropy``, ``num_loss_tokens``, ``weight_sum``. Ratio-like
        stats are ``sum(x * w)``: means when the weights sum to 1 (token-mean,
        seq-mean-token-mean); under seq-mean-token-sum divide by the summed ``weight_sum``.

        Raises:
            ValueError: ``prepare`` was not applied, or a KL penalty is on without
                ``mb.ref_logprobs``.
        """
        if mb.advantages is None or mb.loss_weights is None:
            raise ValueError(
                f"micro-batch has no advantages/loss_weights; call {type(self).__name__}.prepare("
                "batch, samples) on the full batch before splitting it"
            )
        prox = mb.prox_logprobs if mb.prox_logprobs is not None else mb.old_logprobs
        w = torch.where(mb.loss_mask != 0, mb.loss_weights, 0.0)
        loss, stats = ppo_policy_loss(
            logprobs, prox, mb.old_logprobs, mb.advantages, mb.loss_mask, w,
            clip_eps=self.clip_eps, clip_eps_high=self.clip_eps_high,
            dual_clip_c=self.dual_clip_c, behave_imp_weight_cap=self.behave_imp_weight_cap,
            behave_imp_weight_mode=self.behave_imp_weight_mode,
            sequence_level=self.sequence_level,
        )  # fmt: skip
        kl = loss.new_zeros(())
        if self.kl_coef > 0:
            if mb.ref_logprobs is None:
                raise ValueError(
                    f"{type(self).__name__}.kl_coef={self.kl_coef} needs mb.ref_logprobs; compute "
                    "reference log-probs (needs_reference is True) or set kl_coef=0"
                )
            kl = weighted_sum(kl_penalty(logprobs, mb.ref_logprobs, self.kl_estimator), w)
            loss = loss + self.kl_coef * kl
        ent = weighted_sum(entropy, w)
        if self.entropy_coef:
            loss = loss - self.entropy_coef * ent
        stats["kl"] = kl.detach()
        stats["entropy"] = ent.detach()
        stats["num_loss_tokens"] = (mb.loss_mask != 0).sum().float()
        stats["weight_sum"] = w.sum().detach()
        return loss, stats

    __call__ = loss


def _check_rows(batch: TokenBatch, samples: Sequence[Sample]) -> None:
    if len(samples) != batch.batch_size:
        raise ValueError(
            f"prepare() got {len(samples)} samples for a batch of {batch.batch_size} rows; pass "
            "the samples the batch was collated from (after filter())"
        )


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
class ReinforcePlusPlus(PolicyGradient):
    """REINFORCE++: rewards normalised over the whole batch (optionally group-centred first)."""

    group_baseline: bool = False
    eps: float = 1e-6

    def _group_advantages(self, rewards: torch.Tensor, gids: torch.Tensor) -> torch.Tensor:
        return adv_fns.reinforce_pp_advantages(
            rewards, gids if self.group_baseline else None, eps=self.eps
        )


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
    """GSPO: sequence-level (length-normalised) importance ratio with a tight clip."""

    clip_eps: float = 3e-4
    clip_eps_high: float | None = 4e-4
    sequence_level: ClassVar[bool] = True


@dataclass
class PPO(PolicyGradient):
    """PPO with a critic: GAE advantages per token, returns for the clipped value loss.

    ``prepare`` reads critic values from ``batch.values`` (``[B, T]``, the critic's estimate
    before each token; zeros if unset, i.e. discounted returns) and sets ``advantages`` and
    ``returns``. ``value_loss`` is separate from ``loss`` because ``LossFn`` carries no values.

    Attributes:
        gamma, gae_lambda: GAE discount and λ. adv_norm: whiten advantages over the batch.
        value_clip_eps: value-loss clip (``None`` disables clipping).
    """

    gamma: float = 1.0
    gae_lambda: float = 0.95
    adv_norm: bool = True
    value_clip_eps: float | None = 0.2

    def _token_advantages(
        self, rewards: torch.Tensor, values: torch.Tensor | None, loss_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        v = torch.zeros(loss_mask.shape, device=loss_mask.device) if values is None else values
        adv, ret = adv_fns.gae(
            adv_fns.terminal_rewards(rewards.to(v), loss_mask), v, loss_mask,
            gamma=self.gamma, gae_lambda=self.gae_lambda,
        )  # fmt: skip
        if self.adv_norm:
            adv = adv_fns.masked_whiten(adv, loss_mask)
        return adv, ret

    def advantages(  # type: ignore[override]
        self, samples: Sequence[Sample], values: Sequence[Sequence[float]] | None = None
    ) -> list[list[float]]:
        """Per-token GAE advantages, one list per sample aligned with its ``token_ids``.

        ``values[i][t]`` is the critic value for sample i token t (zeros when omitted).
        """

        batch = collate(samples)
        v = None
        if values is not None:
            v = torch.zeros(batch.loss_mask.shape)
            for i, row in enumerate(values):
                v[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
        r = torch.tensor(self.rewards(samples))
        adv, _ = self._token_advantages(r, v, batch.loss_mask)
        return [adv[i, : len(s)].tolist() for i, s in enumerate(samples)]

    def prepare(self, batch: TokenBatch, samples: Sequence[Sample]) -> TokenBatch:
        """Sets ``advantages``, ``returns`` and ``loss_weights`` (all ``[B, T]``)."""
        _check_rows(batch, samples)
        r = torch.tensor(self.rewards(samples))
        adv, ret = self._token_advantages(r, batch.values, batch.loss_mask)
        return replace(
            batch, advantages=adv.float(), returns=ret.float(),
            loss_weights=loss_weights(batch.loss_mask, self.aggregation),
        )  # fmt: skip

    def value_loss(
        self, values: torch.Tensor, mb: TokenBatch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Clipped value loss of new critic ``values`` ``[b, t]`` vs ``mb.returns``, clipped
        around ``mb.values``; additive over micro-batches like ``loss``.

        Raises:
            ValueError: ``prepare`` was not applied.
        """
        if mb.returns is None or mb.loss_weights is None:
            raise ValueError("micro-batch has no returns; call PPO.prepare(batch, samples) first")
        old = mb.values if mb.values is not None else torch.zeros_like(values)
        return value_loss(
            values, old, mb.returns, mb.loss_mask, mb.loss_weights,
            value_clip_eps=self.value_clip_eps,
        )  # fmt: skip
