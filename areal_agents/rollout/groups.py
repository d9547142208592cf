"""Groups of episodes: the finished ``Group`` handed to training, and the in-flight bookkeeping."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from areal_agents.samples import Sample


@dataclass
class Group:
    """The finished episodes of one task seed, for one policy.

    ``min_version`` is the group's age reference: the oldest of its episodes' admission
    versions and its samples' token versions (so ``version - min_version`` is the number of
    versions its oldest data lags behind at training time).
    """

    seed: int
    policy: str
    samples: list[Sample]
    num_episodes: int
    min_version: int = 0
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class GroupRun:
    """A task seed whose episodes are being admitted and generated.

    Attributes:
        seed: the task seed.
        size: episodes in the group.
        versions: per policy, the version when the group's first episode was admitted.
        results: per member, its samples by policy, an exception, or None (not done yet).
        tasks: the members still generating, by member index.
        admitted / done: members admitted so far / finished generating (ok or failed).
    """

    seed: int
    size: int
    versions: dict[str, int]
    results: list[Any] = field(default_factory=list)
    tasks: dict[int, asyncio.Task[None]] = field(default_factory=dict)
    admitted: int = 0
    done: int = 0

    def __post_init__(self) -> None:
        self.results = [None] * self.size

    @property
    def fully_admitted(self) -> bool:
        return self.admitted == self.size

    @property
    def finished(self) -> bool:
        return self.done == self.size


class Signal:
    """Wakes every waiter when the controller's state changes.

    There is no lock: the controller never awaits between checking and changing its state, so
    its bookkeeping stays synchronous (and therefore cancel-safe).
    """

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Return once ``predicate()`` is true (checked now and after every ``notify``)."""
        while not predicate():
            self._event.clear()
            await self._event.wait()
