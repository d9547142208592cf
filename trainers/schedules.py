"""Learning-rate schedules shared by every training backend."""

from __future__ import annotations

import math
from collections.abc import Callable


def lr_lambda(warmup_steps: int, schedule: str, total_steps: int | None) -> Callable[[int], float]:
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
