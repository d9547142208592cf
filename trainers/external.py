"""External episodes: sessions that agents outside the trainer open, play and end over HTTP
become grouped training samples (``ExternalEpisodes``), and ``ExternalTrainer`` trains on them.

One session is one episode of one policy. The client declares its group (``task_id``) and
role when opening it (``POST /rl/sessions {"policy", "task_id", "role"}``); once
``group_size`` sessions of one task id have ended they form a ``Group`` in the policy's buffer,
exactly like a group of env episodes, and the trainer takes, trains and pushes weights as in
env-driven training. Admission follows the same staleness rule (``StalenessControl``): a
policy without capacity answers the opening request with 429 and ``Retry-After``.

Ledger, per policy, at any moment::

    opened == trained + filtered:* + failed:* + abandoned + unresolved(policy)

``failed:unrewarded`` is a session ended without any reward (e.g. the agent raised),
``failed:no_samples`` one with no recorded turn, ``failed:samples_error`` one the
tokenization contract could not turn into samples (logged); ``abandoned`` counts sessions the
gateway expired (idle longer than ``session_idle_timeout_s``: the agent vanished without
ending them) and what was still open, waiting for its group or buffered when the source
stopped (``unresolved`` is then 0).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from areal_agents.errors import ConfigError
from areal_agents.gateway.sessions import Session
from areal_agents.rollout.controller import FilterFn, ledger_counts
from areal_agents.rollout.groups import Group, Signal
from areal_agents.rollout.staleness import StalenessControl
from areal_agents.samples import Sample

from .checkpointing import TrainerState
from .clocks import control_of
from .episodes import assign_turn_rewards
from .trainer import Trainer

__all__ = ["ExternalEpisodes", "ExternalTrainer", "session_samples"]

log = logging.getLogger(__name__)


@dataclass
class _OpenGroup:
    """The ended sessions of one task id, waiting for the rest of the group."""

    index: int
    task_id: str
    samples: list[Sample] = field(default_factory=list)
    num_ok: int = 0
    num_failed: int = 0
    min_version: int | None = None


def session_samples(session: Session, group: str) -> list[Sample]:
    """The samples of an ended session, its role as ``agent`` and ``group`` set.

    Rewards posted for a turn (``{"reward", "turn"}`` / ``"completion_id"``) become
    ``Sample.token_rewards`` on that turn's last generated token (PPO's GAE reads them); the
    rest of the session's reward lands on the last generated token, so a lone sample's
    ``token_rewards`` sum to its ``reward`` (``assign_turn_rewards``, as for env steps).
    Without per-turn rewards ``token_rewards`` stays None.

    Raises:
        ValueError: the tokenization contract refused the session's turns.
    """
    samples, _ = session.to_samples(agent=str(session.metadata.get("role", "")), group=group)
    if session.turn_rewards and samples:
        turns = sorted(session.turn_rewards)
        assign_turn_rewards(
            samples, [len(t.prompt_ids) + len(t.completion_ids) for t in session.turns],
            action_turns=turns, rewards=[session.turn_rewards[t] for t in turns],
            reward_actions=list(range(len(turns))),
            extra=session.reward - sum(session.turn_rewards.values()))
    return samples


class ExternalEpisodes:
    """The rollout source of a trainer whose episodes are sessions of external agents.

    It offers the part of ``RolloutController``'s interface the ``Trainer`` uses (``take``,
    ``update_weights``, ``controls``, ``counts``, ``pending``, ``run``, ``stop``) and two
    gateway hooks: ``admit`` (``Gateway.session_gate``) and ``on_session_end``
    (``Gateway.session_sink``).

    Args:
        controls: one ``StalenessControl`` per trainable policy (units: sessions).
        group_size: sessions per task id (>= 1).
        filter_fn: per-group filter, as the controller's.
        retry_after: seconds a refused client is told to wait (``Retry-After``).
        first_index: the index (``Group.seed``) of the first group; later ones count up (a
            mixed run numbers them apart from the env task seeds).

    Example:
        >>> src = ExternalEpisodes({"p": StalenessControl(2, 0, 8)}, group_size=2)
        >>> src.admit("p", {}), src.admit("p", {}), src.admit("p", {})
        (None, None, 1.0)
    """

    def __init__(self, controls: dict[str, StalenessControl], *, group_size: int,
                 filter_fn: FilterFn | None = None, retry_after: float = 1.0,
                 first_index: int = 0) -> None:
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        self.controls = controls
        self.group_size = group_size
        self.filter_fn = filter_fn or (lambda policy, samples: (samples, {}))
        self.retry_after = retry_after
        self.buffers: dict[str, list[Group]] = {p: [] for p in controls}
        self.ledger: dict[str, Counter[str]] = {p: Counter() for p in controls}
        self.pending: dict[int, set[str]] = {}  # group index -> policies (Trainer reads keys)
        self._open: dict[tuple[str, str], _OpenGroup] = {}  # (policy, task id) -> group
        self._next_index = first_index
        self._changed = Signal()
        self._stopped = False

    # ---- gateway hooks --------------------------------------------------------------------

    def admit(self, policy: str, metadata: dict[str, Any]) -> float | None:
        """Admit one session of ``policy``: None if admitted, else the seconds to wait.

        Policies that are not trained here are always admitted (and never counted).
        """
        control = self.controls.get(policy)
        if control is None:
            return None
        if self._stopped or control.capacity() < 1:
            return self.retry_after
        control.admit(1)
        metadata["admitted_version"] = control.version
        return None

    def on_session_end(self, session: Session) -> None:
        """A session ended: its samples join its task id's group (or it is counted failed)."""
        control = self.controls.get(session.policy)
        if control is None or self._stopped or "admitted_version" not in session.metadata:
            return  # not trained here, or already counted abandoned by ``stop``
        control.release(1)
        task_id = str(session.metadata.get("task_id", session.session_id))
        key = (session.policy, task_id)
        group = self._open.get(key)
        if group is None:
            group = self._open[key] = _OpenGroup(self._next_index, task_id)
            self.pending[group.index] = {session.policy}
            self._next_index += 1
        admitted = int(session.metadata["admitted_version"])
        group.min_version = min(admitted, group.min_version if group.min_version is not None
                                else admitted)
        samples: list[Sample] = []
        reason = "failed:unrewarded" if not session.rewards else "failed:no_samples"
        if session.metadata.get("expired"):
            reason = "abandoned"  # idle past the gateway's timeout: never trained on
        elif session.rewards:
            try:
                samples = session_samples(session, task_id)
            except Exception:  # counted; the client's `end` still succeeds
                log.exception("session %s could not become samples", session.session_id)
                reason = "failed:samples_error"
        if samples:
            group.samples.extend(samples)
            group.num_ok += 1
        else:
            self.ledger[session.policy][reason] += 1
            control.finish("failed", 1, released=True)
            group.num_failed += 1
        if group.num_ok + group.num_failed >= self.group_size:
            del self._open[key]
            self._end_group(session.policy, group)
        self._changed.notify()

    def _end_group(self, policy: str, group: _OpenGroup) -> None:
        control = self.controls[policy]
        kept, dropped = (self.filter_fn(policy, group.samples) if group.samples
                         else ([], {"no_samples": 1}))
        if not group.num_ok:
            self.pending.pop(group.index, None)
            return
        if not kept:
            reason = next(iter(dropped), "empty")
            control.finish("filtered", group.num_ok, released=True)
            self.ledger[policy][f"filtered:{reason}"] += group.num_ok
            self.pending.pop(group.index, None)
            return
        control.finish("accepted", group.num_ok, released=True)
        versions = [v for s in kept for v in s.versions if v >= 0]
        self.buffers[policy].append(Group(
            group.index, policy, kept, group.num_ok,
            min([*versions, group.min_version if group.min_version is not None else 0]),
            meta={"task_id": group.task_id}))

    # ---- trainer side ---------------------------------------------------------------------

    async def run(self) -> None:
        """Nothing to drive: clients open sessions. Present for the Trainer's loop."""
        self._stopped = False

    def buffered(self, policy: str) -> int:
        """Sessions waiting in ``policy``'s buffer."""
        return sum(g.num_episodes for g in self.buffers[policy])

    async def take(self, policy: str, num_episodes: int) -> list[Group]:
        """Wait for and remove the oldest groups holding >= ``num_episodes`` sessions; groups
        more than ``max_staleness`` versions old are dropped as ``filtered:too_stale``."""

        def ready() -> bool:
            self._drop_stale(policy)
            return self.buffered(policy) >= num_episodes

        await self._changed.wait_for(ready)
        out: list[Group] = []
        self.buffers[policy].sort(key=lambda g: g.min_version)
        while self.buffers[policy] and sum(g.num_episodes for g in out) < num_episodes:
            out.append(self.buffers[policy].pop(0))
            self.pending.pop(out[-1].seed, None)
        taken = sum(g.num_episodes for g in out)
        self.ledger[policy]["trained"] += taken
        self.controls[policy].consume(taken)
        return out

    def _drop_stale(self, policy: str) -> None:
        c = self.controls[policy]
        fresh = [g for g in self.buffers[policy] if c.version - g.min_version <= c.max_staleness]
        for g in self.buffers[policy]:
            if g not in fresh:
                self.ledger[policy]["filtered:too_stale"] += g.num_episodes
                c.accepted -= g.num_episodes
                c.filtered += g.num_episodes
                self.pending.pop(g.seed, None)
        self.buffers[policy] = fresh

    async def update_weights(self, policy: str, apply: Callable[[], Awaitable[None]],
                             new_version: int) -> None:
        """Pause admission (opening answers 429), ``await apply()``, bump the version, resume;
        sessions already open keep going (their tokens carry their versions)."""
        try:
            with self.controls[policy].updating(new_version):
                await apply()
        finally:
            self._changed.notify()

    def unresolved(self, policy: str) -> int:
        """Sessions open, waiting for their group, or buffered."""
        c = self.controls[policy]
        return c.running + c.waiting + self.buffered(policy)

    async def stop(self) -> None:
        """Refuse new sessions and count everything unresolved as ``abandoned``."""
        self._stopped = True
        for policy, c in self.controls.items():
            n = self.unresolved(policy)
            if n:
                self.ledger[policy]["abandoned"] += n
            c.failed += c.running + c.waiting
            c.running = c.waiting = 0
            self.buffers[policy].clear()
        self._open.clear()
        self.pending.clear()
        self._changed.notify()

    def counts(self) -> dict[str, dict[str, int]]:
        """Per policy: the staleness counters, ``outcome/<name>`` ledger entries, ``buffered``."""
        return ledger_counts(self.controls, self.ledger, self.buffered)

    def state_dict(self) -> dict[str, Any]:
        """The ledger and counters (external sessions cannot be replayed after a restart)."""
        return {"ledger": {p: dict(c) for p, c in self.ledger.items()},
                "controls": {p: c.state_dict() for p, c in self.controls.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the ledger and rebase the counters to the saved versions (a resume).

        Sessions that were open, waiting for their group or buffered when the state was saved
        died with the run that saved it: they are counted ``abandoned``, so the ledger still
        adds up (``opened == trained + filtered:* + failed:* + abandoned``), and capacity is
        what it was right after the saved version's update.
        """
        for p, counts in state.get("ledger", {}).items():
            if p in self.ledger:
                self.ledger[p] = Counter(counts)
        for p, cs in state.get("controls", {}).items():
            if p in self.controls:
                self.controls[p].load_state_dict(cs)
        for p, c in self.controls.items():
            lost = c.submitted - sum(self.ledger[p].values())
            if lost > 0:
                self.ledger[p]["abandoned"] += lost
                c.failed += lost
            c.rebase(c.version, trained_episodes=self.ledger[p]["trained"])


class ExternalTrainer(Trainer):
    """A ``Trainer`` whose training episodes are sessions opened by external agents.

    Same arguments as ``Trainer`` (``env`` and ``policy_map`` still name the policies and are
    used by ``evaluate``), plus ``admin_key`` (the key that opens sessions; None: random, read
    ``trainer.gateway.admin_key``), ``retry_after`` and ``session_idle_timeout_s`` (a session
    no request used for that long is ended by the gateway and counted ``abandoned``; None:
    never). Serve ``trainer.gateway.app`` (e.g.
    with uvicorn, in the same event loop as ``afit``) so agents can reach it. ``resume=True``
    continues from ``run_dir``'s latest checkpoint (``load_state_dict``).

    ``external_batch_size`` makes a mixed run (``trainers/mixed.py``): that many episodes of
    each trainable policy's batch (an int, or ``{policy: n}``; a policy left out trains on
    env episodes only) are external sessions, the rest env episodes of ``env``, played as
    in ``Trainer``. None (default): every episode is an external session.
    """

    def __init__(self, *, admin_key: str | None = None, retry_after: float = 1.0,
                 session_idle_timeout_s: float | None = None,
                 external_batch_size: int | dict[str, int] | None = None,
                 **kwargs: Any) -> None:
        if kwargs.get("clock", "lockstep") != "lockstep":
            raise ConfigError("clock='independent' is not supported with external episodes; "
                              "use clock='lockstep' (Policy.train_every still sets 1:k ratios)")
        super().__init__(**kwargs)
        self.admin_key, self.retry_after = admin_key, retry_after
        self.session_idle_timeout_s = session_idle_timeout_s
        self.external_batch_size = external_batch_size
        self.external_parts()  # a bad split fails here, before anything is loaded

    async def setup(self) -> None:
        """``Trainer.setup`` (with ``resume``: from the latest checkpoint: weights, step,
        algorithm state, ledger), then sessions opened over HTTP feed the buffers."""
        if self.gateway is not None:
            return
        await super().setup()
        if self.admin_key:
            self.gateway.admin_key = self.admin_key
        source = self._external_source()
        self.gateway.session_gate = source.admit
        self.gateway.session_sink = source.on_session_end
        self.gateway.session_idle_timeout_s = self.session_idle_timeout_s

    def load_state_dict(self, state: TrainerState) -> None:
        """``Trainer.load_state_dict`` into the external source (a resumed ``serve --train``:
        sessions of the killed run are counted abandoned; agents open new ones)."""
        self._external_source()
        super().load_state_dict(state)

    def _external_source(self) -> ExternalEpisodes:
        """The ``ExternalEpisodes`` the gateway feeds. Built once: it replaces the env-driven
        controller ``Trainer.setup`` built, or with ``external_batch_size`` joins it in a
        ``MixedEpisodes`` (a resume loads its state into it before the gateway serves)."""
        from .mixed import EXTERNAL_FIRST_INDEX, MixedEpisodes  # mixed.py imports this module

        if isinstance(self.controller, MixedEpisodes):
            return self.controller.external
        if isinstance(self.controller, ExternalEpisodes):
            return self.controller
        parts = self.external_parts()
        controls = {p: control_of(self.policies[p], batch_size=self.batch_size,
                                  max_staleness=self.max_staleness,
                                  max_concurrent=self.max_concurrent)
                    for p in parts}
        for p, n in parts.items():
            controls[p].batch_size = n
        external = ExternalEpisodes(
            controls, group_size=self.group_size, filter_fn=self._filter,
            retry_after=self.retry_after,
            first_index=0 if self.external_batch_size is None else EXTERNAL_FIRST_INDEX)
        if self.external_batch_size is None:
            self.controller = external
            return external
        for p, n in parts.items():  # the env controller plays the rest of each batch
            self.controller.controls[p].batch_size -= n
        self.controller = MixedEpisodes(self.controller, external)
        return external

    def external_parts(self) -> dict[str, int]:
        """Per trainable policy with an external part: its sessions per train step.

        Raises:
            ConfigError: a part that is not a multiple of group_size below the policy's batch,
                or a policy that is not trainable.
        """
        total = {p: self.batch_size * self.policies[p].train_every for p in self.trainable}
        if self.external_batch_size is None:
            return total
        wanted = (dict(self.external_batch_size) if isinstance(self.external_batch_size, dict)
                  else dict.fromkeys(self.trainable, self.external_batch_size))
        unknown = sorted(set(wanted) - set(total))
        if unknown:
            raise ConfigError(f"external_batch_size names {unknown}, not trainable policies "
                              f"of this run ({sorted(total)})")
        for p, n in wanted.items():
            if not (0 < n < total[p] and n % self.group_size == 0):
                raise ConfigError(
                    f"external_batch_size of {p!r} must be a multiple of group_size "
                    f"({self.group_size}) in 1..{total[p] - 1} (its batch is {total[p]}: the "
                    f"rest are env episodes), got {n}; for external sessions only, leave "
                    "external_batch_size unset")
        return wanted
