"""The gateway's HTTP routes: OpenAI endpoints, ``/rl/sessions``, ``/admin`` and the OpenAPI
document.

Every answer that is not a success is an OpenAI-format JSON error (``errors.GatewayError``):
client mistakes are 4xx naming the problem and the fix, unknown routes 404 and wrong methods
405; unexpected exceptions become 500s with the cause named, logged with their trace. Request
bodies are capped (``Gateway.max_body_bytes``, 413). Completions of a session are recorded
only once delivered (``delivery``).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..engines.base import WeightUpdate
from .auth import Principal, authenticate, bearer_token
from .completions import chat_completion, text_completion
from .delivery import Delivery, parse_json_object, read_body
from .errors import GatewayError, bad_request, conflict, forbidden, not_found, route_error
from .openapi import openapi_document
from .params import stream_fields
from .responses import ResponseStream, response_completion
from .sessions import Session, Turn
from .streaming import ChatStream

if TYPE_CHECKING:
    from .app import Gateway, ServedPolicy

log = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Response]]
T = TypeVar("T")


def build_app(gateway: Gateway) -> Starlette:
    """The Starlette app serving ``gateway``."""
    routes = [*GatewayRoutes(gateway).routes(),
              Route("/openapi.json", _wrap(_openapi), methods=["GET"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: route_error})


async def _openapi(request: Request) -> Response:
    """The OpenAPI document of this app's routes (no key needed)."""
    return JSONResponse(openapi_document(request.app.router.routes))


class GatewayRoutes:
    """Route handlers bound to one ``Gateway``."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def _principal(self, request: Request) -> Principal:
        """Who calls (after ending idle sessions: an expired key is refused); a session key's
        session counts as active now."""
        self.gw.expire_idle_sessions()
        principal = authenticate(bearer_token(request.headers.get("authorization")),
                                 self.gw.admin_key, self.gw._key_table())
        if principal.kind == "session":
            self._touch(principal.session_id)
        return principal

    def _touch(self, session_id: str | None) -> None:
        session = self.gw._sessions.get(session_id or "")
        if session is not None:
            session.last_active = self.gw.clock()

    def _require_admin(self, request: Request) -> None:
        if self._principal(request).kind != "admin":
            raise forbidden("this endpoint needs the gateway's admin key, not a session key")

    def _session_for(self, request: Request) -> Session:
        principal = self._principal(request)
        session_id = request.path_params["session_id"]
        if principal.kind == "session" and principal.session_id != session_id:
            raise forbidden("a session key may only read or write its own session")
        if session_id in self.gw._ended:
            raise _ended(session_id)
        if session_id not in self.gw._sessions:
            raise not_found(f"no session {session_id!r}", code="session_not_found")
        self._touch(session_id)
        return self.gw._sessions[session_id]

    async def _body(self, request: Request, empty_ok: bool = False) -> dict[str, Any]:
        raw = await read_body(request, self.gw.max_body_bytes)
        if not raw and empty_ok:
            return {}
        return parse_json_object(raw)

    def _optional_policy(self, value: Any, param: str) -> str | None:
        return None if value is None else self._policy_name(value, param)

    def _policy_name(self, value: Any, param: str) -> str:
        """``value`` if it names a served policy; else 400 (not a string) or 404."""
        if not isinstance(value, str):
            raise bad_request(f"'{param}' must be the name of a served policy (a string), got "
                              f"{value!r}; served: {sorted(self.gw.policies)}", param=param)
        if value not in self.gw.policies:
            raise not_found(f"the model {value!r} does not exist; served policies: "
                            f"{sorted(self.gw.policies)}", param=param, code="model_not_found")
        return value

    def routes(self) -> list[Route]:
        return [
            Route("/health", _wrap(self._health), methods=["GET"]),
            Route("/v1/models", _wrap(self._models), methods=["GET"]),
            Route("/v1/chat/completions", _wrap(self._chat), methods=["POST"]),
            Route("/v1/completions", _wrap(self._completions), methods=["POST"]),
            Route("/v1/responses", _wrap(self._responses), methods=["POST"]),
            Route("/rl/sessions", _wrap(self._create_session), methods=["POST"]),
            Route("/rl/sessions/{session_id}", _wrap(self._get_session), methods=["GET"]),
            Route("/rl/sessions/{session_id}/reward", _wrap(self._reward), methods=["POST"]),
            Route("/rl/sessions/{session_id}/end", _wrap(self._end), methods=["POST"]),
            Route("/rl/sessions/{session_id}/refresh", _wrap(self._refresh),
                  methods=["POST"]),
            Route("/admin/pause", _wrap(self._admin_pause), methods=["POST"]),
            Route("/admin/resume", _wrap(self._admin_resume), methods=["POST"]),
            Route("/admin/update_weights", _wrap(self._admin_update), methods=["POST"]),
        ]

    async def _health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "policies": {
            p.name: {"replicas": len(p.router.engines),
                     "versions": [e.version for e in p.router.engines]}
            for p in self.gw.policies.values()},
            "sessions": {"live": len(self.gw._sessions), **self.gw.ledger.to_dict()}})

    async def _models(self, request: Request) -> Response:
        self._principal(request)
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "areal-agents"}
            for name in self.gw.policies]})

    async def _completion_context(self, request: Request
                                  ) -> tuple[ServedPolicy, dict[str, Any], Session | None]:
        principal = self._principal(request)
        body = await self._body(request)
        model = body.get("model")
        if model is None:
            raise bad_request("'model' is required: the name of a policy", param="model")
        policy = self.gw.policies[self._policy_name(model, "model")]
        session = None
        if principal.kind == "session":
            session = self.gw._sessions.get(principal.session_id or "")
            if session is None or session.ended:
                raise _ended(principal.session_id, "open a new one with POST /rl/sessions")
            if session.policy != policy.name:
                raise bad_request(f"this session was opened for policy {session.policy!r}, "
                                  f"not {policy.name!r}", param="model")
        return policy, body, session

    async def _serve(self, request: Request, produce: Callable[..., Awaitable[Any]]
                     ) -> Response:
        """Run ``produce`` while watching the connection; record its turns once delivered."""
        policy, body, session = await self._completion_context(request)
        stream, include_usage = stream_fields(body)
        if stream and produce is text_completion:
            raise bad_request("streaming is supported on /v1/chat/completions only",
                              param="stream")
        delivery = Delivery(request.receive)
        if stream:  # chat chunks / Responses events as the engine produces tokens
            streamed = (ChatStream(policy, body, session, self._offload, include_usage)
                        if produce is chat_completion
                        else ResponseStream(policy, body, session, self._offload))
            started = await self._answer(delivery, streamed.start())
            if started is None:
                return Response(status_code=499)
            inner = StreamingResponse(started.events(delivery), media_type="text/event-stream")
            return delivery.respond(inner, lambda: _record(session, started.turns),
                                    self._abandon)
        result = await self._answer(delivery, produce(policy, body, session, self._offload))
        if result is None:
            return Response(status_code=499)
        response, turns = result
        return delivery.respond(JSONResponse(response), lambda: _record(session, turns),
                                self._abandon)

    async def _answer(self, delivery: Delivery, work: Awaitable[T]) -> T | None:
        """``work``'s result while ``delivery`` watches the connection; None (counted as
        abandoned, ``work`` cancelled) when the client went away first. A streamed chat
        completion's ``work`` ends at its first tokens, before the headers."""
        try:
            result = await delivery.run(work)
        except BaseException:
            delivery.close()
            raise
        if result is None:
            delivery.close()
            self.gw.ledger.abandoned += 1
        return result

    def _abandon(self) -> None:
        self.gw.ledger.abandoned += 1

    async def _offload(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.gw._tokenizer_pool(), fn)

    async def _chat(self, request: Request) -> Response:
        return await self._serve(request, chat_completion)

    async def _completions(self, request: Request) -> Response:
        return await self._serve(request, text_completion)

    async def _responses(self, request: Request) -> Response:
        return await self._serve(request, response_completion)

    async def _create_session(self, request: Request) -> Response:
        self._require_admin(request)
        body = await self._body(request)
        param = "policy" if "policy" in body else "model"
        policy = self._policy_name(body.get(param), param)
        metadata = body.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise bad_request("'metadata' must be an object", param="metadata")
        metadata = {**metadata, **_group_fields(body)}
        refused = self._refused(policy, metadata)
        if refused is not None:
            return refused
        session_id, key = self.gw._open_session(policy, metadata)
        self._touch(session_id)
        return JSONResponse({"session_id": session_id, "api_key": key})

    def _refused(self, policy: str, metadata: dict[str, Any], retry: str = "") -> Response | None:
        """The 429 answer when ``session_gate`` refuses a session of ``policy``, else None."""
        wait = self.gw.session_gate(policy, metadata) if self.gw.session_gate else None
        if wait is None:
            return None
        return GatewayError(429, f"policy {policy!r} has no capacity now (its weights are "
                            "updating or enough episodes are in flight); retry after "
                            f"{wait:g} s{retry}", code="no_capacity").response(
                                {"Retry-After": str(max(1, math.ceil(wait)))})

    async def _refresh(self, request: Request) -> Response:
        """End the session's episode (as ``/end``) and open the next one under the same key
        (a long-lived agent keeps its client). ``task_id``/``role``/``metadata`` in the body
        replace the previous session's. A refused next session answers 429: the episode
        stays ended and the same call, retried, opens the next one."""
        session_id = request.path_params["session_id"]
        principal = self._principal(request)
        if principal.kind == "session" and principal.session_id != session_id:
            raise forbidden("a session key may only refresh its own session")
        body = await self._body(request, empty_ok=True)
        if session_id not in self.gw._between_episodes:
            self.gw._end_for_refresh(self._session_for(request))
        policy, metadata, _ = self.gw._between_episodes[session_id]
        extra = body.get("metadata") or {}
        if not isinstance(extra, dict):
            raise bad_request("'metadata' must be an object", param="metadata")
        metadata = {**metadata, **extra, **_group_fields(body)}
        refused = self._refused(policy, metadata, f"; POST /rl/sessions/{session_id}/refresh "
                                "again (this episode has ended; the key waits for the next)")
        if refused is not None:
            return refused
        new_id = self.gw._reopen(session_id, metadata)
        self._touch(new_id)
        return JSONResponse({"session_id": new_id, "previous_session_id": session_id})

    async def _get_session(self, request: Request) -> Response:
        return JSONResponse(self._session_for(request).to_dict())

    async def _reward(self, request: Request) -> Response:
        session = self._session_for(request)
        body = await self._body(request)
        if session.ended:
            raise _ended(session.session_id, "post rewards before POST /rl/sessions/{id}/end")
        reward = body.get("reward")
        if isinstance(reward, bool) or not isinstance(reward, int | float):
            raise bad_request(f"'reward' must be a number, got {reward!r}", param="reward")
        turn = _turn_of(session, body)
        try:
            session.add_reward(float(reward), turn)
        except ValueError as exc:
            raise bad_request(str(exc), param="reward", code="invalid_reward") from exc
        return JSONResponse({"session_id": session.session_id, "rewards": session.rewards,
                             "turn_rewards": {str(k): v for k, v in
                                              sorted(session.turn_rewards.items())}})

    async def _end(self, request: Request) -> Response:
        session = self._session_for(request)
        body = await self._body(request, empty_ok=True)
        drop, give = body.get("drop", True), body.get("return_session", False)
        for name, value in (("drop", drop), ("return_session", give)):
            if not isinstance(value, bool):
                raise bad_request(f"'{name}' must be a boolean, got {value!r}", param=name)
        record = session.to_dict() if give else None
        self.gw._end_over_http(session, drop)
        answer = {"session_id": session.session_id, "ended": True,
                  "num_turns": len(session.turns)}
        if record is not None:
            answer["session"] = {**record, "ended": True}
        return JSONResponse(answer)

    async def _admin_pause(self, request: Request) -> Response:
        self._require_admin(request)
        body = await self._body(request, empty_ok=True)
        policy = self._optional_policy(body.get("policy"), "policy")
        await self.gw.pause(policy)
        return JSONResponse({"paused": policy or sorted(self.gw.policies)})

    async def _admin_resume(self, request: Request) -> Response:
        self._require_admin(request)
        body = await self._body(request, empty_ok=True)
        policy = self._optional_policy(body.get("policy"), "policy")
        await self.gw.resume(policy)
        return JSONResponse({"resumed": policy or sorted(self.gw.policies)})

    async def _admin_update(self, request: Request) -> Response:
        self._require_admin(request)
        body = await self._body(request)
        policy = self._policy_name(body.get("policy"), "policy")
        path, version = body.get("path"), body.get("version")
        if not isinstance(path, str) or not path:
            raise bad_request("'path' (a directory of *.safetensors) is required", param="path")
        if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
            raise bad_request(f"'version' must be an integer or null, got {version!r}",
                              param="version")
        try:
            await self.gw.update_weights(policy, WeightUpdate(path=path, version=version))
        except (FileNotFoundError, NotADirectoryError, PermissionError) as exc:  # no weights
            raise bad_request(f"could not load weights from {path!r}: {exc}; pass a directory "
                              "of *.safetensors the engine can read", param="path",
                              code="invalid_weights_path") from exc
        return JSONResponse({"policy": policy, "versions": [
            e.version for e in self.gw.policies[policy].router.engines]})


def _record(session: Session | None, turns: list[Turn]) -> None:
    if session is not None:
        for turn in turns:
            session.record(turn)


def _ended(session_id: str | None, fix: str = "open a new one with POST /rl/sessions"
           ) -> GatewayError:
    return conflict(f"session {session_id} has ended; {fix}", code="session_ended")


def _group_fields(body: dict[str, Any]) -> dict[str, Any]:
    """``task_id`` (the group sessions are compared in; a string or integer) and ``role`` (the
    agent's role, a string) of a session-opening body, validated; absent ones are left out."""
    out: dict[str, Any] = {}
    task_id, role = body.get("task_id"), body.get("role")
    if task_id is not None:
        if isinstance(task_id, bool) or not isinstance(task_id, str | int):
            raise bad_request(f"'task_id' must be a string or an integer, got {task_id!r}",
                              param="task_id")
        out["task_id"] = str(task_id)
    if role is not None:
        if not isinstance(role, str):
            raise bad_request(f"'role' must be a string, got {role!r}", param="role")
        out["role"] = role
    return out


def _turn_of(session: Session, body: dict[str, Any]) -> int | None:
    """The turn a reward names: ``turn`` (an index) or ``completion_id`` (+ ``choice``)."""
    turn, completion_id = body.get("turn"), body.get("completion_id")
    if turn is not None and completion_id is not None:
        raise bad_request("name the turn with 'turn' or with 'completion_id', not both",
                          param="turn")
    if completion_id is not None:
        choice = body.get("choice", 0)
        if not isinstance(completion_id, str) or isinstance(choice, bool) or not isinstance(
                choice, int):
            raise bad_request("'completion_id' must be the 'id' of a completion (a string) and "
                              "'choice' an integer", param="completion_id")
        try:
            return session.find_turn(completion_id, choice)
        except KeyError as exc:
            raise not_found(str(exc.args[0]), param="completion_id",
                            code="turn_not_found") from exc
    if turn is None:
        return None
    if isinstance(turn, bool) or not isinstance(turn, int):
        raise bad_request(f"'turn' must be a turn index (an integer), got {turn!r}",
                          param="turn")
    if not 0 <= turn < len(session.turns):
        raise not_found(f"session {session.session_id} has {len(session.turns)} turn(s); "
                        f"there is no turn {turn}", param="turn", code="turn_not_found")
    return turn


def _wrap(handler: Handler) -> Handler:
    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except GatewayError as exc:
            return exc.response()
        except ClientDisconnect:  # gone while sending its body: nobody reads an answer
            return Response(status_code=499)
        except Exception as exc:  # answer in OpenAI format, log the trace
            log.exception("gateway: unhandled error on %s", request.url.path)
            return GatewayError(500, f"internal error: {type(exc).__name__}: {exc}",
                                code="internal_error").response()

    return endpoint
