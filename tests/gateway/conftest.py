"""Fixtures: the tiny tokenizer, a gateway on a ScriptedEngine, served in process or on a port.

``served`` is parametrized over ``"asgi"`` (SDK -> httpx2.ASGITransport, no sockets) and
``"http"`` (uvicorn on 127.0.0.1, random free port, in a background thread), so every test
using it runs against both and must behave identically.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
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
    opened: list[Any] = field(default_factory=list)

    def async_client(self, key: str = ADMIN) -> Any:
        if self.base_url is None:
            client = self.gw.async_client(key)
        else:
            client = async_client_for_url(self.base_url, key)
        self.opened.append(client)
        return client

    def client(self, key: str = ADMIN) -> Any:
        if self.base_url is None:
            client = self.gw.client(key)
        else:
            client = client_for_url(self.base_url, key)
        self.opened.append(client)
        return client

    async def aclose(self) -> None:
        for client in self.opened:
            result = client.close()
            if hasattr(result, "__await__"):
                await result

    def http(self, key: str | None = ADMIN) -> Any:
        """A raw httpx2 client (for invalid JSON and /rl routes)."""
        import httpx2

        headers = {"Authorization": f"Bearer {key}"} if key else {}
        if self.base_url is None:
            return httpx2.AsyncClient(transport=httpx2.ASGITransport(app=self.gw.app),
                                      base_url="http://gateway", headers=headers)
        return httpx2.AsyncClient(base_url=self.base_url, headers=headers)


@pytest.fixture(params=["asgi", "http"])
async def served(request: pytest.FixtureRequest, tok: Any) -> AsyncIterator[Served]:
    gw = Gateway(admin_key=ADMIN)
    engine = ScriptedEngine(["hello world"], tokenizer=tok, max_context=512)
    gw.add_policy("tiny", [engine], tok, max_n=4)
    if request.param == "asgi":
        served = Served("asgi", gw, engine)
        yield served
        await served.aclose()
        await gw.close()
        return
    with ServerThread(gw.app) as server:
        served = Served("http", gw, engine, server.url)
        yield served
        await served.aclose()
