"""Replicas that die: dropping them from routing, restarting them, keeping their updates.

A replica whose engine raises ``EngineUnavailable`` (its server process is gone) is marked
dead in its policy's ``Router``: it takes no new requests and its sessions are routed afresh.
An engine that is ``Restartable`` with restarts left is restarted in the background and routed
to again once it is back; weight updates that arrive while it is dead are handed to it (it
keeps them and loads them on restart), so it comes back on the policy's current version.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from ..engines.base import WeightUpdate
from ..errors import EngineError
from .router import Router

log = logging.getLogger(__name__)

_RESTARTS: set[asyncio.Task[None]] = set()  # strong references to running restarts


@runtime_checkable
class Restartable(Protocol):
    """An engine that can relaunch its dead server (``RemoteEngine`` with a ``restart_limit``);
    while dead, ``update_weights`` keeps the weights for the restart."""

    restart_limit: int
    num_restarts: int
    version: int

    async def restart(self) -> None: ...

    async def pause(self) -> None: ...

    async def resume(self) -> None: ...

    async def update_weights(self, update: WeightUpdate) -> None: ...


def drop_replica(name: str, router: Router, index: int, error: BaseException, *,
                 paused: Callable[[], bool] = lambda: False) -> None:
    """Mark replica ``index`` of policy ``name`` dead (idempotent); restart it in the
    background when it is ``Restartable`` with restarts left (needs a running event loop).

    ``paused()`` says whether the policy's replicas are paused (a weight push in progress):
    a replica that comes back then is paused before it is routed to, and the push's resume
    resumes it with the others."""
    if index in router.dead:
        return
    log.warning("policy %r: dropping engine replica %d: %s", name, index, error)
    router.mark_dead(index)
    engine = router.engines[index]
    if isinstance(engine, Restartable) and engine.num_restarts < engine.restart_limit:
        task = asyncio.get_running_loop().create_task(
            _restart(name, router, index, engine, paused))
        _RESTARTS.add(task)
        task.add_done_callback(_RESTARTS.discard)


async def _restart(name: str, router: Router, index: int, engine: Restartable,
                   paused: Callable[[], bool]) -> None:
    try:
        await engine.restart()
        engine_paused = False
        while engine_paused != paused():  # a push may begin or end during each call
            engine_paused = paused()
            await (engine.pause() if engine_paused else engine.resume())
    except Exception as exc:
        log.error("policy %r: engine replica %d could not be restarted: %s", name, index, exc)
        return
    log.warning("policy %r: engine replica %d restarted at version %d", name, index,
                engine.version)
    router.revive(index)


async def keep_for_restart(name: str, index: int, engine: object, update: WeightUpdate) -> None:
    """Hand ``update`` to dead replica ``index`` if it can restart (it loads it then)."""
    if not isinstance(engine, Restartable) or not engine.restart_limit:
        return
    try:
        await engine.update_weights(update)
    except EngineError as exc:
        log.warning("policy %r: dead replica %d did not keep the update: %s", name, index, exc)
