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
import pickle
from collections.abc import Callable
from typing import Any

from .checker_rules import (
    MAX_STEPS,
    RuleFailed,
    SkipCheck,
    call_with_timeout,
    check_act_when_ready,
    compare,
    describe,
    driving_action,
    rollout,
)
from .env import AgentEnv, MultiAgentEnv
from .errors import AgentsError, EnvError, MissingAction, ResetNeeded, UnknownAgent


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


# ---------------------------------------------------------------- the checks


async def _expect_error(coro: Any, error: type[Exception], what: str) -> None:
    try:
        await call_with_timeout(coro)
    except error:
        return
    except Exception as exc:
        raise RuleFailed(f"{what} raises {error.__name__}", describe(exc)) from None
    raise RuleFailed(f"{what} raises {error.__name__}", "no error")


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
        except RuleFailed as f:
            self.report.failures.append(CheckFailure(name, f.expected, f.seen))
        except SkipCheck as s:
            self.report.skipped[name] = str(s)
        except (TimeoutError, Exception) as exc:
            self.report.failures.append(
                CheckFailure(name, "no unexpected exception", describe(exc))
            )
        else:
            self.report.passed.append(name)

    def fresh(self) -> Any:
        if self.factory is None:
            raise SkipCheck("no way to build a fresh env (no spec and not deep-copyable)")
        return self.factory()

    async def step_before_reset(self) -> None:
        env = self.fresh()
        act = {env.possible_agents[0]: "0"} if self.multi else driving_action(env, None)
        await _expect_error(env.step(act), ResetNeeded, "step() before reset()")

    async def types_and_determinism(self) -> None:
        self.baseline, self.actions, self.ended = await rollout(self.env, self.seed)
        again, _, _ = await rollout(self.env, self.seed, self.actions)
        compare(self.baseline, again, "same seed, same actions, same env")

    async def determinism_new_instance(self) -> None:
        other, _, _ = await rollout(self.fresh(), self.seed, self.actions)
        compare(self.baseline, other, "same seed, same actions, a new instance")

    async def step_after_end(self) -> None:
        await rollout(self.env, self.seed, self.actions)
        if not self.ended:
            raise SkipCheck(f"the episode did not end within {MAX_STEPS} steps")
        act = {self.env.possible_agents[0]: "0"} if self.multi else driving_action(self.env, None)
        await _expect_error(self.env.step(act), ResetNeeded, "step() after the episode ended")

    async def unknown_agent(self) -> None:
        obs, _ = await call_with_timeout(self.env.reset(seed=self.seed))
        idle = [a for a in self.env.possible_agents if a not in obs] or ["__not_an_agent__"]
        actions = {a: driving_action(self.env, a) for a in obs}
        actions[idle[0]] = "0"
        await _expect_error(
            self.env.step(actions), UnknownAgent, f"an action for {idle[0]!r} (not asked to act)"
        )

    async def missing_action(self) -> None:
        obs, _ = await call_with_timeout(self.env.reset(seed=self.seed))
        await _expect_error(
            self.env.step({}), MissingAction, f"step({{}}) while {sorted(obs)} must act"
        )

    async def act_when_ready(self) -> None:
        await check_act_when_ready(self.env, self.seed)

    async def _usable_after(self, make_call: Callable[[], Any]) -> None:
        if not self.actions:
            raise SkipCheck("the first rollout took no step")
        await call_with_timeout(self.env.reset(seed=self.seed))
        await _cancel_mid(make_call())
        try:
            await call_with_timeout(self.env.step(self.actions[0]))
        except AgentsError:
            pass  # raising a clear env error is allowed
        except Exception as exc:
            raise RuleFailed(
                "after cancellation: the env keeps working or raises an AgentsError", describe(exc)
            ) from None
        again, _, _ = await rollout(self.env, self.seed, self.actions)
        compare(self.baseline, again, "after a cancelled call, reset(seed) then the same actions")

    async def cancel_step(self) -> None:
        await self._usable_after(lambda: self.env.step(self.actions[0]))

    async def cancel_reset(self) -> None:
        await self._usable_after(lambda: self.env.reset(seed=self.seed))

    async def pickles(self) -> None:
        try:
            clone = pickle.loads(pickle.dumps(self.env))
        except Exception as exc:
            raise RuleFailed("the env pickles and unpickles", describe(exc)) from None
        if type(clone) is not type(self.env):
            raise RuleFailed(f"unpickled type {type(self.env).__name__}", type(clone).__name__)

    async def from_spec(self) -> None:
        spec = self.env.spec
        if spec is None:
            raise SkipCheck("env.spec is None (not made by aa.make)")
        rebuilt = spec.make()
        if type(rebuilt.unwrapped) is not type(self.env.unwrapped):
            raise RuleFailed(
                f"spec.make() builds {type(self.env.unwrapped).__name__}",
                type(rebuilt.unwrapped).__name__,
            )
        if wrapper_chain(rebuilt) != wrapper_chain(self.env):
            names = [t.__name__ for t in wrapper_chain(self.env)]
            raise SkipCheck(f"the env is wrapped beyond what its spec builds ({' > '.join(names)})")
        other, _, _ = await rollout(rebuilt, self.seed, self.actions)
        compare(self.baseline, other, "the env rebuilt from its spec, same seed and actions")

    async def close_twice(self) -> None:
        await call_with_timeout(self.env.close())
        await call_with_timeout(self.env.close())


def wrapper_chain(env: Any) -> list[type]:
    """The types from the outermost wrapper down to the innermost env."""
    chain = [type(env)]
    while isinstance(vars(env).get("env"), AgentEnv | MultiAgentEnv):
        env = vars(env)["env"]
        chain.append(type(env))
    return chain


def _factory(env: Any) -> Callable[[], Any] | None:
    """Builds fresh copies of ``env``: from its spec when that rebuilds the same wrapper
    stack, else by deep-copying a pristine copy taken now."""
    spec = getattr(env, "spec", None)
    if spec is not None:
        try:
            if wrapper_chain(spec.make()) == wrapper_chain(env):
                return spec.make
        except Exception:
            pass  # the from_spec check reports it
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
    asyncio leaves the env usable (or raises an ``AgentsError``); (``act_when_ready`` envs) a
    step with one of several agents that may act is taken, and the others stay able to act
    without being observed again; the env pickles and rebuilds from its spec; ``close`` twice
    is fine.

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
        if env.act_when_ready:
            await c.run("act_when_ready", c.act_when_ready)
    await c.run("cancel_step", c.cancel_step)
    await c.run("cancel_reset", c.cancel_reset)
    await c.run("pickle", c.pickles)
    await c.run("from_spec", c.from_spec)
    await c.run("close_twice", c.close_twice)
    if raise_on_failure and not c.report.ok:
        raise EnvError(str(c.report))
    return c.report
