"""Mixed runs: one trainer whose batches hold env episodes *and* sessions of external agents.

``MixedEpisodes`` joins the env-driven ``RolloutController`` and ``ExternalEpisodes`` behind
the one rollout-source interface the ``Trainer`` uses. Per trainable policy the batch is split
in two fixed parts: ``external`` episodes from sessions (grouped by their task id) and the
rest from env episodes (grouped by task seed). Each source keeps its own staleness control,
ledger and groups; a weight update pauses both, bumps both versions and resumes both, so the
policy's version is one number. A policy without an external part trains on env episodes
only (e.g. the other role of a two-policy env)::

    batch of policy p  =  env groups (controls[p].env.batch_size episodes)
                        + external groups (controls[p].external.batch_size sessions)

Ledgers stay per source (``ledgers["env"]``, ``ledgers["external"]``), each adding up on its
own; ``ledger`` is their per-policy sum.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from areal_agents.rollout.controller import RolloutController
from areal_agents.rollout.groups import Group
from areal_agents.rollout.staleness import StalenessControl

from .external import ExternalEpisodes

__all__ = ["EXTERNAL_FIRST_INDEX", "MixedControl", "MixedEpisodes"]

EXTERNAL_FIRST_INDEX = 1 << 40
"""External groups of a mixed run are numbered from here, apart from the env task seeds."""


@dataclass
class MixedControl:
    """What the trainer reads of one policy's control in a mixed run: one version, one batch.

    Attributes:
        env: the env controller's control of the policy.
        external: the external source's control (None: no external part).

    Example:
        >>> control = MixedControl(StalenessControl(8), StalenessControl(4))
        >>> control.batch_size, control.version
        (12, 0)
    """

    env: StalenessControl
    external: StalenessControl | None = None

    @property
    def version(self) -> int:
        """The policy's weight version (both sources hold the same)."""
        return self.env.version

    @property
    def batch_size(self) -> int:
        """Episodes per train step: the env part plus the external part."""
        return self.env.batch_size + (self.external.batch_size if self.external else 0)


class MixedEpisodes:
    """Env episodes and external sessions feeding one trainer (see the module docstring).

    Args:
        env: the env-driven controller (its controls' ``batch_size`` is the env part).
        external: the external source (its controls' ``batch_size`` is the external part;
            policies it has no control for train on env episodes only).

    Raises:
        ValueError: ``external`` has a policy the env controller does not train.
    """

    def __init__(self, env: RolloutController, external: ExternalEpisodes) -> None:
        unknown = sorted(set(external.controls) - set(env.controls))
        if unknown:
            raise ValueError(f"external policies {unknown} are not trained by the env "
                             f"controller (it trains {sorted(env.controls)})")
        self.env, self.external = env, external
        self.controls = {p: MixedControl(c, external.controls.get(p))
                         for p, c in env.controls.items()}

    @property
    def ledgers(self) -> dict[str, dict[str, Counter[str]]]:
        """Per source (``"env"``, ``"external"``), per policy: the outcome ledger."""
        return {"env": self.env.ledger, "external": self.external.ledger}

    @property
    def ledger(self) -> dict[str, Counter[str]]:
        """Per policy: both sources' ledgers summed."""
        return {p: self.env.ledger[p] + self.external.ledger.get(p, Counter())
                for p in self.controls}

    @property
    def pending(self) -> dict[int, set[str]]:
        """Unresolved groups of both sources (external ones numbered apart)."""
        return {**self.env.pending, **self.external.pending}

    async def run(self) -> None:
        """Admit env episodes until ``stop`` (external sessions are opened by their agents)."""
        await self.external.run()
        await self.env.run()

    async def take(self, policy: str, num_episodes: int) -> list[Group]:
        """Both parts of ``policy``'s batch (``num_episodes`` must be their sum): the env
        groups, then the external ones.

        Raises:
            ValueError: ``num_episodes`` is not ``controls[policy].batch_size``.
            RolloutFailed: as ``RolloutController.take`` (e.g. ``Deadlocked``); the external
                part's wait is cancelled first.
        """
        control = self.controls[policy]
        if num_episodes != control.batch_size:
            raise ValueError(f"a mixed batch of {policy!r} is {control.batch_size} episodes "
                             f"(env {control.env.batch_size} + external "
                             f"{control.batch_size - control.env.batch_size}), not "
                             f"{num_episodes}")
        if control.external is None:
            return await self.env.take(policy, control.env.batch_size)
        parts = [asyncio.ensure_future(self.env.take(policy, control.env.batch_size)),
                 asyncio.ensure_future(self.external.take(policy, control.external.batch_size))]
        try:
            env, ext = await asyncio.gather(*parts)
        except BaseException:  # the error as it is (e.g. Deadlocked), the other part cancelled
            for part in parts:
                part.cancel()
            await asyncio.gather(*parts, return_exceptions=True)
            raise
        return [*env, *ext]

    async def update_weights(self, policy: str, apply: Callable[[], Awaitable[None]],
                             new_version: int) -> None:
        """Pause both sources' admission, ``await apply()`` once, bump both versions, resume."""
        if self.controls[policy].external is None:
            await self.env.update_weights(policy, apply, new_version)
            return

        async def external() -> None:
            await self.external.update_weights(policy, apply, new_version)

        await self.env.update_weights(policy, external, new_version)

    def unresolved(self, policy: str) -> int:
        """Episodes and sessions of ``policy`` without an outcome yet, both sources."""
        ext = self.external.unresolved(policy) if policy in self.external.controls else 0
        return self.env.unresolved(policy) + ext

    async def stop(self) -> None:
        """Stop both sources (external sessions still unresolved count ``abandoned``)."""
        try:
            await self.env.stop()
        finally:
            await self.external.stop()

    def counts(self) -> dict[str, dict[str, int]]:
        """The env controller's rows, each with the external source's as ``external/<k>``."""
        rows = self.env.counts()
        for p, row in self.external.counts().items():
            rows[p].update({f"external/{k}": v for k, v in row.items()})
        return rows

    def state_dict(self) -> dict[str, Any]:
        """Both sources' states (``{"env": ..., "external": ...}``)."""
        return {"env": self.env.state_dict(), "external": self.external.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore both sources (a resumed mixed run)."""
        self.env.load_state_dict(state["env"])
        self.external.load_state_dict(state["external"])
