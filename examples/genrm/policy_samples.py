"""The policy's own answers to Arithmetic tasks, labelled by exact match (shared by the genrm
examples: the judge trains and grades on them, the Bradley-Terry reward model builds its
preference pairs from them).

``sample_answers`` plays one episode per (seed, sample) with a *set-up* Trainer's policy
(its sampling settings: temperature 1 in these examples, as in RL) and labels each answer by
the env's exact-match check. Import it with this folder (``examples/genrm``) on ``sys.path``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from areal_agents.episode import Episode


async def sample_answers(trainer: Any, make_env: Callable[[], Any], seeds: Sequence[int],
                         samples: int = 1, policy: str = "solver", agent: str = "agent"
                         ) -> list[tuple[Episode, bool]]:
    """``samples`` answers of ``trainer``'s ``policy`` per task seed, in seed order, each as
    ``(episode, is_correct)``; correct means the env's ``info["success"]`` (exact match).

    ``trainer`` must be set up (``await trainer.setup()``); the caller closes it. The episodes
    are played outside training: nothing here is trained on, and no reward function runs.
    """
    from areal_agents.trainers.episodes import play

    async def one(seed: int) -> tuple[Episode, bool]:
        _, stats = await play(make_env(), seed, policy_of={agent: policy}, fixed_agents={},
                              open_seat=trainer._open_seat, reward_fns=[])
        assert stats.episode is not None
        return stats.episode, stats.success[agent] == 1.0

    return list(await asyncio.gather(*(one(s) for s in seeds for _ in range(samples))))


__all__ = ["sample_answers"]
