"""PPO-clip policy loss and the clipped value loss, token-level and masked, aggregated with
batch-global ``loss_weights`` (see :mod:`areal_agents.algorithms.aggregation`) so that every loss
and every statistic returned here adds up exactly over micro-batches. Statistics use separate
``stat_weights`` (a per-token mean whatever the aggregation). KL estimators live in
:mod:`areal_agents.algorithms.kl` (re-exported here); CISPO and SAPO in
:mod:`areal_agents.algorithms.soft_losses`.

Notation (all ``[B, T]``): ``logp`` current policy log-probs (with grad), ``prox`` proximal
policy log-probs (recomputed by the trainer before the update), ``behave`` behaviour log-probs
(recorded by the inference engine), ``A`` advantages, ``m`` the loss mask, ``w`` loss weights.
"""

from __future__ import annotations

from typing import Literal

import torch

from areal_agents.algorithms.aggregation import weighted_sum
from areal_agents.algorithms.kl import KLEstimator, kl_penalty

__all__ = [
    "CapMode", "KLEstimator", "behave_importance_weight", "clipped_surrogate", "kl_penalty",
    "ppo_policy_loss", "value_loss",
]

CapMode = Literal["mask", "clamp"]


def behave_importance_weight(
    prox: torch.Tensor,
    behave: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    cap: float | None = None,
    mode: CapMode = "mask",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Behaviour importance weight ``u = exp(prox - behave) = pi_prox / pi_behave`` (no grad).

    Args:
        prox, behave, loss_mask: ``[B, T]``.
        cap: tokens with ``u > cap`` are handled by ``mode``; ``None`` disables the cap.
        mode: ``"mask"`` sets their weight to 0 (dropped from the loss); ``"clamp"`` sets it to
            ``cap``.

    Returns:
        ``(u, capped)``: ``[B, T]`` weights (0 off the mask) and a ``[B, T]`` bool tensor marking
        masked tokens above the cap.
    """
    m = loss_mask != 0
    u = torch.where(m, torch.exp((prox - behave).detach()), 0.0)
    capped = torch.zeros_like(m)
    if cap is not None:
        capped = m & (u > cap)
        u = torch.where(capped, 0.0 if mode == "mask" else cap, u)
    return u, capped


def clipped_surrogate(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip_c: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate, per position (elementwise on any shape).

    ``L = max(-A * r, -A * clip(r, 1 - eps_low, 1 + eps_high))`` (clip-higher when
    ``eps_high != eps_low``, DAPO); with dual clip (``c > 1``), for ``A < 0``:
    ``L = min(L, -A * c)``.

    Returns:
        ``(loss, clipped, dual_clipped)``: the loss and bool masks of positions where the
        clipped branch (resp. the dual-clip bound) is the active one.
    """
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    unclipped = -advantages * ratio
    clipped_term = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + eps_high)
    loss = torch.maximum(unclipped, clipped_term)
    clipped = clipped_term > unclipped
    dual = torch.zeros_like(clipped)
    if dual_clip_c is not None:
        if dual_clip_c <= 1.0:
            raise ValueError(f"dual_clip_c must be > 1, got {dual_clip_c}")
        bound = -advantages * dual_clip_c
        dual = (advantages < 0) & (loss > bound)
        loss = torch.where(dual, bound, loss)
    return loss, clipped, dual


def importance_ratios(
    logp: torch.Tensor,
    prox: torch.Tensor,
    behave: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    behave_imp_weight_cap: float | None = None,
    behave_imp_weight_mode: CapMode = "mask",
    sequence_level: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The decoupled objective's two ratios, shared by every policy loss.

    ``r = exp(logp - prox)`` (gradient flows through ``logp``) and the behaviour weight
    ``u = exp(prox - behave)`` (no grad, capped, see :func:`behave_importance_weight`).

    With ``sequence_level=True`` (GSPO), ``r`` is replaced per row by the length-normalised
    sequence ratio ``s_b = exp(mean_{t in m_b}(logp - prox))`` written token-wise as
    ``s_b * exp(logp - sg(logp))`` so every token carries the sequence ratio's gradient; ``u`` is
    likewise ``exp(mean_t(prox - behave))`` per row and the cap masks or clamps whole rows.

    Args:
        logp, prox, behave, loss_mask: ``[B, T]``.

    Returns:
        ``(log_ratio, ratio, u, capped)``, all ``[B, T]``: the token log-ratio ``logp - prox``
        (0 off the mask, detached use only), ``r``, ``u`` (0 off the mask) and the bool mask of
        capped tokens.
    """
    m = loss_mask != 0
    log_ratio = torch.where(m, logp - prox.detach(), 0.0)
    cap, mode = behave_imp_weight_cap, behave_imp_weight_mode
    if not sequence_level:
        u, capped = behave_importance_weight(prox, behave, loss_mask, cap=cap, mode=mode)
        return log_ratio, torch.exp(log_ratio), u, capped
    n_b = m.sum(-1, keepdim=True).clamp(min=1)
    seq_log_ratio = (log_ratio.sum(-1, keepdim=True) / n_b).detach()
    ratio = torch.exp(seq_log_ratio) * torch.exp(logp - logp.detach())
    seq_u = torch.exp(torch.where(m, prox - behave, 0.0).sum(-1, keepdim=True) / n_b)
    u_prox = behave + torch.log(seq_u).expand_as(behave)  # row-constant log weight
    u, capped = behave_importance_weight(u_prox, behave, loss_mask, cap=cap, mode=mode)
    return log_ratio, ratio, u, capped


def ratio_stats(
    log_ratio: torch.Tensor, u: torch.Tensor, capped: torch.Tensor, stat_weights: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Statistics every policy loss logs, as per-token means under ``stat_weights``.

    Returns:
        ``imp_weight`` (mean ``u``), ``imp_weight_capped_frac``, ``num_imp_weight_capped`` (a
        count) and ``approx_kl_prox`` (clamped k3 of the proximal policy vs the current one).
    """
    with torch.no_grad():
        lr = log_ratio.detach()  # k3 with x = prox - logp
        return {
            "imp_weight": weighted_sum(u, stat_weights),
            "imp_weight_capped_frac": weighted_sum(capped.float(), stat_weights),
            "num_imp_weight_capped": capped.sum().float(),
            "approx_kl_prox": weighted_sum(kl_penalty(lr, torch.zeros_like(lr)), stat_weights),
        }


def ppo_policy_loss(
    logp: torch.Tensor,
    prox: torch.Tensor,
    behave: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    loss_weights: torch.Tensor,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip_c: float | None = None,
    behave_imp_weight_cap: float | None = None,
    behave_imp_weight_mode: CapMode = "mask",
    sequence_level: bool = False,
    stat_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Decoupled PPO clip loss (token level, or GSPO's sequence level).

    ``loss = sum_{b,t} w * u * L(r, A)`` with ``r``, ``u`` from :func:`importance_ratios` and
    ``L`` from :func:`clipped_surrogate`. With ``prox == behave`` (on-policy data) ``u = 1`` and
    this is standard PPO.

    Args:
        logp, prox, behave, advantages, loss_mask, loss_weights: ``[B, T]``.
        stat_weights: ``[B, T]`` weights of the ratio-like statistics (``TokenBatch.
            stat_weights``: ``loss_mask / N``, a per-token mean); ``None`` uses ``loss_weights``.

    Returns:
        ``(loss, stats)``: 0-d loss; stats (0-d, detached, additive over micro-batches):
        ``pg_loss`` (the loss), and under ``stat_weights``: ``clip_frac``, ``dual_clip_frac``
        and those of :func:`ratio_stats`.
    """
    m = loss_mask != 0
    log_ratio, ratio, u, capped = importance_ratios(
        logp, prox, behave, loss_mask, behave_imp_weight_cap=behave_imp_weight_cap,
        behave_imp_weight_mode=behave_imp_weight_mode, sequence_level=sequence_level,
    )  # fmt: skip
    pg, clipped, dual = clipped_surrogate(
        ratio, advantages, clip_eps=clip_eps, clip_eps_high=clip_eps_high, dual_clip_c=dual_clip_c
    )
    w = torch.where(m, loss_weights, 0.0)
    sw = w if stat_weights is None else torch.where(m, stat_weights, 0.0)
    loss = weighted_sum(pg * u, w)
    stats = {
        "pg_loss": loss.detach(),
        "clip_frac": weighted_sum(clipped.float(), sw).detach(),
        "dual_clip_frac": weighted_sum(dual.float(), sw).detach(),
        **ratio_stats(log_ratio, u, capped, sw),
    }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    loss_mask: torch.Tensor,
    loss_weights: torch.Tensor,
    *,
    value_clip_eps: float | None = 0.2,
    stat_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss ``sum w * 0.5 * max((V - R)^2, (V_clip - R)^2)``.

    ``V_clip = V_old + clip(V - V_old, -eps, eps)``; ``value_clip_eps=None`` gives the plain
    ``0.5 * (V - R)^2``. All tensors ``[B, T]``.

    Returns:
        ``(loss, stats)`` with ``vf_loss`` and ``vf_clip_frac`` (a per-token mean under
        ``stat_weights``; ``None`` weights it like the loss).
    """
    err = (values - returns) ** 2
    clip_frac = torch.zeros_like(err)
    if value_clip_eps is not None:
        v_clip = old_values + (values - old_values).clamp(-value_clip_eps, value_clip_eps)
        err_clip = (v_clip - returns) ** 2
        clip_frac = (err_clip > err).float()
        err = torch.maximum(err, err_clip)
    w = torch.where(loss_mask != 0, loss_weights, 0.0)
    sw = w if stat_weights is None else torch.where(loss_mask != 0, stat_weights, 0.0)
    loss = weighted_sum(0.5 * err, w)
    return loss, {"vf_loss": loss.detach(), "vf_clip_frac": weighted_sum(clip_frac, sw).detach()}
