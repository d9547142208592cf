"""The rules ``check_env`` applies: return types and dict keys, seeded rollouts, comparisons.

Each rule raises ``RuleFailed(expected, seen)``; ``checker.py`` turns that into a report line.
"""

from __future__ import annotations

import asyncio
import math
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np

from .env import MultiAgentEnv
from .messages import ROLES

MAX_STEPS = 64  # rollout length cap for the checks
TIMEOUT_S = 10.0  # per env call; a hang is reported, not waited on forever


class RuleFailed(Exception):
    """A rule was broken: ``expected`` describes the contract, ``seen`` what the env did."""

    def __init__(self, expected: str, seen: str) -> None:
        super().__init__(expected, seen)
        self.expected, self.seen = expected, seen


class SkipCheck(Exception):
    """A check cannot run for this env (the message says why)."""

    pass


def short(value: Any, limit: int = 200) -> str:
    """``repr(value)`` cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(exc: BaseException) -> str:
    """``"ExceptionType: message"``."""
    return f"{type(exc).__name__}: {exc}"


def driving_action(env: Any, agent: str | None) -> Any:
    """``env.sample_action(agent)`` if the env defines it, else the text action ``"0"``."""
    sampler = getattr(env, "sample_action", None)
    return sampler(agent) if callable(sampler) else "0"


# ---------------------------------------------------------------- type checks


def check_obs(obs: Any, where: str) -> None:
    """An observation is a list of message dicts (or a str)."""
    if isinstance(obs, str):
        return
    if not isinstance(obs, list):
        raise RuleFailed(f"{where}: a list of message dicts (or a str)", short(obs))
    for m in obs:
        ok = isinstance(m, Mapping) and m.get("role") in ROLES
        ok = ok and (m.get("content") is None or isinstance(m.get("content"), str))
        if not ok:
            raise RuleFailed(
                f"{where}: messages {{'role': one of {list(ROLES)}, 'content': str}}", short(m)
            )


def check_reward(r: Any, where: str) -> None:
    """A reward is a finite real number (not a bool)."""
    if isinstance(r, bool) or not isinstance(r, numbers.Real) or not math.isfinite(float(r)):
        raise RuleFailed(f"{where}: a finite float reward", short(r))


def check_flag(x: Any, where: str) -> None:
    """A termination/truncation flag is a bool."""
    if not isinstance(x, bool | np.bool_):
        raise RuleFailed(f"{where}: a bool", short(x))


def check_dict(d: Any, where: str, allowed: set[str]) -> None:
    """A mapping whose keys are within ``allowed``."""
    if not isinstance(d, Mapping):
        raise RuleFailed(f"{where}: a dict keyed by agent id", short(d))
    extra = sorted(set(d) - allowed)
    if extra:
        raise RuleFailed(f"{where}: keys within {sorted(allowed)}", f"keys {extra}")


def check_reset(env: Any, result: Any) -> None:
    """The types and keys of a ``reset`` result (single- or multi-agent)."""
    if not isinstance(result, tuple) or len(result) != 2:
        raise RuleFailed("reset() -> (obs, info)", short(result))
    obs, info = result
    if isinstance(env, MultiAgentEnv):
        names = env.possible_agents
        if not names or not all(isinstance(a, str) for a in names):
            raise RuleFailed("possible_agents: a non-empty list of str ids", short(names))
        possible = set(names)
        if not set(env.agents) <= possible:
            raise RuleFailed("env.agents within possible_agents", short(env.agents))
        check_dict(obs, "reset obs", set(env.agents))
        check_dict(info, "reset infos", possible)
        if env.agents and not obs:
            raise RuleFailed("reset obs naming at least one agent to act", "{} with live agents")
        for agent, o in obs.items():
            check_obs(o, f"reset obs[{agent!r}]")
    else:
        check_obs(obs, "reset obs")
        if not isinstance(info, Mapping):
            raise RuleFailed("reset info: a dict", short(info))


def check_step(env: Any, result: Any) -> None:
    """The types and keys of a ``step`` result (single- or multi-agent)."""
    if not isinstance(result, tuple) or len(result) != 5:
        raise RuleFailed("step() -> (obs, reward, terminated, truncated, info)", short(result))
    obs, reward, term, trunc, info = result
    if isinstance(env, MultiAgentEnv):
        possible = set(env.possible_agents)
        check_dict(obs, "step obs", set(env.agents))
        for name, d in (("rewards", reward), ("terminations", term), ("truncations", trunc)):
            check_dict(d, f"step {name}", possible)
        check_dict(info, "step infos", possible)
        for agent, r in reward.items():
            check_reward(r, f"rewards[{agent!r}]")
        for agent, x in {**term, **trunc}.items():
            check_flag(x, f"terminations/truncations[{agent!r}]")
        for agent, o in obs.items():
            check_obs(o, f"step obs[{agent!r}]")
        if env.agents and not obs:
            raise RuleFailed(
                "step obs naming who acts next while agents are live",
                f"{{}} with agents {env.agents}",
            )
    else:
        check_obs(obs, "step obs")
        check_reward(reward, "step reward")
        check_flag(term, "terminated")
        check_flag(trunc, "truncated")
        if not isinstance(info, Mapping):
            raise RuleFailed("step info: a dict", short(info))


# ---------------------------------------------------------------- rollouts


async def call_with_timeout(coro: Any) -> Any:
    """Await ``coro`` for at most ``TIMEOUT_S`` seconds."""
    return await asyncio.wait_for(coro, TIMEOUT_S)


async def rollout(
    env: Any, seed: int, actions: list[Any] | None = None
) -> tuple[list[Any], list[Any], bool]:
    """Run up to MAX_STEPS steps; returns (trace, actions used, ended)."""
    result = await call_with_timeout(env.reset(seed=seed))
    check_reset(env, result)
    trace: list[Any] = [("reset", result[0])]
    obs, used = result[0], []
    multi = isinstance(env, MultiAgentEnv)
    for i in range(MAX_STEPS):
        if multi and not env.agents:
            return trace, used, True
        if actions is not None:
            if i >= len(actions):
                raise RuleFailed(
                    f"the episode to end after {len(actions)} steps (as the first run)",
                    "it went on",
                )
            act = actions[i]
        else:
            act = {a: driving_action(env, a) for a in obs} if multi else driving_action(env, None)
        used.append(act)
        result = await call_with_timeout(env.step(act))
        check_step(env, result)
        trace.append(("step", result[0], result[1], result[2], result[3]))
        obs = result[0]
        if not multi and (result[2] or result[3]):
            return trace, used, True
    if multi and not env.agents:
        return trace, used, True
    return trace, used, False


def compare(first: list[Any], second: list[Any], what: str) -> None:
    """Two rollout traces are equal; the first difference is reported."""
    for i, (a, b) in enumerate(zip(first, second, strict=False)):
        if a != b:
            raise RuleFailed(f"{what}: step {i} equal to the first run: {short(a)}", short(b))
    if len(first) != len(second):
        raise RuleFailed(f"{what}: {len(first)} transitions", f"{len(second)}")


# ---------------------------------------------------------------- act when ready


async def check_act_when_ready(env: Any, seed: int) -> None:
    """An ``act_when_ready`` env takes a step with one of several agents that may act, keeps
    the others able to act (``agents_to_act``) and does not observe them again meanwhile.

    Drives the env with every agent that may act until two may act at once (else SkipCheck).
    """
    obs, _ = await call_with_timeout(env.reset(seed=seed))
    may_act = set(obs)
    for _ in range(MAX_STEPS):
        if not env.agents:
            break
        if len(may_act) < 2:
            result = await call_with_timeout(
                env.step({a: driving_action(env, a) for a in sorted(may_act)}))
            may_act = set(result[0])
            continue
        first, waiting = sorted(may_act)[0], may_act - {sorted(may_act)[0]}
        try:
            result = await call_with_timeout(env.step({first: driving_action(env, first)}))
        except Exception as exc:
            raise RuleFailed(f"act_when_ready: step() with {first!r} alone while "
                             f"{sorted(may_act)} may act", describe(exc)) from None
        check_step(env, result)
        again = sorted(set(result[0]) & waiting)
        if again:
            raise RuleFailed("act_when_ready: no new observation for an agent whose action is "
                             "pending", f"observations for {again}")
        lost = sorted((waiting & set(env.agents)) - set(env.agents_to_act))
        if lost:
            raise RuleFailed(f"act_when_ready: {lost} still in agents_to_act (their actions are "
                             "pending)", f"agents_to_act = {sorted(env.agents_to_act)}")
        return
    raise SkipCheck(f"no two agents could act at once within {MAX_STEPS} steps")
