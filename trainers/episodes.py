"""One training or evaluation episode: a seat per LLM agent, rewards, samples and statistics.

The sample path: each LLM agent acts on its own recorded gateway session (a ``Seat``); when
the episode is over ``play`` takes every session's samples from the gateway, with the agent,
policy, group and reward set once, and each env step's reward on the turn (LLM call) that
produced the action it rewards (``assign_turn_rewards``). Agents only act.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from areal_agents.agent import Agent
from areal_agents.algorithms.reward_levels import LevelWeights, apply_reward_levels, level_totals
from areal_agents.episode import Episode, run_episode
from areal_agents.ids import new_id
from areal_agents.samples import Sample

from .llm_session import Seat

if TYPE_CHECKING:
    from areal_agents.gateway.sessions import Session

RewardFn = Callable[[Episode], "float | dict[str, float] | Awaitable[float | dict[str, float]]"]
"""``reward_fn(episode) -> float (added to every agent) | {agent_id: float}``, sync or async."""

SeatFactory = Callable[[str, str, bool], Awaitable[Seat]]
"""``open_seat(agent_id, policy_name, greedy) -> Seat`` (an LLM agent on its own session)."""


class _TurnTracker(Agent):
    """``agent`` as is, noting after each action the index of ``session``'s latest turn: the
    LLM call that produced the action (tool rounds before it are earlier turns)."""

    def __init__(self, agent: Agent, session: Session) -> None:
        self.agent, self.session = agent, session
        self.action_turns: list[int] = []

    async def act(self, observation: Any) -> Any:
        action = await self.agent.act(observation)
        self.action_turns.append(len(self.session.turns) - 1)
        return action

    def reset(self) -> None:
        self.agent.reset()
        self.action_turns = []

    async def end_episode(self, episode_return: float) -> list[Sample]:
        return await self.agent.end_episode(episode_return)


def assign_turn_rewards(samples: list[Sample], turn_ends: list[int], action_turns: list[int],
                        rewards: list[float], reward_actions: list[int], extra: float) -> None:
    """Set ``token_rewards`` of one session's ``samples``: each step reward on its turn.

    Reward ``rewards[i]`` rewards action ``reward_actions[i]`` (-1: before the first action,
    counted for the first), produced by turn ``action_turns[k]``; it lands on that turn's last
    generated token, at position ``turn_ends[t] - 1`` of the sample holding turn ``t``
    (``meta["turns"]``; a turn ends where its prompt + completion end). ``extra`` (reward
    functions' share, rewards of no known turn) and, for a sample followed by split-off ones
    of the same session, the later samples' rewards land on each sample's last generated
    token. So a lone sample's ``token_rewards`` sum to the agent's return (its ``reward``),
    and every sample's to the return from its first turn on.
    """
    per_turn: dict[int, float] = {}
    for r, k in zip(rewards, reward_actions, strict=True):
        k = max(k, 0)
        t = action_turns[k] if k < len(action_turns) else -1
        if t < 0:
            extra += r
        else:
            per_turn[t] = per_turn.get(t, 0.0) + r
    later = extra
    for s in reversed(samples):
        masked = [p for p, m in enumerate(s.loss_mask) if m]
        if not masked:
            continue
        out: dict[int, float] = {}
        for t in s.meta.get("turns", []):
            if t in per_turn:
                pos = max((p for p in masked if p < turn_ends[t]), default=masked[0])
                out[pos] = out.get(pos, 0.0) + per_turn[t]
        own = sum(out.values())
        out[masked[-1]] = out.get(masked[-1], 0.0) + later
        later += own
        s.token_rewards = out


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
    levels: dict[str, dict[str, float]] = field(default_factory=dict)  # per agent, unweighted
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
    reward_levels: Mapping[str, LevelWeights] | None = None,
) -> tuple[dict[str, list[Sample]], EpisodeStats]:
    """Run one episode of ``env`` at ``seed``; samples per *policy* and the episode's stats.

    Agents in ``fixed_agents`` (scripted, random...) are used as given; every other agent id
    acts on a fresh seat from ``open_seat`` for its policy. After the episode each seat's
    session becomes samples (``Seat.take_samples``) whose ``reward`` is the agent's env return
    plus the reward functions', ``group`` the seed and ``agent``/``policy`` who produced them,
    and whose ``token_rewards`` put each env step's reward on the turn that produced the
    action it rewards (``assign_turn_rewards``; PPO's GAE reads them). ``reward_levels``
    (``{agent_id: LevelWeights}``) recombines those agents' step rewards from the levels the
    env reported (``areal_agents.algorithms.reward_levels``) before any of this.
    Every seat's session is closed, whatever happens (failure, cancellation).

    Raises:
        EpisodeFailed: the episode's status is ``failed``, or a reward function raised (e.g.
            ``JudgeFailed``); the message carries the error, ``__cause__`` the exception.
    """
    agents: dict[str, Agent] = dict(fixed_agents)
    seats: dict[str, Seat] = {}
    trackers: dict[str, _TurnTracker] = {}
    try:
        for agent_id, policy in policy_of.items():
            if agent_id not in fixed_agents:
                seat = seats[agent_id] = await open_seat(agent_id, policy, greedy)
                agents[agent_id] = seat.agent
                if seat.gateway is not None and seat.key is not None:
                    agents[agent_id] = trackers[agent_id] = _TurnTracker(
                        seat.agent, seat.gateway.session(seat.key))
        episode = await run_episode(env, agents, seed=seed, max_steps=max_steps)
        if episode.status == "failed":
            raise EpisodeFailed(f"episode seed={seed} failed: {episode.error}")
        episode = apply_reward_levels(episode, reward_levels or {})
        try:
            rewards = await apply_reward_fns(episode, reward_fns)
        except Exception as e:  # e.g. a judge that kept failing: this episode fails, not the run
            raise EpisodeFailed(f"episode seed={seed} failed in a reward function: "
                                f"{type(e).__name__}: {e}") from e
        samples = {a: seat.take_samples(reward=rewards.get(a, 0.0), group=str(seed))
                   for a, seat in seats.items()}
        for a, tracker in trackers.items():
            if len(episode.rewards.get(a, [])) != len(episode.reward_actions.get(a, [])):
                continue  # an Episode built without reward_actions: rewards stay terminal
            assign_turn_rewards(
                samples[a], [len(t.prompt_ids) + len(t.completion_ids)
                             for t in tracker.session.turns],
                tracker.action_turns, episode.rewards.get(a, []),
                episode.reward_actions.get(a, []),
                rewards.get(a, 0.0) - episode.returns.get(a, 0.0))
    finally:
        for seat in seats.values():
            seat.close()
    episode_id = new_id()
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
        levels={a: level_totals(steps) for a, steps in episode.reward_levels.items()
                if any(steps)},
        episode=episode,
    )
    return by_policy, stats
