"""Reward functions beyond the env's own: LLM judges (and, from other modules, learned reward
models). Each is a ``Trainer(reward_fns=[...])`` entry, or ``group_reward_fns`` for judges
that score a whole group in one call. Guide: ``docs/generative_reward.md``."""

from .hooks import GroupRewardFn, ModelReward, apply_group_reward_fns
from .judge_cache import JudgeCache
from .judge_client import JudgeClient, JudgeFailed
from .judges import GroupJudge, Judge, ReferenceJudge, RubricJudge
from .parsing import JudgeParseError, OutOfRange, parse_score, parse_scores, parse_verdict
from .reward_model import PreferencePair, RewardModel, RewardModelReward, train_reward_model

__all__ = ["GroupJudge", "GroupRewardFn", "Judge", "JudgeCache", "JudgeClient", "JudgeFailed",
           "JudgeParseError", "ModelReward", "OutOfRange", "ReferenceJudge", "RubricJudge",
           "apply_group_reward_fns", "parse_score", "parse_scores", "parse_verdict"]
__all__ += ["PreferencePair", "RewardModel", "RewardModelReward", "train_reward_model"]
