"""``RayReplicaSet``: a policy's engine-server replicas, each inside a Ray actor.

Each replica is the same engine server as ``kind: server`` (``python -m
areal_agents.engines.service``, a ``ServerProcess`` that dies with its owner), started by a
small Ray actor on the node Ray placed it on and bound to that node's IP; the controller
reaches it with ``RemoteEngine.attach``. Killing the actor (or losing its node) ends the server.

Placement: the replicas of the initial set share one placement group of ``replicas`` bundles
with strategy ``SPREAD`` (one bundle per replica, on different nodes when there are); a replica
added later takes a bundle freed by a removed one, else a placement group of its own. A replica
starts from the saved model at version 0: ``Trainer.add_replica`` gives it the current weights
and version before it takes traffic.

A lost replica fails fast. A node that is gone (powered off, cut off the network) closes no
connection: a request in flight to its server, or a weight push's ``pause`` to it, would wait
for the engine's whole ``timeout_s`` (600 s by default) while the rollouts and the step wait
with it. So each replica's engine is a ``RayReplicaEngine``: its actor runs a ``watch`` call
that never returns while the actor lives, and once Ray reports the actor dead (``ray.kill``,
or its node lost: Ray's health check) every HTTP call of that engine, in flight or later,
raises ``EngineUnavailable`` at once. The gateway then drops the replica and answers 503, the
agents retry on a live replica, and a push skips it.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import sys
from pathlib import Path
from typing import Any

from areal_agents.engines.base import InferenceEngine
from areal_agents.engines.remote import RemoteEngine
from areal_agents.errors import EngineError, EngineUnavailable

__all__ = ["RayReplicaEngine", "RayReplicaSet"]


class _ReplicaServer:
    """Runs one engine server on this actor's node; ``stop`` (or the actor's death) ends it."""

    def __init__(self) -> None:
        self.server: Any = None

    async def start(self, argv: list[str], log_path: str, token: str, threads: int,
                    startup_timeout_s: float) -> str:
        import ray

        from areal_agents.engines.server_process import ServerProcess, free_port
        from areal_agents.engines.service import TOKEN_ENV

        host = ray.util.get_node_ip_address()
        port = free_port(host)
        env = {TOKEN_ENV: token, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        self.server = ServerProcess([*argv, "--host", host, "--port", str(port)], log_path,
                                    env=env, name="engine server (Ray replica)", grace_s=5.0)
        url = f"http://{host}:{port}"
        await self.server.wait_ready(f"{url}/health", timeout_s=startup_timeout_s,
                                     progress=lambda msg: None)
        return url

    def ping(self) -> bool:
        return self.server is not None and self.server.running

    async def watch(self) -> None:
        """Never returns: the caller's reference fails when this actor dies."""
        await asyncio.Event().wait()

    def pid(self) -> int:
        return int(self.server.pid)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


class RayReplicaEngine(RemoteEngine):
    """A ``RemoteEngine`` whose HTTP calls fail with ``EngineUnavailable`` as soon as its Ray
    actor is reported dead (module docstring), instead of waiting for ``timeout_s``.

    ``watch(ref)`` arms it with the actor's ``watch`` reference; until then it is a plain
    ``RemoteEngine``.
    """

    actor_lost: asyncio.Future[Any] | None = None

    def watch(self, ref: Any) -> None:
        """Fail every call once ``ref`` (the actor's never-ending ``watch``) ends."""
        lost = asyncio.ensure_future(_ended(ref))
        self.actor_lost = lost

    async def close(self) -> None:
        """Stop watching the actor, then close as ``RemoteEngine`` does. Idempotent."""
        if self.actor_lost is not None and not self.actor_lost.done():
            self.actor_lost.cancel()
        await super().close()

    async def _send(self, method: str, path: str, body: Any, params: dict[str, str] | None,
                    what: str, retry: bool) -> Any:
        lost = self.actor_lost
        if lost is None:
            return await super()._send(method, path, body, params, what, retry)
        if not lost.done():
            call = asyncio.ensure_future(super()._send(method, path, body, params, what, retry))
            try:
                await asyncio.wait({call, lost}, return_when=asyncio.FIRST_COMPLETED)
            except BaseException:  # cancelled: the call with it
                call.cancel()
                raise
            if call.done():
                return call.result()
            call.cancel()  # its connection is closed as it ends; nothing waits for it
            call.add_done_callback(lambda c: c.cancelled() or c.exception())
        why = "closed" if lost.cancelled() else lost.result()
        raise EngineUnavailable(f"the {self.server_name} at {self.url} is lost: its Ray actor "
                                f"died ({why}); {what} was not answered")


async def _ended(ref: Any) -> str:
    """Wait until the actor behind ``ref`` dies; returns why (never raises)."""
    try:
        await ref
    except Exception as exc:  # RayActorError: killed, or its node lost
        return type(exc).__name__
    return "its watch returned"


class RayReplicaSet:
    """Starts and stops one policy's engine-server replicas as Ray actors.

    Args:
        model_dir: the model and tokenizer (``save_pretrained``), on a path every node reads.
        bundle: the resources of one replica (``{"CPU": c}``; ``{"GPU": 1}`` reserved for
            engines that use it).
        transport, bucket_bytes, timeout_s: how the controller's ``RemoteEngine`` moves
            weights and waits (``InferencePlacement``'s).
        threads, max_batch_size, startup_timeout_s, python: the server's
            (``server_args``; ``python``: the interpreter on the nodes).
        placement_group: the initial replicas' ``SPREAD`` group (its bundles are the first free
            slots), or None.

    Example:
        >>> replicas = RayReplicaSet("runs/x/serving/listener", {"CPU": 1})  # doctest: +SKIP
        >>> engine = await replicas.start()  # doctest: +SKIP
    """

    def __init__(self, model_dir: str | Path, bundle: dict[str, float], *,
                 transport: str = "shm", bucket_bytes: int | None = None,
                 timeout_s: float = 600.0, threads: int = 1, max_batch_size: int = 32,
                 startup_timeout_s: float = 300.0, python: str | None = None,
                 placement_group: Any = None, num_bundles: int = 0) -> None:
        self.model_dir, self.bundle = Path(model_dir), dict(bundle)
        self.transport, self.bucket_bytes, self.timeout_s = transport, bucket_bytes, timeout_s
        self.threads, self.max_batch_size = threads, max_batch_size
        self.startup_timeout_s, self.python = startup_timeout_s, python or sys.executable
        self._free: list[tuple[Any, int]] = [(placement_group, i) for i in range(num_bundles)]
        self._own_groups: list[Any] = []  # placement groups made for late replicas
        self._actors: dict[int, tuple[Any, tuple[Any, int]]] = {}  # id(engine) -> actor, slot
        self.num_started = 0

    def _slot(self) -> tuple[Any, int]:
        if self._free:
            return self._free.pop(0)
        from ray.util.placement_group import placement_group

        group = placement_group([self.bundle], strategy="PACK")
        self._own_groups.append(group)
        return group, 0

    async def start(self) -> InferenceEngine:
        """A new replica on a free slot (waits for Ray to find the resources), attached.

        Raises:
            EngineError: the server exited during start-up (with its log tail), Ray found
                no resources for it within ``startup_timeout_s``, or its actor did not
                answer within twice that.
            EngineTimeout: not healthy within ``startup_timeout_s``.
        """
        import ray

        from .ray_actors import actor_options

        group, index = slot = self._slot()
        try:
            await asyncio.to_thread(ray.get, group.ready(), timeout=self.startup_timeout_s)
        except ray.exceptions.GetTimeoutError:
            self._free.append(slot)
            raise EngineError(f"Ray found no free {self.bundle} for a new replica within "
                              f"{self.startup_timeout_s} s; add nodes or lower max_replicas or "
                              "cpus_per_worker") from None
        actor = ray.remote(_ReplicaServer).options(
            **actor_options(self.bundle, group, index)).remote()
        token = secrets.token_urlsafe(32)
        self.num_started += 1
        log_path = self.model_dir / "logs" / f"ray_replica{self.num_started}.log"
        argv = [self.python, "-m", "areal_agents.engines.service", "--model",
                str(self.model_dir), "--threads", str(self.threads),
                "--max-batch-size", str(self.max_batch_size)]
        try:
            # bounded: an actor Ray never schedules (its bundle still held) must not hang the
            # caller; the server's own start-up is bounded by startup_timeout_s inside
            url = await asyncio.wait_for(
                actor.start.remote(argv, str(log_path), token, self.threads,
                                   self.startup_timeout_s), 2 * self.startup_timeout_s)
            engine = await RayReplicaEngine.attach(
                url, token=token, timeout_s=self.timeout_s,
                transport=self.transport,  # type: ignore[arg-type]
                bucket_bytes=self.bucket_bytes)
            engine.watch(actor.watch.remote())
        except TimeoutError:
            ray.kill(actor)
            self._free.append(slot)
            raise EngineError(f"the Ray replica actor did not start its engine server within "
                              f"{2 * self.startup_timeout_s:.0f} s (log: {log_path})") from None
        except BaseException:
            ray.kill(actor)
            self._free.append(slot)
            raise
        self._actors[id(engine)] = (actor, slot)
        return engine

    async def alive(self, engine: InferenceEngine) -> bool:
        """Whether ``engine``'s actor and server are up (False once its node is gone)."""
        import ray

        entry = self._actors.get(id(engine))
        if entry is None:
            return True  # not one of ours: the gateway's own checks apply
        try:
            return bool(await asyncio.wait_for(entry[0].ping.remote(), timeout=10))
        except (TimeoutError, ray.exceptions.RayError):
            return False

    def actor_of(self, engine: InferenceEngine) -> Any:
        """The Ray actor serving ``engine`` (tests kill it to simulate a lost node)."""
        return self._actors[id(engine)][0]

    async def stop(self, engine: InferenceEngine) -> None:
        """Close ``engine``, stop its server and actor, free its slot (idempotent)."""
        import ray

        entry = self._actors.pop(id(engine), None)
        await engine.close()
        if entry is None:
            return
        actor, slot = entry
        with contextlib.suppress(TimeoutError, ray.exceptions.RayError):  # dead, or stuck
            await asyncio.wait_for(actor.stop.remote(), timeout=30)
        ray.kill(actor)
        self._free.append(slot)

    def close(self) -> None:
        """Kill every actor still running (their servers end with them)."""
        import ray

        for actor, _ in self._actors.values():
            ray.kill(actor)
        self._actors.clear()
        for group in self._own_groups:
            ray.util.remove_placement_group(group)
        self._own_groups.clear()
