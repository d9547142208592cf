"""The trainer's episodes: one seeded training episode, and greedy evaluation episodes.

A training episode's agent ``a`` samples with seeds keyed by ``(trainer.seed, task seed,
member, a)``, so a replayed episode (after a resume) draws the same tokens; with an
``OpponentPool`` the league seats the drawn opponent. Evaluation plays greedy episodes on
held-out seeds with the trainer's own seats and summarises them as ``eval/<agent>/...``.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from areal_agents.samples import Sample

from .episodes import EpisodeStats, play
from .llm_session import Seat
from .stats import StepStats

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ["evaluate", "train_episode"]


async def train_episode(trainer: Trainer, seed: int, member: int) -> dict[str, list[Sample]]:
    """Group ``seed``'s member ``member``: the trainable policies' samples (``Trainer._episode``,
    the rollout controller's episode function)."""

    async def seat(agent_id: str, policy: str, greedy: bool) -> Seat:
        key = f"{trainer.seed}/{seed}/{member}/{agent_id}"
        return await trainer._open_seat(agent_id, policy, greedy, seed_key=key)

    env = trainer.make_env()
    match = trainer.league.match(trainer, seed, env)  # the drawn opponent, if a pool is set
    try:
        by_policy, stats = await play(
            env, seed, policy_of=match.policy_of, fixed_agents=match.fixed_agents,
            open_seat=seat, reward_fns=[*match.reward_fns, *trainer.reward_fns],
            max_steps=trainer.max_steps_per_episode, reward_levels=trainer.reward_levels)
    finally:
        match.close()
        await env.close()
    trainer._stats.add_episode(match.learner_stats(stats))
    trainer.rewards.record(seed, member, stats.episode)
    trainer.sample_log.attach(by_policy, stats.episode.messages if stats.episode else {})
    return {p: s for p, s in by_policy.items() if p in trainer.trainable}


async def evaluate(trainer: Trainer, seeds: list[int]) -> dict[str, float]:
    """Greedy episodes of the trainer's own seats on ``seeds``, summarised as ``eval/...``
    (``StepStats.summarise``; a raising episode is counted, not raised), plus the league's
    ``pool/*`` (``Trainer.evaluate``)."""

    async def one(seed: int) -> EpisodeStats:
        env = trainer.make_env()
        try:
            _, stats = await play(env, seed, policy_of=trainer.policy_of,
                                  fixed_agents=trainer.fixed_agents,
                                  open_seat=trainer._open_seat, reward_fns=trainer.reward_fns,
                                  greedy=True, max_steps=trainer.max_steps_per_episode,
                                  reward_levels=trainer.reward_levels)
            return stats
        finally:
            await env.close()

    results = await asyncio.gather(*(one(s) for s in seeds), return_exceptions=True)
    metrics = StepStats.summarise([r for r in results if isinstance(r, EpisodeStats)], "eval",
                                  num_failed=sum(isinstance(r, BaseException) for r in results))
    return metrics | await trainer.league.on_evaluate(trainer)  # pool stats, league when due
