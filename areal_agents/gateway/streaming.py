"""Streaming chat completions: SSE chunks leave as the engine produces tokens.

``ChatStream`` serves one ``stream: true`` chat request. ``start`` validates it, starts the
generation and waits for its first tokens (or its end), so a request that fails before any
token (a bad field, a too-long prompt, every replica down) still answers with its HTTP status
and OpenAI error body, which the SDK retries or raises as usual. ``events`` then yields the
``chat.completion.chunk`` events: per choice a role chunk, content deltas as tokens arrive
(``TextStream``: text held back while it could still be cut by a stop string or is an
incomplete UTF-8 sequence), each delta's log-probs when asked, a final chunk with the finish
reason and the choice's exact ``token_ids``, the usage chunk when asked, and ``[DONE]``.
The content of a choice's deltas concatenates to exactly the non-streamed ``message.content``.

An engine failure after the first chunk ends the stream with an OpenAI error event
(``data: {"error": {...}}``, which the SDK raises as ``APIError``) and no ``[DONE]``: nothing
is recorded. A client that disconnects mid-stream cancels the generation (its rows leave the
engine's batch) and the completion counts as abandoned (``delivery``). Turns are recorded only
once ``[DONE]`` is written to a connected client, as for whole answers.

Requests whose tool calls are parsed (``tools`` given, ``tool_choice`` not ``"none"``) are
generated whole and then replayed as chunks (``completions.chat_chunks``): a tool call is
parsed from the complete text.

``pieces`` and ``finish`` are the format-free part (text as it becomes certain, then the
whole answer); ``responses.ResponseStream`` builds the streamed Responses API on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..engines.base import CompletionOutput, TokenDelta
from .chat import decode_completion
from .completions import (
    ChatCall,
    Offload,
    chat_chunks,
    chat_response,
    generate,
    logprob_entries,
    prepare_chat,
)
from .delivery import SSE_DONE, Delivery
from .errors import GatewayError
from .sessions import Session, Turn

if TYPE_CHECKING:
    from .app import ServedPolicy

log = logging.getLogger(__name__)


class TextStream:
    """The client-visible text of one completion, released as its tokens arrive.

    ``push`` returns the new text that is certain to begin the final text
    (``decode_completion`` of all tokens): it holds back the last ``len(longest stop) - 1``
    characters (a stop string may still complete there and cut them) and a trailing U+FFFD
    (a multi-byte character whose remaining bytes are in later tokens). ``finish`` returns
    the rest of the final text.
    """

    def __init__(self, tokenizer: Any, stop: list[str], stop_ids: set[int]) -> None:
        self.tokenizer, self.stop, self.stop_ids = tokenizer, stop, stop_ids
        self.hold = max((len(s) for s in stop if s), default=1) - 1
        self.ids: list[int] = []
        self.sent = ""

    def push(self, token_ids: list[int]) -> str:
        """Add tokens; the text now safe to send (possibly empty)."""
        self.ids += token_ids
        text = decode_completion(self.tokenizer, self.ids, self.stop, self.stop_ids)
        end = len(text) - self.hold
        while end > len(self.sent) and text[end - 1] == "\ufffd":
            end -= 1
        if end <= len(self.sent) or not text.startswith(self.sent):
            return ""
        piece, self.sent = text[len(self.sent):end], text[:end]
        return piece

    def finish(self, final: str) -> str:
        """The text still to send so that everything sent equals ``final``."""
        if not final.startswith(self.sent):  # a tokenizer whose decode is not prefix-stable
            log.warning("streamed text %r is not a prefix of the completion %r; the stream's "
                        "content differs from the recorded reply", self.sent, final)
            return ""
        rest, self.sent = final[len(self.sent):], final
        return rest


_END = object()  # queued when the generation task has finished (with or without error)


@dataclass
class Piece:
    """New client-visible text of one choice of a streamed completion (``ChatStream.pieces``).

    Attributes:
        index: the choice.
        text: text certain to continue the choice's content (possibly empty).
        logprobs: the chat ``logprobs`` object of the tokens behind it, when asked.
        first: the choice's first piece.
    """

    index: int
    text: str
    logprobs: dict[str, Any] | None
    first: bool


class ChatStream:
    """One streamed chat completion (see the module docstring).

    Args:
        policy: the served policy.
        body: the request body (``stream: true``).
        session: the session the completion is recorded in, or None.
        offload: runs the chat template and tokenizer off the event loop.
        include_usage: ``stream_options.include_usage``.
    """

    def __init__(self, policy: ServedPolicy, body: dict[str, Any], session: Session | None,
                 offload: Offload, include_usage: bool) -> None:
        self.policy, self.body, self.session = policy, body, session
        self.offload, self.include_usage = offload, include_usage
        self.turns: list[Turn] = []  # set once the whole completion exists
        self._call: ChatCall | None = None
        self._whole: dict[str, Any] | None = None  # a response generated whole (tool calls)
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self._first: Any = None  # the item start() waited for
        self._created = int(time.time())
        self._texts: list[TextStream] = []
        self.ended = False  # pieces() saw the generation end

    async def start(self) -> ChatStream:
        """Validate, start generating and wait for the first tokens or the end; returns this
        stream. Cancelled or failing, it leaves no generation running.

        Raises:
            GatewayError: the request failed before its first token (status and body as for
                a non-streamed request).
        """
        try:
            await self._start()
        except BaseException:
            await self.cancel()
            raise
        return self

    async def _start(self) -> None:
        call = self._call = await prepare_chat(self.policy, self.body, self.session,
                                               self.offload)
        if call.parse_calls:
            outputs, timing = await generate(self.policy, call.prompt_ids, call.fields,
                                             self.session)
            self._whole, self.turns = chat_response(self.policy, call, outputs, timing,
                                                    self.session)
            return
        self._task = asyncio.ensure_future(generate(
            self.policy, call.prompt_ids, call.fields, self.session, self._queue.put_nowait))
        self._task.add_done_callback(lambda _: self._queue.put_nowait(_END))
        self._first = await self._queue.get()
        if self._first is _END and self._task.exception() is not None:
            raise self._task.exception()  # type: ignore[misc]

    async def cancel(self) -> None:
        """Stop the generation, if running (the engine frees its rows)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def events(self, delivery: Delivery) -> AsyncIterator[str]:
        """The SSE events; stops early (cancelling the generation) when the client goes."""
        try:
            if self._whole is not None:
                for event in chat_chunks(self.policy, self._whole, self.include_usage):
                    yield event
                return
            async for event in self._stream(delivery):
                yield event
        finally:
            await self.cancel()

    @property
    def whole(self) -> dict[str, Any] | None:
        """The response when it was generated whole (tool calls parsed), else None."""
        return self._whole

    @property
    def call(self) -> ChatCall:
        """The validated request (after ``start``)."""
        assert self._call is not None, "start() first"
        return self._call

    @property
    def created(self) -> int:
        """The ``created`` time of this stream's events."""
        return self._created

    async def pieces(self, delivery: Delivery) -> AsyncIterator[Piece]:
        """The client-visible text of each choice as its tokens arrive (``TextStream``
        hold-back), with each delta's log-probs when asked. ``ended`` tells, once this is
        exhausted, whether the generation ended (then ``finish``) or the client went away."""
        assert self._call is not None and self._task is not None
        call, policy = self._call, self.policy
        self._texts = [TextStream(policy.tokenizer, call.fields["stop"], policy.stop_ids)
                       for _ in range(call.fields["n"])]
        opened: set[int] = set()
        item = self._first
        while True:
            if item is None:
                item = await _next(self._queue, delivery)
            if item is None:  # the client went away
                return
            if item is _END:
                self.ended = True
                return
            delta: TokenDelta = item
            first = delta.index not in opened
            opened.add(delta.index)
            piece = self._texts[delta.index].push(delta.token_ids)
            lp = None
            if call.fields["logprobs"]:
                out = CompletionOutput(delta.token_ids, delta.logprobs, delta.versions,
                                       "length", delta.top_logprobs)
                lp = {"content": logprob_entries(policy, out, len(out.token_ids))}
            yield Piece(delta.index, piece, lp, first)
            item = None

    def finish(self) -> tuple[dict[str, Any], list[str]]:
        """Once ``pieces`` ended with the generation: the ``chat.completion`` response and,
        per choice, the text still to send (so that all sent equals its content); sets
        ``turns``.

        Raises:
            GatewayError: the generation failed.
        """
        assert self._call is not None and self._task is not None and self.ended
        outputs, timing = self._task.result()
        response, self.turns = chat_response(self.policy, self._call, outputs, timing,
                                             self.session)
        rests = [self._texts[c["index"]].finish(c["message"]["content"] or "")
                 for c in response["choices"]]
        return response, rests

    async def _stream(self, delivery: Delivery) -> AsyncIterator[str]:
        call = self.call
        opened = 0
        async for piece in self.pieces(delivery):
            if piece.first:
                opened += 1
                yield self._event([{"index": piece.index, "delta": {"role": "assistant",
                                                                    "content": ""},
                                    "logprobs": None, "finish_reason": None}],
                                  prompt_token_ids=call.prompt_ids if opened == 1 else None)
            if piece.text or piece.logprobs:
                yield self._event([{"index": piece.index, "delta": {"content": piece.text},
                                    "logprobs": piece.logprobs, "finish_reason": None}])
        if not self.ended:  # the client went away
            return
        try:
            response, rests = self.finish()
        except GatewayError as exc:
            yield f"data: {json.dumps(exc.body())}\n\n"
            return
        for choice, rest in zip(response["choices"], rests, strict=True):
            i = choice["index"]
            if rest:
                yield self._event([{"index": i, "delta": {"content": rest}, "logprobs": None,
                                    "finish_reason": None}])
            yield self._event([{"index": i, "delta": {}, "logprobs": None,
                                "finish_reason": choice["finish_reason"],
                                "token_ids": choice["token_ids"]}])
        if self.include_usage:
            yield self._event([], usage=response["usage"])
        yield SSE_DONE.decode()

    def _event(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        assert self._call is not None
        chunk = {"id": self._call.response_id, "object": "chat.completion.chunk",
                 "created": self._created, "model": self.policy.name, "choices": choices,
                 **extra}
        return f"data: {json.dumps(chunk)}\n\n"


async def _next(queue: asyncio.Queue[Any], delivery: Delivery) -> Any:
    """The next queued item, or None once the client has disconnected."""
    if not queue.empty():
        return queue.get_nowait()
    getter = asyncio.ensure_future(queue.get())
    await asyncio.wait({getter, delivery.watch}, return_when=asyncio.FIRST_COMPLETED)
    if getter.done():
        return getter.result()
    getter.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await getter
    return None if delivery.disconnected else await queue.get()
