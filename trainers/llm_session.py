"""LLM agents for training: one recorded gateway session per agent per episode."""

from __future__ import annotations

import os
from typing import Any

from areal_agents.agent import Agent
from areal_agents.messages import parse_action
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


class SessionAgent(Agent):
    """Chats through the official ``openai`` SDK under one recorded session.

    ``end_episode(return)`` turns the session's recorded turns into training samples by the
    gateway's tokenization contract (exact ids, nothing re-tokenized) and ends and drops the
    session (the gateway keeps no finished sessions);
    with ``gateway=None`` (an external endpoint) it returns ``[]``.
    """

    def __init__(self, client: Any, model: str, sampling: dict[str, Any],
                 gateway: Any = None, key: str | None = None, agent_id: str = "",
                 api: str = "chat") -> None:
        self.client, self.model, self.sampling = client, model, sampling
        self.gateway, self.key, self.agent_id, self.api = gateway, key, agent_id, api
        self.history: list[dict[str, Any]] = []
        self.report: Any = None

    def reset(self) -> None:
        self.history = []

    async def act(self, observation: Any) -> dict[str, Any]:
        new = observation if isinstance(observation, list) else [observation]
        self.history.extend(m if isinstance(m, dict) else {"role": "user", "content": str(m)}
                            for m in new)
        if self.api == "completions":
            reply = await self.client.completions.create(
                model=self.model, prompt=raw_prompt(self.history), **self.sampling)
            content = reply.choices[0].text or ""
        else:
            reply = await self.client.chat.completions.create(
                model=self.model, messages=self.history, **self.sampling)
            content = reply.choices[0].message.content or ""
        message = {"role": "assistant", "content": content}
        self.history.append(message)
        return parse_action(message)

    async def end_episode(self, episode_return: float) -> list[Sample]:
        if self.gateway is None or self.key is None:
            return []
        # drop=True: the gateway forgets the finished session, so long runs do not accumulate
        # sessions; the returned Session still holds its turns.
        session = self.gateway.end_session(self.key, drop=True)
        samples, self.report = session.to_samples(reward=episode_return, agent=self.agent_id)
        return samples


async def make_llm_agent(gateway: Any, client: Any, policy: Policy, name: str, agent_id: str,
                         greedy: bool = False) -> Agent:
    """A ``SessionAgent`` for ``agent_id`` acting with policy ``name``.

    In-process policies get a fresh recorded session on ``gateway`` (``client`` is the shared
    ``gateway.async_client()``; each session uses it with its own API key); ``endpoint`` policies talk to the external server (key from
    ``OPENAI_API_KEY``) and record nothing.
    """
    sampling = dict(policy.sampling)
    if greedy:
        sampling["temperature"] = 0.0
    if policy.endpoint is not None:
        import openai

        client = openai.AsyncOpenAI(base_url=policy.endpoint,
                                    api_key=os.environ.get("OPENAI_API_KEY", "none"))
        return SessionAgent(client, str(policy.model or "default"), sampling)
    key = await gateway.create_session(name, {"agent": agent_id})
    return SessionAgent(client.with_options(api_key=key), name, sampling, gateway, key, agent_id,
                        api=policy.api)
