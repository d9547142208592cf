"""The gateway's HTTP routes: OpenAI endpoints, ``/rl/sessions`` and ``/admin``.

Every handler answers errors in OpenAI format (``errors.GatewayError``); unexpected
exceptions become 500s with the cause named, and are logged with their trace.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..engines.base import WeightUpdate
from .auth import Principal, authenticate, bearer_token
from .completions import chat_chunks, chat_completion, text_completion
from .errors import GatewayError, bad_request, forbidden, not_found
from .sessions import Session

if TYPE_CHECKING:
    from .app import Gateway, ServedPolicy

log = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Response]]


def build_app(gateway: Gateway) -> Starlette:
    """The Starlette app serving ``gateway``."""
    return Starlette(routes=GatewayRoutes(gateway).routes())


class GatewayRoutes:
    """Route handlers bound to one ``Gateway``."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def _principal(self, request: Request) -> Principal:
        return authenticate(bearer_token(request.headers.get("authorization")), self.gw.admin_key,
                            self.gw._session_by_digest)

    def _require_admin(self, request: Request) -> None:
        if self._principal(request).kind != "admin":
            raise forbidden("this endpoint needs the gateway's admin key, not a session key")

    def _session_for(self, request: Request) -> Session:
        principal = self._principal(request)
        session_id = request.path_params["session_id"]
        if principal.kind == "session" and principal.session_id != session_id:
            raise forbidden("a session key may only read or write its own session")
        if session_id not in self.gw._sessions:
            raise not_found(f"no session {session_id!r}", code="session_not_found")
        return self.gw._sessions[session_id]

    def _policy(self, body: dict[str, Any]) -> ServedPolicy:
        model = body.get("model")
        if not isinstance(model, str):
            raise bad_request("'model' is required: the name of a policy", param="model")
        if model not in self.gw.policies:
            raise not_found(f"the model {model!r} does not exist; served policies: "
                            f"{sorted(self.gw.policies)}", param="model", code="model_not_found")
        return self.gw.policies[model]

    def routes(self) -> list[Route]:
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
            for p in self.gw.policies.values()}})

    async def _models(self, request: Request) -> Response:
        self._principal(request)
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "areal-agents"}
            for name in self.gw.policies]})

    async def _completion_context(self, request: Request
                                  ) -> tuple[ServedPolicy, dict[str, Any], Session | None]:
        principal = self._principal(request)
        body = await _json_body(request)
        policy = self._policy(body)
        session = None
        if principal.kind == "session":
            session = self.gw._sessions[principal.session_id]  # type: ignore[index]
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
        if policy not in self.gw.policies:
            raise not_found(f"unknown policy {policy!r}; served: {sorted(self.gw.policies)}",
                            param="policy", code="model_not_found")
        metadata = body.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise bad_request("'metadata' must be an object", param="metadata")
        session_id, key = self.gw._open_session(policy, metadata)
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
        session = self.gw.end_session(self._session_for(request).session_id)
        return JSONResponse({"session_id": session.session_id, "ended": True,
                             "num_turns": len(session.turns)})

    async def _admin_pause(self, request: Request) -> Response:
        self._require_admin(request)
        policy = (await _json_body(request, empty_ok=True)).get("policy")
        await _known(self.gw.pause, policy)
        return JSONResponse({"paused": policy or sorted(self.gw.policies)})

    async def _admin_resume(self, request: Request) -> Response:
        self._require_admin(request)
        policy = (await _json_body(request, empty_ok=True)).get("policy")
        await _known(self.gw.resume, policy)
        return JSONResponse({"resumed": policy or sorted(self.gw.policies)})

    async def _admin_update(self, request: Request) -> Response:
        self._require_admin(request)
        body = await _json_body(request)
        policy, path = body.get("policy"), body.get("path")
        if not isinstance(path, str):
            raise bad_request("'path' (a directory of *.safetensors) is required", param="path")
        version = body.get("version")
        await _known(self.gw.update_weights, policy, WeightUpdate(path=path, version=version))
        return JSONResponse({"policy": policy, "versions": [
            e.version for e in self.gw.policies[policy].router.engines]})


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


