"""The proxy helper: one episode of an external agent against a served gateway, for agents that
only want an OpenAI client, a reward call and nothing of the session API.

``episode`` opens a session (``POST /rl/sessions``, waiting out 429 answers as their
``Retry-After`` says while the trainer has no capacity), yields an ``Episode`` whose ``client``
is an ``openai.AsyncOpenAI`` on the session's key, and ends the session on exit, also when the
body raises (a session ended without a reward is counted by the trainer, never trained on).

Example:
    >>> async def play(url, admin_key):  # doctest: +SKIP
    ...     async with episode(url, "solver", task_id="q17", key=admin_key) as ep:
    ...         reply = await ep.client.chat.completions.create(
    ...             model="solver", messages=[{"role": "user", "content": "2 + 3 ="}])
    ...         await ep.reward(float(reply.choices[0].message.content.strip() == "5"))
"""

from __future__ import annotations

import asyncio
import html
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx2
import openai

from .client import async_client_for_url

__all__ = ["Episode", "SessionRefused", "episode"]


class SessionRefused(RuntimeError):
    """The gateway did not open a session (still no capacity after ``open_timeout``, or an
    error answer); the message carries the gateway's reason."""


@dataclass
class Episode:
    """An open session of one external episode.

    Attributes:
        client: an ``openai.AsyncOpenAI`` whose API key is the session key (its completions
            are recorded for training).
        session_id: the session's id.
        api_key: the session key.
        base_url: the gateway (without ``/v1``).
    """

    client: openai.AsyncOpenAI
    session_id: str
    api_key: str
    base_url: str
    http: httpx2.AsyncClient

    async def reward(self, value: float, *, turn: int | None = None,
                     completion_id: str | None = None) -> None:
        """Post a finite reward to the session, or to one turn (its index or the ``id`` of
        its completion).

        Raises:
            httpx2.HTTPStatusError: the gateway refused it (a non-finite reward: 400).
        """
        body: dict[str, Any] = {"reward": float(value)}
        if turn is not None:
            body["turn"] = turn
        if completion_id is not None:
            body["completion_id"] = completion_id
        r = await self.http.post(f"/rl/sessions/{self.session_id}/reward", json=body)
        r.raise_for_status()

    def _repr_html_(self) -> str:
        """The session id and gateway; never the session key (a credential)."""
        return (f"<div><b>proxy Episode</b> session={html.escape(self.session_id)} "
                f"gateway={html.escape(self.base_url)} (key hidden)</div>")

    async def record(self) -> dict[str, Any]:
        """The session as the gateway recorded it so far (``GET /rl/sessions/{id}``): its
        ``turns`` (each with ``reply``, ``versions``, ``finish_reason``...) and ``rewards``.
        What the model said is there also when the agent framework gave up on a reply (e.g.
        a Responses ``incomplete`` answer cut at ``max_output_tokens``)."""
        r = await self.http.get(f"/rl/sessions/{self.session_id}")
        r.raise_for_status()
        return r.json()

    async def versions(self) -> list[int]:
        """The weight versions the session's recorded tokens were generated with, in order."""
        return [v for turn in (await self.record())["turns"] for v in turn["versions"]]


@asynccontextmanager
async def episode(url: str, policy: str, *, task_id: str | int | None = None,
                  role: str | None = None, key: str | None = None,
                  metadata: dict[str, Any] | None = None, open_timeout: float = 600.0,
                  timeout: float = 120.0, max_retries: int = 2) -> AsyncIterator[Episode]:
    """Open a session of ``policy`` on the gateway at ``url``, yield it, end it on exit.

    Args:
        url: the gateway, e.g. ``http://127.0.0.1:8000`` (a trailing ``/v1`` is accepted).
        policy: the served policy (model) name.
        task_id: the group the episode belongs to (group-relative advantages compare the
            sessions of one task id); None: a group of its own.
        role: the agent's role (written into its samples).
        key: the gateway's admin key (default: ``$AREAL_AGENTS_ADMIN_KEY``).
        metadata: free-form data stored with the session.
        open_timeout: how long to keep retrying while the gateway answers 429.
        timeout, max_retries: of the yielded client (the SDK also honours ``Retry-After``).

    Raises:
        SessionRefused: no session could be opened (the gateway's message is included).
        ValueError: no admin key given and ``$AREAL_AGENTS_ADMIN_KEY`` is unset.
    """
    admin_key = key or os.environ.get("AREAL_AGENTS_ADMIN_KEY")
    if not admin_key:
        raise ValueError("episode() needs the gateway's admin key: pass key=... or set "
                         "$AREAL_AGENTS_ADMIN_KEY (it is printed when `areal-agents serve` starts)")
    base = url.rstrip("/").removesuffix("/v1")
    body: dict[str, Any] = {"policy": policy, "metadata": dict(metadata or {})}
    if task_id is not None:
        body["task_id"] = task_id
    if role is not None:
        body["role"] = role
    async with httpx2.AsyncClient(base_url=base, timeout=timeout,
                                  headers={"Authorization": f"Bearer {admin_key}"}) as admin:
        opened = await _open(admin, body, open_timeout)
    session_id, api_key = opened["session_id"], opened["api_key"]
    http = httpx2.AsyncClient(base_url=base, timeout=timeout,
                              headers={"Authorization": f"Bearer {api_key}"})
    client = async_client_for_url(base, api_key, timeout=timeout, max_retries=max_retries)
    try:
        yield Episode(client, session_id, api_key, base, http)
    finally:
        try:
            r = await http.post(f"/rl/sessions/{session_id}/end", json={})
            r.raise_for_status()
        finally:
            await client.close()
            await http.aclose()


async def _open(admin: httpx2.AsyncClient, body: dict[str, Any], open_timeout: float
                ) -> dict[str, Any]:
    """``POST /rl/sessions``, sleeping ``Retry-After`` on each 429 until ``open_timeout``."""
    deadline = time.monotonic() + open_timeout
    while True:
        r = await admin.post("/rl/sessions", json=body)
        if r.status_code == 200:
            return r.json()
        message = _message(r)
        if r.status_code != 429:
            raise SessionRefused(f"the gateway refused to open a session ({r.status_code}): "
                                 f"{message}")
        wait = float(r.headers.get("retry-after", "1"))
        if time.monotonic() + wait > deadline:
            raise SessionRefused(f"no capacity for {open_timeout:g} s: {message}")
        await asyncio.sleep(wait)


def _message(r: httpx2.Response) -> str:
    try:
        return str(r.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return r.text
