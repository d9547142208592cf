"""LLM agents for training: ``LLMAgent`` on one recorded gateway session per agent per episode,
plus raw-text (``/v1/completions``) prompts and reproducible per-turn sampling seeds."""

from __future__ import annotations

import hashlib
import os
from typing import Any

from areal_agents.agents.llm import LLMAgent

from areal_agents.messages import Message
from areal_agents.samples import Sample

from .policy import Policy


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


class SessionAgent(LLMAgent):
    """``LLMAgent`` for the trainer: a session opened up front on a shared client.

    Differences from ``LLMAgent.for_gateway``: the session ``key`` is created by the caller
    and requests go through ``client`` (the trainer's shared in-process client, with the
    session's API key) which ``end_episode`` does not close; ``api="completions"`` sends
    ``raw_prompt(history)`` to ``/v1/completions``; with ``seed_key`` turn ``t`` samples with
    seed ``turn_seed(seed_key, t)`` (reproducible rollouts whatever the scheduling).
    ``end_episode`` ends and drops the session and returns its samples (exact ids); with
    ``gateway=None`` (an external endpoint) it returns ``[]``.
    """

    def __init__(self, client: Any, model: str, sampling: dict[str, Any],
                 gateway: Any = None, key: str | None = None, agent_id: str = "",
                 api: str = "chat", seed_key: str | None = None) -> None:
        super().__init__(client, model, sampling=sampling, agent_id=agent_id)
        self._gateway, self._session_key = gateway, key
        self.api, self.seed_key = api, seed_key
        self.turn = 0
        self.report: Any = None

    def reset(self) -> None:
        self.history, self.last_report, self.turn = [], None, 0

    async def _complete(self) -> Message:
        if self.seed_key is not None and self.sampling.get("temperature", 1.0) != 0:
            self.sampling["seed"] = turn_seed(self.seed_key, self.turn)
        self.turn += 1
        if self.api != "completions":
            return await super()._complete()
        reply = await self.client.completions.create(  # type: ignore[union-attr]
            model=self.model, prompt=raw_prompt(self.history), **self.sampling)
        return {"role": "assistant", "content": reply.choices[0].text or ""}

    async def end_episode(self, episode_return: float) -> list[Sample]:
        self.client = None  # shared with other sessions: LLMAgent must not close it
        samples = await super().end_episode(episode_return)
        self.report = self.last_report
        return samples


async def make_llm_agent(gateway: Any, client: Any, policy: Policy, name: str, agent_id: str,
                         greedy: bool = False, seed_key: str | None = None) -> SessionAgent:
    """A ``SessionAgent`` for ``agent_id`` acting with policy ``name``.

    In-process policies get a fresh recorded session on ``gateway`` (``client`` is the shared
    ``gateway.async_client()``; each session uses it with its own API key); ``endpoint``
    policies talk to the external server (key from ``OPENAI_API_KEY``) and record nothing.
    ``greedy`` sets temperature 0; ``seed_key`` (e.g. ``"<task seed>/<member>/<agent>"``)
    makes sampling reproducible.
    """
    sampling = dict(policy.sampling)
    if greedy:
        sampling["temperature"] = 0.0
    if policy.endpoint is not None:
        import openai

        client = openai.AsyncOpenAI(base_url=policy.endpoint,
                                    api_key=os.environ.get("OPENAI_API_KEY", "none"))
        return SessionAgent(client, str(policy.model or "default"), sampling, api=policy.api)
    key = await gateway.create_session(name, {"agent": agent_id})
    return SessionAgent(client.with_options(api_key=key), name, sampling, gateway, key, agent_id,
                        api=policy.api, seed_key=seed_key)
