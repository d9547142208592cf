"""The sending side of an engine server's weight-update process group (``gloo`` / ``nccl``).

``RemoteEngine`` (rank 0, the sender) and its server (rank 1) join a standalone two-rank
group (``trainers.weight_nccl.join_group``; the store on 127.0.0.1, a free port), then each
update is an HTTP call and a broadcast that run concurrently::

    engine (controller)                              server (engines/service.py)
    join_group(rank 0)  ║ POST /weights_group/join ─► join_group(rank 1)      (once)
    NCCLTransport.send  ║ POST /update_weights/group ─► NCCLTransport.receive -> load, version

The replicas of one policy share one group (``ReplicaGroup``: the controller is rank 0, replica
``i``'s server rank ``i + 1``), so an update is one broadcast whatever the number of replicas:
the gateway updates the replicas one after the other, the first one's ``update_weights`` sends
to every live member, and the others collect their outcome. A member found dead during a
broadcast is left out of a second try (a new group of the others) when the update can be
iterated again; it fails with ``EngineUnavailable`` and the gateway drops it. A
``RemoteEngine`` without a ``ReplicaGroup`` joins a two-rank group of its own (``join``).

The gateway pauses the replicas before and resumes them after (``Gateway.push_weights``).
A failure on either side ends both calls: a peer that dies breaks the broadcast at once (its
sockets close), a stalled one after the group's timeout. A call that failed before the other
side took part leaves that side's blocked thread to end at the group's timeout (it is not
waited for; nobody uses that group again).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from ..errors import EngineUnavailable, WeightSyncError
from .server_process import free_port

__all__ = ["ReplicaGroup", "broadcast", "broadcast_all", "join", "join_all"]

HOST = "127.0.0.1"
Post = Callable[[str, dict[str, Any]], Awaitable[Any]]


async def join(post: Post, backend: str, bucket_bytes: int | None, timeout_s: float) -> Any:
    """Join a new two-rank group with the server behind ``post``; returns the sender's
    ``NCCLTransport``.

    Args:
        post: ``POST``s a JSON body to the server (``RemoteEngine``'s, no retries).
        backend: ``"gloo"`` or ``"nccl"``.
        bucket_bytes: the most tensor bytes per broadcast (None: 256 MiB).
        timeout_s: the group's timeout (joining and every broadcast).

    Raises:
        WeightSyncError: the group could not be formed.
        EngineError: the server refused to join (its message).
    """
    return await join_all([post], backend, bucket_bytes, timeout_s)


async def join_all(posts: Sequence[Post], backend: str, bucket_bytes: int | None,
                   timeout_s: float) -> Any:
    """Join a new group of ``len(posts) + 1`` ranks: this process (rank 0, the sender) and
    the server behind ``posts[i]`` as rank ``i + 1``; returns the sender's ``NCCLTransport``.

    Raises:
        EngineError: a server refused to join or is gone (the first such error; the others'
            joins end at the group's timeout).
        WeightSyncError: the group could not be formed.
    """
    from areal_agents.trainers.weight_nccl import NCCLTransport, join_group
    from areal_agents.trainers.weight_sync import DEFAULT_BUCKET_BYTES

    bucket_bytes = bucket_bytes or DEFAULT_BUCKET_BYTES
    port, world_size = free_port(HOST), len(posts) + 1
    local = asyncio.ensure_future(asyncio.to_thread(
        join_group, HOST, port, 0, world_size, backend=backend,  # type: ignore[arg-type]
        timeout_s=timeout_s))
    body = {"host": HOST, "port": port, "world_size": world_size, "src": 0, "backend": backend,
            "timeout_s": timeout_s, "bucket_bytes": bucket_bytes}
    try:
        replies = await asyncio.gather(*(post("/weights_group/join", {**body, "rank": i + 1})
                                         for i, post in enumerate(posts)),
                                       return_exceptions=True)
    except BaseException:
        _forget(local)
        raise
    failed = next((r for r in replies if isinstance(r, BaseException)), None)
    if failed is not None:
        _forget(local)
        raise failed
    group = await local
    device = "cuda" if backend == "nccl" else "cpu"
    return NCCLTransport(group, src=0, bucket_bytes=bucket_bytes, device=device)


async def broadcast(post: Post, group: Any, named_tensors: Iterable[tuple[str, torch.Tensor]],
                    version: int) -> None:
    """Send one update over ``group`` while the server receives it and takes ``version``.

    Raises:
        EngineUnavailable: the server died (during the broadcast too); the replica is gone.
        WeightSyncError: the broadcast failed or timed out, or the server could not load what
            it received; the server keeps its weights and version.
        Exception: what ``named_tensors`` raised (the server was told to discard the update).
    """
    error = (await broadcast_all([post], group, named_tensors, version))[0]
    if error is not None:
        raise error


async def broadcast_all(posts: Sequence[Post], group: Any,
                        named_tensors: Iterable[tuple[str, torch.Tensor]],
                        version: int) -> list[BaseException | None]:
    """Send one update over ``group`` (one broadcast) while the server behind each of
    ``posts`` receives it and takes ``version``; returns each server's outcome (None: loaded).

    Outcomes: ``EngineUnavailable`` (that server died, during the broadcast too), the error
    ``named_tensors`` raised (the servers were told to discard the update), or
    ``WeightSyncError`` (the broadcast failed or timed out, or the server could not load what
    it received; it keeps its weights and version).
    """
    sending = asyncio.ensure_future(asyncio.to_thread(group.send, named_tensors))
    try:
        replies = await asyncio.gather(*(post("/update_weights/group", {"version": version})
                                         for post in posts), return_exceptions=True)
    except BaseException:
        _forget(sending)
        raise
    if not any(isinstance(r, BaseException) for r in replies):
        try:
            await sending
        except BaseException as exc:  # every server loaded it, yet the sender failed
            return [exc] * len(posts)
        return [None] * len(posts)
    done, _ = await asyncio.wait({sending}, timeout=30.0)  # its own error says more
    source_error = sending.exception() if done else None
    if not done:
        _forget(sending)
    outcomes: list[BaseException | None] = []
    for reply in replies:
        if not isinstance(reply, BaseException):
            outcomes.append(None)
        elif isinstance(reply, EngineUnavailable):
            outcomes.append(reply)
        elif source_error is not None and not isinstance(source_error, WeightSyncError):
            outcomes.append(source_error)  # the trainer's export failed
        else:
            error = WeightSyncError(f"the weight broadcast (version {version}) failed: {reply}"
                                    + (f"; the sender: {source_error}" if source_error else ""))
            error.__cause__ = reply
            outcomes.append(error)
    return outcomes


class ReplicaGroup:
    """One weight-update group for every replica of a policy (see the module docstring).

    Members join with ``RemoteEngine.join_replica_group``; ``update`` is what a member's
    ``update_weights`` calls. The group is (re)formed on the first update and after any
    failure or change of the live members.

    Args:
        backend: ``"gloo"`` or ``"nccl"``.
        bucket_bytes: the most tensor bytes per broadcast (None: 256 MiB).
        timeout_s: the group's timeout (joining and every broadcast).

    Attributes:
        num_broadcasts: updates sent so far (one per push, whatever the number of replicas).
    """

    def __init__(self, backend: str = "gloo", bucket_bytes: int | None = None,
                 timeout_s: float = 600.0) -> None:
        self.backend, self.bucket_bytes, self.timeout_s = backend, bucket_bytes, timeout_s
        self.num_broadcasts = 0
        self._members: list[tuple[object, Post, Callable[[], bool]]] = []
        self._sender: Any = None  # the NCCLTransport of the current group
        self._joined: list[object] = []  # its members, in rank order
        self._round: tuple[int, asyncio.Future[dict[int, BaseException | None]],
                           set[int]] | None = None

    def add(self, member: object, post: Post, live: Callable[[], bool]) -> None:
        """Add a replica: ``post`` reaches its server, ``live()`` says whether it runs."""
        self._members.append((member, post, live))

    async def update(self, member: object, named_tensors: Iterable[tuple[str, torch.Tensor]],
                     version: int) -> None:
        """Bring ``member`` to ``version``: the first member asked for ``version`` broadcasts
        it to every live member; the others take their outcome from that broadcast.

        Raises:
            EngineUnavailable, WeightSyncError, Exception: as ``broadcast_all``'s outcomes.
        """
        key = id(member)
        if self._round is None or self._round[0] != version or key not in self._round[2]:
            live = [(m, post, is_live) for m, post, is_live in self._members if is_live()]
            task = asyncio.ensure_future(self._send(live, named_tensors, version))
            self._round = (version, task, {id(m) for m, _, _ in live})
        _, task, waiting = self._round
        outcomes = await asyncio.shield(task)
        waiting.discard(key)
        if key not in outcomes:
            raise EngineUnavailable("this replica's server is not running; it took no part "
                                    f"in the broadcast of version {version}")
        error = outcomes[key]
        if error is not None:
            raise error

    async def _send(self, live: list[tuple[object, Post, Callable[[], bool]]],
                    named_tensors: Iterable[tuple[str, torch.Tensor]],
                    version: int) -> dict[int, BaseException | None]:
        """Broadcast to ``live``; once more without the servers found gone when that failed
        and ``named_tensors`` can be iterated again. Returns each member's outcome."""
        outcomes: dict[int, BaseException | None] = {}
        for attempt in (0, 1):
            results = await self._try(live, named_tensors, version)
            outcomes.update({id(m): r for (m, _, _), r in zip(live, results, strict=True)})
            if all(r is None for r in results):
                return outcomes
            self._sender = None  # both sides join a new group on the next update
            gone = {id(m) for (m, _, is_live), r in zip(live, results, strict=True)
                    if isinstance(r, EngineUnavailable) or not is_live()}
            if attempt or not gone or isinstance(named_tensors, Iterator):
                return outcomes
            for key in gone:
                if not isinstance(outcomes[key], EngineUnavailable):
                    outcomes[key] = EngineUnavailable(f"the engine server died during the "
                                                      f"weight broadcast of version {version}")
            live = [x for x in live if id(x[0]) not in gone]
            if not live:
                return outcomes
        return outcomes

    async def _try(self, live: list[tuple[object, Post, Callable[[], bool]]],
                   named_tensors: Iterable[tuple[str, torch.Tensor]],
                   version: int) -> list[BaseException | None]:
        """(Re)join when the group is not these members', then broadcast once."""
        posts = [post for _, post, _ in live]
        try:
            if self._sender is None or self._joined != [m for m, _, _ in live]:
                self._sender = None
                self._sender = await join_all(posts, self.backend, self.bucket_bytes,
                                              self.timeout_s)
                self._joined = [m for m, _, _ in live]
        except Exception as exc:  # the group did not form: nobody received anything
            return [exc] * len(live)
        self.num_broadcasts += 1
        return await broadcast_all(posts, self._sender, named_tensors, version)


def _forget(task: asyncio.Future[Any]) -> None:
    """Let a thread blocked in the group end on its own (at the group's timeout) unobserved."""
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    with contextlib.suppress(Exception):
        task.cancel()
