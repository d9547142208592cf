"""The rollout controller: concurrent episodes, groups, per-policy staleness and buffers.

The controller knows nothing about envs, gateways or models: it calls ``run_episode(seed,
member)`` (an async function returning that episode's samples per policy) and hands finished
groups to per-policy buffers. Every admitted episode ends, for each trainable policy, in
exactly one of ``trained``, ``filtered:<reason>`` or ``failed`` (see ``ledger``).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from areal_agents.samples import Sample

from .staleness import StalenessControl

log = logging.getLogger(__name__)

EpisodeFn = Callable[[int, int], Awaitable[dict[str, list[Sample]]]]
"""``run_episode(seed, member) -> {policy: samples}`` for one episode of a group."""

FilterFn = Callable[[str, list[Sample]], tuple[list[Sample], dict[str, int]]]
"""``filter(policy, group_samples) -> (kept, {reason: dropped_count})``."""


class RolloutFailed(RuntimeError):
    """Every recent episode failed: training cannot make progress."""


@dataclass
class Group:
    """The finished episodes of one task seed, for one policy."""

    seed: int
    policy: str
    samples: list[Sample]
    num_episodes: int
    min_version: int = 0
    meta: dict[str, Any] = field(default_factory=dict)


def _keep_all(policy: str, samples: list[Sample]) -> tuple[list[Sample], dict[str, int]]:
    return samples, {}


class RolloutController:
    """Run groups of episodes concurrently under per-policy staleness control.

    Args:
        run_episode: ``async (seed, member) -> {policy: samples}``; exceptions mark the episode
            failed (logged with the exception, counted, never retried).
        controls: one ``StalenessControl`` per trainable policy (units: episodes).
        group_size: episodes per task seed (>= 1); admitted together.
        filter_fn: per-group filter (e.g. zero reward variance); a group left empty for a
            policy is filtered for it with the first reason given.
        seed: the first task seed; seeds are consumed in order (the data cursor).
        max_consecutive_failures: after this many failed episodes in a row, ``take`` raises
            ``RolloutFailed`` with the last error instead of waiting forever (0 = never).

    Example (sketch)::

        ctl = RolloutController(run_episode, {"speaker": StalenessControl(32)}, group_size=16)
        task = asyncio.create_task(ctl.run())
        groups = await ctl.take("speaker", 32)
    """

    def __init__(
        self,
        run_episode: EpisodeFn,
        controls: dict[str, StalenessControl],
        *,
        group_size: int,
        filter_fn: FilterFn | None = None,
        seed: int = 0,
        max_consecutive_failures: int = 256,
    ) -> None:
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        for name, c in controls.items():
            if c.max_concurrent < group_size:
                raise ValueError(
                    f"policy {name!r}: max_concurrent={c.max_concurrent} < group_size="
                    f"{group_size}; a group could never be admitted — raise max_concurrent"
                )
        self.run_episode = run_episode
        self.controls = controls
        self.group_size = group_size
        self.filter_fn = filter_fn or _keep_all
        self.next_seed = seed
        self.max_consecutive_failures = max_consecutive_failures
        self.consecutive_failures = 0
        self.buffers: dict[str, list[Group]] = {p: [] for p in controls}
        self.ledger: dict[str, Counter[str]] = {p: Counter() for p in controls}
        self.errors: list[BaseException] = []
        self._changed = asyncio.Condition()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopped = False
        # data cursor: seeds admitted but not yet trained/filtered/failed for some policy
        self.pending: dict[int, set[str]] = {}
        self.skip: set[int] = set()  # seeds past the cursor already resolved (after a resume)

    # ---- admission loop -------------------------------------------------------------------

    def can_admit(self) -> bool:
        """Every trainable policy has room for a whole group."""
        return all(c.capacity() >= self.group_size for c in self.controls.values())

    async def run(self) -> None:
        """Admit groups forever (until ``stop``); cancel-safe."""
        self._stopped = False
        while not self._stopped:
            async with self._changed:
                await self._changed.wait_for(lambda: self._stopped or self.can_admit())
                if self._stopped:
                    return
                while self.next_seed in self.skip:
                    self.skip.discard(self.next_seed)
                    self.next_seed += 1
                seed = self.next_seed
                self.next_seed += 1
                for c in self.controls.values():
                    c.admit(self.group_size)
                self.pending[seed] = set(self.controls)
            task = asyncio.create_task(self._run_group(seed))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run_group(self, seed: int) -> None:
        try:
            results = await asyncio.gather(
                *(self.run_episode(seed, m) for m in range(self.group_size)),
                return_exceptions=True,
            )
        except asyncio.CancelledError:
            for policy, control in self.controls.items():
                control.finish("failed", self.group_size)
                self.ledger[policy]["failed:cancelled"] += self.group_size
            self.pending.pop(seed, None)  # never trained: a resumed run plays it again
            raise
        ok: list[dict[str, list[Sample]]] = []
        for r in results:
            if isinstance(r, BaseException):
                if isinstance(r, asyncio.CancelledError):
                    raise r
                log.warning("episode of seed %d failed: %r", seed, r)
                self.errors.append(r)
                del self.errors[:-100]  # keep the latest ones
                self.consecutive_failures += 1
            else:
                ok.append(r)
                self.consecutive_failures = 0
        num_failed = len(results) - len(ok)
        async with self._changed:
            for policy, control in self.controls.items():
                if num_failed:
                    control.finish("failed", num_failed)
                    self.ledger[policy]["failed"] += num_failed
                if not ok:
                    self._resolve(seed, policy)
                    continue
                samples = [s for r in ok for s in r.get(policy, [])]
                kept, dropped = self.filter_fn(policy, samples) if samples else ([], {"no_samples": 1})
                if kept:
                    control.finish("accepted", len(ok))
                    versions = [v for s in kept for v in s.versions if v >= 0]
                    self.buffers[policy].append(
                        Group(seed, policy, kept, len(ok), min(versions, default=control.version))
                    )
                else:
                    reason = next(iter(dropped), "empty")
                    control.finish("filtered", len(ok))
                    self.ledger[policy][f"filtered:{reason}"] += len(ok)
                    self._resolve(seed, policy)
            self._changed.notify_all()

    # ---- consumer side --------------------------------------------------------------------

    def buffered(self, policy: str) -> int:
        """Episodes waiting in ``policy``'s buffer."""
        return sum(g.num_episodes for g in self.buffers[policy])

    async def take(self, policy: str, num_episodes: int) -> list[Group]:
        """Wait for and remove the oldest groups holding >= ``num_episodes`` episodes.

        Groups older than the policy's ``max_staleness`` are dropped as ``filtered:too_stale``
        (admission control makes this rare: only a ``max_staleness`` lowered on resume).
        """
        async with self._changed:
            while True:
                self._check_failures()
                self._drop_stale(policy)
                if self.buffered(policy) >= num_episodes:
                    break
                await self._changed.wait()
            out: list[Group] = []
            while sum(g.num_episodes for g in out) < num_episodes:
                out.append(self.buffers[policy].pop(0))
                self._resolve(out[-1].seed, policy)
            self.ledger[policy]["trained"] += sum(g.num_episodes for g in out)
            return out

    def _check_failures(self) -> None:
        limit = self.max_consecutive_failures
        if limit and self.consecutive_failures >= limit:
            raise RolloutFailed(
                f"{self.consecutive_failures} episodes failed in a row; the last error: "
                f"{self.errors[-1]!r}. Fix the env/agent/engine error above and restart"
            ) from self.errors[-1]

    def _drop_stale(self, policy: str) -> None:
        c = self.controls[policy]
        fresh = [g for g in self.buffers[policy] if c.version - g.min_version <= c.max_staleness]
        for g in self.buffers[policy]:
            if g not in fresh:  # it was accepted; now it is filtered, and its slot is free
                self.ledger[policy]["filtered:too_stale"] += g.num_episodes
                c.accepted -= g.num_episodes
                c.filtered += g.num_episodes
                self._resolve(g.seed, policy)
        if len(fresh) != len(self.buffers[policy]):
            self.buffers[policy] = fresh
            self._changed.notify_all()

    async def update_weights(
        self, policy: str, apply: Callable[[], Awaitable[None]], new_version: int
    ) -> None:
        """Pause admission for ``policy``, ``await apply()``, bump the version, resume.

        A failing ``apply`` leaves the version unchanged and the policy admitting again; the
        exception propagates.
        """
        control = self.controls[policy]
        try:
            with control.updating(new_version):
                await apply()
        finally:
            async with self._changed:
                self._changed.notify_all()

    def _resolve(self, seed: int, policy: str) -> None:
        left = self.pending.get(seed)
        if left is not None:
            left.discard(policy)
            if not left:
                del self.pending[seed]

    def state_dict(self) -> dict[str, Any]:
        """The data cursor: the first unresolved seed and the resolved seeds after it.

        Seeds admitted but not yet trained (in flight or buffered) are *not* resolved, so a
        run resumed from this state plays them again: no batch is lost or trained twice.
        """
        cursor = min([*self.pending, self.next_seed])
        done = sorted(s for s in range(cursor, self.next_seed) if s not in self.pending)
        return {"cursor": cursor, "done": done,
                "ledger": {p: dict(c) for p, c in self.ledger.items()},
                "controls": {p: c.state_dict() for p, c in self.controls.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the cursor, outcome counts and rebased staleness counters."""
        self.next_seed = int(state["cursor"])
        self.skip = set(state["done"])
        self.pending.clear()
        for p, counts in state.get("ledger", {}).items():
            if p in self.ledger:
                self.ledger[p] = Counter(counts)
        for p, cs in state.get("controls", {}).items():
            if p in self.controls:
                self.controls[p].load_state_dict(cs)

    async def stop(self) -> None:
        """Stop admitting and cancel in-flight groups (their episodes count as failed)."""
        self._stopped = True
        async with self._changed:
            self._changed.notify_all()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def counts(self) -> dict[str, dict[str, int]]:
        """Per policy: submitted/running/accepted/filtered/failed/version + ledger outcomes."""
        out: dict[str, dict[str, int]] = {}
        for p, c in self.controls.items():
            row = {k: int(getattr(c, k)) for k in
                   ("version", "submitted", "running", "accepted", "filtered", "failed")}
            row.update({f"outcome/{k}": v for k, v in self.ledger[p].items()})
            row["buffered"] = self.buffered(p)
            out[p] = row
        return out
