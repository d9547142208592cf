"""``RemoteEngine``: an engine server (``engines/service.py``) as an ``InferenceEngine``.

Launch a server that this engine owns (``RemoteEngine.launch(model_dir)``: its own process
group via ``ServerProcess``, a random token, 127.0.0.1) or attach to a running one
(``RemoteEngine.attach(url, token=...)``). The server is a ``LocalEngine``, so token ids,
per-token log-probs and versions are exactly those of an in-process ``LocalEngine`` on the
same weights.

``generate_streaming`` streams from the server's ``POST /generate/stream`` (server-sent
events, ``engines/service_stream.py``): ``on_tokens`` gets each decode step's tokens as the
server produces them, and the returned result is the server's, exactly ``generate``'s.
Those requests go through ``httpx2``'s default transport (the ``KeepAliveTransport`` of every
other request reads answers whole); closing the stream cancels the generation on the server.

A server that dies makes every request fail with ``EngineUnavailable`` (the gateway then drops
the replica). With ``restart_limit > 0`` a launched engine can ``restart()`` its server: the
new process loads the model and the weights of the last update (every update of such an
engine goes through a safetensors directory it keeps), and takes the same version.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import httpx2

from ..errors import ContextLengthExceeded, EngineError
from . import weights_group
from .base import GenerateRequest, GenerateResult, OnTokens, WeightUpdate
from .http_engine import HTTPEngine
from .keepalive import KeepAliveTransport
from .server_process import ServerProcess, free_port
from .service import TOKEN_ENV, delta_from_json, request_to_json, result_from_json

WeightTransport = Literal["shm", "disk", "gloo", "nccl"]
_TRANSPORTS = ("shm", "disk", "gloo", "nccl")


class RemoteEngine(HTTPEngine):
    """An engine server reached over HTTP (token ids in; ids, log-probs, versions out).

    Build one with ``await RemoteEngine.launch(model_dir)`` or ``await RemoteEngine.attach(url,
    token=...)``; the constructor checks nothing.

    Args:
        url: base URL, e.g. ``"http://127.0.0.1:8123"``.
        token: the server's bearer token.
        max_context: the server's context window.
        version: the weight version the server holds.
        timeout_s: seconds one request may take (a whole generation included).
        transport: how ``update_weights(named_tensors=...)`` ships tensors: ``"shm"``
            (one POSIX shared-memory block, same host), ``"disk"`` (a safetensors dir), or a
            broadcast over a weight-update process group that this engine (rank 0, the
            sender) and its server (rank 1) join on the first update: ``"gloo"`` (CPU) or
            ``"nccl"`` (GPU); the group's timeout is ``timeout_s`` and a failed broadcast
            drops it (the next update joins a new one); with ``join_replica_group`` one
            group serves all of a policy's replicas instead (one broadcast per update).
        bucket_bytes: the shared-memory block of ``shm`` updates (a larger tensor crosses it
            in pieces); None: 256 MiB.
        http_transport: an ``httpx2`` transport (tests pass ``httpx2.ASGITransport``); None:
            a ``KeepAliveTransport`` (``engines/keepalive.py``: a fraction of the client CPU
            per request of ``httpx2``'s default pool; an RL trainer pays that CPU in training).
        server: the ``ServerProcess`` this engine owns (stopped by ``close``).
        launch_args: how ``restart`` relaunches the server (set by ``launch``).
        restart_limit: how many times ``restart`` may relaunch the server (0: never).

    Attributes:
        close_callbacks: called once each, in order, when ``close`` has stopped the server
            (``trainers.serving`` removes a temporary model directory this way).

    Example:
        >>> async def main():  # doctest: +SKIP
        ...     async with await RemoteEngine.launch("runs/x/serving/listener") as engine:
        ...         out = await engine.generate(GenerateRequest([1, 2], SamplingParams(max_tokens=4)))
        ...         return out.outputs[0].token_ids
    """

    server_name = "engine server"
    retry_transport_errors = True  # generation is recomputed; control calls are idempotent

    def __init__(self, url: str, *, token: str, max_context: int, version: int = 0,
                 timeout_s: float = 600.0, transport: WeightTransport = "shm",
                 http_transport: httpx2.AsyncBaseTransport | None = None,
                 server: ServerProcess | None = None, launch_args: dict[str, Any] | None = None,
                 restart_limit: int = 0, bucket_bytes: int | None = None) -> None:
        if transport not in _TRANSPORTS:
            raise ValueError(f"transport={transport!r}; choose one of {list(_TRANSPORTS)}")
        super().__init__(url, timeout_s=timeout_s, server=server,
                         transport=http_transport or KeepAliveTransport(timeout_s=timeout_s),
                         headers=_auth(token))
        self.token = token
        self.max_context = max_context
        self.version = version
        self.transport: WeightTransport = "disk" if restart_limit else transport
        self.bucket_bytes = bucket_bytes
        self.launch_args = launch_args
        self.restart_limit = restart_limit
        self.num_restarts = 0
        self._lock = asyncio.Lock()  # weight updates and restarts, one at a time
        self._weights_dir: Path | None = None  # the last update's tensors (restartable engines)
        self._shm: Any = None  # the SharedMemoryTransport of "shm" updates (made on first use)
        self._group: Any = None  # the NCCLTransport of "gloo"/"nccl" updates (joined on use)
        self.close_callbacks: list[Callable[[], object]] = []  # run once by close()
        self.replica_group: weights_group.ReplicaGroup | None = None  # join_replica_group
        # generate_streaming's client: KeepAliveTransport reads answers whole, so streams go
        # through httpx2's default transport (made on first use); a test transport serves both
        self._streams_whole = http_transport is None
        self._stream_http: httpx2.AsyncClient | None = None

    # -- construction -------------------------------------------------------------------------

    @classmethod
    async def launch(cls, model_dir: str | Path, *, threads: int = 1, max_batch_size: int = 32,
                     python: str | None = None, log_path: str | Path | None = None,
                     startup_timeout_s: float = 300.0, timeout_s: float = 600.0,
                     transport: WeightTransport = "shm", restart_limit: int = 0,
                     weights: str | Path | None = None, version: int = 0,
                     progress: Callable[[str], None] | None = None,
                     bucket_bytes: int | None = None) -> RemoteEngine:
        """Start ``python -m areal_agents.engines.service`` on a free port and attach.

        Args:
            model_dir: model and tokenizer saved with ``save_pretrained``.
            threads: ``OMP_NUM_THREADS`` and torch threads of the server.
            max_batch_size: the server engine's rows per decode step.
            python: the interpreter (default: this one).
            log_path: the server's log (default: a new temporary directory).
            startup_timeout_s: seconds to wait for ``GET /health``.
            weights, version: a safetensors dir loaded at start, and the version it is.
            transport, restart_limit, timeout_s, bucket_bytes: see the class.

        Raises:
            EngineError: the server exited during start-up (with its last log lines).
            EngineTimeout: not healthy within ``startup_timeout_s`` (the server is stopped).
        """
        args = {"model_dir": str(model_dir), "threads": threads, "max_batch_size": max_batch_size,
                "python": python or sys.executable, "startup_timeout_s": startup_timeout_s,
                "log_path": str(log_path or Path(tempfile.mkdtemp(prefix="engine-")) / "server.log"),
                "progress": progress}
        server, url, token = await _start_server(args, weights, version)
        try:
            engine = await cls.attach(url, token=token, timeout_s=timeout_s, server=server,
                                      transport=transport, restart_limit=restart_limit,
                                      bucket_bytes=bucket_bytes)
        except BaseException:
            server.stop()
            raise
        engine.launch_args = args
        return engine

    @classmethod
    async def attach(cls, url: str, *, token: str, timeout_s: float = 600.0,
                     transport: WeightTransport = "shm",
                     http_transport: httpx2.AsyncBaseTransport | None = None,
                     server: ServerProcess | None = None, restart_limit: int = 0,
                     bucket_bytes: int | None = None) -> RemoteEngine:
        """An engine for the running server at ``url`` (version and context read from it).

        Raises:
            EngineError: the server cannot be reached or refuses the token.
        """
        engine = cls(url, token=token, max_context=0, timeout_s=timeout_s, transport=transport,
                     http_transport=http_transport, server=server, restart_limit=restart_limit,
                     bucket_bytes=bucket_bytes)
        try:
            state = await engine._request("GET", "/version")
        except BaseException:
            await engine._http.aclose()
            raise
        engine.version, engine.max_context = int(state["version"]), int(state["max_context"])
        return engine

    # -- InferenceEngine ----------------------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        """Generate on the server.

        Raises:
            ContextLengthExceeded: ``len(prompt_ids) + max_tokens > max_context``.
            EngineUnavailable: the server died (or was never reachable).
            EngineTimeout: no answer within ``timeout_s``.
            EngineError: the server refused the request (its message).
        """
        self._check_request(request)
        self._pending += 1
        try:
            data = await self._request("POST", "/generate", request_to_json(request))
        finally:
            self._pending -= 1
        return result_from_json(data)

    async def generate_streaming(self, request: GenerateRequest,
                                 on_tokens: OnTokens) -> GenerateResult:
        """``generate`` streamed from the server (``POST /generate/stream``): ``on_tokens``
        gets each completion's new tokens (one decode step a delta) as the server sends them.

        The deltas of a completion concatenate to its returned ids, log-probs and versions,
        and the result is the server's (``generate``'s for the same request). Cancelling the
        caller, or ``on_tokens`` raising, closes the stream: the server cancels the
        generation. ``timeout_s`` bounds each wait for an event, not the whole stream.

        Raises:
            As ``generate`` (a server that dies mid-stream: ``EngineUnavailable``); an error
            the server reports after the first delta is an ``EngineError``.
        """
        self._check_request(request)
        self._pending += 1
        result = None
        try:
            events = self._stream("/generate/stream", request_to_json(request),
                                  client=self._streaming_client())
            async with contextlib.aclosing(events):
                async for event in events:
                    if "delta" in event:
                        on_tokens(delta_from_json(event["delta"]))
                    elif "result" in event:
                        result = result_from_json(event["result"])
        finally:
            self._pending -= 1
        if result is None:
            raise EngineError(f"the {self.server_name} at {self.url} ended the stream of "
                              f"request {request.request_id} without its result")
        return result

    def _streaming_client(self) -> httpx2.AsyncClient:
        """The client of streamed requests (the engine's own unless that reads whole)."""
        if not self._streams_whole:
            return self._http
        if self._stream_http is None:
            self._stream_http = httpx2.AsyncClient(  # direct, as KeepAliveTransport: no
                base_url=self.url, timeout=self.timeout_s,  # proxies from the environment
                headers=_auth(self.token), trust_env=False)
        return self._stream_http

    async def _close_stream_client(self) -> None:
        client, self._stream_http = self._stream_http, None
        if client is not None:
            await client.aclose()

    async def pause(self) -> None:
        """``POST /pause``: the server stops decoding; in-flight requests wait. Idempotent."""
        await self._request("POST", "/pause")

    async def resume(self) -> None:
        """``POST /resume``. Idempotent."""
        await self._request("POST", "/resume")

    async def update_weights(self, update: WeightUpdate) -> None:
        """Load new weights on the server and take the new version.

        ``path`` updates send the directory (the server must read the same file system);
        ``named_tensors`` go by shared memory or through a safetensors dir (``transport``).
        A restartable engine keeps that dir, and while its server is dead an update only
        replaces it (``restart`` loads it).

        Raises:
            EngineUnavailable: the server died (not restartable).
            WeightSyncError: a ``gloo``/``nccl`` broadcast failed or timed out (the server
                keeps its weights and version).
            EngineError: the server refused the update (a name or shape it does not know).
        """
        from areal_agents.trainers.weight_sync import save_safetensors_dir

        async with self._lock:
            target = update.version if update.version is not None else self.version + 1
            if self.restart_limit:
                path = await self._keep_weights(update, target)
                if self.server is not None and not self.server.running:
                    self.version = target  # restart() loads these weights
                    return
                body = {"path": path, "version": target}
                await self._request("POST", "/update_weights/disk", body)
            elif update.path is not None:
                await self._request("POST", "/update_weights/disk",
                                    {"path": str(Path(update.path).resolve()), "version": target})
            elif self.transport == "shm":
                assert update.named_tensors is not None
                await self._stream_shared(update.named_tensors, target)
            elif self.transport in ("gloo", "nccl"):
                assert update.named_tensors is not None
                await self._broadcast(update.named_tensors, target)
            else:
                assert update.named_tensors is not None
                folder = tempfile.mkdtemp(prefix="engine-weights-")
                try:
                    tensors = update.named_tensors
                    await asyncio.to_thread(lambda: save_safetensors_dir(_untied(tensors), folder))
                    await self._request("POST", "/update_weights/disk",
                                        {"path": folder, "version": target})
                finally:
                    shutil.rmtree(folder, ignore_errors=True)
            self.version = target

    async def _stream_shared(self, named_tensors: Any, version: int) -> None:
        """Stream tensors through a ``SharedMemoryTransport`` (one block of ``bucket_bytes``,
        reused) while the server reads them; the tensors are not gathered first."""
        from areal_agents.trainers.weight_shm import SharedMemoryTransport
        from areal_agents.trainers.weight_sync import DEFAULT_BUCKET_BYTES

        if self._shm is None:
            self._shm = SharedMemoryTransport(self.bucket_bytes or DEFAULT_BUCKET_BYTES,
                                              timeout=self.timeout_s)
        shm = self._shm
        manifest = shm.manifest()
        sending = asyncio.ensure_future(asyncio.to_thread(shm.send, named_tensors))
        try:
            await self._request("POST", "/update_weights/stream",  # the stream is not rewound
                                {"manifest": manifest, "version": version}, retry=False)
        except BaseException:
            shm.cancel()  # the reader is gone (or never started): the sender raises at once
            with contextlib.suppress(Exception):
                await sending
            self._shm = None
            shm.close()
            raise
        await sending

    def join_replica_group(self, group: weights_group.ReplicaGroup) -> None:
        """Take ``gloo``/``nccl`` updates through ``group``, shared with the policy's other
        replicas: one broadcast per update reaches them all (``engines/weights_group.py``)."""
        self.replica_group = group
        group.add(self, self._post, self._live)

    def _live(self) -> bool:
        return not self._closed and (self.server is None or self.server.running)

    async def _broadcast(self, named_tensors: Any, version: int) -> None:
        """Broadcast the tensors over the weight-update group while the server receives them
        (``POST /update_weights/group``); joins the group first when there is none. With a
        ``replica_group`` the group's one broadcast serves every replica."""
        if self.replica_group is not None:
            await self.replica_group.update(self, named_tensors, version)
            return
        if self._group is None:
            self._group = await weights_group.join(self._post, self.transport, self.bucket_bytes,
                                                   self.timeout_s)
        group = self._group
        try:
            await weights_group.broadcast(self._post, group, named_tensors, version)
        except BaseException:
            self._group = None  # failed: both sides join a new group on the next update
            raise

    async def _post(self, path: str, body: dict[str, Any]) -> Any:
        """``POST path`` once (a weight-group call is not repeated after a transport error)."""
        return await self._request("POST", path, body, retry=False)

    async def _keep_weights(self, update: WeightUpdate, version: int) -> str:
        """Write (or copy) the update into this engine's own safetensors dir; returns it."""
        from areal_agents.trainers.weight_sync import load_safetensors_dir, save_safetensors_dir

        if self._weights_dir is None:
            self._weights_dir = Path(tempfile.mkdtemp(prefix="engine-latest-"))
        tensors = (update.named_tensors if update.named_tensors is not None
                   else load_safetensors_dir(str(update.path)))
        folder = str(self._weights_dir / "latest")
        await asyncio.to_thread(lambda: save_safetensors_dir(_untied(tensors), folder))
        return folder

    async def restart(self) -> None:
        """Relaunch a dead server with the last update's weights and this engine's version.

        Raises:
            EngineError: closed (also when ``close`` comes while the new server starts: it is
                stopped), not launched here, or ``restart_limit`` restarts already used.
        """
        async with self._lock:
            if self._closed:
                raise EngineError("RemoteEngine is closed; create a new engine")
            if self.launch_args is None:
                raise EngineError(f"the engine server at {self.url} was attached, not launched "
                                  "here; it cannot be restarted")
            if self.num_restarts >= self.restart_limit:
                raise EngineError(f"the engine server was restarted {self.num_restarts} times "
                                  f"already (restart_limit={self.restart_limit})")
            self.num_restarts += 1
            if self.server is not None:
                await asyncio.to_thread(self.server.stop)
            weights = self._weights_dir / "latest" if self._weights_dir else None
            args = {**self.launch_args,
                    "log_path": f"{self.launch_args['log_path']}.restart{self.num_restarts}"}
            server, url, token = await _start_server(
                args, weights if weights and weights.exists() else None, self.version)
            if self._closed:  # closed while the new server was starting: leave no orphan
                await asyncio.to_thread(server.stop)
                raise EngineError("RemoteEngine was closed while its server restarted")
            self.server, self.token = server, token
            self._group = None  # the new server has not joined it
            await self._reconnect(url, _auth(token))
            await self._close_stream_client()  # the old server's URL and token

    async def _release(self) -> None:
        """Close the streaming client; remove the kept weights and the shared-memory block
        (after ``close``)."""
        await self._close_stream_client()
        if self._weights_dir is not None:
            shutil.rmtree(self._weights_dir, ignore_errors=True)
        if self._shm is not None:
            self._shm.close()
        self._group = None
        callbacks, self.close_callbacks = self.close_callbacks, []
        for callback in callbacks:
            callback()

    def _http_error(self, response: httpx2.Response, what: str) -> Exception:
        error = _error(response)
        if error.get("type") == "context_length_exceeded":
            return ContextLengthExceeded(error.get("message", ""))
        return super()._http_error(response, what)


async def _start_server(args: dict[str, Any], weights: str | Path | None,
                        version: int) -> tuple[ServerProcess, str, str]:
    """Start an engine server from ``launch``'s arguments; wait until it is healthy."""
    port, token = free_port(), secrets.token_urlsafe(32)
    argv = [args["python"], "-m", "areal_agents.engines.service", "--model", args["model_dir"],
            "--port", str(port), "--threads", str(args["threads"]),
            "--max-batch-size", str(args["max_batch_size"]), "--version", str(version)]
    argv += ["--weights", str(weights)] if weights is not None else []
    env = {TOKEN_ENV: token, "OMP_NUM_THREADS": str(args["threads"]),
           "MKL_NUM_THREADS": str(args["threads"])}
    server = ServerProcess(argv, args["log_path"], env=env, name="engine server", grace_s=5.0)
    url = f"http://127.0.0.1:{port}"
    await server.wait_ready(f"{url}/health", timeout_s=args["startup_timeout_s"],
                            progress=args["progress"])
    return server, url, token


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _untied(named_tensors: Any) -> Iterator[tuple[str, Any]]:
    """Detached CPU tensors, one at a time; one sharing storage with an earlier one (tied
    weights) is cloned for safetensors."""
    seen = set()
    for name, tensor in named_tensors:
        t = tensor.detach().cpu().contiguous()
        if t.data_ptr() in seen:
            t = t.clone()
        seen.add(t.data_ptr())
        yield name, t


def _error(response: httpx2.Response) -> dict[str, Any]:
    with contextlib.suppress(ValueError):
        body = response.json()
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            return body["error"]
    return {"message": response.text[:500] or response.reason_phrase}
