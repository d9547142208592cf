"""RL algorithms: pure advantage/loss/aggregation/filtering functions and one object each."""

from areal_agents.algorithms.group_relative import DAPO, GRPO, GSPO, RLOO, DrGRPO
from areal_agents.algorithms.objects import PolicyGradient, check_group_size
from areal_agents.algorithms.registry import ALGORITHMS, resolve
from areal_agents.algorithms.soft_clip import CISPO, SAPO
from areal_agents.algorithms.token_level import PPO, ReinforcePlusPlus

__all__ = [
    "ALGORITHMS", "CISPO", "DAPO", "GRPO", "GSPO", "PPO", "RLOO", "SAPO", "DrGRPO",
    "PolicyGradient", "ReinforcePlusPlus", "check_group_size", "resolve",
]
