"""Scheduling simulators: a virtual-clock event loop, a slot/latency engine and a learnable bandit.

Used by ``benchmarks/async_vs_sync.py`` and the controller tests to measure the rollout
controller's scheduling alone, deterministically: under ``run_virtual`` every ``asyncio.sleep``
advances a simulated clock instead of waiting, so throughput figures do not depend on the
machine's load and repeat exactly for a given seed.

Example:
    >>> import asyncio
    >>> async def two_sleeps():
    ...     loop = asyncio.get_running_loop()
    ...     t0 = loop.time()
    ...     await asyncio.gather(asyncio.sleep(5.0), asyncio.sleep(3.0))
    ...     return loop.time() - t0
    >>> run_virtual(two_sleeps())
    5.0
"""

from __future__ import annotations

import asyncio
import math
import random
import selectors
from collections.abc import Coroutine
from typing import Any

from ..samples import Sample


class _VirtualSelector(selectors.BaseSelector):
    """A selector that, instead of blocking for ``timeout``, moves the virtual clock on."""

    def __init__(self) -> None:
        self._inner = selectors.DefaultSelector()
        self.now = 0.0

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._inner.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._inner.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._inner.modify(fileobj, events, data)

    def get_map(self) -> Any:
        return self._inner.get_map()

    def close(self) -> None:
        self._inner.close()

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = self._inner.select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:  # nothing scheduled: only real I/O (e.g. a thread) can wake us
            return self._inner.select(None)
        self.now += timeout
        return []


def run_virtual(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` to completion on an event loop whose clock only moves when all tasks wait.

    ``loop.time()`` starts at 0 and jumps to the next timer whenever no callback is ready, so
    sleeps cost no real time. Real I/O and threads still work (they block for real).
    """
    selector = _VirtualSelector()
    loop = asyncio.SelectorEventLoop(selector)
    loop.time = lambda: selector.now  # type: ignore[method-assign]
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


class SimEngine:
    """An engine with ``slots`` concurrent sequences decoding at ``token_latency`` s/token.

    Output lengths are log-normal (``exp(N(mu, sigma))`` tokens, 1..``max_tokens``): a long
    tail. A request waits for a free slot, then holds it for ``length * token_latency``
    seconds. ``version`` is bumped by ``update_weights``; in-flight requests continue
    (interruptible generation), so a result records the version at its first and last token.

    Attributes:
        busy: slot-seconds spent decoding requests that completed (utilisation =
            (busy + cancelled_busy) / (slots * elapsed)).
        cancelled_busy: slot-seconds spent on requests cancelled mid-decode (wasted work).
        generated: requests completed.
        requested, requested_tokens: requests received and their drawn lengths (including
            requests cancelled before they completed): the unbiased length distribution.
    """

    def __init__(self, slots: int = 64, token_latency: float = 0.0005, mu: float = 4.0,
                 sigma: float = 1.0, max_tokens: int = 2000, seed: int = 0) -> None:
        if slots < 1 or token_latency <= 0:
            raise ValueError(f"need slots >= 1 and token_latency > 0, got {slots}, {token_latency}")
        self.slots, self.token_latency, self.max_tokens = slots, token_latency, max_tokens
        self.mu, self.sigma = mu, sigma
        self.rng = random.Random(seed)
        self.version = 0
        self.busy = self.cancelled_busy = 0.0
        self.generated = 0
        self.requested = self.requested_tokens = 0
        self._sem = asyncio.Semaphore(slots)

    def mean_tokens(self, draws: int = 200_000) -> float:
        """The mean output length, estimated from ``draws`` samples of a separate RNG."""
        rng = random.Random(12345)
        return sum(self._length(rng) for _ in range(draws)) / draws

    def _length(self, rng: random.Random) -> int:
        return min(int(rng.lognormvariate(self.mu, self.sigma)) + 1, self.max_tokens)

    def ideal_rate(self, mean_tokens: float | None = None) -> float:
        """Requests/s with every slot always busy: slots * (1/token_latency) / mean length."""
        mean = self.mean_tokens() if mean_tokens is None else mean_tokens
        return self.slots * (1.0 / self.token_latency) / mean

    async def generate(self) -> tuple[int, int, int]:
        """Decode one request; returns ``(num_tokens, first_version, last_version)``."""
        num_tokens = self._length(self.rng)
        self.requested += 1
        self.requested_tokens += num_tokens
        async with self._sem:
            first = self.version
            seconds = num_tokens * self.token_latency
            start = asyncio.get_running_loop().time()
            try:
                await asyncio.sleep(seconds)
            except asyncio.CancelledError:
                self.cancelled_busy += asyncio.get_running_loop().time() - start
                raise
            self.busy += seconds
            self.generated += 1
            return num_tokens, first, self.version

    def update_weights(self, version: int) -> None:
        """Load new weights: later tokens of in-flight requests carry ``version``."""
        self.version = version


class SimBandit:
    """A learnable contextual bandit policy: softmax over ``arms`` per context, one per version.

    A task seed's context is ``seed % contexts``; arm ``target(c)`` gives reward 1, others 0.
    ``train`` is a group-relative policy-gradient step (advantage = reward - group mean) with
    the decoupled-PPO correction: the ratio ``pi_current / pi_behaviour`` clipped to
    ``1 +- clip`` — so stale samples (from older versions) really learn less well.
    """

    def __init__(self, contexts: int = 16, arms: int = 8, lr: float = 0.1, clip: float = 0.2,
                 seed: int = 0) -> None:
        self.contexts, self.arms, self.lr, self.clip = contexts, arms, lr, clip
        self.rng = random.Random(seed + 1)
        self.targets = [(c * 5 + seed) % arms for c in range(contexts)]
        self.logits: list[list[float]] = [[0.0] * arms for _ in range(contexts)]
        self.history: dict[int, list[list[float]]] = {0: [row[:] for row in self.logits]}
        self.version = 0

    def probs(self, context: int, version: int | None = None) -> list[float]:
        """Action probabilities of ``context`` under ``version`` (default: current)."""
        row = self.history[self.version if version is None else version][context]
        top = max(row)
        exps = [math.exp(x - top) for x in row]
        total = sum(exps)
        return [e / total for e in exps]

    def act(self, seed: int, version: int) -> tuple[int, float]:
        """Sample an arm for task ``seed`` with the weights of ``version``: (arm, reward)."""
        c = seed % self.contexts
        arm = self.rng.choices(range(self.arms), self.probs(c, version))[0]
        return arm, float(arm == self.targets[c])

    def success(self) -> float:
        """Expected reward of the current policy over all contexts (sampled decoding)."""
        return sum(self.probs(c)[self.targets[c]] for c in range(self.contexts)) / self.contexts

    def train(self, samples: list[Sample]) -> None:
        """One step on ``samples`` (``meta``: context, arm, behaviour version); bumps version."""
        groups: dict[str, list[Sample]] = {}
        for s in samples:
            groups.setdefault(s.group, []).append(s)
        grads = [[0.0] * self.arms for _ in range(self.contexts)]
        for members in groups.values():
            mean = sum(s.reward for s in members) / len(members)
            for s in members:
                c, arm, v = s.meta["context"], s.meta["arm"], s.meta["version"]
                p_now, p_old = self.probs(c), self.probs(c, v)
                adv = s.reward - mean
                ratio = p_now[arm] / max(p_old[arm], 1e-12)
                if (adv > 0 and ratio > 1 + self.clip) or (adv < 0 and ratio < 1 - self.clip):
                    continue  # clipped: no gradient (PPO)
                for a in range(self.arms):
                    grads[c][a] += adv * ratio * ((a == arm) - p_now[a])
        for c in range(self.contexts):
            for a in range(self.arms):
                self.logits[c][a] += self.lr * grads[c][a] / len(samples) * self.contexts
        self.version += 1
        self.history[self.version] = [row[:] for row in self.logits]
