"""One training or evaluation episode: a seat per LLM agent, rewards, samples and statistics.

The sample path: each LLM agent acts on its own recorded gateway session (a ``Seat``); when
the episode is over ``play`` takes every session's samples from the gateway, with the agent,
policy, group and reward set once. Agents only act.
"""

from __future__ import annotations

import inspect
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from areal_agents.agent import Agent
from areal_agents.episode import Episode, run_episode
from areal_agents.samples import Sample

from .llm_session import Seat

RewardFn = Callable[[Episode], "float | dict[str, float] | Awaitable[float | dict[str, float]]"]
"""``reward_fn(episode) -> float (added to every agent) | {agent_id: float}``, sync or async."""

SeatFactory = Callable[[str, str, bool], Awaitable[Seat]]
"""``open_seat(agent_id, policy_name, greedy) -> Seat`` (an LLM agent on its own session)."""


class EpisodeFailed(RuntimeError):
    """An episode ended with status ``failed`` (the env's or an agent's exception)."""


@dataclass
class EpisodeStats:
    """What the trainer logs about one finished episode."""

    seed: int
    returns: dict[str, float]
    success: dict[str, float]
    length: int
    status: str
    policy_of: dict[str, str]
    gen_lengths: dict[str, list[int]] = field(default_factory=dict)
    episode: Episode | None = None  # the record (group reward functions read it)


def success_of(episode: Episode, agent_id: str) -> float:
    """``info["success"]`` of the agent's last info when the env reports it, else return > 0."""
    info = episode.infos.get(agent_id, {})
    if "success" in info:
        return float(bool(info["success"]))
    return float(episode.returns.get(agent_id, 0.0) > 0)


async def apply_reward_fns(episode: Episode, reward_fns: list[RewardFn]) -> dict[str, float]:
    """The env returns plus every reward function's contribution, per agent.

    Raises:
        TypeError: a reward function returned something else than a number or a dict.
        ValueError: a reward function named an agent that is not in the episode.
    """
    total = dict(episode.returns)
    for fn in reward_fns:
        value = fn(episode)
        if inspect.isawaitable(value):
            value = await value
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - set(total))
            if unknown:
                raise ValueError(f"reward function {fn!r} rewarded unknown agents {unknown}; "
                                 f"the episode's agents are {sorted(total)}")
            for a, r in value.items():
                total[a] += float(r)
        elif isinstance(value, int | float):
            for a in total:
                total[a] += float(value)
        else:
            raise TypeError(f"reward function {fn!r} returned {type(value).__name__}; return a "
                            "float or {agent_id: float}")
    return total


async def play(
    env: Any,
    seed: int,
    *,
    policy_of: Mapping[str, str],
    fixed_agents: Mapping[str, Agent],
    open_seat: SeatFactory,
    reward_fns: list[RewardFn],
    greedy: bool = False,
    max_steps: int | None = None,
) -> tuple[dict[str, list[Sample]], EpisodeStats]:
    """Run one episode of ``env`` at ``seed``; samples per *policy* and the episode's stats.

    Agents in ``fixed_agents`` (scripted, random...) are used as given; every other agent id
    acts on a fresh seat from ``open_seat`` for its policy. After the episode each seat's
    session becomes samples (``Seat.take_samples``) whose ``reward`` is the agent's env return
    plus the reward functions', ``group`` the seed and ``agent``/``policy`` who produced them.
    Every seat's session is closed, whatever happens (failure, cancellation).

    Raises:
        EpisodeFailed: the episode's status is ``failed``, or a reward function raised (e.g.
            ``JudgeFailed``); the message carries the error, ``__cause__`` the exception.
    """
    agents: dict[str, Agent] = dict(fixed_agents)
    seats: dict[str, Seat] = {}
    try:
        for agent_id, policy in policy_of.items():
            if agent_id not in fixed_agents:
                seats[agent_id] = await open_seat(agent_id, policy, greedy)
                agents[agent_id] = seats[agent_id].agent
        episode = await run_episode(env, agents, seed=seed, max_steps=max_steps)
        if episode.status == "failed":
            raise EpisodeFailed(f"episode seed={seed} failed: {episode.error}")
        try:
            rewards = await apply_reward_fns(episode, reward_fns)
        except Exception as e:  # e.g. a judge that kept failing: this episode fails, not the run
            raise EpisodeFailed(f"episode seed={seed} failed in a reward function: "
                                f"{type(e).__name__}: {e}") from e
        samples = {a: seat.take_samples(reward=rewards.get(a, 0.0), group=str(seed))
                   for a, seat in seats.items()}
    finally:
        for seat in seats.values():
            seat.close()
    episode_id = uuid.uuid4().hex[:12]
    by_policy: dict[str, list[Sample]] = {}
    gen_lengths: dict[str, list[int]] = {}
    for agent_id, agent_samples in samples.items():
        for s in agent_samples:
            s.meta["episode"] = episode_id
            by_policy.setdefault(seats[agent_id].policy, []).append(s)
            gen_lengths.setdefault(agent_id, []).append(s.num_generated)
    stats = EpisodeStats(
        seed=seed,
        returns=rewards,
        success={a: success_of(episode, a) for a in episode.agents},
        length=episode.length,
        status=episode.status,
        policy_of=dict(policy_of),
        gen_lengths=gen_lengths,
        episode=episode,
    )
    return by_policy, stats
