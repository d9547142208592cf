"""RL algorithms: pure advantage/loss/aggregation/filtering functions and one object each."""

from areal_agents.algorithms.objects import (
    DAPO,
    GRPO,
    GSPO,
    RLOO,
    DrGRPO,
    PolicyGradient,
)
from areal_agents.algorithms.token_level import PPO, ReinforcePlusPlus

__all__ = ["DAPO", "GRPO", "GSPO", "PPO", "RLOO", "DrGRPO", "PolicyGradient", "ReinforcePlusPlus"]
