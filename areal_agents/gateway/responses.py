"""``POST /v1/responses``: the minimal Responses API that OpenAI's Agents SDK sends by default,
served on the chat-completion path (same session recording, same tokenization contract).

A Responses request is translated into a chat request (``to_chat_body``), served by
``chat_completion`` and its answer translated back (``to_response``). Served: ``input`` as a
string or a list of items (messages with text parts, ``function_call`` and
``function_call_output`` items; ``reasoning`` items are skipped), ``instructions`` (a system
message), function ``tools``, ``tool_choice``, ``temperature``, ``top_p``,
``max_output_tokens``. Accepted and ignored: ``include``, ``store``, ``truncation``,
``parallel_tool_calls``, ``metadata``, ``reasoning``, ``text``, ``prompt_cache_*``, ``user``,
``service_tier``, ``context_management``. ``stream: true`` answers the Responses event
stream (what the Agents SDK's ``Runner.run_streamed`` reads) with text deltas as the engine
produces tokens (``ResponseStream``; replayed from the whole answer when tool calls are
parsed: ``response_events``). Refused
with a 400 naming the fix: ``previous_response_id`` / ``conversation`` (nothing is stored:
send the whole conversation, as the SDK does by default), non-function tools, non-text
content.

The Response's ``id`` is the recorded turn's completion id, so ``POST
/rl/sessions/{id}/reward {"completion_id": response.id}`` rewards that turn.

Example:
    >>> body = to_chat_body({"model": "p", "instructions": "Be brief.", "input": "2 + 3 ="})
    >>> body["messages"]
    [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': '2 + 3 ='}]
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

from .completions import Offload, chat_completion, inline
from .delivery import Delivery
from .errors import GatewayError, bad_request
from .sessions import Session, Turn
from .streaming import ChatStream

if TYPE_CHECKING:
    from .app import ServedPolicy

_REFUSED = {
    "previous_response_id": "responses are not stored; send the whole conversation as "
                            "'input' (the Agents SDK does unless told to chain responses)",
    "conversation": "conversations are not stored; send the whole conversation as 'input'",
}
_TEXT_PARTS = {"input_text", "output_text", "text"}


def _text(content: Any, where: str) -> str:
    """The text of a message's content: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in _TEXT_PARTS:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad_request(f"{where}: only text content parts are served "
                                  f"({sorted(_TEXT_PARTS)}), got {kind!r}", param="input")
            parts.append(str(part.get("text", "")))
        return "".join(parts)
    raise bad_request(f"{where}: content must be a string or a list of text parts",
                      param="input")


def _messages(items: Any) -> list[dict[str, Any]]:
    """Chat messages of a Responses ``input``; consecutive function calls (and the assistant
    text before them) join one assistant message, as the gateway's chat reply holds them."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise bad_request("'input' must be a string or a non-empty list of input items",
                          param="input")
    out: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise bad_request(f"input[{i}] must be an object, got {item!r}", param="input")
        kind = item.get("type", "message")
        if kind == "message":
            msg = {"role": item.get("role"), "content": _text(item.get("content"),
                                                              f"input[{i}]")}
            out.append(msg)
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function", "function": {
                "name": item.get("name"), "arguments": item.get("arguments", "")}}
            last = out[-1] if out else None
            if last is not None and last.get("role") == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            out.append({"role": "tool", "tool_call_id": item.get("call_id"),
                        "content": _text(output, f"input[{i}].output")})
        elif kind == "reasoning":
            continue
        else:
            raise bad_request(f"input[{i}] has type {kind!r}; served item types: message, "
                              "function_call, function_call_output (reasoning is skipped)",
                              param="input")
    return out


def _tools(tools: Any) -> list[dict[str, Any]] | None:
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list):
        raise bad_request("'tools' must be a list of function tools", param="tools")
    out = []
    for t in tools:
        if not isinstance(t, dict) or t.get("type") != "function" or not t.get("name"):
            kind = t.get("type") if isinstance(t, dict) else t
            raise bad_request(f"only function tools ({{'type': 'function', 'name', "
                              f"'parameters'}}) are served, got {kind!r}", param="tools")
        fn = {"name": t["name"], "description": t.get("description") or "",
              "parameters": t.get("parameters") or {"type": "object", "properties": {}}}
        out.append({"type": "function", "function": fn})
    return out


def to_chat_body(body: dict[str, Any]) -> dict[str, Any]:
    """The chat-completion body equivalent to a Responses request body.

    Raises:
        GatewayError: 400 for a refused field, item, tool or content part (the message names
            the fix).
    """
    for name, fix in _REFUSED.items():
        if body.get(name):
            raise bad_request(f"'{name}': {fix}", param=name)
    messages = _messages(body.get("input"))
    instructions = body.get("instructions")
    if instructions:
        if not isinstance(instructions, str):
            raise bad_request("'instructions' must be a string", param="instructions")
        messages.insert(0, {"role": "system", "content": instructions})
    chat: dict[str, Any] = {"model": body.get("model"), "messages": messages}
    tools = _tools(body.get("tools"))
    if tools:
        chat["tools"] = tools
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "function":
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    if choice is not None:
        chat["tool_choice"] = choice
    for src, dst in (("temperature", "temperature"), ("top_p", "top_p"),
                     ("max_output_tokens", "max_tokens"), ("seed", "seed")):
        if body.get(src) is not None:
            chat[dst] = body[src]
    return chat


def _envelope(body: dict[str, Any], tools: list[dict] | None, response_id: str,
              created: int, model: str) -> dict[str, Any]:
    """The fields of a Responses ``response`` object that echo the request."""
    return {
        "id": response_id, "object": "response", "created_at": created, "error": None,
        "model": model, "instructions": body.get("instructions"),
        "metadata": body.get("metadata") or {},
        "parallel_tool_calls": bool(body.get("parallel_tool_calls", True)),
        "temperature": body.get("temperature"), "top_p": body.get("top_p"),
        "max_output_tokens": body.get("max_output_tokens"),
        "tool_choice": body.get("tool_choice") or "auto",
        "tools": list(body.get("tools") or []) if tools else [],
        "text": {"format": {"type": "text"}}, "truncation": "disabled", "store": False,
    }


def _message_item(text: str, item_id: str | None = None) -> dict[str, Any]:
    return {"type": "message", "id": item_id or f"msg_{uuid.uuid4().hex}", "role": "assistant",
            "status": "completed", "content": [{"type": "output_text", "text": text,
                                                "annotations": [], "logprobs": []}]}


def to_response(chat: dict[str, Any], body: dict[str, Any], tools: list[dict] | None
                ) -> dict[str, Any]:
    """The Responses ``response`` object of a one-choice chat completion ``chat``."""
    choice = chat["choices"][0]
    reply = choice["message"]
    output: list[dict[str, Any]] = []
    if reply.get("content") or not reply.get("tool_calls"):  # an empty reply is a message too
        output.append(_message_item(reply.get("content") or ""))
    for call in reply.get("tool_calls") or []:
        output.append({"type": "function_call", "id": f"fc_{uuid.uuid4().hex}",
                       "call_id": call["id"], "name": call["function"]["name"],
                       "arguments": call["function"]["arguments"], "status": "completed"})
    truncated = choice["finish_reason"] == "length"
    usage = chat["usage"]
    return {
        **_envelope(body, tools, chat["id"], chat["created"], chat["model"]),
        "status": "incomplete" if truncated else "completed",
        "incomplete_details": {"reason": "max_output_tokens"} if truncated else None,
        "output": output,
        "usage": {"input_tokens": usage["prompt_tokens"],
                  "output_tokens": usage["completion_tokens"],
                  "total_tokens": usage["total_tokens"],
                  "input_tokens_details": {"cached_tokens": 0},
                  "output_tokens_details": {"reasoning_tokens": 0}},
        "prompt_token_ids": chat["prompt_token_ids"], "token_ids": choice["token_ids"],
        "session_id": chat["session_id"],
    }


async def response_completion(policy: ServedPolicy, body: dict[str, Any],
                              session: Session | None, offload: Offload = inline
                              ) -> tuple[dict[str, Any], list[Turn]]:
    """Serve a Responses request through ``chat_completion``.

    Returns:
        ``(response, turns)`` as ``chat_completion``: the ``response`` object and the turns
        to record once delivered (their ``request_id`` is the response's ``id``).

    Raises:
        GatewayError: 400 as ``to_chat_body`` and ``chat_completion``; 500 for engine errors.
    """
    chat_body = to_chat_body(body)
    chat, turns = await chat_completion(policy, chat_body, session, offload)
    return to_response(chat, body, chat_body.get("tools")), turns


class _Events:
    """Numbered Responses events: ``event: <type>`` plus ``data: {..., "sequence_number"}``."""

    def __init__(self) -> None:
        self.seq = 0

    def __call__(self, kind: str, **fields: Any) -> str:
        data = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(data)}\n\n"


def _pending(response: dict[str, Any]) -> dict[str, Any]:
    return {**response, "status": "in_progress", "output": [], "usage": None,
            "incomplete_details": None}


def _text_done(event: _Events, item: dict[str, Any], index: int) -> Iterator[str]:
    """The events closing message ``item`` (its deltas sent): text, part and item done."""
    where = {"item_id": item["id"], "output_index": index}
    for k, part in enumerate(item["content"]):
        yield event("response.output_text.done", **where, content_index=k, text=part["text"],
                    logprobs=[])
        yield event("response.content_part.done", **where, content_index=k, part=part)
    yield event("response.output_item.done", output_index=index, item=item)


def _final(event: _Events, response: dict[str, Any]) -> str:
    kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
    return event(kind, response=response)


def response_events(response: dict[str, Any]) -> Iterator[str]:
    """The Responses API's server-sent events for a finished ``response`` (``to_response``;
    replayed when it was generated whole: tool calls are parsed from the complete text).

    In order: ``response.created``, ``response.in_progress``; per output item
    ``response.output_item.added``, then for a message ``response.content_part.added``,
    ``response.output_text.delta`` (the whole text), ``response.output_text.done``,
    ``response.content_part.done``, or for a function call
    ``response.function_call_arguments.delta`` / ``.done``, then
    ``response.output_item.done``; last ``response.completed`` (``response.incomplete`` when
    the reply was cut at ``max_output_tokens``). Each is ``event: <type>`` plus ``data: {...,
    "sequence_number": n}``. ``ResponseStream`` sends the same sequence with the text
    deltas as the engine produces tokens.
    """
    event = _Events()
    yield event("response.created", response=_pending(response))
    yield event("response.in_progress", response=_pending(response))
    for index, item in enumerate(response["output"]):
        where = {"item_id": item["id"], "output_index": index}
        if item["type"] == "message":
            yield event("response.output_item.added", output_index=index,
                        item={**item, "status": "in_progress", "content": []})
            for k, part in enumerate(item["content"]):
                at = {**where, "content_index": k}
                yield event("response.content_part.added", **at,
                            part={**part, "text": ""})
                yield event("response.output_text.delta", **at, delta=part["text"],
                            logprobs=[])
            yield from _text_done(event, item, index)
            continue
        yield event("response.output_item.added", output_index=index,
                    item={**item, "status": "in_progress", "arguments": ""})
        yield event("response.function_call_arguments.delta", **where,
                    delta=item["arguments"])
        yield event("response.function_call_arguments.done", **where,
                    arguments=item["arguments"], name=item["name"])
        yield event("response.output_item.done", output_index=index, item=item)
    yield _final(event, response)


class ResponseStream:
    """One streamed Responses request (``stream: true``): ``response.output_text.delta``
    events leave as the engine produces tokens.

    Served by a ``ChatStream`` on the translated chat body, so its rules hold here too:
    ``start`` answers a failure before the first tokens with its HTTP status; text is held
    back while a stop string could still cut it or a UTF-8 character is incomplete; a client
    that goes away cancels the generation; an engine failure mid-stream ends the stream with
    an ``error`` event (``{"type": "error", "code", "message", "error": {...}}``, which the
    SDK raises as ``APIError``) and nothing is recorded; the turn (its exact token ids) is
    recorded once ``response.completed`` reached a connected client. Requests whose tool
    calls are parsed are generated whole and replayed (``response_events``).

    Args:
        policy, session, offload: as ``ChatStream``.
        body: the Responses request body.
    """

    def __init__(self, policy: ServedPolicy, body: dict[str, Any], session: Session | None,
                 offload: Offload = inline) -> None:
        self.policy, self.body, self.session, self.offload = policy, body, session, offload
        self.chat_body: dict[str, Any] = {}
        self._chat: ChatStream | None = None

    @property
    def turns(self) -> list[Turn]:
        """The turns to record once delivered (set when the whole completion exists)."""
        return self._chat.turns if self._chat is not None else []

    async def start(self) -> ResponseStream:
        """Validate, start generating and wait for the first tokens or the end.

        Raises:
            GatewayError: 400 as ``to_chat_body``; the request failed before its first token.
        """
        self.chat_body = to_chat_body(self.body)
        self._chat = await ChatStream(self.policy, self.chat_body, self.session,
                                      self.offload, include_usage=False).start()
        return self

    async def events(self, delivery: Delivery) -> AsyncIterator[str]:
        """The Responses events (``response_events``' sequence); stops early, cancelling the
        generation, when the client goes."""
        chat, tools = self._chat, self.chat_body.get("tools")
        assert chat is not None, "start() first"
        try:
            if chat.whole is not None:
                for line in response_events(to_response(chat.whole, self.body, tools)):
                    yield line
                return
            async for line in self._streamed(chat, delivery, tools):
                yield line
        finally:
            await chat.cancel()

    async def _streamed(self, chat: ChatStream, delivery: Delivery,
                        tools: list[dict] | None) -> AsyncIterator[str]:
        event, call = _Events(), chat.call
        envelope = {**_envelope(self.body, tools, call.response_id, chat.created,
                                self.policy.name),
                    "prompt_token_ids": list(call.prompt_ids),
                    "session_id": self.session.session_id if self.session else None}
        item_id = f"msg_{uuid.uuid4().hex}"
        at = {"item_id": item_id, "output_index": 0, "content_index": 0}
        yield event("response.created", response=_pending(envelope))
        yield event("response.in_progress", response=_pending(envelope))
        yield event("response.output_item.added", output_index=0,
                    item={**_message_item("", item_id), "status": "in_progress",
                          "content": []})
        yield event("response.content_part.added", **at,
                    part=_message_item("")["content"][0])
        async for piece in chat.pieces(delivery):
            if piece.text:
                yield event("response.output_text.delta", **at, delta=piece.text, logprobs=[])
        if not chat.ended:  # the client went away
            return
        try:
            answer, rests = chat.finish()
        except GatewayError as exc:
            error = exc.body()["error"]
            yield event("error", code=error["code"], message=error["message"],
                        param=error["param"], error=error)
            return
        if rests[0]:
            yield event("response.output_text.delta", **at, delta=rests[0], logprobs=[])
        response = to_response(answer, self.body, tools)
        response["created_at"] = chat.created
        (item,) = response["output"]  # tool calls are not parsed on this path
        item["id"] = item_id
        for line in _text_done(event, item, 0):
            yield line
        yield _final(event, response)
