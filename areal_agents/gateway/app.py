"""The ``Gateway``: policies, sessions and the OpenAI-compatible ASGI app in front of engines.

Example:
    >>> import asyncio
    >>> from areal_agents.gateway import Gateway
    >>> gw = Gateway(admin_key="secret")
    >>> gw.admin_key
    'secret'
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from ..engines.base import InferenceEngine, WeightUpdate
from .auth import digest, new_secret
from .router import Router
from .routes import build_app
from .sessions import Session

log = logging.getLogger(__name__)


@dataclass
class Policy:
    """A named policy: its engine replicas, tokenizer and limits.

    ``stop_ids`` always stop generation (EOS and ``<|im_end|>`` when the vocabulary has it);
    ``eos_id`` is the end-of-turn token the chat template closes assistant turns with.
    """

    name: str
    router: Router
    tokenizer: Any
    max_n: int = 8
    stop_ids: set[int] = field(default_factory=set)
    eos_id: int = -1

    @property
    def max_context(self) -> int:
        return min(e.max_context for e in self.router.engines)

    def token_text(self, token_id: int) -> str:
        return _token_text(self.tokenizer, token_id)


@lru_cache(maxsize=65536)
def _token_text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


class Gateway:
    """OpenAI-compatible gateway recording exact tokens per session.

    Args:
        admin_key: the admin secret; None generates a random one (read it from
            ``gateway.admin_key``). There is never a default key.

    Attributes:
        app: the ASGI app (serve with uvicorn, or use in process via ``async_client``).
        admin_key: the admin secret.
        policies: policy name -> ``Policy``.
    """

    def __init__(self, admin_key: str | None = None) -> None:
        if admin_key is not None and not admin_key:
            raise ValueError("admin_key must be a non-empty string or None (random)")
        self.admin_key = admin_key or new_secret("aa-admin")
        self.policies: dict[str, Policy] = {}
        self._sessions: dict[str, Session] = {}
        self._session_by_digest: dict[str, str] = {}
        self._portal: Any = None
        self.app = build_app(self)

    # ---- in-process API ---------------------------------------------------------------
    def add_policy(self, name: str, engines: Sequence[InferenceEngine], tokenizer: Any, *,
                   max_n: int = 8) -> Policy:
        """Serve ``engines`` (replicas of one model) as the model named ``name``.

        Raises:
            ValueError: the name is taken, ``engines`` is empty, or the tokenizer has no EOS.
        """
        if name in self.policies:
            raise ValueError(f"policy {name!r} is already registered; pick another name")
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError(f"the tokenizer of policy {name!r} has no eos_token_id; set one")
        stop_ids = {int(eos)}
        end_of_turn = int(eos)  # the token that closes an assistant turn in the template
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
            stop_ids.add(im_end)
            end_of_turn = im_end
        policy = Policy(name, Router(engines), tokenizer, max_n, stop_ids, end_of_turn)
        self.policies[name] = policy
        return policy

    async def create_session(self, policy: str, metadata: dict[str, Any] | None = None) -> str:
        """Open a recorded session for ``policy``; returns its API key.

        Raises:
            KeyError: unknown policy.
        """
        return self._open_session(policy, metadata)[1]

    def session(self, key: str) -> Session:
        """The session with API key or session id ``key``.

        Raises:
            KeyError: no such session.
        """
        if key in self._sessions:
            return self._sessions[key]
        session_id = self._session_by_digest.get(digest(key))
        if session_id is None:
            raise KeyError(f"no session has key or id {key[:12]!r}...")
        return self._sessions[session_id]

    def end_session(self, key: str, *, drop: bool = False) -> Session:
        """End the session with API key or id ``key`` (no more completions; its replica
        stickiness is released). ``drop=True`` also forgets it (its key stops working), so
        long runs do not accumulate sessions; the returned ``Session`` keeps its data.

        Raises:
            KeyError: no such session.
        """
        session = self.session(key)
        session.end()
        if drop:
            self._sessions.pop(session.session_id, None)
            for d in [d for d, sid in self._session_by_digest.items()
                      if sid == session.session_id]:
                del self._session_by_digest[d]
        return session

    def _open_session(self, policy: str, metadata: dict[str, Any] | None) -> tuple[str, str]:
        if policy not in self.policies:
            raise KeyError(f"unknown policy {policy!r}; known: {sorted(self.policies)}")
        router = self.policies[policy].router
        session = Session(policy=policy, metadata=dict(metadata or {}),
                          on_end=lambda s: router.forget(s.session_id))
        key = new_secret("aa-sess")
        self._sessions[session.session_id] = session
        self._session_by_digest[digest(key)] = session.session_id
        return session.session_id, key

    def _policies(self, policy: str | None) -> list[Policy]:
        if policy is None:
            return list(self.policies.values())
        if policy not in self.policies:
            raise KeyError(f"unknown policy {policy!r}; known: {sorted(self.policies)}")
        return [self.policies[policy]]

    async def pause(self, policy: str | None = None) -> None:
        """Pause every replica of ``policy`` (None: all policies)."""
        await asyncio.gather(*(e.pause() for p in self._policies(policy)
                               for e in p.router.engines))

    async def resume(self, policy: str | None = None) -> None:
        """Resume every replica of ``policy`` (None: all policies)."""
        await asyncio.gather(*(e.resume() for p in self._policies(policy)
                               for e in p.router.engines))

    async def update_weights(self, policy: str, update: WeightUpdate) -> None:
        """Load ``update`` into every replica of ``policy`` (in order; they end on one version).

        In-process ``named_tensors`` are materialised once and handed to each replica.
        """
        engines = self.policies[policy].router.engines if policy in self.policies else None
        if engines is None:
            raise KeyError(f"unknown policy {policy!r}; known: {sorted(self.policies)}")
        if update.named_tensors is not None and len(engines) > 1:
            tensors = list(update.named_tensors)
            target = update.version if update.version is not None else engines[0].version + 1
            for e in engines:
                await e.update_weights(WeightUpdate(named_tensors=iter(tensors), version=target))
            return
        if update.path is not None and update.version is None and len(engines) > 1:
            update = WeightUpdate(path=update.path, version=engines[0].version + 1)
        for e in engines:
            await e.update_weights(update)

    def async_client(self, api_key: str | None = None, **kwargs: Any) -> Any:
        """An ``openai.AsyncOpenAI`` talking to this gateway in process (ASGI, no sockets).

        ``api_key`` defaults to the admin key (calls are then not recorded).
        """
        from ..client import async_client_for_app

        return async_client_for_app(self.app, api_key or self.admin_key, **kwargs)

    def client(self, api_key: str | None = None, **kwargs: Any) -> Any:
        """A sync ``openai.OpenAI`` talking to this gateway in process.

        The app runs on a private event-loop thread (started on first use, stopped by
        ``close``); engines must not be bound to another running loop.
        """
        from ..client import Portal, sync_client_for_app

        if self._portal is None:
            self._portal = Portal()
        return sync_client_for_app(self.app, api_key or self.admin_key, self._portal, **kwargs)

    async def close(self) -> None:
        """Close the sync portal and every engine. Idempotent."""
        if self._portal is not None:
            self._portal.close()
            self._portal = None
        for p in self.policies.values():
            for e in p.router.engines:
                await e.close()

    async def __aenter__(self) -> Gateway:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
