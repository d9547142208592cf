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
import time
from collections import ChainMap
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from ..engines.base import InferenceEngine, WeightUpdate
from ..errors import EngineUnavailable
from .auth import digest, new_secret
from .replicas import drop_replica, keep_for_restart
from .router import Router
from .routes import build_app
from .sessions import EndedSessions, Session, SessionLedger, idle_sessions
from .tool_parsing import ToolParser, hermes, tool_parser_for

log = logging.getLogger(__name__)


@dataclass
class ServedPolicy:
    """A policy as the gateway serves it: its engine replicas, tokenizer and limits (the
    gateway's record; the trainable model spec is ``areal_agents.Policy``).

    ``stop_ids`` always stop generation (EOS and ``<|im_end|>`` when the vocabulary has it);
    ``eos_id`` is the end-of-turn token the chat template closes assistant turns with.
    """

    name: str
    router: Router
    tokenizer: Any
    max_n: int = 8
    stop_ids: set[int] = field(default_factory=set)
    eos_id: int = -1
    paused: bool = False  # between Gateway.pause and resume: a revived replica is paused too
    tool_parser: ToolParser = hermes  # completion text -> (content, tool_calls); tool_parsing

    @property
    def max_context(self) -> int:
        return min(e.max_context for e in self.router.engines)

    def token_text(self, token_id: int) -> str:
        return _token_text(self.tokenizer, token_id)

    def replica_failed(self, index: int, error: BaseException) -> None:
        """Drop replica ``index`` from routing (its engine is gone); see
        ``areal_agents.gateway.replicas`` for restarts."""
        drop_replica(self.name, self.router, index, error, paused=lambda: self.paused)


@lru_cache(maxsize=65536)
def _token_text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


class Gateway:
    """OpenAI-compatible gateway recording exact tokens per session.

    Args:
        admin_key: the admin secret; None generates a random one (read it from
            ``gateway.admin_key``). There is never a default key.
        max_body_bytes: the largest request body accepted; larger ones answer 413.
        tokenize_workers: threads that render chat templates and tokenize prompts, off the
            event loop (a huge prompt must not stall ``/health`` and every other request).
        session_sink: called with each session a client ends over HTTP, before the gateway
            forgets it (the consumer of external episodes keeps what it trains on here);
            None: ended sessions are dropped, only the ``ledger`` counts them.
        ended_memory: how many sessions ended over HTTP are remembered (id and key digest
            only) so late calls answer 409 "ended" rather than 401/404.
        session_gate: called as ``gate(policy, metadata)`` before a session is opened over
            HTTP; None admits it, a number refuses it with 429 and that ``Retry-After``
            (seconds). The gate may add to ``metadata``. None (default): always admitted.
        session_idle_timeout_s: a session no request used for this long is ended by the
            gateway (``expire_idle_sessions``; checked on each request): ``session_sink``
            gets it with ``metadata["expired"] = True``, its key is revoked (409 "ended")
            and ``ledger.expired`` counts it. None (default): sessions never expire.
        clock: the seconds clock idle times are measured with (tests inject one).

    Attributes:
        app: the ASGI app (serve with uvicorn, or use in process via ``async_client``).
        admin_key: the admin secret.
        policies: policy name -> ``ServedPolicy``.
        ledger: counts of sessions opened and ended and of abandoned completions.
    """

    def __init__(self, admin_key: str | None = None, *, max_body_bytes: int = 4 << 20,
                 tokenize_workers: int = 2,
                 session_sink: Callable[[Session], None] | None = None,
                 ended_memory: int = 4096,
                 session_gate: Callable[[str, dict[str, Any]], float | None] | None = None,
                 session_idle_timeout_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 ) -> None:
        if admin_key is not None and not admin_key:
            raise ValueError("admin_key must be a non-empty string or None (random)")
        if max_body_bytes < 1 or tokenize_workers < 1:
            raise ValueError(f"max_body_bytes ({max_body_bytes}) and tokenize_workers "
                             f"({tokenize_workers}) must be >= 1")
        self.admin_key = admin_key or new_secret("aa-admin")
        self.max_body_bytes = max_body_bytes
        self.session_sink = session_sink
        self.session_gate = session_gate
        if session_idle_timeout_s is not None and not session_idle_timeout_s > 0:
            raise ValueError(f"session_idle_timeout_s must be > 0 or None, got "
                             f"{session_idle_timeout_s!r}")
        self.session_idle_timeout_s = session_idle_timeout_s
        self.clock = clock
        self.policies: dict[str, ServedPolicy] = {}
        self.ledger = SessionLedger()
        self._sessions: dict[str, Session] = {}
        self._session_by_digest: dict[str, str] = {}
        self._digest_by_session: dict[str, str] = {}
        self._ended = EndedSessions(ended_memory)
        # refreshed sessions whose next session was refused (429): id -> policy, metadata, key
        self._between_episodes: dict[str, tuple[str, dict[str, Any], str | None]] = {}
        self._tokenize_workers = tokenize_workers
        self._tokenize_pool: ThreadPoolExecutor | None = None
        self._portal: Any = None
        self.app = build_app(self)

    # ---- in-process API ---------------------------------------------------------------
    def add_policy(self, name: str, engines: Sequence[InferenceEngine], tokenizer: Any, *,
                   max_n: int = 8, tool_parser: str = "auto",
                   stop_token_ids: Iterable[int] = ()) -> ServedPolicy:
        """Serve ``engines`` (replicas of one model) as the model named ``name``.

        ``tool_parser`` names how tool calls are read from its replies (``"auto"``,
        ``"hermes"``, ``"llama3_json"``, ``"mistral"``, ``"gpt_oss"``,
        ``"response_template"``; see ``areal_agents.gateway.tool_parsing``).
        ``stop_token_ids`` are more ids that end every completion besides the tokenizer's EOS
        and ``<|im_end|>``: the checkpoint's ``generation_config.eos_token_id`` list
        (``areal_agents.models.eos_token_ids``), which servers launched with their own
        generation defaults (vLLM here) would not stop on otherwise.

        Raises:
            ValueError: the name is taken, ``engines`` is empty, or the tokenizer has no EOS.
            ConfigError: an unknown ``tool_parser`` (lists the choices).
        """
        parse_tools = tool_parser_for(tool_parser, tokenizer)
        if name in self.policies:
            raise ValueError(f"policy {name!r} is already registered; pick another name")
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError(f"the tokenizer of policy {name!r} has no eos_token_id; set one")
        stop_ids = {int(eos), *(int(i) for i in stop_token_ids)}
        end_of_turn = int(eos)  # the token that closes an assistant turn in the template
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
            stop_ids.add(im_end)
            end_of_turn = im_end
        policy = ServedPolicy(name, Router(engines), tokenizer, max_n, stop_ids, end_of_turn,
                              tool_parser=parse_tools)
        self.policies[name] = policy
        return policy

    async def create_session(self, policy: str, metadata: dict[str, Any] | None = None, *,
                             single_turn: bool = False) -> str:
        """Open a recorded session for ``policy``; returns its API key. ``single_turn``: the
        caller will send one completion only (``Session.single_turn``).

        Raises:
            KeyError: unknown policy.
        """
        return self._open_session(policy, metadata, single_turn)[1]

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
        if not session.ended:
            self.ledger.ended += 1
        session.end()
        if drop:
            self._forget(session.session_id)
        return session

    def expire_idle_sessions(self) -> list[str]:
        """End the sessions idle for more than ``session_idle_timeout_s`` as ``/end`` would
        (``session_sink`` gets each, marked ``metadata["expired"] = True``), revoke their
        keys (409 "ended") and count them in ``ledger.expired``; returns their ids.
        A no-op without a timeout."""
        if self.session_idle_timeout_s is None:
            return []
        expired = idle_sessions(self._sessions, self.clock(), self.session_idle_timeout_s)
        for session in expired:
            session.metadata["expired"] = True
            self.ledger.expired += 1
            self._end_over_http(session, drop=True)
        return [s.session_id for s in expired]

    def _end_over_http(self, session: Session, drop: bool) -> None:
        """``POST /rl/sessions/{id}/end``: end, hand to ``session_sink``, and (``drop``)
        forget the session, remembering only its id and key digest in ``_ended``."""
        first = not session.ended
        self.end_session(session.session_id)
        if first and self.session_sink is not None:
            self.session_sink(session)
        if drop:
            digest_ = self._forget(session.session_id)
            self._ended.add(session.session_id, [digest_] if digest_ else [])

    def _end_for_refresh(self, session: Session) -> None:
        """``POST /rl/sessions/{id}/refresh``, first half: end and drop ``session`` as ``/end``
        does; its key stays known (its calls answer 409) until ``_reopen`` binds it to the
        next episode's session."""
        digest_ = self._digest_by_session.get(session.session_id)
        self._end_over_http(session, drop=True)
        self._between_episodes[session.session_id] = (
            session.policy, {k: v for k, v in session.metadata.items()
                             if k != "admitted_version"}, digest_)

    def _reopen(self, previous_id: str, metadata: dict[str, Any]) -> str:
        """Second half: open the next episode's session under the key of ``previous_id``."""
        policy, _, key_digest = self._between_episodes.pop(previous_id)
        session_id, key = self._open_session(policy, metadata)
        self._session_by_digest.pop(digest(key))
        if key_digest is not None:
            self._ended.by_digest.pop(key_digest, None)
            self._session_by_digest[key_digest] = session_id
            self._digest_by_session[session_id] = key_digest
        return session_id

    def _forget(self, session_id: str) -> str | None:
        """Drop a session and its key; returns the key's digest."""
        self._sessions.pop(session_id, None)
        digest_ = self._digest_by_session.pop(session_id, None)
        if digest_ is not None:
            self._session_by_digest.pop(digest_, None)
        return digest_

    def _key_table(self) -> Mapping[str, str]:
        """Key digest -> session id, live sessions first, then recently ended ones."""
        return ChainMap(self._session_by_digest, self._ended.by_digest)

    def _tokenizer_pool(self) -> ThreadPoolExecutor:
        """The threads that tokenize prompts (started on first use, stopped by ``close``)."""
        if self._tokenize_pool is None:
            self._tokenize_pool = ThreadPoolExecutor(self._tokenize_workers,
                                                     thread_name_prefix="aa-tokenize")
        return self._tokenize_pool

    def _open_session(self, policy: str, metadata: dict[str, Any] | None,
                      single_turn: bool = False) -> tuple[str, str]:
        if policy not in self.policies:
            raise KeyError(f"unknown policy {policy!r}; known: {sorted(self.policies)}")
        router = self.policies[policy].router
        session = Session(policy=policy, metadata=dict(metadata or {}), single_turn=single_turn,
                          on_end=lambda s: router.forget(s.session_id))
        key = new_secret("aa-sess")
        self._sessions[session.session_id] = session
        key_digest = digest(key)
        self._session_by_digest[key_digest] = session.session_id
        self._digest_by_session[session.session_id] = key_digest
        self.ledger.opened += 1
        return session.session_id, key

    def _policies(self, policy: str | None) -> list[ServedPolicy]:
        if policy is None:
            return list(self.policies.values())
        if policy not in self.policies:
            raise KeyError(f"unknown policy {policy!r}; known: {sorted(self.policies)}")
        return [self.policies[policy]]

    async def pause(self, policy: str | None = None) -> None:
        """Pause every live replica of ``policy`` (None: all policies); a replica found dead
        is dropped."""
        for p in self._policies(policy):
            p.paused = True
        await self._each_live(policy, lambda e: e.pause())

    async def resume(self, policy: str | None = None) -> None:
        """Resume every live replica of ``policy`` (None: all policies); a replica found dead
        is dropped."""
        for p in self._policies(policy):
            p.paused = False
        await self._each_live(policy, lambda e: e.resume())

    async def _each_live(self, policy: str | None, call: Any) -> None:
        async def one(p: ServedPolicy, index: int) -> None:
            try:
                await call(p.router.engines[index])
            except EngineUnavailable as exc:
                p.replica_failed(index, exc)

        # every call finishes before an error propagates: a pause still in flight would
        # otherwise land after push_weights' resume and leave that replica paused
        results = await asyncio.gather(*(one(p, i) for p in self._policies(policy)
                                         for i in range(len(p.router.engines))
                                         if i not in p.router.dead), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def push_weights(self, policy: str, update: WeightUpdate) -> None:
        """Pause all replicas of ``policy`` -> update all -> resume all, resuming even when the
        update fails (the error then propagates; no replica is left paused).

        Raises:
            KeyError: unknown policy.
            EngineError: a live replica refused the update.
        """
        try:  # a failed pause too: the replicas already paused must resume
            await self.pause(policy)
            await self.update_weights(policy, update)
        finally:
            await self.resume(policy)

    async def add_replica(self, policy: str, engine: InferenceEngine,
                          weights: WeightUpdate | None = None) -> int:
        """Add a replica to ``policy`` (a late joiner); returns its index.

        It takes traffic only after it holds the policy's current version: ``weights`` (the
        current weights) are loaded into it first, at that version.

        Raises:
            KeyError: unknown policy.
            ValueError: the engine is behind the policy's version and ``weights`` is None.
        """
        p = self._policies(policy)[0]
        live = p.router.live_engines()
        current = max((e.version for e in live), default=engine.version)
        if weights is not None:
            await engine.update_weights(WeightUpdate(named_tensors=weights.named_tensors,
                                                     path=weights.path, version=current))
        if engine.version != current:
            raise ValueError(f"the new replica of {policy!r} holds version {engine.version}, the "
                             f"policy is at {current}: pass weights= (the current weights)")
        return p.router.add(engine)

    async def update_weights(self, policy: str, update: WeightUpdate) -> None:
        """Load ``update`` into every live replica of ``policy`` (in order; they end on one
        version). A replica found dead is dropped; dead replicas that will restart keep the
        update for then.

        ``named_tensors`` that are an ``Iterator`` (consumed once) are materialised once and
        handed to each replica; any other iterable (a list, the Trainer's re-iterable export)
        is iterated once per replica, so nothing holds a copy of the whole update.

        Raises:
            KeyError: unknown policy.
            EngineError: a live replica refused the update.
        """
        p = self._policies(policy)[0]
        live = p.router.live_engines()
        target = (update.version if update.version is not None
                  else max([e.version for e in live] or [0]) + 1)
        tensors = update.named_tensors
        if isinstance(tensors, Iterator):
            tensors = list(tensors)

        def fresh() -> WeightUpdate:
            if tensors is not None:
                return WeightUpdate(named_tensors=tensors, version=target)
            return WeightUpdate(path=update.path, version=target)

        for index, engine in enumerate(list(p.router.engines)):
            if index in p.router.dead:
                await keep_for_restart(p.name, index, engine, fresh())
                continue
            try:
                await engine.update_weights(fresh())
            except EngineUnavailable as exc:
                p.replica_failed(index, exc)
                await keep_for_restart(p.name, index, engine, fresh())

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
        """Close the sync portal, the tokenizer threads and every engine. Idempotent."""
        if self._portal is not None:
            self._portal.close()
            self._portal = None
        if self._tokenize_pool is not None:
            self._tokenize_pool.shutdown(wait=False, cancel_futures=True)
            self._tokenize_pool = None
        for p in self.policies.values():
            for e in p.router.engines:
                await e.close()

    async def __aenter__(self) -> Gateway:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
