"""Per-token KL estimators (one table, verl's names as aliases) and the KL-in-reward penalty.

All estimate ``KL(pi_theta || pi_ref)`` from tokens sampled from ``pi_theta``, with
``x = log pi_ref - log pi_theta`` per token:

==========  ===================  =========================================================
name        verl alias           per-token value
==========  ===================  =========================================================
``k1``      ``"kl"``             ``-x`` (unbiased, can be negative)
``k2``      ``"mse"``            ``x^2 / 2``
``k3``      ``"low_var_kl"``     ``exp(x) - 1 - x`` (unbiased, >= 0), clamped as verl
``abs``     ``"abs"``            ``|x|``
==========  ===================  =========================================================

``k3`` is clamped like verl's ``low_var_kl``: ``x`` to ``[-20, 20]`` and the estimate to
``[-10, 10]``. Unclamped, ``exp(x)`` overflows float32 at ``x ~ 89`` (a token the reference
finds far likelier than the policy) and one ``inf`` poisons the whole loss; clamped, such a
token contributes at most 10 and no gradient (it is outside the trust region of the estimate).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

import torch

KLEstimator = Literal["k1", "k2", "k3", "abs", "kl", "mse", "low_var_kl"]
KL_ESTIMATORS: tuple[str, ...] = get_args(KLEstimator)

K3_LOG_RATIO_CLAMP = 20.0
K3_VALUE_CLAMP = 10.0


def _k3(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp(-K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)
    return (torch.exp(x) - 1 - x).clamp(-K3_VALUE_CLAMP, K3_VALUE_CLAMP)


_ESTIMATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "k1": lambda x: -x,
    "k2": lambda x: 0.5 * x**2,
    "k3": _k3,
    "abs": torch.abs,
}
_ALIASES = {"kl": "k1", "mse": "k2", "low_var_kl": "k3"}


def canonical_kl_estimator(name: str) -> str:
    """``"k1"``, ``"k2"``, ``"k3"`` or ``"abs"`` for a name or a verl alias.

    Raises:
        ValueError: unknown estimator (lists the accepted names).
    """
    key = _ALIASES.get(name, name)
    if key not in _ESTIMATORS:
        raise ValueError(f"unknown KL estimator {name!r}; choose one of {KL_ESTIMATORS}")
    return key


def kl_penalty(
    logp: torch.Tensor, ref: torch.Tensor, estimator: KLEstimator | str = "k3"
) -> torch.Tensor:
    """Per-token estimate of ``KL(pi_theta || pi_ref)`` (see the module table).

    Args:
        logp: ``[B, T]`` log-probs of the sampled tokens under the policy (gradient flows).
        ref: ``[B, T]`` reference log-probs (detached here).
        estimator: a name or verl alias from the module table.

    Returns:
        ``[B, T]`` per-token estimates; mask them with the loss/stat weights.

    Raises:
        ValueError: unknown estimator.

    Example:
        >>> v = kl_penalty(torch.tensor([[0.0]]), torch.tensor([[100.0]]), "low_var_kl")
        >>> v.item()  # exp(100) would be inf in float32; clamped as verl
        10.0
    """
    return _ESTIMATORS[canonical_kl_estimator(estimator)](ref.detach() - logp)


def reward_kl(
    logp: torch.Tensor,
    ref: torch.Tensor,
    loss_mask: torch.Tensor,
    estimator: KLEstimator | str = "k3",
) -> torch.Tensor:
    """Per-token KL for verl's ``use_kl_in_reward``: :func:`kl_penalty` of the detached ``logp``
    in float64, 0 off the mask.

    The penalised token reward is ``terminal_reward - kl_coef * reward_kl`` (see
    ``advantages.terminal_rewards``); a sequence's penalised scalar reward is
    ``r - kl_coef * reward_kl(...).sum(-1)`` (verl's outcome estimators sum token rewards).

    Args:
        logp: ``[B, T]`` log-probs of the policy that sampled the tokens (no gradient taken).
        ref: ``[B, T]`` reference log-probs. loss_mask: ``[B, T]``.
        estimator: as :func:`kl_penalty`.

    Returns:
        ``[B, T]`` float64.

    Example:
        >>> reward_kl(torch.tensor([[0.0, -1.0, -2.0]]), torch.tensor([[0.0, -1.5, -1.0]]),
        ...           torch.tensor([[0, 1, 1]]), "k1")
        tensor([[ 0.0000,  0.5000, -1.0000]], dtype=torch.float64)
    """
    kl = kl_penalty(logp.detach().double(), ref.double(), estimator)
    return torch.where(loss_mask != 0, kl, 0.0)
