"""A ``LocalEngine`` served in its own process: a small token-in / token-out HTTP protocol.

Endpoints (JSON bodies; every one but ``GET /health`` needs ``Authorization: Bearer <token>``,
the server's random token, read from ``$AREAL_AGENTS_ENGINE_TOKEN``; there is no default)::

    GET  /health                    {"status": "ok"}
    GET  /version                   {"version": int, "max_context": int, "num_pending": int}
    POST /generate                  GenerateRequest -> GenerateResult (see *_to_json below)
    POST /generate/stream           GenerateRequest -> server-sent events (below)
    POST /pause, /resume            {"version": int}
    POST /update_weights/disk       {"path": DIR, "version": int | null} -> {"version": int}
    POST /update_weights/stream     {"manifest": transport.manifest(), "version": ...}
    POST /weights_group/join        {"host", "port", "rank", "world_size", "backend",
                                     "timeout_s", "bucket_bytes"} -> {"version": int, ...}
    POST /update_weights/group      {"version": int | null} -> {"version": int}

``/update_weights/stream`` takes the manifest of any transport of
``areal_agents.trainers.weight_transport`` that another process can read (``shm``, ``disk``);
the server reads the stream (``receive(manifest)``) while the sender writes it.

A streamed or broadcast update is all or nothing, in bounded memory (``receive_update``): an
update that fits in one of the sender's buckets is held in memory as it arrives; a larger one
is written to a safetensors spool directory on disk (a temporary directory; one shard of the
sender's bucket size pending at a time, so about two buckets besides the model). Either is
loaded only once the stream ended normally, one tensor at a time after checking every name
and shape (``local_weights.apply_weight_update``). A failed stream leaves the model and
version as they were. The price of a large update is one write and one read of it on the
server's disk; a small one (a tiny model every step) skips the disk.

``/weights_group/join`` makes the server a rank of a standalone weight-update process group
(``trainers.weight_nccl.join_group``: gloo on CPU, NCCL on GPU; it answers once every rank has
joined, so the client joins concurrently). ``/update_weights/group`` receives one update by
``NCCLTransport.receive`` while the client broadcasts it, then loads it (all or nothing) and
takes the version. A failed receive (the sender aborted, a peer died, the group timed out)
answers 500 and leaves the server's weights and version as they were; after a failed
broadcast the group is dropped and must be joined again.

Errors answer ``{"error": {"type": ..., "message": ...}}``: 400 ``context_length_exceeded``,
400 ``invalid_request``, 401 ``unauthorized``, 500 ``engine_error``.

``/generate/stream`` runs the engine's ``generate_streaming`` and answers
``text/event-stream``: one ``data: {"delta": TokenDelta}`` event per delta as the engine
produces it (a decode step's tokens of one completion; see ``delta_to_json``), then
``data: {"result": GenerateResult}`` (exactly ``/generate``'s answer) and ``data: [DONE]``.
The answer starts only once the first delta (or the result) exists, so a request that fails
before any token gets ``/generate``'s status and error body; a failure after it is the event
``data: {"error": {"type", "message"}}`` and ends the stream. A client that disconnects
(before or during the stream) cancels the generation: its rows leave the engine's batch.

Run one with (``RemoteEngine.launch`` does this)::

    AREAL_AGENTS_ENGINE_TOKEN=... python -m areal_agents.engines.service --model DIR --port P

``DIR`` holds a model and tokenizer saved with ``save_pretrained``. The server binds
127.0.0.1 only and sets ``OMP_NUM_THREADS`` / ``torch.set_num_threads`` to ``--threads``
(default 1) before loading the model.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from typing import Any

from ..errors import ContextLengthExceeded, EngineError
from .base import (
    CompletionOutput,
    GenerateRequest,
    GenerateResult,
    SamplingParams,
    TokenDelta,
    WeightUpdate,
)

TOKEN_ENV = "AREAL_AGENTS_ENGINE_TOKEN"
HOST = "127.0.0.1"

# ---- the protocol: JSON forms of requests and results -------------------------------------


def request_to_json(request: GenerateRequest) -> dict[str, Any]:
    """The JSON body of ``POST /generate`` for ``request``."""
    return asdict(request)


def request_from_json(body: Any) -> GenerateRequest:
    """Parse a ``POST /generate`` body.

    Raises:
        ValueError: a missing or mistyped field (the message names it).
    """
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object with prompt_ids and sampling")
    ids = body.get("prompt_ids")
    if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
        raise ValueError("prompt_ids must be a list of integer token ids")
    sampling = body.get("sampling") or {}
    if not isinstance(sampling, dict):
        raise ValueError("sampling must be an object of SamplingParams fields")
    try:
        params = SamplingParams(**sampling)
    except TypeError as exc:
        raise ValueError(f"sampling: {exc}") from exc
    adapter = body.get("adapter")
    if adapter is not None and not isinstance(adapter, str):
        raise ValueError("adapter must be the name of a served LoRA adapter (a string) or null")
    extra: dict[str, Any] = {}
    if body.get("request_id") is not None:
        extra["request_id"] = str(body["request_id"])
    return GenerateRequest(ids, params, session_id=body.get("session_id"), adapter=adapter,
                           **extra)


def result_to_json(result: GenerateResult) -> dict[str, Any]:
    """The JSON answer of ``POST /generate``."""
    return asdict(result)


def result_from_json(data: dict[str, Any]) -> GenerateResult:
    """Parse a ``POST /generate`` answer (``top_logprobs`` pairs become tuples again)."""
    outputs = []
    for out in data["outputs"]:
        outputs.append(CompletionOutput(
            token_ids=[int(t) for t in out["token_ids"]],
            logprobs=[float(x) for x in out["logprobs"]],
            versions=[int(v) for v in out["versions"]], finish_reason=out["finish_reason"],
            top_logprobs=_pairs(out.get("top_logprobs"))))
    return GenerateResult(str(data["request_id"]), [int(t) for t in data["prompt_ids"]], outputs)


def delta_to_json(delta: TokenDelta) -> dict[str, Any]:
    """The ``delta`` of a ``/generate/stream`` event."""
    return asdict(delta)


def delta_from_json(data: dict[str, Any]) -> TokenDelta:
    """Parse the ``delta`` of a ``/generate/stream`` event."""
    return TokenDelta(int(data["index"]), [int(t) for t in data["token_ids"]],
                      [float(x) for x in data["logprobs"]], [int(v) for v in data["versions"]],
                      _pairs(data.get("top_logprobs")))


def _pairs(rows: Any) -> list[list[tuple[int, float]]] | None:
    """``top_logprobs`` rows from JSON (lists of ``[id, logprob]``) as tuples."""
    return None if rows is None else [[(int(t), float(lp)) for t, lp in row] for row in rows]


# ---- the server -------------------------------------------------------------------------------


def build_app(engine: Any, token: str) -> Any:
    """The Starlette app serving ``engine`` (a ``LocalEngine``) under bearer ``token``.

    Raises:
        ValueError: ``token`` is empty (there is no default secret).
    """
    from starlette.applications import Starlette
    from starlette.routing import Route

    if not token:
        raise ValueError(f"the engine server needs a non-empty token (set ${TOKEN_ENV})")
    service = _Service(engine, token)
    return Starlette(routes=[
        Route("/health", service.health, methods=["GET"]),
        Route("/version", service.endpoint(service.version), methods=["GET"]),
        Route("/generate", service.endpoint(service.generate), methods=["POST"]),
        Route("/generate/stream", service.endpoint(service.generate_stream, streams=True),
              methods=["POST"]),
        Route("/pause", service.endpoint(service.pause), methods=["POST"]),
        Route("/resume", service.endpoint(service.resume), methods=["POST"]),
        Route("/update_weights/disk", service.endpoint(service.update_disk), methods=["POST"]),
        Route("/update_weights/stream", service.endpoint(service.update_stream),
              methods=["POST"]),
        Route("/weights_group/join", service.endpoint(service.join_group), methods=["POST"]),
        Route("/update_weights/group", service.endpoint(service.update_group),
              methods=["POST"]),
    ])


def error_answer(exc: Exception) -> tuple[int, str, str]:
    """``(HTTP status, error type, message)`` of an endpoint's exception."""
    if isinstance(exc, ContextLengthExceeded):
        return 400, "context_length_exceeded", str(exc)
    if isinstance(exc, (ValueError, KeyError, FileNotFoundError)):
        return 400, "invalid_request", str(exc)
    if isinstance(exc, EngineError):
        return 500, "engine_error", str(exc)
    return 500, "engine_error", f"{type(exc).__name__}: {exc}"  # any other failure: name it


DEFAULT_SPOOL_BYTES = 256 * 2**20
"""Shard size of a received update's spool when the sender names no bucket size."""


def receive_update(stream: Iterable[tuple[str, Any]], bucket_bytes: int,
                   spool: str) -> list[tuple[str, Any]] | None:
    """Drain a received weight stream: its ``(name, tensor)`` pairs (the receiver's own
    copies) while they add up to at most ``bucket_bytes``, returned as a list; once they
    exceed it, everything (the ones held first) goes to the safetensors dir ``spool`` in
    shards of ``bucket_bytes`` and None is returned. Holds about two buckets at most.

    Raises:
        Exception: whatever the stream raises (nothing is returned or left in ``spool``).
    """
    from areal_agents.trainers.weight_sync import save_safetensors_dir

    held: list[tuple[str, Any]] = []
    size = 0
    items = iter(stream)
    for name, tensor in items:
        size += tensor.numel() * tensor.element_size()
        if size > bucket_bytes:
            def spooled(first: tuple[str, Any] = (name, tensor)) -> Iterator[tuple[str, Any]]:
                while held:
                    yield held.pop(0)  # handed to the writer's shard: not held twice
                yield first
                yield from items

            save_safetensors_dir(spooled(), spool, bucket_bytes)
            return None
        held.append((name, tensor))
    return held


class _Service:
    """The endpoints: each takes the parsed JSON body and returns the JSON answer."""

    def __init__(self, engine: Any, token: str) -> None:
        self.engine = engine
        self.expected = f"Bearer {token}".encode()
        self.weights_group: Any = None  # the NCCLTransport of /weights_group/join

    def endpoint(self, fn: Any, *, streams: bool = False) -> Any:
        """Wrap ``fn(body)`` (``fn(body, request)`` when it ``streams``: it returns a
        ``Response`` of its own): check the token, parse the body, map errors to answers."""
        from starlette.requests import Request
        from starlette.responses import JSONResponse, Response

        def error(status: int, kind: str, message: str) -> JSONResponse:
            return JSONResponse({"error": {"type": kind, "message": message}},
                                status_code=status)

        async def handler(request: Request) -> Response:
            header = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(header, self.expected):
                return error(401, "unauthorized", "missing or wrong bearer token")
            try:
                raw = await request.body()
                body = json.loads(raw) if raw else {}
            except ValueError as exc:
                return error(400, "invalid_request", f"the body is not JSON: {exc}")
            try:
                return await fn(body, request) if streams else JSONResponse(await fn(body))
            except Exception as exc:
                return error(*error_answer(exc))

        return handler

    def state(self) -> dict[str, int]:
        return {"version": self.engine.version, "max_context": self.engine.max_context,
                "num_pending": self.engine.num_pending}

    async def health(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        return JSONResponse({"status": "ok"})

    async def version(self, body: Any) -> dict[str, int]:
        return self.state()

    def _request(self, body: Any) -> GenerateRequest:
        """``request_from_json``, refusing an adapter this server does not serve (a request
        is never answered by a different policy than the one it names)."""
        request = request_from_json(body)
        if request.adapter is not None and request.adapter not in self.engine.adapters:
            raise ValueError(f"adapter {request.adapter!r} is not served here (adapters: "
                             f"{self.engine.adapters}); send adapter null for the base model")
        return request

    async def generate(self, body: Any) -> dict[str, Any]:
        return result_to_json(await self.engine.generate(self._request(body)))

    async def generate_stream(self, body: Any, request: Any) -> Any:
        """``/generate/stream`` (module docstring): start ``generate_streaming``, answer once
        its first event exists; an exception before it is raised (``endpoint`` maps it)."""
        from .service_stream import token_stream

        return await token_stream(self.engine, self._request(body), request.receive)

    async def pause(self, body: Any) -> dict[str, int]:
        await self.engine.pause()
        return self.state()

    async def resume(self, body: Any) -> dict[str, int]:
        await self.engine.resume()
        return self.state()

    async def update_disk(self, body: Any) -> dict[str, int]:
        path = body.get("path") if isinstance(body, dict) else None
        if not isinstance(path, str):
            raise ValueError("'path' (a directory of *.safetensors files) is required")
        await self.engine.update_weights(WeightUpdate(path=path, version=body.get("version")))
        return self.state()

    async def update_stream(self, body: Any) -> dict[str, int]:
        from areal_agents.trainers.weight_transport import receive

        manifest = body.get("manifest") if isinstance(body, dict) else None
        if not isinstance(manifest, dict) or "kind" not in manifest:
            raise ValueError("'manifest' (a weight transport's manifest()) is required")
        bucket_bytes = int(manifest.get("bucket_bytes") or DEFAULT_SPOOL_BYTES)
        await self._load_spooled(lambda: receive(manifest), bucket_bytes, body.get("version"))
        return self.state()

    async def _load_spooled(self, stream: Any, bucket_bytes: int, version: Any) -> None:
        """Receive ``stream()`` (off the event loop; ``receive_update``: in memory up to one
        bucket, else into a spool directory), then load it into the engine one tensor at a
        time, and take ``version``. All or nothing: a stream that fails leaves nothing to load
        (the spool is removed), and the load checks every name and shape first."""
        root = tempfile.mkdtemp(prefix="engine-spool-")
        try:
            path = os.path.join(root, "update")
            held = await asyncio.to_thread(lambda: receive_update(stream(), bucket_bytes, path))
            update = (WeightUpdate(path=path, version=version) if held is None
                      else WeightUpdate(named_tensors=held, version=version))
            await self.engine.update_weights(update)
        finally:
            shutil.rmtree(root, ignore_errors=True)


    async def join_group(self, body: Any) -> dict[str, int]:
        from areal_agents.trainers.weight_nccl import NCCLTransport, join_group

        if not isinstance(body, dict):
            raise ValueError("the body must be a JSON object")
        missing = [k for k in ("host", "port", "rank", "world_size") if k not in body]
        if missing:
            raise ValueError(f"/weights_group/join needs {missing}")
        backend = body.get("backend", "gloo")
        self.weights_group = None  # a new group replaces the old one
        group = await asyncio.to_thread(
            join_group, str(body["host"]), int(body["port"]), int(body["rank"]),
            int(body["world_size"]), backend=backend,
            timeout_s=float(body.get("timeout_s", 120.0)))
        self.weights_group = NCCLTransport(
            group, src=int(body.get("src", 0)), device="cuda" if backend == "nccl" else "cpu",
            bucket_bytes=int(body.get("bucket_bytes", 256 * 2**20)))
        return self.state()

    async def update_group(self, body: Any) -> dict[str, int]:
        group = self.weights_group
        if group is None:
            raise ValueError("no weight-update group: POST /weights_group/join first")
        version = body.get("version") if isinstance(body, dict) else None
        try:  # the sender waits on each bucket
            await self._load_spooled(group.receive, group.bucket_bytes, version)
        finally:
            if group.broken:
                self.weights_group = None
        return self.state()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m areal_agents.engines.service",
                                     description="Serve a LocalEngine over HTTP on 127.0.0.1.")
    parser.add_argument("--model", required=True, help="model + tokenizer dir (save_pretrained)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1, help="OMP / torch threads")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--weights", default=None,
                        help="a safetensors dir loaded over the model's weights at start")
    parser.add_argument("--version", type=int, default=0, help="the initial weight version")
    parser.add_argument("--host", default=HOST, help="the address to bind (default 127.0.0.1; "
                        "a node's IP to serve other nodes, as trainers/ray_replicas.py does)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Load the model, then serve until SIGTERM."""
    args = parse_args(argv)
    token = os.environ.get(TOKEN_ENV, "")
    if not token:
        sys.exit(f"set ${TOKEN_ENV} to a random secret (RemoteEngine.launch does); there is no "
                 "default token")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch creates its thread pool
    import torch
    import uvicorn

    from .local import LocalEngine
    from .local_weights import apply_weight_update

    torch.set_num_threads(args.threads)
    engine = LocalEngine(args.model, max_batch_size=args.max_batch_size)
    if args.weights:
        apply_weight_update(engine.model, WeightUpdate(path=args.weights))
    engine.version = args.version
    print(f"engine server: {args.model} (version {engine.version}) on {args.host}:{args.port}",
          flush=True)
    # keep idle connections longer than the client does (httpx: 5 s), so the client never
    # reuses one the server is closing
    uvicorn.run(build_app(engine, token), host=args.host, port=args.port, log_level="warning",
                lifespan="off", timeout_keep_alive=75)


if __name__ == "__main__":
    main()
