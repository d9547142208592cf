"""Policy, KL, entropy and value losses, token-level and masked, aggregated with batch-global
``loss_weights`` (see :mod:`areal_agents.algorithms.aggregation`) so that every loss and every
statistic returned here adds up exactly over micro-batches.

Notation (all ``[B, T]``): ``logp`` current policy log-probs (with grad), ``prox`` proximal
policy log-probs (recomputed by the trainer before the update), ``behave`` behaviour log-probs
(recorded by the inference engine), ``A`` advantages, ``m`` the loss mask, ``w`` loss weights.
"""

from __future__ import annotations

from typing import Literal

import torch

from areal_agents.algorithms.aggregation import weighted_sum

KLEstimator = Literal["k1", "k2", "k3"]
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
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Decoupled PPO clip loss (token level, or GSPO's sequence level).

    ``r = exp(logp - prox)``, ``u = exp(prox - behave)`` (capped, see
    :func:`behave_importance_weight`) and ``loss = sum_{b,t} w * u * L(r, A)`` with ``L`` from
    :func:`clipped_surrogate`. With ``prox == behave`` (on-policy data) ``u = 1`` and this is
    standard PPO.

    With ``sequence_level=True`` (GSPO), ``r`` is replaced per row by the length-normalised
    sequence ratio ``s_b = exp(mean_{t in m_b}(logp - prox))`` written token-wise as
    ``s_b * exp(logp - sg(logp))`` so every token carries the sequence ratio's gradient; ``u`` is
    likewise ``exp(mean_t(prox - behave))`` per row and the cap masks or clamps whole rows.

    Args:
        logp, prox, behave, advantages, loss_mask, loss_weights: ``[B, T]``.

    Returns:
        ``(loss, stats)``: 0-d loss; stats (0-d, detached, additive over micro-batches):
        ``pg_loss``, ``clip_frac``, ``dual_clip_frac``, ``imp_weight`` (mean ``u``),
        ``imp_weight_capped_frac`` (all weighted by ``w``), ``num_imp_weight_capped`` (count of
        tokens) and ``approx_kl_prox`` (k3 of prox vs current).
    """
    m = loss_mask != 0
    log_ratio = torch.where(m, logp - prox.detach(), 0.0)
    if sequence_level:
        n_b = m.sum(-1, keepdim=True).clamp(min=1)
        seq_log_ratio = (log_ratio.sum(-1, keepdim=True) / n_b).detach()
        ratio = torch.exp(seq_log_ratio) * torch.exp(logp - logp.detach())
        seq_u = torch.exp(torch.where(m, prox - behave, 0.0).sum(-1, keepdim=True) / n_b)
        u_prox = behave + torch.log(seq_u).expand_as(behave)  # row-constant log weight
        u, capped = behave_importance_weight(
            u_prox, behave, loss_mask, cap=behave_imp_weight_cap, mode=behave_imp_weight_mode
        )
    else:
        ratio = torch.exp(log_ratio)
        u, capped = behave_importance_weight(
            prox, behave, loss_mask, cap=behave_imp_weight_cap, mode=behave_imp_weight_mode
        )
    pg, clipped, dual = clipped_surrogate(
        ratio, advantages, clip_eps=clip_eps, clip_eps_high=clip_eps_high, dual_clip_c=dual_clip_c
    )
    w = torch.where(m, loss_weights, 0.0)
    loss = weighted_sum(pg * u, w)
    with torch.no_grad():
        k3 = torch.exp(-log_ratio) - 1 + log_ratio
        stats = {
            "pg_loss": loss.detach(),
            "clip_frac": weighted_sum(clipped.float(), w),
            "dual_clip_frac": weighted_sum(dual.float(), w),
            "imp_weight": weighted_sum(u, w),
            "imp_weight_capped_frac": weighted_sum(capped.float(), w),
            "num_imp_weight_capped": capped.sum().float(),
            "approx_kl_prox": weighted_sum(k3, w),
        }
    return loss, stats


def kl_penalty(
    logp: torch.Tensor, ref: torch.Tensor, estimator: KLEstimator = "k3"
) -> torch.Tensor:
    """Per-token estimate of ``KL(pi_theta || pi_ref)`` from samples of ``pi_theta``.

    With ``x = ref - logp``: ``k1 = -x``; ``k2 = x^2 / 2``; ``k3 = exp(x) - 1 - x`` (unbiased
    and non-negative). Shapes ``[B, T]`` -> ``[B, T]``; mask with the loss weights.

    Raises:
        ValueError: unknown estimator.
    """
    x = ref.detach() - logp
    if estimator == "k1":
        return -x
    if estimator == "k2":
        return 0.5 * x**2
    if estimator == "k3":
        return torch.exp(x) - 1 - x
    raise ValueError(f"unknown KL estimator {estimator!r}; choose 'k1', 'k2' or 'k3'")


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    loss_mask: torch.Tensor,
    loss_weights: torch.Tensor,
    *,
    value_clip_eps: float | None = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss ``sum w * 0.5 * max((V - R)^2, (V_clip - R)^2)``.

    ``V_clip = V_old + clip(V - V_old, -eps, eps)``; ``value_clip_eps=None`` gives the plain
    ``0.5 * (V - R)^2``. All tensors ``[B, T]``.

    Returns:
        ``(loss, stats)`` with ``vf_loss`` and ``vf_clip_frac`` (weighted like the loss).
    """
    err = (values - returns) ** 2
    clip_frac = torch.zeros_like(err)
    if value_clip_eps is not None:
        v_clip = old_values + (values - old_values).clamp(-value_clip_eps, value_clip_eps)
        err_clip = (v_clip - returns) ** 2
        clip_frac = (err_clip > err).float()
        err = torch.maximum(err, err_clip)
    w = torch.where(loss_mask != 0, loss_weights, 0.0)
    loss = weighted_sum(0.5 * err, w)
    return loss, {"vf_loss": loss.detach(), "vf_clip_frac": weighted_sum(clip_frac, w).detach()}
