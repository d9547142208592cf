"""The gateway's OpenAPI 3.1 document, served at ``GET /openapi.json``.

The paths come from the app's route table (``openapi_document(app.routes)``); this module
holds only what a route table cannot say: a summary and request/response schemas per
operation. ``openapi_document`` raises when a route has no entry here (or an entry no route),
so the two cannot drift apart.
"""

from __future__ import annotations

from typing import Any

_NUM = {"type": "number"}
_INT = {"type": "integer"}
_STR = {"type": "string"}
_BOOL = {"type": "boolean"}
_OBJ = {"type": "object"}
_POLICY = {"type": "string", "description": "a served policy (model) name"}

_MESSAGE = {"type": "object", "required": ["role"], "properties": {
    "role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
    "content": {"anyOf": [_STR, {"type": "array", "items": _OBJ}, {"type": "null"}]},
    "tool_calls": {"type": "array", "items": _OBJ}, "tool_call_id": _STR, "name": _STR}}
_SAMPLING = {
    "max_tokens": {"type": "integer", "minimum": 1}, "max_completion_tokens":
        {"type": "integer", "minimum": 1},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "top_k": {"type": "integer", "minimum": 0}, "seed": _INT,
    "n": {"type": "integer", "minimum": 1},
    "stop": {"anyOf": [_STR, {"type": "array", "items": _STR, "maxItems": 4}]},
    "stream": _BOOL}
_CHAT_REQUEST = {"type": "object", "required": ["model", "messages"], "properties": {
    "model": _POLICY, "messages": {"type": "array", "items": _MESSAGE, "minItems": 1},
    "tools": {"type": "array", "items": {"type": "object", "required": ["function"],
                                         "properties": {"type": {"const": "function"},
                                                        "function": _OBJ}}},
    "tool_choice": {"anyOf": [_STR, _OBJ]}, "logprobs": _BOOL,
    "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
    "stream_options": {"type": "object", "properties": {"include_usage": _BOOL}},
    **_SAMPLING}}
_TEXT_REQUEST = {"type": "object", "required": ["model", "prompt"], "properties": {
    "model": _POLICY, "prompt": {"anyOf": [_STR, {"type": "array", "items": _INT,
                                                  "minItems": 1}]},
    "logprobs": {"type": "integer", "minimum": 0, "maximum": 20}, **_SAMPLING}}
_COMPLETION = {"type": "object", "required": ["id", "object", "model", "choices", "usage"],
               "properties": {"id": _STR, "object": _STR, "model": _STR, "created": _INT,
                              "choices": {"type": "array", "items": _OBJ}, "usage": _OBJ,
                              "prompt_token_ids": {"type": "array", "items": _INT}}}
_RESPONSES_REQUEST = {"type": "object", "required": ["model", "input"], "properties": {
    "model": _POLICY, "input": {"anyOf": [_STR, {"type": "array", "items": _OBJ,
                                                 "minItems": 1}]},
    "instructions": _STR, "tools": {"type": "array", "items": {
        "type": "object", "required": ["type", "name"], "properties": {
            "type": {"const": "function"}, "name": _STR, "parameters": _OBJ}}},
    "tool_choice": {"anyOf": [_STR, _OBJ]},
    "temperature": _SAMPLING["temperature"], "top_p": _SAMPLING["top_p"],
    "max_output_tokens": {"type": "integer", "minimum": 1}, "stream": {"const": False}}}
_RESPONSE = {"type": "object", "required": ["id", "object", "model", "output", "usage"],
             "properties": {"id": _STR, "object": {"const": "response"}, "model": _STR,
                            "status": _STR, "output": {"type": "array", "items": _OBJ},
                            "usage": _OBJ}}
_SESSION = {"type": "object", "required": ["session_id", "policy", "turns", "rewards", "ended"],
            "properties": {"session_id": _STR, "policy": _STR, "metadata": _OBJ,
                           "turns": {"type": "array", "items": _OBJ},
                           "rewards": {"type": "array", "items": _NUM},
                           "turn_rewards": {"type": "object", "additionalProperties": _NUM},
                           "ended": _BOOL, "created": _NUM}}
_POLICY_BODY = {"type": "object", "properties": {"policy": _POLICY}}
_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"], "properties": {
        "message": _STR, "type": _STR, "param": {"type": ["string", "null"]},
        "code": {"type": ["string", "null"]}}}}}

# (method, path) -> (summary, request body schema or None, 200 response schema, needs a key)
OPERATIONS: dict[tuple[str, str], tuple[str, dict | None, dict, bool]] = {
    ("GET", "/health"): ("Liveness, policy versions and session counts", None, _OBJ, False),
    ("GET", "/openapi.json"): ("This document", None, _OBJ, False),
    ("GET", "/v1/models"): ("The served policies as OpenAI models", None, _OBJ, True),
    ("POST", "/v1/chat/completions"): (
        "Chat completion (SSE when stream); recorded with a session key", _CHAT_REQUEST,
        _COMPLETION, True),
    ("POST", "/v1/completions"): (
        "Text completion of one prompt (string or token ids)", _TEXT_REQUEST, _COMPLETION,
        True),
    ("POST", "/v1/responses"): (
        "Minimal Responses API (text, function tools; no stream, nothing stored); recorded "
        "with a session key like a chat completion", _RESPONSES_REQUEST, _RESPONSE, True),
    ("POST", "/rl/sessions"): (
        "Open a recorded session (admin key); answers its id and API key",
        {"type": "object", "required": ["policy"], "properties": {
            "policy": _POLICY, "metadata": _OBJ, "task_id": {"anyOf": [_STR, _INT]},
            "role": _STR}},
        {"type": "object", "required": ["session_id", "api_key"],
         "properties": {"session_id": _STR, "api_key": _STR}}, True),
    ("GET", "/rl/sessions/{session_id}"): ("A session's turns and rewards", None, _SESSION,
                                           True),
    ("POST", "/rl/sessions/{session_id}/reward"): (
        "Post a finite reward to the session, or to one turn (index or completion id)",
        {"type": "object", "required": ["reward"], "properties": {
            "reward": _NUM, "turn": {"type": "integer", "minimum": 0}, "completion_id": _STR,
            "choice": {"type": "integer", "minimum": 0}}},
        {"type": "object", "properties": {"session_id": _STR, "rewards": {
            "type": "array", "items": _NUM}, "turn_rewards": _OBJ}}, True),
    ("POST", "/rl/sessions/{session_id}/end"): (
        "End the session; the gateway forgets it unless drop is false",
        {"type": "object", "properties": {"drop": _BOOL, "return_session": _BOOL}},
        {"type": "object", "properties": {"session_id": _STR, "ended": _BOOL,
                                          "num_turns": _INT, "session": _SESSION}}, True),
    ("POST", "/rl/sessions/{session_id}/refresh"): (
        "End the episode (as /end) and open the next session under the same key; 429 + "
        "Retry-After when refused (retry the same call)",
        {"type": "object", "properties": {"task_id": {"anyOf": [_STR, _INT]}, "role": _STR,
                                          "metadata": _OBJ}},
        {"type": "object", "required": ["session_id"], "properties": {
            "session_id": _STR, "previous_session_id": _STR}}, True),
    ("POST", "/admin/pause"): ("Pause a policy's replicas (all policies without one)",
                               _POLICY_BODY, _OBJ, True),
    ("POST", "/admin/resume"): ("Resume a policy's replicas", _POLICY_BODY, _OBJ, True),
    ("POST", "/admin/update_weights"): (
        "Load weights (a directory of *.safetensors) into every replica of a policy",
        {"type": "object", "required": ["policy", "path"], "properties": {
            "policy": _POLICY, "path": _STR, "version": {"type": ["integer", "null"]}}},
        {"type": "object", "properties": {"policy": _STR, "versions": {
            "type": "array", "items": _INT}}}, True),
}

_ERRORS = {str(code): {"description": text, "content": {"application/json": {
    "schema": _ERROR}}} for code, text in [
    (400, "invalid request"), (401, "missing or unknown key"), (403, "forbidden"),
    (404, "unknown model, session, turn or route"), (409, "the session has ended"),
    (413, "request body over the limit")]}


def _operation(method: str, path: str) -> dict[str, Any]:
    summary, request, response, keyed = OPERATIONS[(method, path)]
    op: dict[str, Any] = {
        "summary": summary,
        "operationId": (method.lower() + path.replace("/", "_").replace("{", "").replace(
            "}", "").replace(".", "_")),
        "responses": {"200": {"description": "success", "content": {
            "application/json": {"schema": response}}}, **_ERRORS},
    }
    if request is not None:
        op["requestBody"] = {"required": "required" in request,
                             "content": {"application/json": {"schema": request}}}
    if "{session_id}" in path:
        op["parameters"] = [{"name": "session_id", "in": "path", "required": True,
                             "schema": _STR}]
    op["security"] = [{"bearer": []}] if keyed else []
    return op


def openapi_document(routes: list[Any]) -> dict[str, Any]:
    """The OpenAPI document of ``routes`` (Starlette ``Route`` objects).

    Raises:
        KeyError: a route has no entry in ``OPERATIONS``, or an entry matches no route.
    """
    paths: dict[str, dict[str, Any]] = {}
    seen = set()
    for route in routes:
        for method in sorted(route.methods or []):
            if method == "HEAD":
                continue
            seen.add((method, route.path))
            paths.setdefault(route.path, {})[method.lower()] = _operation(method, route.path)
    stale = set(OPERATIONS) - seen
    if stale:
        raise KeyError(f"OPERATIONS lists routes the app does not serve: {sorted(stale)}")
    return {
        "openapi": "3.1.0",
        "info": {"title": "areal-agents gateway", "version": "1",
                 "description": "OpenAI-compatible completions recorded per session for RL: "
                                "open a session (admin key) -> chat with the session key -> "
                                "post rewards -> end."},
        "paths": paths,
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
