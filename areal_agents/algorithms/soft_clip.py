"""Policy losses that keep every token's gradient instead of PPO's hard clip: CISPO (clipped,
detached IS weight) and SAPO (sigmoid soft gate), as pure functions and algorithm objects.

Notation as in :mod:`areal_agents.algorithms.losses`: ``r = exp(logp - prox)``, behaviour
weight ``u`` (decoupled objective, capped), ``A`` advantages, ``w`` loss weights and ``sw`` stat
weights, all ``[B, T]``; ``sg`` is stop-gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from areal_agents.algorithms.aggregation import Aggregation, weighted_sum
from areal_agents.algorithms.group_relative import GRPO
from areal_agents.algorithms.losses import CapMode, importance_ratios, ratio_stats
from areal_agents.samples import TokenBatch


def cispo_policy_loss(
    logp: torch.Tensor,
    prox: torch.Tensor,
    behave: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    loss_weights: torch.Tensor,
    stat_weights: torch.Tensor,
    *,
    clip_eps: float = 1.0,
    clip_eps_high: float = 0.28,
    behave_imp_weight_cap: float | None = None,
    behave_imp_weight_mode: CapMode = "mask",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CISPO (MiniMax-M1): ``L = -sg(clip(r, 1 - eps_low, 1 + eps_high)) * A * logp``.

    Computed as ``-sg(clip(r)) * A * exp(logp - sg(logp))``: the value is ``-clip(r) * A`` and
    the gradient is exactly ``-clip(r) * A * d logp``. No token is dropped: a token whose ratio
    left the band keeps its gradient, only its weight is capped. ``loss = sum w * u * L``.

    Returns:
        ``(loss, stats)``: ``pg_loss``, ``clip_frac`` (tokens whose IS weight was clipped) and
        :func:`~areal_agents.algorithms.losses.ratio_stats`, all under ``stat_weights``
        except ``pg_loss``.
    """
    log_ratio, ratio, u, capped = importance_ratios(
        logp, prox, behave, loss_mask, behave_imp_weight_cap=behave_imp_weight_cap,
        behave_imp_weight_mode=behave_imp_weight_mode,
    )  # fmt: skip
    weight = ratio.detach().clamp(1.0 - clip_eps, 1.0 + clip_eps_high)
    per_token = -weight * advantages * torch.exp(logp - logp.detach())
    loss = weighted_sum(per_token * u, loss_weights)
    clipped = (ratio.detach() < 1.0 - clip_eps) | (ratio.detach() > 1.0 + clip_eps_high)
    stats = {
        "pg_loss": loss.detach(),
        "clip_frac": weighted_sum(clipped.float(), stat_weights),
        **ratio_stats(log_ratio, u, capped, stat_weights),
    }
    return loss, stats


def sapo_policy_loss(
    logp: torch.Tensor,
    prox: torch.Tensor,
    behave: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    loss_weights: torch.Tensor,
    stat_weights: torch.Tensor,
    *,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    behave_imp_weight_cap: float | None = None,
    behave_imp_weight_mode: CapMode = "mask",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SAPO (soft adaptive policy optimisation): ``L = -f(r) * A`` with the soft gate
    ``f(r) = 4 / tau * sigmoid(tau * (r - 1))``, ``tau = tau_pos`` where ``A > 0`` else
    ``tau_neg``.

    The gradient is ``-4 * s * (1 - s) * r * A * d logp`` with ``s = sigmoid(tau * (r - 1))``:
    exactly the unclipped policy gradient ``-A * d logp`` on-policy (``r = 1``) and smoothly
    decaying as ``r`` leaves 1 (faster for larger ``tau``) instead of PPO's hard cut.
    ``loss = sum w * u * L``.

    Returns:
        ``(loss, stats)``: ``pg_loss``, ``soft_gate`` (mean of ``4 s (1 - s)``, 1 on-policy)
        and :func:`~areal_agents.algorithms.losses.ratio_stats`, all under ``stat_weights``
        except ``pg_loss``.
    """
    log_ratio, ratio, u, capped = importance_ratios(
        logp, prox, behave, loss_mask, behave_imp_weight_cap=behave_imp_weight_cap,
        behave_imp_weight_mode=behave_imp_weight_mode,
    )  # fmt: skip
    tau = torch.where(advantages > 0, tau_pos, tau_neg).to(ratio.dtype)
    gate = torch.sigmoid(tau * (ratio - 1.0))
    loss = weighted_sum(-(4.0 / tau) * gate * advantages * u, loss_weights)
    with torch.no_grad():
        stats = {
            "pg_loss": loss.detach(),
            "soft_gate": weighted_sum(4.0 * gate * (1.0 - gate), stat_weights),
            **ratio_stats(log_ratio, u, capped, stat_weights),
        }
    return loss, stats


@dataclass
class CISPO(GRPO):
    """CISPO (MiniMax-M1): GRPO advantages with a clipped, detached IS weight per token.

    ``clip_eps`` / ``clip_eps_high`` bound the IS weight to ``[1 - eps_low, 1 + eps_high]``;
    the default ``clip_eps=1.0`` leaves no lower bound (the paper tunes only the upper one).
    Token-mean aggregation as in the paper. ``dual_clip_c`` does not apply.

    Example:
        >>> CISPO().clip_eps, CISPO().clip_eps_high, CISPO().aggregation
        (1.0, 0.28, 'token-mean')
    """

    clip_eps: float = 1.0
    clip_eps_high: float | None = 0.28
    aggregation: Aggregation = "token-mean"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dual_clip_c is not None:
            raise ValueError("CISPO.dual_clip_c does not apply (no token is clipped); leave it "
                             "None")

    def _policy_loss(
        self, logprobs: torch.Tensor, prox: torch.Tensor, mb: TokenBatch, w: torch.Tensor,
        sw: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        assert mb.advantages is not None
        high = self.clip_eps if self.clip_eps_high is None else self.clip_eps_high
        return cispo_policy_loss(
            logprobs, prox, mb.old_logprobs, mb.advantages, mb.loss_mask, w, sw,
            clip_eps=self.clip_eps, clip_eps_high=high,
            behave_imp_weight_cap=self.behave_imp_weight_cap,
            behave_imp_weight_mode=self.behave_imp_weight_mode,
        )  # fmt: skip


@dataclass
class SAPO(GRPO):
    """SAPO: GRPO advantages with the sigmoid soft gate instead of the clip (see
    :func:`sapo_policy_loss`). ``clip_eps``, ``clip_eps_high`` are unused; ``dual_clip_c``
    does not apply.

    Attributes:
        tau_pos, tau_neg: gate temperatures for positive / negative advantages (> 0); a
            larger ``tau_neg`` damps off-policy negative updates faster.

    Example:
        >>> SAPO().tau_pos, SAPO().tau_neg
        (1.0, 1.05)
    """

    tau_pos: float = 1.0
    tau_neg: float = 1.05

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tau_pos <= 0 or self.tau_neg <= 0:
            raise ValueError(f"SAPO.tau_pos and tau_neg must be > 0, got {self.tau_pos}, "
                             f"{self.tau_neg}")
        if self.dual_clip_c is not None:
            raise ValueError("SAPO.dual_clip_c does not apply (the gate replaces the clip); "
                             "leave it None")

    def _policy_loss(
        self, logprobs: torch.Tensor, prox: torch.Tensor, mb: TokenBatch, w: torch.Tensor,
        sw: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        assert mb.advantages is not None
        return sapo_policy_loss(
            logprobs, prox, mb.old_logprobs, mb.advantages, mb.loss_mask, w, sw,
            tau_pos=self.tau_pos, tau_neg=self.tau_neg,
            behave_imp_weight_cap=self.behave_imp_weight_cap,
            behave_imp_weight_mode=self.behave_imp_weight_mode,
        )  # fmt: skip
