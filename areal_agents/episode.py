"""``run_episode``: drive a single- or multi-agent env with agents; the ``Episode`` record."""

from __future__ import annotations

import asyncio
import dataclasses
import html
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from .agent import Agent
from .algorithms.reward_levels import step_levels
from .env import AgentEnv, MultiAgentEnv
from .errors import EnvError
from .messages import Message
from .wrappers.record_episode import action_message, as_messages

if TYPE_CHECKING:
    from .samples import Sample

SINGLE_AGENT_ID = "agent"

Status = Literal["terminated", "truncated", "failed"]


@dataclasses.dataclass
class Episode:
    """The record of one episode.

    Attributes:
        agents: the agent ids that took part (single-agent envs: ``["agent"]`` unless a
            one-entry dict named the agent).
        messages: ``{agent_id: transcript}``: each agent's observations (as messages) and its
            actions (as assistant messages), in order.
        rewards: ``{agent_id: [reward of each step that rewarded it]}``.
        reward_actions: ``{agent_id: [for each of those rewards, the index of the agent's
            latest action applied by then (-1 before its first)]}``: the action it rewards.
        returns: ``{agent_id: sum of its rewards}``.
        length: number of env steps.
        status: ``"terminated"``, ``"truncated"`` (time limit or ``max_steps``) or ``"failed"``.
        error: ``"ExceptionType: message"`` when ``status == "failed"``, else None.
        seed: the seed given to ``reset``.
        infos: ``{agent_id: last info dict}``.
        reward_levels: ``{agent_id: [for each of its rewards, the step's reward levels]}``:
            ``info["reward_levels"]`` of that step, ``{}`` when the env gave none
            (``areal_agents.algorithms.reward_levels``).
        samples: ``{agent_id: samples from agent.end_episode(return)}``: what agents that
            record their own session return (``LLMAgent.for_gateway``); ``[]`` for others.
            The Trainer does not use it: it takes each LLM agent's samples from the gateway.
    """

    agents: list[str]
    messages: dict[str, list[Message]]
    rewards: dict[str, list[float]]
    returns: dict[str, float]
    length: int
    status: Status
    error: str | None = None
    seed: int | None = None
    infos: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    samples: dict[str, list[Sample]] = dataclasses.field(default_factory=dict)
    reward_actions: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    reward_levels: dict[str, list[dict[str, float]]] = dataclasses.field(default_factory=dict)

    @property
    def total_return(self) -> float:
        """The sum of all agents' returns."""
        return float(sum(self.returns.values()))

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td>{html.escape(a)}</td><td>{self.returns.get(a, 0.0):.3g}</td>"
            f"<td>{len(self.messages.get(a, []))}</td></tr>"
            for a in self.agents
        )
        transcripts = "".join(
            f"<details><summary>{html.escape(a)}</summary><pre>"
            + html.escape("\n".join(f"{m['role']}: {m.get('content')}" for m in msgs))
            + "</pre></details>"
            for a, msgs in self.messages.items()
        )
        err = f"<p>error: {html.escape(self.error)}</p>" if self.error else ""
        return (
            f"<div><b>Episode</b> status={self.status} length={self.length} seed={self.seed}"
            f"{err}<table><tr><th>agent</th><th>return</th><th>messages</th></tr>{rows}</table>"
            f"{transcripts}</div>"
        )


def _normalise_agents(env: Any, agents: Agent | Mapping[str, Agent]) -> dict[str, Agent]:
    if isinstance(env, MultiAgentEnv):
        if not isinstance(agents, Mapping):
            raise TypeError(
                f"a multi-agent env needs a dict {{agent_id: Agent}}, got {type(agents).__name__}"
            )
        missing = sorted(set(env.possible_agents) - set(agents))
        if missing:
            raise ValueError(
                f"no agent for {missing}; the env's possible_agents are {list(env.possible_agents)}, "
                f"agents given for {sorted(agents)}"
            )
        return dict(agents)
    if not isinstance(env, AgentEnv):
        raise TypeError(f"env must be an AgentEnv or MultiAgentEnv, got {type(env).__name__}")
    if isinstance(agents, Mapping):
        if len(agents) != 1:
            raise ValueError(f"a single-agent env takes one agent, got {sorted(agents)}")
        return dict(agents)  # the caller's id names the single agent in the Episode
    return {SINGLE_AGENT_ID: agents}


class _Run:
    """Mutable bookkeeping of one episode run."""

    def __init__(self, ids: list[str]) -> None:
        self.messages: dict[str, list[Message]] = {a: [] for a in ids}
        self.rewards: dict[str, list[float]] = {a: [] for a in ids}
        self.reward_actions: dict[str, list[int]] = {a: [] for a in ids}
        self.reward_levels: dict[str, list[dict[str, float]]] = {a: [] for a in ids}
        self.num_actions: dict[str, int] = {}
        self.infos: dict[str, dict[str, Any]] = {}
        self.length = 0
        self.truncated = False

    def observe(self, obs: Mapping[str, Any]) -> None:
        for agent, o in obs.items():
            self.messages.setdefault(agent, []).extend(as_messages(o))

    def record(
        self, actions: Mapping[str, Any], rewards: Mapping[str, float], infos: Mapping
    ) -> None:
        self.length += 1
        for agent, action in actions.items():
            self.messages.setdefault(agent, []).append(action_message(action))
            self.num_actions[agent] = self.num_actions.get(agent, 0) + 1
        for agent, r in rewards.items():
            self.rewards.setdefault(agent, []).append(float(r))
            self.reward_actions.setdefault(agent, []).append(self.num_actions.get(agent, 0) - 1)
            self.reward_levels.setdefault(agent, []).append(step_levels(infos.get(agent) or {}))
        for agent, info in infos.items():
            self.infos[agent] = dict(info)


async def _run_single(
    env: AgentEnv,
    agents: dict[str, Agent],
    run: _Run,
    seed: Any,
    options: Any,
    max_steps: int | None,
) -> None:
    ((agent_id, agent),) = agents.items()
    obs, info = await env.reset(seed=seed, options=options)
    run.infos[agent_id] = dict(info)
    run.observe({agent_id: obs})
    while max_steps is None or run.length < max_steps:
        action = await agent.act(obs)
        obs, reward, terminated, truncated, info = await env.step(action)
        run.record({agent_id: action}, {agent_id: reward}, {agent_id: info})
        run.observe({agent_id: obs})
        if terminated or truncated:
            run.truncated = bool(truncated and not terminated)
            return
    run.truncated = True


async def _reset_multi(env: MultiAgentEnv, run: _Run, seed: Any, options: Any) -> dict[str, Any]:
    """Reset ``env`` and record its infos and first observations; returns them."""
    obs, infos = await env.reset(seed=seed, options=options)
    run.infos.update({a: dict(i) for a, i in infos.items()})
    run.observe(obs)
    return obs


async def _step_multi(env: MultiAgentEnv, run: _Run, actions: dict[str, Any]) -> dict[str, Any]:
    """Apply ``actions`` in one ``step`` and record it; returns the new observations."""
    obs, rewards, _terms, truncs, infos = await env.step(actions)
    run.record(actions, rewards, infos)
    run.observe(obs)
    run.truncated = run.truncated or any(truncs.values())
    return obs


async def _run_multi(
    env: MultiAgentEnv,
    agents: dict[str, Agent],
    run: _Run,
    seed: Any,
    options: Any,
    max_steps: int | None,
) -> None:
    obs = await _reset_multi(env, run, seed, options)
    while env.agents:
        if max_steps is not None and run.length >= max_steps:
            run.truncated = True
            return
        acting = list(obs)
        if not acting:
            raise EnvError(
                f"{type(env).__name__}: agents {list(env.agents)} are live but none was asked to act "
                "(obs is empty); the env must name who acts next or empty env.agents"
            )
        unknown = [a for a in acting if a not in agents]
        if unknown:
            raise ValueError(f"the env asked {unknown} to act, but no agent was given for them")
        chosen = await asyncio.gather(*(agents[a].act(obs[a]) for a in acting))
        actions = dict(zip(acting, chosen, strict=True))
        obs = await _step_multi(env, run, actions)


async def _run_when_ready(
    env: MultiAgentEnv,
    agents: dict[str, Agent],
    run: _Run,
    seed: Any,
    options: Any,
    max_steps: int | None,
) -> None:
    """``env.act_when_ready``: each observed agent acts on its own; each action is applied in
    its own ``step`` as soon as it arrives (several arrived together: by agent id)."""
    obs = await _reset_multi(env, run, seed, options)
    acting: dict[asyncio.Task[Any], str] = {}

    def start(observed: Mapping[str, Any]) -> None:
        busy = set(acting.values())
        for a, o in observed.items():
            if a in busy:
                raise EnvError(
                    f"{type(env).__name__}: a new observation for {a!r} while its action is "
                    "pending; an act_when_ready env observes an agent again only after its "
                    "action was applied"
                )
            if a not in agents:
                raise ValueError(f"the env asked {a!r} to act, but no agent was given for it")
            acting[asyncio.ensure_future(agents[a].act(o))] = a

    try:
        start(obs)
        while env.agents:
            if not acting:
                raise EnvError(
                    f"{type(env).__name__}: agents {list(env.agents)} are live but none may act; "
                    "the env must observe who acts next or empty env.agents"
                )
            done, _ = await asyncio.wait(acting, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=lambda t: acting[t]):
                agent = acting.pop(task)
                action = task.result()
                if not env.agents or agent not in env.agents_to_act:
                    continue  # the episode ended, or the agent left, while it was thinking
                if max_steps is not None and run.length >= max_steps:
                    run.truncated = True
                    return
                obs = await _step_multi(env, run, {agent: action})
                start(obs)
            for task, agent in list(acting.items()):  # agents that left stop thinking
                if agent not in env.agents_to_act:
                    task.cancel()
                    del acting[task]
    finally:
        for task in acting:
            task.cancel()
        await asyncio.gather(*acting, return_exceptions=True)


async def run_episode(
    env: AgentEnv | MultiAgentEnv,
    agents: Agent | Mapping[str, Agent],
    *,
    seed: int | None = None,
    options: dict[str, Any] | None = None,
    max_steps: int | None = None,
    raise_errors: bool = False,
) -> Episode:
    """Run one episode and return its ``Episode``.

    Each agent's ``reset()`` is called first. Agents get exactly the env's observation for
    them; in a multi-agent env the agents asked to act in a step act concurrently, and the
    step waits for all of them. An env with ``act_when_ready = True`` has no such barrier:
    every observed agent acts on its own and each action is applied in its own ``step`` as
    soon as it arrives (a slow agent blocks nobody; ``Episode.length`` counts those steps).
    At the end ``await agent.end_episode(return)`` of each agent gives ``Episode.samples``.

    Args:
        env: a single- or multi-agent env (already constructed; not closed here).
        agents: for an ``AgentEnv`` an ``Agent`` (its id in the ``Episode`` is ``"agent"``) or
            a one-entry ``{agent_id: Agent}`` (the id is kept); for a
            ``MultiAgentEnv`` ``{agent_id: Agent}`` covering ``env.possible_agents``.
        seed, options: passed to ``env.reset``.
        max_steps: stop after this many steps with status ``"truncated"``.
        raise_errors: re-raise an exception of the env or an agent instead of returning an
            episode with status ``"failed"``.

    Raises:
        TypeError, ValueError: ``agents`` does not fit the env.
    """
    by_id = _normalise_agents(env, agents)
    run = _Run(list(by_id))
    error: str | None = None
    for agent in by_id.values():
        agent.reset()
    try:
        if isinstance(env, MultiAgentEnv) and env.act_when_ready:
            await _run_when_ready(env, by_id, run, seed, options, max_steps)
        elif isinstance(env, MultiAgentEnv):
            await _run_multi(env, by_id, run, seed, options, max_steps)
        else:
            await _run_single(env, by_id, run, seed, options, max_steps)
    except Exception as exc:
        if raise_errors:
            raise
        error = f"{type(exc).__name__}: {exc}"
    returns = {a: float(sum(run.rewards.get(a, []))) for a in run.messages}
    samples = {}
    for agent_id, agent in by_id.items():
        samples[agent_id] = list(await agent.end_episode(returns.get(agent_id, 0.0)))
    status: Status = "failed" if error else ("truncated" if run.truncated else "terminated")
    return Episode(
        agents=list(run.messages),
        messages=run.messages,
        rewards=run.rewards,
        returns=returns,
        length=run.length,
        status=status,
        error=error,
        seed=seed,
        infos=run.infos,
        samples=samples,
        reward_actions=run.reward_actions,
        reward_levels=run.reward_levels,
    )
