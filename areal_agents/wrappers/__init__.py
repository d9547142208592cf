"""Env wrappers: time limits, episode recording, observation transforms, fixed opponents.

Wrappers compose like Gymnasium's: each holds ``env``, forwards unknown attributes to it, and
``unwrapped`` reaches the innermost env. A wrapper of a ``MultiAgentEnv`` is itself a
``MultiAgentEnv`` (forwarding ``agents``/``possible_agents``); ``FixedOpponents`` turns a
``MultiAgentEnv`` into an ``AgentEnv``.
"""

from .base import MultiAgentWrapper, Wrapper
from .fixed_opponents import FixedOpponents
from .record_episode import RecordEpisode
from .time_limit import TimeLimit
from .transform import TransformObservation

__all__ = [
    "FixedOpponents",
    "MultiAgentWrapper",
    "RecordEpisode",
    "TimeLimit",
    "TransformObservation",
    "Wrapper",
]
