"""The async environment contracts: ``AgentEnv`` (one agent) and ``MultiAgentEnv`` (several).

Subclasses implement ``reset`` and ``step``; the base classes wrap both so that every env gets
the same misuse errors (``ResetNeeded``, ``UnknownAgent``, ``MissingAction``) and the same
bookkeeping without repeating it. A cancelled ``reset``/``step`` leaves that bookkeeping
unchanged.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import numpy as np

from .errors import MissingAction, ResetNeeded, UnknownAgent

if TYPE_CHECKING:
    from .registration import EnvSpec

ObsT = TypeVar("ObsT")
ActT = TypeVar("ActT")


class _EnvBase:
    """What both env kinds share: ``np_random`` handling (Gymnasium semantics), ``render``,
    ``close`` and ``async with``, and the repr."""

    metadata: ClassVar[dict[str, Any]] = {"render_modes": []}
    spec: EnvSpec | None = None
    render_mode: str | None = None

    _np_random: np.random.Generator | None = None
    _np_random_seed: int | None = None
    _action_rng: random.Random | None = None
    _action_seed: int | None = None  # the seed of an action_rng not built yet (see _seed)

    @property
    def np_random(self) -> np.random.Generator:
        """The env's random generator; seeded by ``reset(seed=...)``, or from entropy if unseeded."""
        if self._np_random is None:
            self._seed(None)
        assert self._np_random is not None
        return self._np_random

    @property
    def action_rng(self) -> random.Random:
        """A ``random.Random`` for ``sample_action``, kept apart from ``np_random`` so sampling
        actions never changes the episode; reseeded by ``reset(seed=...)``."""
        if self._action_rng is None:
            seed, self._action_seed = self._action_seed, None
            self._action_rng = random.Random() if seed is None else random.Random(seed)
        return self._action_rng

    @property
    def np_random_seed(self) -> int | None:
        """The seed last given to ``reset`` (None when seeded from entropy)."""
        return self._np_random_seed

    def _seed(self, seed: int | None) -> None:
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
            raise ValueError(f"seed must be a non-negative int or None, got {seed!r}")
        self._np_random = np.random.default_rng(seed)
        self._np_random_seed = seed
        if seed is not None and self._action_rng is None:
            # built from this seed on first use (most episodes never sample an action): the
            # same stream as Random(seed) now, without its ~10 us per reset
            self._action_seed = seed
        elif seed is not None:
            self._action_rng.seed(seed)

    def render(self) -> Any:
        """Render the env (optional); returns None unless a subclass supports a render mode."""
        return None

    async def close(self) -> None:
        """Release resources. Idempotent."""

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        name = self.spec.id if self.spec is not None else type(self).__name__
        return f"<{type(self).__name__} {name}>"


class AgentEnv(_EnvBase, Generic[ObsT, ActT]):
    """A single-agent environment with an async Gymnasium-style API.

    For LLM envs an observation is the list of *new* chat messages (OpenAI format) since the
    agent's last action; the first observation carries the task. An action is an assistant
    message dict (``content``, optional ``tool_calls``); a plain ``str`` is accepted as
    ``{"role": "assistant", "content": str}`` (see ``areal_agents.messages.parse_action``).

    Subclasses implement ``reset`` and ``step`` and call ``await super().reset(seed=seed)``
    first in ``reset`` to seed ``self.np_random``. The base class raises ``ResetNeeded`` when
    ``step`` is called before ``reset`` or after the episode ended (terminated or truncated).

    Example:
        >>> import asyncio, areal_agents as aa
        >>> class Echo(aa.AgentEnv):
        ...     async def reset(self, *, seed=None, options=None):
        ...         await super().reset(seed=seed)
        ...         return [aa.user("say hi")], {}
        ...     async def step(self, action):
        ...         text = aa.parse_action(action)["content"]
        ...         return [], float(text == "hi"), True, False, {}
        >>> async def main():
        ...     env = Echo()
        ...     await env.reset(seed=0)
        ...     return await env.step("hi")
        >>> asyncio.run(main())
        ([], 1.0, True, False, {})
    """


    _needs_reset: bool = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "step" in cls.__dict__:
            cls.step = _guard_single_step(cls.__dict__["step"])  # type: ignore[method-assign]
        if "reset" in cls.__dict__:
            cls.reset = _guard_reset(cls.__dict__["reset"])  # type: ignore[method-assign]

    async def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[ObsT, dict[str, Any]]:
        """Start a new episode.

        Args:
            seed: seeds ``self.np_random``; the same seed gives the same episode for the same
                actions. ``None`` keeps the current generator (seeded from entropy at first use).
            options: env-specific options for this episode.

        Returns:
            ``(observation, info)``.
        """
        if seed is not None or self._np_random is None:
            self._seed(seed)
        return None, {}  # type: ignore[return-value]

    async def step(self, action: ActT) -> tuple[ObsT, float, bool, bool, dict[str, Any]]:
        """Apply the agent's action.

        Args:
            action: an assistant message dict or a str.

        Returns:
            ``(observation, reward, terminated, truncated, info)``: the new messages for the
            agent, the reward of this step, whether the episode reached a terminal state,
            whether it was cut short (time limit), and diagnostic info.

        Raises:
            ResetNeeded: before ``reset`` or after the episode ended.
        """
        raise NotImplementedError

    @property
    def unwrapped(self) -> AgentEnv[Any, Any]:
        """The innermost env under any wrappers."""
        return self

    async def __aenter__(self) -> AgentEnv[ObsT, ActT]:
        return self


class MultiAgentEnv(_EnvBase, Generic[ObsT, ActT]):
    """A multi-agent environment with one dict-keyed async API (PettingZoo's parallel keys).

    ``obs`` returned by ``reset``/``step`` holds exactly the agents that must act next: one
    agent in turn-based games, all of them for simultaneous moves, any subset otherwise.
    ``step`` takes actions for exactly those agents. Rewards may go to any agent at any step.
    The episode ends when ``self.agents`` is empty.

    Attributes:
        possible_agents: every agent id that can ever appear.
        agents: the live agents; subclasses keep it current (empty = episode over).

    Subclasses implement ``reset``/``step`` and call ``await super().reset(seed=seed)`` first.
    The base class raises ``ResetNeeded`` (step before reset or after the end),
    ``UnknownAgent`` (an action for an agent not asked to act) and ``MissingAction``.

    Act when ready: an env whose agents act asynchronously sets ``act_when_ready = True``.
    Its ``obs`` then names the agents given a new observation, each of which *may* act from
    then on; ``step`` takes the actions of any non-empty subset of the agents that may act
    (``agents_to_act``), and the others keep their observation and may act later. An agent is
    observed again only after its action was applied (never while its action is pending).
    ``run_episode`` (and so the Trainer) then applies each action in its own ``step`` as soon
    as it arrives, so a slow agent holds nobody back; ``check_env`` checks this contract.
    """

    possible_agents: list[str] = []  # noqa: RUF012 - subclasses assign their own lists
    agents: list[str] = []  # noqa: RUF012

    act_when_ready: ClassVar[bool] = False

    _needs_reset: bool = True
    _to_act: frozenset[str] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "step" in cls.__dict__:
            cls.step = _guard_multi_step(cls.__dict__["step"])  # type: ignore[method-assign]
        if "reset" in cls.__dict__:
            cls.reset = _guard_reset(cls.__dict__["reset"])  # type: ignore[method-assign]

    async def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, ObsT], dict[str, dict[str, Any]]]:
        """Start a new episode; returns ``(obs, infos)`` keyed by agent id (obs: who acts first)."""
        if seed is not None or self._np_random is None:
            self._seed(seed)
        return {}, {}

    async def step(self, actions: Mapping[str, ActT]) -> tuple[
        dict[str, ObsT],
        dict[str, float],
        dict[str, bool],
        dict[str, bool],
        dict[str, dict[str, Any]],
    ]:
        """Apply the actions of the agents asked to act.

        Args:
            actions: ``{agent_id: action}`` for exactly the agents of the last ``obs``.

        Returns:
            ``(obs, rewards, terminations, truncations, infos)``, dicts keyed by agent id:
            ``obs`` names who acts next; the others may hold any agent.

        Raises:
            ResetNeeded: before ``reset`` or after the episode ended.
            UnknownAgent: an action for an agent that was not asked to act.
            MissingAction: no action for an agent that was asked to act.
        """
        raise NotImplementedError

    @property
    def agents_to_act(self) -> frozenset[str]:
        """The agents whose actions the next ``step`` expects (``act_when_ready``: the agents
        that may act, any non-empty subset of which the next ``step`` takes)."""
        return self._to_act

    @property
    def unwrapped(self) -> MultiAgentEnv[Any, Any]:
        """The innermost env under any wrappers."""
        return self

    async def __aenter__(self) -> MultiAgentEnv[ObsT, ActT]:
        return self


def _env_name(env: Any) -> str:
    return env.spec.id if getattr(env, "spec", None) is not None else type(env).__name__


def _guard_reset(reset: Any) -> Any:
    @functools.wraps(reset)
    async def guarded(self: Any, *, seed: int | None = None, options: dict | None = None) -> Any:
        result = await reset(self, seed=seed, options=options)
        self._needs_reset = False
        if isinstance(self, MultiAgentEnv) and isinstance(result, tuple) and result:
            self._to_act = frozenset(result[0])
            if not self.agents:
                self._needs_reset = True
        return result

    guarded.__areal_guarded__ = True  # type: ignore[attr-defined]
    return guarded


def _guard_single_step(step: Any) -> Any:
    @functools.wraps(step)
    async def guarded(self: Any, action: Any) -> Any:
        if self._needs_reset:
            raise ResetNeeded(
                f"{_env_name(self)}: step() called before reset() or after the episode ended; "
                "call `await env.reset()` to start a new episode"
            )
        result = await step(self, action)
        if result[2] or result[3]:
            self._needs_reset = True
        return result

    return guarded


def _guard_multi_step(step: Any) -> Any:
    @functools.wraps(step)
    async def guarded(self: Any, actions: Mapping[str, Any]) -> Any:
        if self._needs_reset:
            raise ResetNeeded(
                f"{_env_name(self)}: step() called before reset() or after the episode ended "
                "(no live agents); call `await env.reset()` to start a new episode"
            )
        if not isinstance(actions, Mapping):
            raise TypeError(
                f"{_env_name(self)}: step() takes a dict {{agent_id: action}}, "
                f"got {type(actions).__name__}"
            )
        extra = sorted(set(actions) - self._to_act)
        if extra:
            raise UnknownAgent(
                f"{_env_name(self)}: actions given for {extra}, which were not asked to act; "
                f"expected actions for exactly {sorted(self._to_act)}"
            )
        ready = self.act_when_ready
        missing = sorted(self._to_act - set(actions))
        if missing and not (ready and actions):
            expected = "at least one of" if ready else "exactly"
            raise MissingAction(
                f"{_env_name(self)}: no action for {missing}; "
                f"expected actions for {expected} {sorted(self._to_act)}"
            )
        result = await step(self, actions)
        waiting = self._to_act - set(actions) if ready else frozenset()
        self._to_act = frozenset(result[0]) | (waiting & frozenset(self.agents))
        if not self.agents:
            self._needs_reset = True
        return result

    return guarded
