"""The trainer's LLM seats: one recorded gateway session per LLM agent per episode, the agent
acting on it (``SessionAgent``: raw-text prompts, reproducible per-turn sampling seeds), and
the session -> samples step the trainer runs itself once the episode is over."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from areal_agents.agents.llm import RETRYABLE, LLMAgent, call_with_retries
from areal_agents.gateway.errors import GatewayError
from areal_agents.messages import Message

from .policy import Policy

if TYPE_CHECKING:
    from areal_agents.agent import Agent
    from areal_agents.gateway import Gateway, TokenizationReport
    from areal_agents.samples import Sample

log = logging.getLogger(__name__)


def raw_prompt(messages: list[dict[str, Any]]) -> str:
    """The ``/v1/completions`` prompt of a conversation: contents joined by newlines, with the
    last observation's final token last (no chat-template suffix after it). Assistant turns
    are appended verbatim so each prompt extends the previous prompt + completion."""
    text = ""
    for m in messages:
        content = str(m.get("content") or "")
        if m.get("role") == "assistant":
            text += content
        else:
            text += ("\n" if text else "") + content
    return text


def turn_seed(key: str, turn: int) -> int:
    """A sampling seed in ``[0, 2**62)`` from an episode key and a turn index, equal in every
    process (unlike ``hash``): the same episode replays the same tokens after a resume."""
    digest = hashlib.blake2b(f"{key}#{turn}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 2


DirectCompletion = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
"""``complete(body) -> response``: a ``/v1/completions`` request body to the response JSON."""

_SDK_ONLY = ("extra_headers", "extra_query", "timeout")  # SDK call options, not body fields


async def complete_in_process(gateway: Gateway, key: str, body: dict[str, Any]
                              ) -> dict[str, Any]:
    """``POST /v1/completions`` on session ``key`` without HTTP, ASGI or the OpenAI SDK: the
    route's own ``text_completion`` (same tokenization, sampling fields, engine call and
    response JSON), and the session records the same turns, so the samples are the same exact
    tokens. Costs ~1/9 of the SDK round trip per request on the in-process path. The prompt is
    tokenized on the event loop (the route hands it to a thread).

    Raises:
        GatewayError: as the route answers (409 ``session_ended`` for an ended session, 400 for
            a bad prompt or sampling field, 500/503 for engine failures).
    """
    from areal_agents.gateway.completions import text_completion
    from areal_agents.gateway.errors import conflict

    session = gateway.session(key)
    if session.ended:
        raise conflict(f"session {session.session_id} has ended; open a new one",
                       code="session_ended")
    response, turns = await text_completion(gateway.policies[session.policy], body, session)
    for turn in turns:
        session.record(turn)
    return response


def retryable(exc: BaseException) -> bool:
    """Whether a completion request that raised ``exc`` is tried again: what ``LLMAgent``
    retries on the chat path (``RETRYABLE``: connection errors and 5xx answers through the
    SDK) and, on the in-process path, the same 5xx answers raised as ``GatewayError`` (a
    ``503 engine_unavailable`` when a replica died: the gateway has already routed around it,
    and the session recorded nothing for the failed request)."""
    if isinstance(exc, GatewayError):
        return exc.status >= 500
    return isinstance(exc, RETRYABLE)


class SessionAgent(LLMAgent):
    """``LLMAgent`` for the trainer: it only acts, on a session the trainer opened.

    Requests go through ``client`` (the trainer's shared in-process client, with the session's
    API key; never closed here); ``api="completions"`` sends ``raw_prompt(history)`` to
    ``/v1/completions`` -- through ``direct`` when given (``complete_in_process``: the
    trainer's in-process seats skip HTTP and the SDK), else through ``client``; with
    ``seed_key`` turn ``t`` samples with seed ``turn_seed(seed_key, t)`` (reproducible
    rollouts whatever the scheduling). It knows nothing of its session: ``end_episode``
    returns ``[]`` and the trainer takes the samples from the gateway (``Seat.take_samples``).
    ``context="last"`` (``Policy.context``) prompts each turn with the newest observation
    only (after the system prompt, if any), so each turn becomes its own sample.

    Both APIs retry alike (``retryable``: 5xx answers, e.g. the 503 of a replica that died
    mid-request, and connection errors), up to ``max_attempts`` attempts with the same
    backoff as ``LLMAgent``, as the OpenAI SDK retries 5xx for every endpoint; a request still
    failing then raises, and the trainer fails the episode with that cause.
    """

    def __init__(self, client: Any, model: str, sampling: dict[str, Any], agent_id: str = "",
                 api: str = "chat", seed_key: str | None = None,
                 direct: DirectCompletion | None = None, context: str = "full",
                 api_key: str | None = None) -> None:
        self._keyed_from, self._api_key = (client, api_key) if api_key is not None else (None, None)
        super().__init__(None if api_key is not None else client, model, sampling=sampling,
                         agent_id=agent_id)
        self.api, self.seed_key, self.direct = api, seed_key, direct
        self.context = context
        self.turn = 0

    @property
    def client(self) -> Any:
        """The SDK client; with ``api_key``, ``client.with_options(api_key=api_key)`` built on
        first use (an in-process ``direct`` seat never needs it: ~40 us saved per episode)."""
        if self._client is None and self._keyed_from is not None:
            self._client = self._keyed_from.with_options(api_key=self._api_key)
        return self._client

    @client.setter
    def client(self, value: Any) -> None:
        self._client = value

    def _has_client(self) -> bool:
        return self._client is not None or self._keyed_from is not None

    async def act(self, observation: Any) -> Message:
        if self.context == "last":
            self.history = [m for m in self.history if m.get("role") == "system"]
        return await super().act(observation)

    def reset(self) -> None:
        self.history, self.last_report, self.turn = [], None, 0

    async def _complete(self) -> Message:
        if self.seed_key is not None and self.sampling.get("temperature", 1.0) != 0:
            self.sampling["seed"] = turn_seed(self.seed_key, self.turn)
        self.turn += 1
        if self.api != "completions":
            return await super()._complete()
        text = await call_with_retries(self._complete_text, attempts=self.max_attempts,
                                       retryable=retryable, logger=log,
                                       what=f"{self.agent_id or self.model}'s completion")
        return {"role": "assistant", "content": text}

    async def _complete_text(self) -> str:
        """One ``/v1/completions`` request for the history; the completion's text."""
        if self.direct is not None:  # the SDK's body: sampling fields, extra_body merged in
            fields = {k: v for k, v in self.sampling.items() if k not in _SDK_ONLY}
            extra = fields.pop("extra_body", None) or {}
            body = {"model": self.model, "prompt": raw_prompt(self.history), **fields, **extra}
            response = await self.direct(body)
            return response["choices"][0]["text"] or ""
        reply = await self.client.completions.create(  # type: ignore[union-attr]
            model=self.model, prompt=raw_prompt(self.history), **self.sampling)
        return reply.choices[0].text or ""


@dataclass
class Seat:
    """One LLM agent's place in one episode: the agent that acts and the recorded gateway
    session (``key``) its completions go to. The trainer, not the agent, turns the session
    into samples.

    Attributes:
        agent_id, policy: who acts, with which policy.
        agent: the acting agent (any ``Agent`` using the session's key).
        gateway, key: the session's gateway and API key; None for an ``endpoint`` policy
            (nothing is recorded) and once the session is closed.
        report: the ``TokenizationReport`` of ``take_samples`` (None before).
    """

    agent_id: str
    policy: str
    agent: Agent
    gateway: Gateway | None = None
    key: str | None = None
    report: TokenizationReport | None = None

    def take_samples(self, *, reward: float, group: str) -> list[Sample]:
        """End and forget the session; return its samples (the exact ids the engine saw and
        generated, by the tokenization contract) with ``agent``, ``policy``, ``group`` and
        ``reward`` set. ``[]`` without a session."""
        if self.gateway is None or self.key is None:
            return []
        session = self.gateway.end_session(self.key, drop=True)
        self.key = None
        samples, self.report = session.to_samples(reward=reward, agent=self.agent_id,
                                                  group=group)
        if self.report.num_splits:
            log.info("agent %s: %d tokenization split(s): %s", self.agent_id,
                     self.report.num_splits, self.report.splits)
        return samples

    def close(self) -> None:
        """End and forget the session without taking samples (an episode that failed or was
        cancelled). Idempotent."""
        if self.gateway is not None and self.key is not None:
            self.gateway.end_session(self.key, drop=True)
        self.key = None


async def open_seat(gateway: Gateway, client: Any, policy: Policy, name: str, agent_id: str,
                    greedy: bool = False, seed_key: str | None = None,
                    single_turn: bool = False) -> Seat:
    """A ``Seat`` for ``agent_id`` acting with policy ``name``.

    In-process policies get a fresh recorded session on ``gateway`` (``client`` is the shared
    ``gateway.async_client()``; the agent uses it with the session's API key); ``endpoint``
    policies talk to the external server (key from ``OPENAI_API_KEY``) and record nothing.
    ``greedy`` sets temperature 0; ``seed_key`` (e.g. ``"<task seed>/<member>/<agent>"``)
    makes sampling reproducible. ``single_turn``: the agent makes one completion call only
    (its session is ``single_turn``: the engine keeps nothing for a follow-up). Call
    ``take_samples`` or ``close`` when the episode is over.
    """
    sampling = dict(policy.sampling)
    if greedy:
        sampling["temperature"] = 0.0
    if policy.endpoint is not None:
        import openai

        client = openai.AsyncOpenAI(base_url=policy.endpoint,
                                    api_key=os.environ.get("OPENAI_API_KEY", "none"))
        agent = SessionAgent(client, str(policy.model or "default"), sampling, agent_id,
                             api=policy.api)
        return Seat(agent_id, name, agent)
    key = await gateway.create_session(name, {"agent": agent_id}, single_turn=single_turn)
    direct = (functools.partial(complete_in_process, gateway, key)
              if policy.api == "completions" else None)  # no HTTP/SDK hop in process
    agent = SessionAgent(client, name, sampling, agent_id, api=policy.api, seed_key=seed_key,
                         direct=direct, context=policy.context, api_key=key)
    return Seat(agent_id, name, agent, gateway, key)
