"""The rollout controller: concurrent episodes, groups, per-policy staleness and buffers.

The controller knows nothing about envs, gateways or models: it calls ``run_episode(seed,
member)`` (an async function returning that episode's samples per policy) and hands finished
groups to per-policy buffers. Every admitted episode ends, for each trainable policy, in
exactly one of ``trained``, ``filtered:<reason>``, ``failed[:cancelled]`` or
``cancelled_by_restart`` (see ``ledger``), so at any moment, per policy::

    submitted == sum(ledger[policy].values()) + unresolved(policy)

with ``unresolved`` the episodes generating, waiting for their group, or buffered.
``cancelled_by_restart`` counts the episodes that were unresolved when the checkpoint a run
resumed from was written: they died with the old process (their seeds are played again).

Scheduling (what keeps the engines busy under the staleness rule):

- episodes are admitted one at a time (a group's members in order, then the next seed) while
  every policy has ``capacity() >= 1``, not a whole group at once;
- an episode done generating is ``release``d at once: its concurrency slot goes to a new
  episode while its group waits for its slowest member (``max_concurrent`` bounds the
  episodes *generating*);
- a group that can no longer be trained within ``max_staleness`` versions (a long-tail
  straggler still generating when the last version that may train it has taken its batch) is
  cancelled at once as ``filtered:too_stale``, freeing its engine slots and staleness budget
  instead of holding them until it ends only to be dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, NotRequired, TypedDict

from areal_agents.samples import Sample

from .groups import Group, GroupRun, Signal
from .staleness import Outcome, StalenessControl

__all__ = ["AllFiltered", "ControllerState", "Deadlocked", "EpisodeFn", "FilterFn", "Group",
           "RolloutController", "RolloutFailed"]

log = logging.getLogger(__name__)

EpisodeFn = Callable[[int, int], Awaitable[dict[str, list[Sample]]]]
"""``run_episode(seed, member) -> {policy: samples}`` for one episode of a group."""

FilterFn = Callable[[str, list[Sample]], tuple[list[Sample], dict[str, int]]]
"""``filter(policy, group_samples) -> (kept, {reason: dropped_count})``."""

GroupFn = Callable[[int, list[Any]], Awaitable[None]]
"""``on_group(seed, results)``: per member ``{policy: samples}`` or its exception; may change
the samples (e.g. add group rewards) in place. Raising fails the group's finished episodes."""


class ControllerState(TypedDict):
    """``RolloutController.state_dict()``: JSON-ready.

    Attributes:
        cursor: the first seed not resolved for every policy (a resumed run starts there).
        done: seeds after ``cursor`` already resolved for every policy (skipped on resume).
        ledger: per policy, episodes by outcome (``trained``, ``filtered:<reason>``...).
        controls: per policy, ``StalenessControl.state_dict()``.
        unresolved: per policy, episodes generating, waiting or buffered at save time; a run
            resumed from this state counts them ``cancelled_by_restart``.
    """

    cursor: int
    done: list[int]
    ledger: dict[str, dict[str, int]]
    controls: dict[str, dict[str, int | bool]]
    unresolved: NotRequired[dict[str, int]]  # absent in states saved before it existed


class RolloutFailed(RuntimeError):
    """Every recent episode failed: training cannot make progress."""


class Deadlocked(RolloutFailed):
    """A policy waits for a batch that can never fill: nothing runs, nothing can be admitted
    and nothing of it is buffered."""


class AllFiltered(RolloutFailed):
    """Every recent group was filtered for a policy (e.g. zero reward variance): its batch
    would never fill."""


def _keep_all(policy: str, samples: list[Sample]) -> tuple[list[Sample], dict[str, int]]:
    return samples, {}


class RolloutController:
    """Run groups of episodes concurrently under per-policy staleness control.

    Args:
        run_episode: ``async (seed, member) -> {policy: samples}``; exceptions mark the episode
            failed (logged with the exception, counted, never retried).
        controls: one ``StalenessControl`` per trainable policy (units: episodes).
        group_size: episodes per task seed (>= 1).
        filter_fn: per-group filter (e.g. zero reward variance); a group left empty for a
            policy is filtered for it with the first reason given.
        seed: the first task seed; seeds are consumed in order (the data cursor).
        max_consecutive_failures: after this many failed episodes in a row, ``take`` raises
            ``RolloutFailed`` with the last error instead of waiting forever (0 = never).
        max_consecutive_filtered: after this many groups in a row filtered for a policy (none
            kept), ``take(policy)`` raises ``AllFiltered`` with the reasons counted instead of
            generating forever (0 = never).
        partial_groups: 0 (default): a group is trained only once all its episodes ended.
            k >= 1: at the last ``take`` that may still train an in-flight group, its episodes
            still generating are cancelled (``filtered:straggler``) and the group is trained
            with the members already done if there are >= k of them (else it stays in flight
            and is cancelled as too stale). Trades the long tail for throughput, so it biases
            training toward shorter outputs — compare generated vs trained lengths.
        group_fn: ``async (seed, results)`` run once per group when its last episode ends,
            before ``filter_fn`` (e.g. a judge ranking the group); that episode keeps its
            concurrency slot meanwhile. Not run on groups trained partially.

    Each policy is assumed to ``take`` one batch per version (take, train, ``update_weights``),
    as the Trainer does: after a ``take`` at version v, a group first admitted at a version
    older than ``v + 1 - max_staleness`` can no longer be trained and is cancelled.

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
        partial_groups: int = 0,
        max_consecutive_filtered: int = 512,
        group_fn: GroupFn | None = None,
    ) -> None:
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if not 0 <= partial_groups <= group_size:
            raise ValueError(f"partial_groups must be in 0..group_size={group_size} (0 = off), "
                             f"got {partial_groups}")
        self.partial_groups = partial_groups
        self.group_fn = group_fn
        self.run_episode = run_episode
        self.controls = controls
        self.group_size = group_size
        self.filter_fn = filter_fn or _keep_all
        self.next_seed = seed
        self.max_consecutive_failures = max_consecutive_failures
        self.consecutive_failures = 0
        self.max_consecutive_filtered = max_consecutive_filtered
        self.consecutive_filtered: Counter[str] = Counter()  # per policy, in groups
        self.buffers: dict[str, list[Group]] = {p: [] for p in controls}
        self.ledger: dict[str, Counter[str]] = {p: Counter() for p in controls}
        self.errors: list[BaseException] = []
        self._changed = Signal()
        self._tasks: set[asyncio.Task[None]] = set()
        self._groups: dict[int, GroupRun] = {}  # admitted, not yet ended
        self._open: GroupRun | None = None  # the group whose members are being admitted
        self._taken: dict[str, int] = {p: -1 for p in controls}  # version of the last take
        self._wanting: dict[str, int] = {}  # policies waiting in take/wait_ready: batch size
        self._stopped = False
        self.cancel_stale_in_flight = True  # False: let doomed groups finish (then drop them)
        # data cursor: seeds admitted but not yet trained/filtered/failed for some policy
        self.pending: dict[int, set[str]] = {}
        self.skip: set[int] = set()  # seeds past the cursor already resolved (after a resume)

    # ---- admission ------------------------------------------------------------------------

    def can_admit(self) -> bool:
        """Every trainable policy has room for one more episode."""
        return all(c.capacity() >= 1 for c in self.controls.values())

    async def run(self) -> None:
        """Admit episodes until ``stop``; cancel-safe."""
        self._stopped = False
        while not self._stopped:
            await self._changed.wait_for(lambda: self._stopped or self.can_admit())
            while not self._stopped and self.can_admit():
                group = self._open
                if group is None or group.fully_admitted:
                    group = self._open = self._new_group()
                member = group.admitted
                group.admitted += 1
                for c in self.controls.values():
                    c.admit(1)
                task = asyncio.create_task(self._run_member(group, member))
                group.tasks[member] = task
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            await asyncio.sleep(0)  # let the new episodes start

    def _new_group(self) -> GroupRun:
        while self.next_seed in self.skip:
            self.skip.discard(self.next_seed)
            self.next_seed += 1
        group = GroupRun(self.next_seed, self.group_size,
                         {p: c.version for p, c in self.controls.items()})
        self.next_seed += 1
        self.pending[group.seed] = set(self.controls)
        self._groups[group.seed] = group
        return group

    async def _run_member(self, group: GroupRun, member: int) -> None:
        result: dict[str, list[Sample]] | BaseException
        try:
            result = await self.run_episode(group.seed, member)
            self.consecutive_failures = 0
        except asyncio.CancelledError as e:
            if member in group.tasks:  # cancelled from outside: a failed episode
                self._member_done(group, member, e)
            raise
        except Exception as e:  # recorded, counted; take() raises after too many
            log.warning("episode %d of seed %d failed: %r", member, group.seed, e)
            self.errors.append(e)
            del self.errors[:-100]  # keep the latest ones
            self.consecutive_failures += 1
            result = e
        except BaseException as e:  # not an Exception (a test's failure, SystemExit): an
            # unaccounted member would leave its group, and a take() waiting on it, hanging
            log.error("episode %d of seed %d raised %r", member, group.seed, e)
            self.errors.append(e)
            del self.errors[:-100]
            if member in group.tasks:
                self._member_done(group, member, e)
            raise
        if self.group_fn is not None and member in group.tasks and group.done == group.size - 1:
            try:  # the group's last episode: it stays "running" while the group fn works
                result = await self._apply_group_fn(group, member, result)
            except asyncio.CancelledError as e:
                if member in group.tasks:
                    self._member_done(group, member, e)
                raise
        if member in group.tasks:  # else its group was cancelled and already accounted
            self._member_done(group, member, result)

    async def _apply_group_fn(self, group: GroupRun, member: int, result: Any) -> Any:
        """Run ``group_fn`` on the finished group; when it raises, every finished episode of
        the group becomes failed with its exception (the return is ``member``'s result)."""
        assert self.group_fn is not None
        results = list(group.results)
        results[member] = result
        try:
            await self.group_fn(group.seed, results)
            return result
        except Exception as e:
            log.warning("group function failed for seed %d: %r", group.seed, e)
            self.errors.append(e)
            del self.errors[:-100]
            ok = [i for i, r in enumerate(results) if r is not None
                  and not isinstance(r, BaseException)]
            self.consecutive_failures += len(ok)
            for i in ok:
                if i != member:
                    group.results[i] = e
            return e if member in ok else result

    def _member_done(self, group: GroupRun, member: int, result: Any) -> None:
        del group.tasks[member]
        for control in self.controls.values():
            control.release(1)  # its concurrency slot is free now
        group.results[member] = result
        group.done += 1
        if group.finished:
            self._end_group(group)
        self._changed.notify()

    def _end_group(self, group: GroupRun) -> None:
        del self._groups[group.seed]
        seed = group.seed
        ok = [r for r in group.results if r is not None and not isinstance(r, BaseException)]
        num_failed = sum(isinstance(r, BaseException) for r in group.results)
        for policy, control in self.controls.items():
            if num_failed:
                control.finish("failed", num_failed, released=True)
                self.ledger[policy]["failed"] += num_failed
            if not ok:
                self._resolve(seed, policy)
                continue
            samples = [s for r in ok for s in r.get(policy, [])]
            kept, dropped = self.filter_fn(policy, samples) if samples else ([], {"no_samples": 1})
            if kept:
                self.consecutive_filtered[policy] = 0
                control.finish("accepted", len(ok), released=True)
                versions = [v for s in kept for v in s.versions if v >= 0]
                self.buffers[policy].append(
                    Group(seed, policy, kept, len(ok), min([*versions, group.versions[policy]]))
                )
            else:
                reason = next(iter(dropped), "empty")
                self.consecutive_filtered[policy] += 1
                control.finish("filtered", len(ok), released=True)
                self.ledger[policy][f"filtered:{reason}"] += len(ok)
                self._resolve(seed, policy)

    def _cancel_group(self, group: GroupRun, outcome: Outcome, reason: str) -> None:
        """End an unfinished group now: its generating and waiting episodes become ``reason``."""
        running = len(group.tasks)
        for policy, control in self.controls.items():
            control.finish(outcome, running)
            control.finish(outcome, group.done, released=True)
            self.ledger[policy][reason] += running + group.done
        for task in group.tasks.values():
            task.cancel()
        group.tasks.clear()
        del self._groups[group.seed]
        if self._open is group:
            self._open = None  # its members not yet admitted never will be
        self._changed.notify()

    def _truncate_last_chance(self) -> None:
        """Train in-flight groups the coming step is the last to accept without their stragglers
        (``partial_groups``)."""
        for group in list(self._groups.values()):
            if not all(group.versions[p] + c.max_staleness <= self._next_train_version(p)
                       for p, c in self.controls.items()):
                continue
            done_ok = sum(r is not None and not isinstance(r, BaseException) for r in group.results)
            if done_ok < self.partial_groups:
                continue
            running = len(group.tasks)
            for policy, control in self.controls.items():
                control.finish("filtered", running)
                self.ledger[policy]["filtered:straggler"] += running
            for task in group.tasks.values():
                task.cancel()
            group.tasks.clear()
            if self._open is group:
                self._open = None
            self._end_group(group)
            self._changed.notify()

    def _next_train_version(self, policy: str) -> int:
        version = self.controls[policy].version
        return version + 1 if self._taken[policy] >= version else version

    def _cancel_doomed(self) -> None:
        """Cancel in-flight groups too stale for every policy's next training step."""
        if not self.cancel_stale_in_flight:
            return
        for group in list(self._groups.values()):
            if all(group.versions[p] + c.max_staleness < self._next_train_version(p)
                   for p, c in self.controls.items()):
                self._cancel_group(group, "filtered", "filtered:too_stale")
                for policy in self.controls:
                    self._resolve(group.seed, policy)

    # ---- consumer side --------------------------------------------------------------------

    def buffered(self, policy: str) -> int:
        """Episodes waiting in ``policy``'s buffer."""
        return sum(g.num_episodes for g in self.buffers[policy])

    async def take(self, policy: str, num_episodes: int) -> list[Group]:
        """Wait for and remove the oldest groups holding >= ``num_episodes`` episodes.

        Fewer (but >= 1) are returned only when the batch cannot fill before a weight update:
        nothing is generating and the staleness budget admits nothing (e.g. synchronous
        training after episodes failed, so whole groups cannot add up to the batch). The
        episodes taken are reported to the policy's ``StalenessControl.consume``.

        Groups whose ``min_version`` (oldest admission or token version) is more than the
        policy's ``max_staleness`` versions behind are dropped as ``filtered:too_stale``, so no
        sample is ever trained staler than that. This happens to long-tail stragglers (a group
        whose slowest member generates across more than ``max_staleness`` train steps) and
        after a ``max_staleness`` lowered on resume. After taking, groups (in flight or
        buffered) that the next version could no longer train are dropped at once.

        Raises:
            RolloutFailed: ``max_consecutive_failures`` episodes failed in a row.
            Deadlocked: the batch can never fill (nothing of ``policy`` buffered or running,
                nothing admissible, no other policy about to update).
        """
        self._wanting[policy] = num_episodes
        try:
            await self._changed.wait_for(lambda: self.ready(policy, num_episodes))
        finally:
            del self._wanting[policy]
        out: list[Group] = []
        self.buffers[policy].sort(key=lambda g: g.min_version)  # oldest data first (stable)
        while self.buffers[policy] and sum(g.num_episodes for g in out) < num_episodes:
            out.append(self.buffers[policy].pop(0))
            self._resolve(out[-1].seed, policy)
        taken = sum(g.num_episodes for g in out)
        self.ledger[policy]["trained"] += taken
        self.controls[policy].consume(taken)
        self._taken[policy] = self.controls[policy].version
        self._drop_stale(policy, self._next_train_version(policy))
        self._cancel_doomed()
        return out

    def ready(self, policy: str, num_episodes: int) -> bool:
        """Whether ``take(policy, num_episodes)`` would return now, without waiting.

        Drops ``policy``'s groups that became too stale on the way (as ``take`` does).

        Raises:
            RolloutFailed: as ``take``.
        """
        self._check_failures()
        self._check_filtered(policy)
        self._drop_stale(policy)
        if self.partial_groups:
            self._truncate_last_chance()
        have = self.buffered(policy)
        if have >= num_episodes:
            return True
        if not self._stalled(policy):
            return False
        if have > 0:
            return True  # a partial batch: it cannot fill before a weight update
        if any(self.buffered(p) for p in self._wanting if p != policy):
            return False  # that policy takes its partial batch first, then updates
        if self._taken[policy] >= self.controls[policy].version:
            return False  # its own update is still to come (a take before update_weights)
        counts = {p: {k: getattr(c, k) for k in ("version", "accepted", "running")}
                      | {"buffered": self.buffered(p)} for p, c in self.controls.items()}
        raise Deadlocked(
            f"policy {policy!r} waits for a batch but no episode can be admitted before a "
            f"weight update and none of its episodes is buffered or running ({counts}); "
            "another policy's staleness budget is full. Typical cause: a role that acts in "
            "few episodes under clock='lockstep'; use clock='independent' or raise the "
            "other policies' max_staleness")

    async def wait_ready(self, wants: dict[str, int]) -> list[str]:
        """Wait until ``take(p, wants[p])`` would return at once for at least one policy ``p``
        of ``wants``; returns every such policy, sorted. Cancel-safe (it takes nothing).

        Raises:
            RolloutFailed: as ``take``.
        """
        self._wanting.update(wants)
        try:
            await self._changed.wait_for(lambda: any(self.ready(p, n) for p, n in wants.items()))
            return sorted(p for p, n in wants.items() if self.ready(p, n))
        finally:
            for p in wants:
                self._wanting.pop(p, None)

    def _stalled(self, policy: str) -> bool:
        """Nothing generates and nothing can be admitted before a weight update, and no other
        policy is about to free admission room: none has taken a batch whose update is still
        to come, and none waiting to take has its whole batch buffered (it takes at once).
        """
        updating = any(self._taken[p] >= c.version for p, c in self.controls.items()
                       if p != policy)
        about_to = any(self.buffered(p) >= n for p, n in self._wanting.items() if p != policy)
        return (not updating and not about_to and not self.can_admit()
                and all(c.running == 0 for c in self.controls.values()))

    def _check_filtered(self, policy: str) -> None:
        limit, n = self.max_consecutive_filtered, self.consecutive_filtered[policy]
        if limit and n >= limit:
            reasons = {k: v for k, v in self.ledger[policy].items() if k.startswith("filtered:")}
            raise AllFiltered(
                f"the last {n} groups were all filtered for policy {policy!r} (episodes so far: "
                f"{reasons}); its batch cannot fill. If the reason is zero reward variance the "
                "task is solved or unsolvable at this group size: stop, make the task harder or "
                "easier, or use an algorithm that keeps such groups (e.g. GRPO instead of DAPO)")

    def _check_failures(self) -> None:
        limit = self.max_consecutive_failures
        if limit and self.consecutive_failures >= limit:
            raise RolloutFailed(
                f"{self.consecutive_failures} episodes failed in a row; the last error: "
                f"{self.errors[-1]!r}. Fix the env/agent/engine error above and restart"
            ) from self.errors[-1]

    def _drop_stale(self, policy: str, version: int | None = None) -> None:
        """Drop buffered groups older than ``max_staleness`` at ``version`` (default: now)."""
        c = self.controls[policy]
        version = c.version if version is None else version
        fresh = [g for g in self.buffers[policy] if version - g.min_version <= c.max_staleness]
        for g in self.buffers[policy]:
            if g not in fresh:  # it was accepted; now it is filtered, and its slot is free
                self.ledger[policy]["filtered:too_stale"] += g.num_episodes
                c.accepted -= g.num_episodes
                c.filtered += g.num_episodes
                self._resolve(g.seed, policy)
        if len(fresh) != len(self.buffers[policy]):
            self.buffers[policy] = fresh
            self._changed.notify()

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
            self._cancel_doomed()
            self._changed.notify()

    def _resolve(self, seed: int, policy: str) -> None:
        left = self.pending.get(seed)
        if left is not None:
            left.discard(policy)
            if not left:
                del self.pending[seed]

    def unresolved(self, policy: str) -> int:
        """``policy``'s episodes without an outcome yet: generating, waiting for their group,
        or buffered (accepted, not yet taken)."""
        c = self.controls[policy]
        return c.running + c.waiting + self.buffered(policy)

    def state_dict(self) -> ControllerState:
        """The data cursor (the first unresolved seed and the resolved seeds after it), the
        outcome ledger, the staleness counters and the episodes still unresolved.

        Seeds admitted but not yet trained (in flight or buffered) are *not* resolved, so a
        run resumed from this state plays them again: no batch is lost or trained twice.
        """
        cursor = min([*self.pending, self.next_seed])
        done = sorted(s for s in range(cursor, self.next_seed) if s not in self.pending)
        return {"cursor": cursor, "done": done,
                "ledger": {p: dict(c) for p, c in self.ledger.items()},
                "controls": {p: c.state_dict() for p, c in self.controls.items()},
                "unresolved": {p: self.unresolved(p) for p in self.controls}}

    def load_state_dict(self, state: ControllerState) -> None:
        """Restore the cursor, outcome ledger and rebased staleness counters; nothing is in
        flight afterwards.

        The episodes unresolved at save time are added to ``ledger[p]["cancelled_by_restart"]``
        (for states written before ``unresolved`` was saved: ``submitted`` minus the ledger's
        total), which keeps ``submitted == sum(ledger) + unresolved`` true after the resume.
        """
        self.next_seed = int(state["cursor"])
        self.skip = set(state["done"])
        self.pending.clear()
        self._groups.clear()
        self._open = None
        for p, counts in state.get("ledger", {}).items():
            if p in self.ledger:
                self.ledger[p] = Counter(counts)
        for p, cs in state.get("controls", {}).items():
            if p in self.controls:
                self.controls[p].load_state_dict(cs)
        saved = state.get("unresolved")
        for p in state.get("controls", {}):
            if p not in self.controls:
                continue
            lost = (int(saved.get(p, 0)) if saved is not None else
                    max(0, self.controls[p].submitted - sum(self.ledger[p].values())))
            if lost:
                self.ledger[p]["cancelled_by_restart"] += lost

    async def stop(self) -> None:
        """Stop admitting and cancel unfinished groups: their episodes (generating, or done and
        waiting for the group) count as ``failed:cancelled`` and their seeds are dropped from
        ``pending``; buffered groups stay buffered."""
        self._stopped = True
        for group in list(self._groups.values()):
            self._cancel_group(group, "failed", "failed:cancelled")
            self.pending.pop(group.seed, None)  # never trained: a resumed run plays it again
        self._open = None
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._changed.notify()

    def counts(self) -> dict[str, dict[str, int]]:
        """Per policy: version/submitted/running/waiting/accepted/filtered/failed counters,
        ``outcome/<name>`` ledger entries and ``buffered``."""
        return ledger_counts(self.controls, self.ledger, self.buffered)


def ledger_counts(controls: dict[str, StalenessControl], ledger: dict[str, Counter[str]],
                  buffered: Callable[[str], int]) -> dict[str, dict[str, int]]:
    """Per policy: the staleness counters (version/submitted/running/waiting/accepted/
    filtered/failed), ``outcome/<name>`` ledger entries and ``buffered`` episodes — the one
    row format of every episode source's ``counts()``."""
    out: dict[str, dict[str, int]] = {}
    for p, c in controls.items():
        row = {k: int(getattr(c, k)) for k in
               ("version", "submitted", "running", "waiting", "accepted", "filtered", "failed")}
        row.update({f"outcome/{k}": v for k, v in ledger[p].items()})
        row["buffered"] = buffered(p)
        out[p] = row
    return out
