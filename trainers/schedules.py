"""Learning-rate schedules shared by every training backend."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, get_args

from areal_agents.errors import ConfigError

LRSchedule = Literal["constant", "cosine"]
"""After the linear warm-up: ``"constant"`` (1.0) or ``"cosine"`` decay to 0 at ``total_steps``."""


def check_lr_schedule(lr_schedule: str, total_steps: int | None) -> None:
    """Validate an engine's LR-schedule arguments (every backend's constructor calls this).

    Raises:
        ConfigError: ``lr_schedule`` is not an ``LRSchedule``, or ``"cosine"`` lacks
            ``total_steps``.
    """
    if lr_schedule not in get_args(LRSchedule):
        raise ConfigError(f"lr_schedule must be 'constant' or 'cosine' (got {lr_schedule!r})")
    if lr_schedule == "cosine" and not total_steps:
        raise ConfigError("lr_schedule='cosine' needs total_steps= (the step the LR reaches 0)")


def lr_lambda(warmup_steps: int, schedule: LRSchedule, total_steps: int | None) -> Callable[[int], float]:
    """Multiplier of the base LR at each step (for ``torch.optim.lr_scheduler.LambdaLR``).

    Linear warm-up over ``warmup_steps``, then ``"constant"`` (1.0) or ``"cosine"`` decay to 0
    at ``total_steps``.
    """

    def fn(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, (total_steps or 1) - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


def apply_update(optimizer: Any, scheduler: Any, grad_norm: float, num_tokens: int,
                 out: dict[str, float]) -> dict[str, float]:
    """Finish a train step after backward and clipping, the same on every backend: record
    ``lr`` (before the schedule advances), ``grad_norm``, ``num_tokens`` and ``skipped`` (1.0 when
    the gradient norm is not finite: the optimizer step is skipped, the schedule still
    advances), then zero the gradients. Returns ``out``."""
    out["lr"] = float(scheduler.get_last_lr()[0])
    out["grad_norm"] = grad_norm
    out["num_tokens"] = float(num_tokens)
    finite = math.isfinite(grad_norm)
    if finite:
        optimizer.step()
    out["skipped"] = 0.0 if finite else 1.0
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return out
