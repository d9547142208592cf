"""``check_env``: verify that an env honours the ``AgentEnv`` / ``MultiAgentEnv`` contract.

The checker drives the env with ``env.sample_action(agent)`` when the env defines it (the
convention of ``areal_agents.registration``), otherwise with the text action ``"0"``. It
expects a freshly constructed env (like Gymnasium's checker).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import html
import math
import numbers
import pickle
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .env import AgentEnv, MultiAgentEnv
from .errors import AgentsError, EnvError, MissingAction, ResetNeeded, UnknownAgent
from .messages import ROLES

MAX_STEPS = 64  # rollout length cap for the checks
TIMEOUT_S = 10.0  # per env call; a hang is reported, not waited on forever


@dataclasses.dataclass
class CheckFailure:
    """One failed check: what was expected and what was seen."""

    check: str
    expected: str
    seen: str


@dataclasses.dataclass
class CheckReport:
    """The result of ``check_env``.

    Attributes:
        env: the env's id or class name.
        passed: names of the checks that passed.
        failures: every failed check, with expected vs seen.
        skipped: ``{check: reason}`` for checks that could not run (e.g. no spec).
    """

    env: str
    passed: list[str] = dataclasses.field(default_factory=list)
    failures: list[CheckFailure] = dataclasses.field(default_factory=list)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when no check failed."""
        return not self.failures

    def failed(self, check: str) -> bool:
        """Whether the check named ``check`` failed."""
        return any(f.check == check for f in self.failures)

    def __str__(self) -> str:
        head = "PASS" if self.ok else "FAIL"
        lines = [
            f"check_env({self.env}): {head} — {len(self.passed)} passed, "
            f"{len(self.failures)} failed, {len(self.skipped)} skipped"
        ]
        lines += [f"  ok    {name}" for name in self.passed]
        for f in self.failures:
            lines.append(
                f"  FAIL  {f.check}\n        expected: {f.expected}\n        seen:     {f.seen}"
            )
        lines += [f"  skip  {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        rows = [
            f"<tr><td>{html.escape(n)}</td><td>ok</td><td></td><td></td></tr>" for n in self.passed
        ]
        rows += [
            f"<tr style='color:#b00'><td>{html.escape(f.check)}</td><td>FAIL</td>"
            f"<td>{html.escape(f.expected)}</td><td>{html.escape(f.seen)}</td></tr>"
            for f in self.failures
        ]
        rows += [
            f"<tr><td>{html.escape(n)}</td><td>skipped</td><td colspan=2>{html.escape(w)}</td></tr>"
            for n, w in self.skipped.items()
        ]
        return (
            f"<div><b>check_env({html.escape(self.env)})</b>: {'PASS' if self.ok else 'FAIL'}"
            "<table><tr><th>check</th><th>result</th><th>expected</th><th>seen</th></tr>"
            + "".join(rows)
            + "</table></div>"
        )


class _Failed(Exception):
    def __init__(self, expected: str, seen: str) -> None:
        super().__init__(expected, seen)
        self.expected, self.seen = expected, seen


class _Skip(Exception):
    pass


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _action(env: Any, agent: str | None) -> Any:
    sampler = getattr(env, "sample_action", None)
    return sampler(agent) if callable(sampler) else "0"


# ---------------------------------------------------------------- type checks


def _check_obs(obs: Any, where: str) -> None:
    if isinstance(obs, str):
        return
    if not isinstance(obs, list):
        raise _Failed(f"{where}: a list of message dicts (or a str)", _short(obs))
    for m in obs:
        ok = isinstance(m, Mapping) and m.get("role") in ROLES
        ok = ok and (m.get("content") is None or isinstance(m.get("content"), str))
        if not ok:
            raise _Failed(
                f"{where}: messages {{'role': one of {list(ROLES)}, 'content': str}}", _short(m)
            )


def _check_reward(r: Any, where: str) -> None:
    if isinstance(r, bool) or not isinstance(r, numbers.Real) or not math.isfinite(float(r)):
        raise _Failed(f"{where}: a finite float reward", _short(r))


def _check_flag(x: Any, where: str) -> None:
    if not isinstance(x, bool | np.bool_):
        raise _Failed(f"{where}: a bool", _short(x))


def _check_dict(d: Any, where: str, allowed: set[str]) -> None:
    if not isinstance(d, Mapping):
        raise _Failed(f"{where}: a dict keyed by agent id", _short(d))
    extra = sorted(set(d) - allowed)
    if extra:
        raise _Failed(f"{where}: keys within {sorted(allowed)}", f"keys {extra}")


def _check_reset(env: Any, result: Any) -> None:
    if not isinstance(result, tuple) or len(result) != 2:
        raise _Failed("reset() -> (obs, info)", _short(result))
    obs, info = result
    if isinstance(env, MultiAgentEnv):
        possible = set(env.possible_agents)
        if not set(env.agents) <= possible:
            raise _Failed("env.agents within possible_agents", _short(env.agents))
        _check_dict(obs, "reset obs", set(env.agents))
        _check_dict(info, "reset infos", possible)
        if env.agents and not obs:
            raise _Failed("reset obs naming at least one agent to act", "{} with live agents")
        for agent, o in obs.items():
            _check_obs(o, f"reset obs[{agent!r}]")
    else:
        _check_obs(obs, "reset obs")
        if not isinstance(info, Mapping):
            raise _Failed("reset info: a dict", _short(info))


def _check_step(env: Any, result: Any) -> None:
    if not isinstance(result, tuple) or len(result) != 5:
        raise _Failed("step() -> (obs, reward, terminated, truncated, info)", _short(result))
    obs, reward, term, trunc, info = result
    if isinstance(env, MultiAgentEnv):
        possible = set(env.possible_agents)
        _check_dict(obs, "step obs", set(env.agents))
        for name, d in (("rewards", reward), ("terminations", term), ("truncations", trunc)):
            _check_dict(d, f"step {name}", possible)
        _check_dict(info, "step infos", possible)
        for agent, r in reward.items():
            _check_reward(r, f"rewards[{agent!r}]")
        for agent, x in {**term, **trunc}.items():
            _check_flag(x, f"terminations/truncations[{agent!r}]")
        for agent, o in obs.items():
            _check_obs(o, f"step obs[{agent!r}]")
        if env.agents and not obs:
            raise _Failed(
                "step obs naming who acts next while agents are live",
                f"{{}} with agents {env.agents}",
            )
    else:
        _check_obs(obs, "step obs")
        _check_reward(reward, "step reward")
        _check_flag(term, "terminated")
        _check_flag(trunc, "truncated")
        if not isinstance(info, Mapping):
            raise _Failed("step info: a dict", _short(info))


# ---------------------------------------------------------------- rollouts


async def _call(coro: Any) -> Any:
    return await asyncio.wait_for(coro, TIMEOUT_S)


async def _rollout(
    env: Any, seed: int, actions: list[Any] | None = None
) -> tuple[list[Any], list[Any], bool]:
    """Run up to MAX_STEPS steps; returns (trace, actions used, ended)."""
    result = await _call(env.reset(seed=seed))
    _check_reset(env, result)
    trace: list[Any] = [("reset", result[0])]
    obs, used = result[0], []
    multi = isinstance(env, MultiAgentEnv)
    for i in range(MAX_STEPS):
        if multi and not env.agents:
            return trace, used, True
        if actions is not None:
            if i >= len(actions):
                raise _Failed(
                    f"the episode to end after {len(actions)} steps (as the first run)",
                    "it went on",
                )
            act = actions[i]
        else:
            act = {a: _action(env, a) for a in obs} if multi else _action(env, None)
        used.append(act)
        result = await _call(env.step(act))
        _check_step(env, result)
        trace.append(("step", result[0], result[1], result[2], result[3]))
        obs = result[0]
        if not multi and (result[2] or result[3]):
            return trace, used, True
    if multi and not env.agents:
        return trace, used, True
    return trace, used, False


def _compare(first: list[Any], second: list[Any], what: str) -> None:
    for i, (a, b) in enumerate(zip(first, second, strict=False)):
        if a != b:
            raise _Failed(f"{what}: step {i} equal to the first run: {_short(a)}", _short(b))
    if len(first) != len(second):
        raise _Failed(f"{what}: {len(first)} transitions", f"{len(second)}")


# ---------------------------------------------------------------- the checks


async def _expect_error(coro: Any, error: type[Exception], what: str) -> None:
    try:
        await _call(coro)
    except error:
        return
    except Exception as exc:
        raise _Failed(f"{what} raises {error.__name__}", _describe(exc)) from None
    raise _Failed(f"{what} raises {error.__name__}", "no error")


async def _cancel_mid(coro: Any) -> None:
    """Start ``coro``, let it run to its first suspension, then cancel it."""
    task = asyncio.ensure_future(coro)
    await asyncio.sleep(0)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, AgentsError):
        await task


class _Checker:
    def __init__(self, env: Any, factory: Callable[[], Any] | None, seed: int) -> None:
        self.env, self.factory, self.seed = env, factory, seed
        self.report = CheckReport(env=getattr(env.spec, "id", None) or type(env.unwrapped).__name__)
        self.multi = isinstance(env, MultiAgentEnv)
        self.baseline: list[Any] = []
        self.actions: list[Any] = []
        self.ended = False

    async def run(self, name: str, fn: Callable[[], Any]) -> None:
        try:
            await fn()
        except _Failed as f:
            self.report.failures.append(CheckFailure(name, f.expected, f.seen))
        except _Skip as s:
            self.report.skipped[name] = str(s)
        except (TimeoutError, Exception) as exc:
            self.report.failures.append(
                CheckFailure(name, "no unexpected exception", _describe(exc))
            )
        else:
            self.report.passed.append(name)

    def fresh(self) -> Any:
        if self.factory is None:
            raise _Skip("no way to build a fresh env (no spec and not deep-copyable)")
        return self.factory()

    async def step_before_reset(self) -> None:
        env = self.fresh()
        act = {env.possible_agents[0]: "0"} if self.multi else _action(env, None)
        await _expect_error(env.step(act), ResetNeeded, "step() before reset()")

    async def types_and_determinism(self) -> None:
        self.baseline, self.actions, self.ended = await _rollout(self.env, self.seed)
        again, _, _ = await _rollout(self.env, self.seed, self.actions)
        _compare(self.baseline, again, "same seed, same actions, same env")

    async def determinism_new_instance(self) -> None:
        other, _, _ = await _rollout(self.fresh(), self.seed, self.actions)
        _compare(self.baseline, other, "same seed, same actions, a new instance")

    async def step_after_end(self) -> None:
        await _rollout(self.env, self.seed, self.actions)
        if not self.ended:
            raise _Skip(f"the episode did not end within {MAX_STEPS} steps")
        act = {self.env.possible_agents[0]: "0"} if self.multi else _action(self.env, None)
        await _expect_error(self.env.step(act), ResetNeeded, "step() after the episode ended")

    async def unknown_agent(self) -> None:
        obs, _ = await _call(self.env.reset(seed=self.seed))
        idle = [a for a in self.env.possible_agents if a not in obs] or ["__not_an_agent__"]
        actions = {a: _action(self.env, a) for a in obs}
        actions[idle[0]] = "0"
        await _expect_error(
            self.env.step(actions), UnknownAgent, f"an action for {idle[0]!r} (not asked to act)"
        )

    async def missing_action(self) -> None:
        obs, _ = await _call(self.env.reset(seed=self.seed))
        await _expect_error(
            self.env.step({}), MissingAction, f"step({{}}) while {sorted(obs)} must act"
        )

    async def _usable_after(self, make_call: Callable[[], Any]) -> None:
        if not self.actions:
            raise _Skip("the first rollout took no step")
        await _call(self.env.reset(seed=self.seed))
        await _cancel_mid(make_call())
        try:
            await _call(self.env.step(self.actions[0]))
        except AgentsError:
            pass  # raising a clear env error is allowed
        except Exception as exc:
            raise _Failed(
                "after cancellation: the env keeps working or raises an AgentsError", _describe(exc)
            ) from None
        again, _, _ = await _rollout(self.env, self.seed, self.actions)
        _compare(self.baseline, again, "after a cancelled call, reset(seed) then the same actions")

    async def cancel_step(self) -> None:
        await self._usable_after(lambda: self.env.step(self.actions[0]))

    async def cancel_reset(self) -> None:
        await self._usable_after(lambda: self.env.reset(seed=self.seed))

    async def pickles(self) -> None:
        try:
            clone = pickle.loads(pickle.dumps(self.env))
        except Exception as exc:
            raise _Failed("the env pickles and unpickles", _describe(exc)) from None
        if type(clone) is not type(self.env):
            raise _Failed(f"unpickled type {type(self.env).__name__}", type(clone).__name__)

    async def from_spec(self) -> None:
        spec = self.env.spec
        if spec is None:
            raise _Skip("env.spec is None (not made by aa.make)")
        rebuilt = spec.make()
        if type(rebuilt.unwrapped) is not type(self.env.unwrapped):
            raise _Failed(
                f"spec.make() builds {type(self.env.unwrapped).__name__}",
                type(rebuilt.unwrapped).__name__,
            )
        other, _, _ = await _rollout(rebuilt, self.seed, self.actions)
        _compare(self.baseline, other, "the env rebuilt from its spec, same seed and actions")

    async def close_twice(self) -> None:
        await _call(self.env.close())
        await _call(self.env.close())


def _factory(env: Any) -> Callable[[], Any] | None:
    if getattr(env, "spec", None) is not None:
        return env.spec.make
    try:
        pristine = copy.deepcopy(env)
    except Exception:
        return None
    return lambda: copy.deepcopy(pristine)


async def check_env(
    env_or_id: AgentEnv | MultiAgentEnv | str, *, seed: int = 0, raise_on_failure: bool = True
) -> CheckReport:
    """Check an env (or a registered id) against the env contract.

    Checks: ``step`` before ``reset`` raises ``ResetNeeded``; ``reset``/``step`` return the
    documented types and dict keys; the same seed and actions give the same observations,
    rewards and flags (on the same env and on a new instance); ``step`` after the end raises
    ``ResetNeeded``; (multi-agent) an action for an agent not asked to act raises
    ``UnknownAgent`` and a missing one ``MissingAction``; a ``step``/``reset`` cancelled by
    asyncio leaves the env usable (or raises an ``AgentsError``); the env pickles and rebuilds
    from its spec; ``close`` twice is fine.

    Args:
        env_or_id: a freshly built env, or an id for ``aa.make``.
        seed: the seed of the rollouts.
        raise_on_failure: raise ``EnvError`` (message = the report) when a check fails.

    Returns:
        The ``CheckReport`` (``report.ok``, ``report.failures``).

    Raises:
        EnvError: a check failed and ``raise_on_failure`` is True.

    Example:
        >>> import asyncio, areal_agents as aa
        >>> from areal_agents.testing import GenericTestEnv
        >>> asyncio.run(aa.check_env(GenericTestEnv())).ok
        True
    """
    if isinstance(env_or_id, str):
        from .registration import make

        env = make(env_or_id)
    else:
        env = env_or_id
    if not isinstance(env, AgentEnv | MultiAgentEnv):
        raise TypeError(
            f"check_env takes an AgentEnv, MultiAgentEnv or env id, got {type(env).__name__}"
        )
    c = _Checker(env, _factory(env), seed)
    await c.run("step_before_reset", c.step_before_reset)
    await c.run("types_and_determinism", c.types_and_determinism)
    await c.run("determinism_new_instance", c.determinism_new_instance)
    await c.run("step_after_end", c.step_after_end)
    if c.multi:
        await c.run("unknown_agent", c.unknown_agent)
        await c.run("missing_action", c.missing_action)
    await c.run("cancel_step", c.cancel_step)
    await c.run("cancel_reset", c.cancel_reset)
    await c.run("pickle", c.pickles)
    await c.run("from_spec", c.from_spec)
    await c.run("close_twice", c.close_twice)
    if raise_on_failure and not c.report.ok:
        raise EnvError(str(c.report))
    return c.report
