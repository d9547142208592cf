"""A trained reward model as a ``reward_fns`` entry: ``RewardModelReward`` scores each agent's
last response, batching the episodes that finish together."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal

from areal_agents.episode import Episode

from .preference_pairs import last_turn

if TYPE_CHECKING:
    from .reward_model import RewardModel


class RewardModelReward:
    """A ``reward_fns`` entry: the reward model's score of each agent's last response.

    The prompt is the agent's transcript before its last assistant message (what it saw when
    it answered; later env feedback is left out), the response that message. Calls of
    concurrently finishing episodes are scored together in one no-grad batch (on a worker
    thread). Agents without a response get no reward and are counted in ``num_unscored``.

    Args:
        rm: the reward model.
        agents: which agents to reward (default: every agent of the episode).
        normalize: ``"none"``; ``"running"``: ``(r - mean) / std`` over every score so far;
            ``"sigmoid"``: ``sigmoid(r)`` in (0, 1).
        clip: clip the (normalised) reward to ``[-clip, clip]``.
        batch_size: rows per forward pass.

    Example:
        >>> from areal_agents.rewards.reward_model import RewardModel
        >>> reward = RewardModelReward(RewardModel.from_pretrained("tiny:xs"), normalize="sigmoid")
        >>> trainer = aa.Trainer(..., reward_fns=[reward])  # doctest: +SKIP
    """

    def __init__(self, rm: RewardModel, *, agents: Sequence[str] | None = None,
                 normalize: Literal["none", "running", "sigmoid"] = "none",
                 clip: float | None = None, batch_size: int = 32) -> None:
        if normalize not in ("none", "running", "sigmoid"):
            raise ValueError(f"normalize={normalize!r}; choose 'none', 'running' or 'sigmoid'")
        if clip is not None and clip <= 0:
            raise ValueError(f"clip must be > 0 (or None), got {clip}")
        self.rm, self.agents, self.normalize, self.clip = rm, agents, normalize, clip
        self.batch_size = batch_size
        self.num_scored = self.num_unscored = 0
        self._step_raw: list[float] = []  # raw scores since the last take_metrics()
        self._step_unscored = 0
        self._count, self._mean, self._m2 = 0, 0.0, 0.0  # Welford running moments
        self._queue: list[tuple[list[int], asyncio.Future[float]]] = []
        self._flusher: asyncio.Task[None] | None = None

    def _post(self, raw: float) -> float:
        if self.normalize == "running":
            std = math.sqrt(self._m2 / self._count) if self._count > 1 else 1.0
            raw = (raw - self._mean) / max(std, 1e-6)
        elif self.normalize == "sigmoid":
            raw = 1.0 / (1.0 + math.exp(-raw))
        return raw if self.clip is None else max(-self.clip, min(self.clip, raw))

    policy: str | None = None
    """No served policy: the model runs in this process (``rewards.hooks.ModelReward``)."""

    def bind(self, client: Any) -> None:
        """Nothing to bind: no gateway client is needed."""

    def take_metrics(self) -> dict[str, float]:
        """``reward_model/{scored,unscored,raw_mean}`` since the last call (logged per step)."""
        out = {"reward_model/scored": float(len(self._step_raw)),
               "reward_model/unscored": float(self._step_unscored)}
        if self._step_raw:
            out["reward_model/raw_mean"] = sum(self._step_raw) / len(self._step_raw)
        self._step_raw, self._step_unscored = [], 0
        return out

    def _observe(self, raws: Iterable[float]) -> None:
        for r in raws:
            self._step_raw.append(r)
            self._count += 1
            delta = r - self._mean
            self._mean += delta / self._count
            self._m2 += delta * (r - self._mean)

    def _requests(self, episode: Episode) -> list[tuple[str, list[int]]]:
        out = []
        for agent in self.agents or episode.agents:
            turn = last_turn(episode.messages.get(agent, []))
            if turn is None:
                self.num_unscored += 1
                self._step_unscored += 1
                continue
            out.append((agent, self.rm.encode(*turn)))
        return out

    def score_episodes(self, episodes: Sequence[Episode]) -> list[dict[str, float]]:
        """Rewards of many episodes at once (synchronous, no grad)."""
        requests = [self._requests(ep) for ep in episodes]
        raws = self.rm.score_ids([ids for req in requests for _, ids in req], self.batch_size)
        self._observe(raws)
        self.num_scored += len(raws)
        it = iter(raws)
        return [{agent: self._post(next(it)) for agent, _ in req} for req in requests]

    async def __call__(self, episode: Episode) -> dict[str, float]:
        requests = self._requests(episode)
        loop = asyncio.get_running_loop()
        futures = []
        for _, ids in requests:
            futures.append(loop.create_future())
            self._queue.append((ids, futures[-1]))
        if futures and (self._flusher is None or self._flusher.done()):
            self._flusher = asyncio.create_task(self._flush())
        raws = await asyncio.gather(*futures)
        return {agent: self._post(raw) for (agent, _), raw in zip(requests, raws, strict=True)}

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # episodes finishing in this loop turn join the batch
        while self._queue:
            batch, self._queue = self._queue[: self.batch_size], self._queue[self.batch_size:]
            try:
                raws = await asyncio.to_thread(self.rm.score_ids, [ids for ids, _ in batch],
                                               self.batch_size)
            except Exception as exc:  # every waiting episode fails with the cause
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            self._observe(raws)
            self.num_scored += len(raws)
            for (_, fut), raw in zip(batch, raws, strict=True):
                if not fut.done():
                    fut.set_result(raw)


__all__ = ["RewardModelReward"]
