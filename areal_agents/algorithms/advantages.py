"""Advantage estimators: group-relative (GRPO, Dr.GRPO, RLOO), batch-normalised (REINFORCE++,
also with discounted token-level returns), per-role EMA baselines and GAE (PPO). Pure
functions on tensors; ``group_ids`` come from :func:`group_ids`, which keys samples by
``(sample.group, sample.agent)`` so each agent role of a multi-agent episode is compared only
with the same role in the same task group.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from areal_agents.samples import Sample


def group_ids(samples: Sequence[Sample]) -> torch.Tensor:
    """Dense group index per sample, grouping by ``(sample.group, sample.agent)``.

    Returns:
        ``[N]`` long tensor; ids are assigned in order of first appearance.
    """
    index: dict[tuple[str, str], int] = {}
    return torch.tensor(
        [index.setdefault((s.group, s.agent), len(index)) for s in samples], dtype=torch.long
    )


def _group_stats(rewards: torch.Tensor, gids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-sample (count, mean, unbiased std) of the sample's group; std is 0 for groups of one."""
    num_groups = int(gids.max()) + 1 if gids.numel() else 0
    r = rewards.to(torch.float64)
    count = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, gids, torch.ones_like(r))
    total = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, gids, r)
    mean = total / count.clamp(min=1)
    sq = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, gids, (r - mean[gids]) ** 2)
    std = (sq / (count - 1).clamp(min=1)).sqrt()
    return count[gids], mean[gids], std[gids]


def _check(rewards: torch.Tensor, gids: torch.Tensor) -> None:
    if rewards.dim() != 1 or gids.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_ids must both be [N]; got {tuple(rewards.shape)} and "
            f"{tuple(gids.shape)}"
        )


def grpo_advantages(
    rewards: torch.Tensor, gids: torch.Tensor, *, std_normalize: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Group-relative advantages (GRPO; Dr.GRPO with ``std_normalize=False``).

    ``A_i = (r_i - mean_g(r)) / (std_g(r) + eps)`` with the unbiased std of sample i's group g,
    or ``A_i = r_i - mean_g(r)`` without std normalisation. Groups of one and groups whose
    rewards are all equal get ``A = 0`` (never NaN).

    Args:
        rewards: ``[N]`` scalar rewards. gids: ``[N]`` long group ids (see :func:`group_ids`).

    Returns:
        ``[N]`` advantages in ``rewards.dtype``.
    """
    _check(rewards, gids)
    count, mean, std = _group_stats(rewards, gids)
    adv = rewards.to(torch.float64) - mean
    if std_normalize:
        adv = adv / (std + eps)
    adv = torch.where((count > 1) & (std > 0), adv, torch.zeros_like(adv))
    return adv.to(rewards.dtype)


def rloo_advantages(rewards: torch.Tensor, gids: torch.Tensor) -> torch.Tensor:
    """Leave-one-out baseline (RLOO): ``A_i = r_i - mean_{j in g, j != i} r_j``.

    Equivalently ``n / (n - 1) * (r_i - mean_g(r))``. Groups of one get ``A = 0``.

    Args / Returns: as :func:`grpo_advantages`.
    """
    _check(rewards, gids)
    count, mean, _ = _group_stats(rewards, gids)
    adv = (rewards.to(torch.float64) - mean) * count / (count - 1).clamp(min=1)
    return torch.where(count > 1, adv, torch.zeros_like(adv)).to(rewards.dtype)


def reinforce_pp_advantages(
    rewards: torch.Tensor, gids: torch.Tensor | None = None, *, eps: float = 1e-6
) -> torch.Tensor:
    """REINFORCE++: global batch normalisation ``A_i = (x_i - mean(x)) / (std(x) + eps)``.

    ``x = r`` by default; with ``gids`` (REINFORCE++-baseline) ``x_i = r_i - mean_g(r)`` first
    subtracts the group mean. Mean and (unbiased) std are over the whole batch; a batch of one or
    a batch with zero spread gives ``A = 0``.

    Args:
        rewards: ``[N]``. gids: optional ``[N]`` long group ids.

    Returns:
        ``[N]`` advantages in ``rewards.dtype``.
    """
    x = rewards.to(torch.float64)
    if gids is not None:
        _check(rewards, gids)
        x = x - _group_stats(rewards, gids)[1]
    if x.numel() < 2:
        return torch.zeros_like(rewards)
    std = x.std()
    if std == 0:
        return torch.zeros_like(rewards)
    return ((x - x.mean()) / (std + eps)).to(rewards.dtype)


def reinforce_pp_token_advantages(
    rewards: torch.Tensor,
    loss_mask: torch.Tensor,
    gids: torch.Tensor | None = None,
    *,
    token_penalty: torch.Tensor | None = None,
    gamma: float = 1.0,
    eps: float = 1e-6,
) -> torch.Tensor:
    """REINFORCE++ with token-level discounted returns, whitened with sequence statistics.

    Token rewards are ``rewards[b]`` on row b's last generated token minus ``token_penalty``
    (e.g. ``kl_coef * KL``, verl's KL in the reward); ``G[b, t]`` is their discounted return
    over generated tokens (observation tokens are skipped, as in :func:`gae`). With
    ``x_b = G[b, first generated token]`` (``rewards[b]`` for a row without generated tokens),
    ``c_b`` the mean of ``x`` over sample b's group (0 without ``gids``), and ``mu``, ``sigma``
    the mean and unbiased std of ``x - c`` over the rows::

        A[b, t] = (G[b, t] - c_b - mu) / (sigma + eps)

    With ``gamma=1`` and no penalty every token of a row gets
    :func:`reinforce_pp_advantages` of the rewards. Fewer than two rows or zero spread give 0.

    Args:
        rewards: ``[B]``. loss_mask: ``[B, T]``. gids: optional ``[B]`` long group ids.
        token_penalty: optional ``[B, T]`` subtracted from the token rewards.
        gamma: discount per generated token, in ``(0, 1]``.

    Returns:
        ``[B, T]`` float64 advantages, 0 off the mask.

    Example:
        >>> m = torch.tensor([[1, 1], [0, 1]])  # G = [[0.5, 1], [., 0]]; x = [0.5, 0]
        >>> reinforce_pp_token_advantages(torch.tensor([1.0, 0.0]), m, gamma=0.5)
        tensor([[ 0.7071,  2.1213],
                [ 0.0000, -0.7071]], dtype=torch.float64)
    """
    m = loss_mask != 0
    r = rewards.to(torch.float64)
    token_rewards = terminal_rewards(r, loss_mask)
    if token_penalty is not None:
        token_rewards = token_rewards - torch.where(m, token_penalty.to(torch.float64), 0.0)
    ret, _ = gae(token_rewards, torch.zeros_like(token_rewards), loss_mask, gamma=gamma,
                 gae_lambda=1.0)  # with zero values and lambda 1, GAE is the discounted return
    first = m.to(torch.long).argmax(-1)  # [B]
    x = torch.where(m.any(-1), ret.gather(1, first[:, None])[:, 0], r)
    c = torch.zeros_like(x)
    if gids is not None:
        _check(rewards, gids)
        c = _group_stats(x, gids)[1]
    if x.numel() < 2 or (x - c).std() == 0:
        return torch.zeros_like(ret)
    mu, sigma = (x - c).mean(), (x - c).std()
    return torch.where(m, (ret - c[:, None] - mu) / (sigma + eps), 0.0)


def ema_advantages(
    rewards: torch.Tensor,
    roles: Sequence[str],
    baselines: Mapping[str, float],
    *,
    decay: float = 0.9,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-role exponential-moving-average baseline, for self-play without task groups.

    ``A_i = r_i - b_{role(i)}`` where ``b`` is the baseline *before* this batch. A role seen for
    the first time starts at the mean of its rewards in this batch (its advantages are then
    centred). After the batch: ``b_role <- decay * b_role + (1 - decay) * mean(r of role)``.

    Args:
        rewards: ``[N]``. roles: ``N`` agent ids. baselines: current ``{role: b}`` (not mutated).
        decay: EMA factor in ``[0, 1)``.

    Returns:
        ``([N] advantages, updated baselines)``.

    Raises:
        ValueError: mismatched lengths or ``decay`` outside ``[0, 1)``.
    """
    if len(roles) != rewards.numel():
        raise ValueError(f"got {rewards.numel()} rewards but {len(roles)} roles")
    if not 0 <= decay < 1:
        raise ValueError(f"decay must be in [0, 1), got {decay}")
    new = dict(baselines)
    adv = torch.zeros(len(roles), dtype=torch.float64)
    r = rewards.to(torch.float64)
    for role in dict.fromkeys(roles):
        rows = torch.tensor([i for i, x in enumerate(roles) if x == role])
        batch_mean = float(r[rows].mean())
        b = new.get(role, batch_mean)
        adv[rows] = r[rows] - b
        new[role] = decay * b + (1 - decay) * batch_mean
    return adv.to(rewards.dtype), new


def broadcast_advantages(adv: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """``[N]`` per-sequence advantages -> ``[N, T]`` on generated tokens: ``adv[:, None] * mask``."""
    return adv[:, None].to(device=loss_mask.device, dtype=torch.float32) * (loss_mask != 0)


def terminal_rewards(rewards: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Place each sequence's scalar reward on its last generated token.

    Args:
        rewards: ``[B]``. loss_mask: ``[B, T]``.

    Returns:
        ``[B, T]`` zeros except ``rewards[b]`` at the last masked position of row b (rows with
        an empty mask get nothing).
    """
    m = (loss_mask != 0).to(torch.long)
    t = m.shape[1]
    last = (m * torch.arange(t, device=m.device)).argmax(-1)  # [B]
    out = torch.zeros(m.shape, dtype=rewards.dtype, device=m.device)
    has = m.sum(-1) > 0
    out[has, last[has]] = rewards.to(m.device)[has]
    return out


def gae(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    gae_lambda: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the generated tokens of each row.

    Only masked positions are time steps (observation tokens between turns are skipped): for
    consecutive generated positions ``t -> t'`` (``V_{t'} = 0`` after the last one),
    ``delta_t = r_t + gamma * V_{t'} - V_t`` and ``A_t = delta_t + gamma * lambda * A_{t'}``;
    returns ``R_t = A_t + V_t``. ``values[t]`` is the critic's estimate before emitting token t.

    Args:
        token_rewards: ``[B, T]`` (e.g. from :func:`terminal_rewards`); values: ``[B, T]``;
        loss_mask: ``[B, T]``.

    Returns:
        ``(advantages, returns)``, both ``[B, T]``, zero off the mask.
    """
    m = loss_mask != 0
    r = token_rewards.to(torch.float64)
    v = values.detach().to(torch.float64)
    adv = torch.zeros_like(r)
    next_v = torch.zeros(r.shape[0], dtype=torch.float64, device=r.device)
    next_a = torch.zeros_like(next_v)
    for t in range(r.shape[1] - 1, -1, -1):
        a = r[:, t] + gamma * next_v - v[:, t] + gamma * gae_lambda * next_a
        adv[:, t] = torch.where(m[:, t], a, 0.0)
        next_v = torch.where(m[:, t], v[:, t], next_v)
        next_a = torch.where(m[:, t], a, next_a)
    returns = torch.where(m, adv + v, 0.0)
    return adv.to(values.dtype), returns.to(values.dtype)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``(x - mean) / (std + eps)`` over masked positions (batch-global); 0 off the mask.

    Fewer than two masked positions or zero spread gives zeros.
    """
    m = mask != 0
    n = int(m.sum())
    if n < 2:
        return torch.zeros_like(x)
    vals = x[m].to(torch.float64)
    std = vals.std()
    if std == 0:
        return torch.zeros_like(x)
    return torch.where(m, (x.to(torch.float64) - vals.mean()) / (std + eps), 0.0).to(x.dtype)
