"""The ``Gateway``: policies, sessions and the OpenAI-compatible ASGI app in front of engines.

Example:
    >>> import asyncio
    >>> from areal_agents.gateway import Gateway
    >>> gw = Gateway(admin_key="secret")
    >>> gw.admin_key
    'secret'
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..engines.base import InferenceEngine, WeightUpdate
from .auth import Principal, authenticate, bearer_token, digest, new_secret
from .completions import chat_chunks, chat_completion, text_completion
from .errors import GatewayError, bad_request, forbidden, not_found
from .router import Router
from .sessions import Session

log = logging.getLogger(__name__)


@dataclass
class Policy:
    """A named policy: its engine replicas, tokenizer and limits."""

    name: str
    router: Router
    tokenizer: Any
    max_n: int = 8
    stop_ids: set[int] = field(default_factory=set)
    eos_id: int = -1

    @property
    def max_context(self) -> int:
        return min(e.max_context for e in self.router.engines)

    def token_text(self, token_id: int) -> str:
        return _token_text(self.tokenizer, token_id)


@lru_cache(maxsize=65536)
def _token_text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


Handler = Callable[[Request], Awaitable[Response]]


class Gateway:
    """OpenAI-compatible gateway recording exact tokens per session.

    Args:
        admin_key: the admin secret; None generates a random one (read it from
            ``gateway.admin_key``). There is never a default key.

    Attributes:
        app: the ASGI app (serve with uvicorn, or use in process via ``async_client``).
        admin_key: the admin secret.
        policies: policy name -> ``Policy``.
    """

    def __init__(self, admin_key: str | None = None) -> None:
        if admin_key is not None and not admin_key:
            raise ValueError("admin_key must be a non-empty string or None (random)")
        self.admin_key = admin_key or new_secret("aa-admin")
        self.policies: dict[str, Policy] = {}
        self._sessions: dict[str, Session] = {}
        self._session_by_digest: dict[str, str] = {}
        self._portal: Any = None
        self.app = Starlette(routes=self._routes())

    # ---- in-process API ---------------------------------------------------------------
    def add_policy(self, name: str, engines: Sequence[InferenceEngine], tokenizer: Any, *,
                   max_n: int = 8) -> Policy:
        """Serve ``engines`` (replicas of one model) as the model named ``name``.

        Raises:
            ValueError: the name is taken, ``engines`` is empty, or the tokenizer has no EOS.
        """
        if name in self.policies:
            raise ValueError(f"policy {name!r} is already registered; pick another name")
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError(f"the tokenizer of policy {name!r} has no eos_token_id; set one")
        stop_ids = {int(eos)}
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
            stop_ids.add(im_end)
        policy = Policy(name, Router(engines), tokenizer, max_n, stop_ids, int(eos))
        self.policies[name] = policy
        return policy

    async def create_session(self, policy: str, metadata: dict[str, Any] | None = None) -> str:
        """Open a recorded session for ``policy``; returns its API key.

        Raises:
            KeyError: unknown policy.
        """
        return self._open_session(policy, metadata)[1]

    def session(self, key: str) -> Session:
        """The session with API key or session id ``key``.

        Raises:
            KeyError: no such session.
        """
        if key in self._sessions:
            return self._sessions[key]
        session_id = self._session_by_digest.get(digest(key))
        if session_id is None:
            raise KeyError(f"no session has key or id {key[:12]!r}...")
        return self._sessions[session_id]

    def end_session(self, key: str, *, drop: bool = False) -> Session:
        """End the session with API key or id ``key`` (no more completions; its replica
        stickiness is released). ``drop=True`` also forgets it (its key stops working), so
        long runs do not accumulate sessions; the returned ``Session`` keeps its data.

        Raises:
            KeyError: no such session.
        """
        session = self.session(key)
        session.end()
        self.policies[session.policy].router.forget(session.session_id)
        if drop:
            self._sessions.pop(session.session_id, None)
            for d in [d for d, sid in self._session_by_digest.items()
                      if sid == session.session_id]:
                del self._session_by_digest[d]
        return session

    def _open_session(self, policy: str, metadata: dict[str, Any] | None) -> tuple[str, str]:
        if policy not in self.policies:
            raise KeyError(f"unknown policy {policy!r}; known: {sorted(self.policies)}")
        session = Session(policy=policy, metadata=dict(metadata or {}))
        key = new_secret("aa-sess")
        self._sessions[session.session_id] = session
        self._session_by_digest[digest(key)] = session.session_id
        return session.session_id, key

    def _policies(self, policy: str | None) -> list[Policy]:
        if policy is None:
            return list(self.policies.values())
        if policy not in self.policies:
            raise KeyError(f"unknown policy {policy!r}; known: {sorted(self.policies)}")
        return [self.policies[policy]]

    async def pause(self, policy: str | None = None) -> None:
        """Pause every replica of ``policy`` (None: all policies)."""
        await asyncio.gather(*(e.pause() for p in self._policies(policy)
                               for e in p.router.engines))

    async def resume(self, policy: str | None = None) -> None:
        """Resume every replica of ``policy`` (None: all policies)."""
        await asyncio.gather(*(e.resume() for p in self._policies(policy)
                               for e in p.router.engines))

    async def update_weights(self, policy: str, update: WeightUpdate) -> None:
        """Load ``update`` into every replica of ``policy`` (in order; they end on one version).

        In-process ``named_tensors`` are materialised once and handed to each replica.
        """
        engines = self.policies[policy].router.engines if policy in self.policies else None
        if engines is None:
            raise KeyError(f"unknown policy {policy!r}; known: {sorted(self.policies)}")
        if update.named_tensors is not None and len(engines) > 1:
            tensors = list(update.named_tensors)
            target = update.version if update.version is not None else engines[0].version + 1
            for e in engines:
                await e.update_weights(WeightUpdate(named_tensors=iter(tensors), version=target))
            return
        if update.path is not None and update.version is None and len(engines) > 1:
            update = WeightUpdate(path=update.path, version=engines[0].version + 1)
        for e in engines:
            await e.update_weights(update)

    def async_client(self, api_key: str | None = None, **kwargs: Any) -> Any:
        """An ``openai.AsyncOpenAI`` talking to this gateway in process (ASGI, no sockets).

        ``api_key`` defaults to the admin key (calls are then not recorded).
        """
        from ..client import async_client_for_app

        return async_client_for_app(self.app, api_key or self.admin_key, **kwargs)

    def client(self, api_key: str | None = None, **kwargs: Any) -> Any:
        """A sync ``openai.OpenAI`` talking to this gateway in process.

        The app runs on a private event-loop thread (started on first use, stopped by
        ``close``); engines must not be bound to another running loop.
        """
        from ..client import Portal, sync_client_for_app

        if self._portal is None:
            self._portal = Portal()
        return sync_client_for_app(self.app, api_key or self.admin_key, self._portal, **kwargs)

    async def close(self) -> None:
        """Close the sync portal and every engine. Idempotent."""
        if self._portal is not None:
            self._portal.close()
            self._portal = None
        for p in self.policies.values():
            for e in p.router.engines:
                await e.close()

    async def __aenter__(self) -> Gateway:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- HTTP ---------------------------------------------------------------------------
    def _principal(self, request: Request) -> Principal:
        return authenticate(bearer_token(request.headers.get("authorization")), self.admin_key,
                            self._session_by_digest)

    def _require_admin(self, request: Request) -> None:
        if self._principal(request).kind != "admin":
            raise forbidden("this endpoint needs the gateway's admin key, not a session key")

    def _session_for(self, request: Request) -> Session:
        principal = self._principal(request)
        session_id = request.path_params["session_id"]
        if principal.kind == "session" and principal.session_id != session_id:
            raise forbidden("a session key may only read or write its own session")
        if session_id not in self._sessions:
            raise not_found(f"no session {session_id!r}", code="session_not_found")
        return self._sessions[session_id]

    def _policy(self, body: dict[str, Any]) -> Policy:
        model = body.get("model")
        if not isinstance(model, str):
            raise bad_request("'model' is required: the name of a policy", param="model")
        if model not in self.policies:
            raise not_found(f"the model {model!r} does not exist; served policies: "
                            f"{sorted(self.policies)}", param="model", code="model_not_found")
        return self.policies[model]

    def _routes(self) -> list[Route]:
        return [
            Route("/health", _wrap(self._health), methods=["GET"]),
            Route("/v1/models", _wrap(self._models), methods=["GET"]),
            Route("/v1/chat/completions", _wrap(self._chat), methods=["POST"]),
            Route("/v1/completions", _wrap(self._completions), methods=["POST"]),
            Route("/rl/sessions", _wrap(self._create_session), methods=["POST"]),
            Route("/rl/sessions/{session_id}", _wrap(self._get_session), methods=["GET"]),
            Route("/rl/sessions/{session_id}/reward", _wrap(self._reward), methods=["POST"]),
            Route("/rl/sessions/{session_id}/end", _wrap(self._end), methods=["POST"]),
            Route("/admin/pause", _wrap(self._admin_pause), methods=["POST"]),
            Route("/admin/resume", _wrap(self._admin_resume), methods=["POST"]),
            Route("/admin/update_weights", _wrap(self._admin_update), methods=["POST"]),
        ]

    async def _health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "policies": {
            p.name: {"replicas": len(p.router.engines),
                     "versions": [e.version for e in p.router.engines]}
            for p in self.policies.values()}})

    async def _models(self, request: Request) -> Response:
        self._principal(request)
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "areal-agents"}
            for name in self.policies]})

    async def _completion_context(self, request: Request
                                  ) -> tuple[Policy, dict[str, Any], Session | None]:
        principal = self._principal(request)
        body = await _json_body(request)
        policy = self._policy(body)
        session = None
        if principal.kind == "session":
            session = self._sessions[principal.session_id]  # type: ignore[index]
            if session.ended:
                raise GatewayError(409, f"session {session.session_id} has ended; open a new "
                                   "one with POST /rl/sessions", code="session_ended")
            if session.policy != policy.name:
                raise bad_request(f"this session was opened for policy {session.policy!r}, "
                                  f"not {policy.name!r}", param="model")
        return policy, body, session

    async def _chat(self, request: Request) -> Response:
        policy, body, session = await self._completion_context(request)
        response = await chat_completion(policy, body, session)
        if body.get("stream"):
            opts = body.get("stream_options") or {}
            return StreamingResponse(chat_chunks(policy, response, bool(opts.get(
                "include_usage"))), media_type="text/event-stream")
        return JSONResponse(response)

    async def _completions(self, request: Request) -> Response:
        policy, body, session = await self._completion_context(request)
        if body.get("stream"):
            raise bad_request("streaming is supported on /v1/chat/completions only",
                              param="stream")
        return JSONResponse(await text_completion(policy, body, session))

    async def _create_session(self, request: Request) -> Response:
        self._require_admin(request)
        body = await _json_body(request)
        policy = body.get("policy", body.get("model"))
        if policy not in self.policies:
            raise not_found(f"unknown policy {policy!r}; served: {sorted(self.policies)}",
                            param="policy", code="model_not_found")
        metadata = body.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise bad_request("'metadata' must be an object", param="metadata")
        session_id, key = self._open_session(policy, metadata)
        return JSONResponse({"session_id": session_id, "api_key": key})

    async def _get_session(self, request: Request) -> Response:
        return JSONResponse(self._session_for(request).to_dict())

    async def _reward(self, request: Request) -> Response:
        session = self._session_for(request)
        body = await _json_body(request)
        reward = body.get("reward")
        if isinstance(reward, bool) or not isinstance(reward, int | float):
            raise bad_request(f"'reward' must be a number, got {reward!r}", param="reward")
        session.rewards.append(float(reward))
        return JSONResponse({"session_id": session.session_id, "rewards": session.rewards})

    async def _end(self, request: Request) -> Response:
        session = self.end_session(self._session_for(request).session_id)
        return JSONResponse({"session_id": session.session_id, "ended": True,
                             "num_turns": len(session.turns)})

    async def _admin_pause(self, request: Request) -> Response:
        self._require_admin(request)
        policy = (await _json_body(request, empty_ok=True)).get("policy")
        await _known(self.pause, policy)
        return JSONResponse({"paused": policy or sorted(self.policies)})

    async def _admin_resume(self, request: Request) -> Response:
        self._require_admin(request)
        policy = (await _json_body(request, empty_ok=True)).get("policy")
        await _known(self.resume, policy)
        return JSONResponse({"resumed": policy or sorted(self.policies)})

    async def _admin_update(self, request: Request) -> Response:
        self._require_admin(request)
        body = await _json_body(request)
        policy, path = body.get("policy"), body.get("path")
        if not isinstance(path, str):
            raise bad_request("'path' (a directory of *.safetensors) is required", param="path")
        version = body.get("version")
        await _known(self.update_weights, policy, WeightUpdate(path=path, version=version))
        return JSONResponse({"policy": policy, "versions": [
            e.version for e in self.policies[policy].router.engines]})


async def _known(fn: Callable[..., Awaitable[None]], *args: Any) -> None:
    try:
        await fn(*args)
    except KeyError as exc:
        raise not_found(str(exc.args[0]), param="policy", code="model_not_found") from exc


async def _json_body(request: Request, empty_ok: bool = False) -> dict[str, Any]:
    raw = await request.body()
    if not raw and empty_ok:
        return {}
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}",
                          code="invalid_json") from exc
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_json")
    return body


def _wrap(handler: Handler) -> Handler:
    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except GatewayError as exc:
            return exc.response()
        except Exception as exc:  # answer in OpenAI format, log the trace
            log.exception("gateway: unhandled error on %s", request.url.path)
            return GatewayError(500, f"internal error: {type(exc).__name__}: {exc}",
                                code="internal_error").response()

    return endpoint


