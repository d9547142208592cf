"""Trainer metrics: per-agent episode stats, per-policy train stats, outcome counts."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Collection, Mapping

from areal_agents.algorithms.registry import resolve as resolve_algorithm
from areal_agents.samples import Sample

from .episodes import EpisodeStats

# resolve_algorithm: algorithm names live in one table, areal_agents.algorithms.registry
__all__ = ["StepStats", "resolve_algorithm"]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


class StepStats:
    """Accumulates episode stats between steps and formats every metric of a step."""

    def __init__(self) -> None:
        self.by_seed: dict[int, list[EpisodeStats]] = {}
        self.t0 = time.perf_counter()
        self.last = self.t0
        self.num_episodes = 0

    def add_episode(self, stats: EpisodeStats) -> None:
        self.by_seed.setdefault(stats.seed, []).append(stats)

    @staticmethod
    def summarise(episodes: list[EpisodeStats], prefix: str, num_failed: int = 0) -> dict[str, float]:
        """``<prefix>/<agent>/{reward,success,gen_len}``, ``<prefix>/episode_length``, and
        ``<prefix>/<agent>/reward_<level>`` for agents whose env reported reward levels."""
        out: dict[str, float] = {}
        agents = sorted({a for e in episodes for a in e.returns})
        for a in agents:
            out[f"{prefix}/{a}/reward"] = _mean([e.returns[a] for e in episodes if a in e.returns])
            out[f"{prefix}/{a}/success"] = _mean([e.success[a] for e in episodes if a in e.success])
            lens = [n for e in episodes for n in e.gen_lengths.get(a, [])]
            if lens:
                out[f"{prefix}/{a}/gen_len"] = _mean([float(n) for n in lens])
            for level in sorted({k for e in episodes for k in e.levels.get(a, {})}):
                out[f"{prefix}/{a}/reward_{level}"] = _mean(
                    [e.levels[a][level] for e in episodes if a in e.levels])
        out[f"{prefix}/episode_length"] = _mean([float(e.length) for e in episodes])
        out[f"{prefix}/episodes"] = float(len(episodes))
        if num_failed:
            out[f"{prefix}/failed"] = float(num_failed)
        return out

    def episode_metrics(self, pending: Collection[int] = ()) -> dict[str, float]:
        """Metrics of the finished episodes whose task seed is not in ``pending`` (the groups
        trained or filtered since the last call; pass the controller's unresolved seeds), plus
        throughput and time. Episodes of still-pending groups wait for a later call, so a
        step's ``train/*`` metrics describe its own batch whatever the scheduling.
        """
        done = [s for s in self.by_seed if s not in pending]
        eps = [e for s in sorted(done) for e in self.by_seed.pop(s)]
        now = time.perf_counter()
        self.num_episodes += len(eps)
        out = self.summarise(eps, "train") if eps else {}
        out["perf/episodes_per_s"] = len(eps) / max(now - self.last, 1e-9)
        out["perf/elapsed_s"] = now - self.t0
        out["perf/episodes_total"] = float(self.num_episodes)
        self.last = now
        return out

    @staticmethod
    def train_metrics(policy: str, samples: list[Sample], stats: Mapping[str, float],
                      version: int, *, wait: float, train: float, sync: float) -> dict[str, float]:
        """Loss terms, staleness histogram and trained-length stats of one policy's step."""
        p = f"policy/{policy}"
        out = {f"{p}/{k}": float(v) for k, v in stats.items()}
        trained = version - 1  # the version these samples were trained at
        lags = Counter(trained - min((v for v in s.versions if v >= 0), default=trained)
                       for s in samples)
        for lag, n in sorted(lags.items()):
            out[f"{p}/staleness/{lag}"] = n / len(samples)
        num_tokens = sum(len(s) for s in samples)
        out.update({
            f"{p}/version": float(version),
            f"{p}/reward": _mean([s.reward for s in samples]),
            f"{p}/trained_gen_len": _mean([float(s.num_generated) for s in samples]),
            f"{p}/num_samples": float(len(samples)),
            f"{p}/time/wait_rollout": wait,
            f"{p}/time/train": train,
            f"{p}/time/weight_sync": sync,
            f"{p}/train_tokens_per_s": num_tokens / max(train, 1e-9),
        })
        return out

    @staticmethod
    def outcome_metrics(counts: Mapping[str, Mapping[str, int]]) -> dict[str, float]:
        """``outcomes/<policy>/<counter>`` from ``RolloutController.counts()``."""
        return {f"outcomes/{p}/{k}": float(v) for p, row in counts.items() for k, v in row.items()}
