"""The exception hierarchy of areal_agents.

::

    AgentsError
    ├── EnvError                 an environment was used against its contract
    │   ├── ResetNeeded          step() before reset() or after the episode ended
    │   ├── UnknownAgent         an action for an agent that was not asked to act
    │   └── MissingAction        no action for an agent that was asked to act
    ├── RegistryError            unknown or duplicate environment id
    ├── EngineError              an inference engine failed a request
    │   ├── EngineTimeout        a request did not finish in time
    │   ├── EngineUnavailable    the engine is gone (its server died); use another replica
    │   ├── ContextLengthExceeded  a prompt does not fit the model's context
    │   └── WeightSyncError      a weight transfer failed or was aborted
    ├── TrainError               a training backend failed
    └── ConfigError              a configuration value is invalid

``ValueError`` / ``TypeError`` are raised for plain bad arguments; messages name the likely
cause and the fix.
"""

from __future__ import annotations


class AgentsError(Exception):
    """Base class of every error raised by areal_agents."""


class EnvError(AgentsError):
    """An environment was used against its contract."""


class ResetNeeded(EnvError):
    """``step`` was called before ``reset`` or after the episode ended."""


class UnknownAgent(EnvError):
    """An action was given for an agent that was not asked to act."""


class MissingAction(EnvError):
    """An agent that was asked to act got no action."""


class RegistryError(AgentsError, KeyError):
    """An environment id is unknown, or registered twice."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class EngineError(AgentsError):
    """An inference engine failed a request."""


class EngineTimeout(EngineError):
    """A request to an inference engine did not finish in time."""


class EngineUnavailable(EngineError):
    """An inference engine can serve no more requests (e.g. its server process died); the
    gateway drops the replica (and restarts it when it can)."""


class ContextLengthExceeded(EngineError, ValueError):
    """A prompt (plus ``max_tokens``) does not fit the model's context window."""


class WeightSyncError(EngineError):
    """A weight transfer to an engine failed or was aborted (the receiver discards it)."""


class TrainError(AgentsError):
    """A training backend failed."""


class ConfigError(AgentsError, ValueError):
    """A configuration value is invalid; the message names the field and the allowed values."""
