"""Fixtures: the tiny tokenizer, a gateway on a ScriptedEngine, served in process or on a port.

``served`` is parametrized over ``"asgi"`` (SDK -> httpx2.ASGITransport, no sockets) and
``"http"`` (uvicorn on 127.0.0.1, random free port, in a background thread), so every test
using it runs against both and must behave identically.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from areal_agents.client import async_client_for_url, client_for_url
from areal_agents.gateway import Gateway
from areal_agents.gateway.server import ServerThread
from areal_agents.testing.engine import ScriptedEngine

ADMIN = "admin-test-key"


@pytest.fixture(scope="session")
def tok() -> Any:
    from areal_agents.models import tiny_tokenizer

    return tiny_tokenizer()


@dataclass
class Served:
    """A gateway plus client factories for one transport."""

    mode: str
    gw: Gateway
    engine: ScriptedEngine
    base_url: str | None = None

    def async_client(self, key: str = ADMIN) -> Any:
        if self.base_url is None:
            return self.gw.async_client(key)
        return async_client_for_url(self.base_url, key)

    def client(self, key: str = ADMIN) -> Any:
        if self.base_url is None:
            return self.gw.client(key)
        return client_for_url(self.base_url, key)

    def http(self, key: str | None = ADMIN) -> Any:
        """A raw httpx2 client (for invalid JSON and /rl routes)."""
        import httpx2

        headers = {"Authorization": f"Bearer {key}"} if key else {}
        if self.base_url is None:
            return httpx2.AsyncClient(transport=httpx2.ASGITransport(app=self.gw.app),
                                      base_url="http://gateway", headers=headers)
        return httpx2.AsyncClient(base_url=self.base_url, headers=headers)


@pytest.fixture(params=["asgi", "http"])
def served(request: pytest.FixtureRequest, tok: Any) -> Iterator[Served]:
    gw = Gateway(admin_key=ADMIN)
    engine = ScriptedEngine(["hello world"], tokenizer=tok, max_context=512)
    gw.add_policy("tiny", [engine], tok, max_n=4)
    if request.param == "asgi":
        yield Served("asgi", gw, engine)
        if gw._portal is not None:
            gw._portal.close()
        return
    with ServerThread(gw.app) as server:
        yield Served("http", gw, engine, server.url)
