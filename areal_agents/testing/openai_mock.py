"""``OpenAIMock``: an OpenAI-schema handler for ``httpx2.MockTransport`` (agent tests, no engine).

Example:
    >>> import asyncio
    >>> mock = OpenAIMock(["hi there"])
    >>> client = mock.async_client()
    >>> r = asyncio.run(client.chat.completions.create(model="m", messages=[
    ...     {"role": "user", "content": "hello"}]))
    >>> r.choices[0].message.content, mock.requests[0]["messages"][0]["content"]
    ('hi there', 'hello')
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import httpx2
import openai

Reply = str | dict[str, Any] | int | Exception
"""A scripted reply: assistant text, an assistant message dict (``content``/``tool_calls``),
an HTTP error status (answered with an OpenAI error body), or an exception to raise (e.g.
``httpx2.ConnectError`` to simulate a dead server)."""


class OpenAIMock:
    """Answers ``/v1/chat/completions`` with scripted replies, in order (the last repeats).

    Args:
        replies: the scripted replies, or a callable ``(request_body) -> Reply``.

    Attributes:
        requests: every chat request body received (JSON-decoded), in order.
    """

    def __init__(self, replies: Sequence[Reply] | Callable[[dict[str, Any]], Reply]) -> None:
        self.replies = replies
        self.requests: list[dict[str, Any]] = []

    def _next(self, body: dict[str, Any]) -> Reply:
        if callable(self.replies):
            return self.replies(body)
        if not self.replies:
            raise ValueError("OpenAIMock has no replies scripted")
        return self.replies[min(len(self.requests) - 1, len(self.replies) - 1)]

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        if not request.url.path.endswith("/chat/completions"):
            return _error(404, f"OpenAIMock serves only /chat/completions, not {request.url.path}")
        body = json.loads(request.content)
        self.requests.append(body)
        reply = self._next(body)
        if isinstance(reply, Exception):
            raise reply
        if isinstance(reply, int):
            return _error(reply, f"scripted error {reply}")
        message = {"role": "assistant", "content": reply} if isinstance(reply, str) else {
            "role": "assistant", "content": None, **reply}
        finish = "tool_calls" if message.get("tool_calls") else "stop"
        return httpx2.Response(200, json={
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": 0,
            "model": body.get("model", ""),
            "choices": [{"index": 0, "message": message, "finish_reason": finish,
                         "logprobs": None}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        })

    def async_client(self, api_key: str = "mock-key") -> openai.AsyncOpenAI:
        """An ``AsyncOpenAI`` routed to this mock (``max_retries=0``)."""
        http = httpx2.AsyncClient(transport=httpx2.MockTransport(self))
        return openai.AsyncOpenAI(api_key=api_key, base_url="http://mock/v1", http_client=http,
                                  max_retries=0)


def _error(status: int, message: str) -> httpx2.Response:
    return httpx2.Response(status, json={"error": {"message": message, "type": "mock_error",
                                                   "param": None, "code": None}})
