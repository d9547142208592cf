"""The sending side of an engine server's weight-update process group (``gloo`` / ``nccl``).

``RemoteEngine`` (rank 0, the sender) and its server (rank 1) join a standalone two-rank
group (``trainers.weight_nccl.join_group``; the store on 127.0.0.1, a free port), then each
update is an HTTP call and a broadcast that run concurrently::

    engine (controller)                              server (engines/service.py)
    join_group(rank 0)  ║ POST /weights_group/join ─► join_group(rank 1)      (once)
    NCCLTransport.send  ║ POST /update_weights/group ─► NCCLTransport.receive -> load, version

The gateway pauses the replicas before and resumes them after (``Gateway.push_weights``).
A failure on either side ends both calls: a peer that dies breaks the broadcast at once (its
sockets close), a stalled one after the group's timeout. A call that failed before the other
side took part leaves that side's blocked thread to end at the group's timeout (it is not
waited for; nobody uses that group again).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import torch

from ..errors import EngineUnavailable, WeightSyncError
from .server_process import free_port

__all__ = ["broadcast", "join"]

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
    from areal_agents.trainers.weight_nccl import NCCLTransport, join_group
    from areal_agents.trainers.weight_sync import DEFAULT_BUCKET_BYTES

    bucket_bytes = bucket_bytes or DEFAULT_BUCKET_BYTES
    port = free_port(HOST)
    local = asyncio.ensure_future(asyncio.to_thread(
        join_group, HOST, port, 0, 2, backend=backend, timeout_s=timeout_s))  # type: ignore[arg-type]
    try:
        await post("/weights_group/join", {
            "host": HOST, "port": port, "rank": 1, "world_size": 2, "src": 0,
            "backend": backend, "timeout_s": timeout_s, "bucket_bytes": bucket_bytes})
    except BaseException:
        _forget(local)
        raise
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
    sending = asyncio.ensure_future(asyncio.to_thread(group.send, named_tensors))
    try:
        await post("/update_weights/group", {"version": version})
    except EngineUnavailable:
        _forget(sending)
        raise
    except Exception as exc:
        done, _ = await asyncio.wait({sending}, timeout=30.0)  # its own error says more
        source_error = sending.exception() if done else None
        if not done:
            _forget(sending)
        if source_error is not None and not isinstance(source_error, WeightSyncError):
            raise source_error from exc  # the trainer's export failed
        raise WeightSyncError(f"the weight broadcast (version {version}) failed: {exc}"
                              + (f"; the sender: {source_error}" if source_error else "")
                              ) from exc
    except BaseException:
        _forget(sending)
        raise
    await sending


def _forget(task: asyncio.Future[Any]) -> None:
    """Let a thread blocked in the group end on its own (at the group's timeout) unobserved."""
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    with contextlib.suppress(Exception):
        task.cancel()
