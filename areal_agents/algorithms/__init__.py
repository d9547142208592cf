"""RL algorithms: pure advantage/loss/aggregation/filtering functions and one object each."""

from areal_agents.algorithms.objects import (
    DAPO,
    GRPO,
    GSPO,
    PPO,
    RLOO,
    DrGRPO,
    PolicyGradient,
    ReinforcePlusPlus,
)

__all__ = ["DAPO", "GRPO", "GSPO", "PPO", "RLOO", "DrGRPO", "PolicyGradient", "ReinforcePlusPlus"]
