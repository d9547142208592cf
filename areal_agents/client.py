"""Build official ``openai`` clients for a gateway: in process (ASGI, no sockets) or by URL.

Clients are built with ``max_retries=0`` by default: ``LLMAgent`` retries (bounded, logged:
``agents.llm.call_with_retries``), and the SDK's own silent retries would double-count
recorded turns.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any

import httpx2
import openai

_BASE = "http://gateway/v1"


def async_client_for_app(app: Any, api_key: str, *, timeout: float = 120.0,
                         max_retries: int = 0) -> openai.AsyncOpenAI:
    """An ``AsyncOpenAI`` whose HTTP client calls the ASGI ``app`` directly."""
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url=_BASE,
                              timeout=timeout)
    return openai.AsyncOpenAI(api_key=api_key, base_url=_BASE, http_client=http,
                              max_retries=max_retries, timeout=timeout)


def async_client_for_url(base_url: str, api_key: str, *, timeout: float = 120.0,
                         max_retries: int = 0) -> openai.AsyncOpenAI:
    """An ``AsyncOpenAI`` for a gateway served at ``base_url`` (e.g. ``http://127.0.0.1:8000``;
    ``/v1`` is appended when missing)."""
    return openai.AsyncOpenAI(api_key=api_key, base_url=_v1(base_url),
                              max_retries=max_retries, timeout=timeout)


def client_for_url(base_url: str, api_key: str, *, timeout: float = 120.0,
                   max_retries: int = 0) -> openai.OpenAI:
    """A sync ``OpenAI`` for a gateway served at ``base_url``."""
    return openai.OpenAI(api_key=api_key, base_url=_v1(base_url), max_retries=max_retries,
                         timeout=timeout)


def _v1(base_url: str) -> str:
    base_url = base_url.rstrip("/")
    return base_url if base_url.endswith("/v1") else base_url + "/v1"


class RemoteGateway:
    """A gateway served elsewhere (``areal-agents serve``), driven over HTTP with the admin key.

    Offers the part of ``Gateway``'s in-process API that agents use (``create_session``,
    ``async_client``, ``session``, ``end_session``), so ``LLMAgent.for_gateway`` works with
    either.

    Args:
        base_url: the server, e.g. ``http://127.0.0.1:8000``.
        admin_key: the server's admin key.
    """

    def __init__(self, base_url: str, admin_key: str, *, timeout: float = 120.0) -> None:
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.admin_key = admin_key
        self.timeout = timeout
        self._keys: dict[str, str] = {}  # api key -> session id

    def _http(self, key: str) -> httpx2.AsyncClient:
        return httpx2.AsyncClient(base_url=self.base_url, timeout=self.timeout,
                                  headers={"Authorization": f"Bearer {key}"})

    async def create_session(self, policy: str, metadata: dict[str, Any] | None = None) -> str:
        """Open a session (``POST /rl/sessions``); returns its API key.

        Raises:
            httpx2.HTTPStatusError: the server refused (unknown policy: 404, bad key: 401).
        """
        async with self._http(self.admin_key) as http:
            r = await http.post("/rl/sessions", json={"policy": policy,
                                                      "metadata": metadata or {}})
        r.raise_for_status()
        body = r.json()
        self._keys[body["api_key"]] = body["session_id"]
        return body["api_key"]

    def async_client(self, api_key: str | None = None, **kwargs: Any) -> openai.AsyncOpenAI:
        """An ``AsyncOpenAI`` for the server with ``api_key`` (default: the admin key)."""
        return async_client_for_url(self.base_url, api_key or self.admin_key, **kwargs)

    async def fetch_session(self, key: str) -> Any:
        """The session of API key ``key`` as a ``Session`` (``GET /rl/sessions/{id}``)."""
        from .gateway.sessions import Session

        async with self._http(key) as http:
            r = await http.get(f"/rl/sessions/{self._keys[key]}")
        r.raise_for_status()
        return Session.from_dict(r.json())

    async def end_session(self, key: str, *, drop: bool = False) -> Any:
        """End the session (``POST /rl/sessions/{id}/end``) and return its ``Session`` (its
        final record comes with the answer); ``drop`` makes the server forget it."""
        from .gateway.sessions import Session

        async with self._http(key) as http:
            r = await http.post(f"/rl/sessions/{self._keys[key]}/end",
                                json={"drop": drop, "return_session": True})
        r.raise_for_status()
        session = Session.from_dict(r.json()["session"])
        if drop:
            self._keys.pop(key, None)
        return session


class Portal:
    """An event loop on a daemon thread, for running async code from sync callers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                        name="areal-agents-portal")
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float | None = None) -> Any:
        """Run ``coro`` on the portal's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        """Stop the loop and join the thread. Idempotent."""
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)
        if not self.loop.is_running() and not self.loop.is_closed():
            self.loop.close()


class SyncASGITransport(httpx2.BaseTransport):
    """A sync transport that runs requests through an ASGI app on a ``Portal`` loop.

    Response bodies (SSE streams included) are read fully before returning.
    """

    def __init__(self, app: Any, portal: Portal) -> None:
        self._inner = httpx2.ASGITransport(app=app)
        self._portal = portal

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        body = request.read()

        async def run() -> tuple[int, Any, bytes]:
            req = httpx2.Request(request.method, request.url, headers=request.headers,
                                 content=body)
            resp = await self._inner.handle_async_request(req)
            content = await resp.aread()
            return resp.status_code, resp.headers, content

        status, headers, content = self._portal.call(run())
        headers = [(k, v) for k, v in headers.items() if k.lower() != "content-encoding"]
        return httpx2.Response(status, headers=headers, content=content, request=request)


def sync_client_for_app(app: Any, api_key: str, portal: Portal, *, timeout: float = 120.0,
                        max_retries: int = 0) -> openai.OpenAI:
    """A sync ``OpenAI`` whose HTTP client calls the ASGI ``app`` on ``portal``'s loop."""
    http = httpx2.Client(transport=SyncASGITransport(app, portal), base_url=_BASE,
                         timeout=timeout)
    return openai.OpenAI(api_key=api_key, base_url=_BASE, http_client=http,
                         max_retries=max_retries, timeout=timeout)
