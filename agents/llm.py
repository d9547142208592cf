"""``LLMAgent``: an agent backed by an OpenAI-compatible chat model (the official SDK).

Example:
    >>> import asyncio
    >>> from areal_agents.testing.openai_mock import OpenAIMock
    >>> agent = LLMAgent(OpenAIMock(["Answer: 4"]).async_client(), "m", system_prompt="Be brief.")
    >>> asyncio.run(agent.act("2+2?"))["content"]
    'Answer: 4'
    >>> [m["role"] for m in agent.history]
    ['system', 'user', 'assistant']
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import openai

from areal_agents.agent import Agent
from areal_agents.messages import Message
from areal_agents.tool_process import ToolFailed, call_in_process, result_text
from areal_agents.wrappers.record_episode import as_messages

if TYPE_CHECKING:
    from areal_agents.client import RemoteGateway
    from areal_agents.gateway import Gateway, Session, TokenizationReport
    from areal_agents.samples import Sample

log = logging.getLogger(__name__)

RETRYABLE = (openai.APIConnectionError, openai.InternalServerError)
"""Errors retried (bounded, logged): connection failures/timeouts and 5xx responses."""

T = TypeVar("T")


async def call_with_retries(call: Callable[[], Awaitable[T]], *, attempts: int,
                            retryable: Callable[[BaseException], bool], logger: logging.Logger,
                            what: str) -> T:
    """``await call()``, again after an exception ``retryable`` accepts, up to ``attempts``
    attempts in all, sleeping 0.1, 0.2, 0.4 ... s (at most 2 s) between them; each retry is a
    warning on ``logger`` starting "Retrying" and naming the exception. The last exception,
    or one not retryable, is raised. The first attempt costs one ``await`` (no retry
    machinery is built unless it fails: this runs once per LLM call)."""
    for attempt in range(1, attempts + 1):
        try:
            return await call()
        except Exception as exc:
            if attempt >= attempts or not retryable(exc):
                raise
            delay = min(0.1 * 2 ** (attempt - 1), 2.0)
            logger.warning("Retrying %s in %.1f s (attempt %d of %d) as it raised %s: %s",
                           what, delay, attempt + 1, attempts, type(exc).__name__, exc)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable: attempts >= 1")


class LLMAgent(Agent):
    """Chats with a model through ``client.chat.completions.create``; returns assistant messages.

    Args:
        client: an ``openai.AsyncOpenAI`` (None only with ``for_gateway``).
        model: the model (policy) name.
        system_prompt: prepended to the history at the start of each episode.
        sampling: extra SDK kwargs for every call (``temperature``, ``max_tokens``...).
        tools: OpenAI tool schemas offered to the model (e.g. ``env.tools``); calls to tools
            without a local ``tool_fns`` entry are returned as the action for the env.
        tool_fns: ``{name: callable}`` run by the agent itself (sync or async, keyword
            arguments from the call's JSON), results fed back as ``tool`` messages.
        max_tool_rounds: local tool rounds per ``act`` at most; then the last assistant
            message is returned as is.
        tool_timeout: seconds per local tool call (a timeout becomes an ``error: ...`` result).
            An async tool is cancelled at its timeout. A sync tool runs, by default
            (``sync_tools="process"``), in a forked child process killed (with its process
            group) at the timeout, so nothing of it runs on afterwards; being a fork, its
            in-memory side effects stay in the child and its result must be a ``str`` or
            JSON-serializable (``areal_agents.tool_process``). ``sync_tools="thread"`` runs it
            in a thread instead (shared memory, but it keeps running after its timeout).
            Model-written code belongs in the sandbox: ``areal_agents.sandbox.python_tool``.
        max_attempts: attempts per completion on ``RETRYABLE`` errors.
        agent_id: written into the samples' ``agent`` field.
        sync_tools: where sync ``tool_fns`` run: ``"process"`` or ``"thread"`` (see above).

    Attributes:
        history: the episode's messages so far (OpenAI format).
        last_report: the ``TokenizationReport`` of the last ``end_episode`` (gateway agents).
        last_session: the ``Session`` ended by the last ``end_episode`` (gateway agents).
    """

    def __init__(self, client: openai.AsyncOpenAI | None, model: str,
                 system_prompt: str | None = None, sampling: Mapping[str, Any] | None = None,
                 tools: list[dict[str, Any]] | None = None,
                 tool_fns: Mapping[str, Callable[..., Any]] | None = None,
                 max_tool_rounds: int = 4, tool_timeout: float = 10.0, max_attempts: int = 3,
                 agent_id: str = "", sync_tools: Literal["process", "thread"] = "process") -> None:
        if max_tool_rounds < 0 or max_attempts < 1:
            raise ValueError("max_tool_rounds must be >= 0 and max_attempts >= 1")
        if sync_tools not in ("process", "thread"):
            raise ValueError(f"sync_tools must be 'process' or 'thread', got {sync_tools!r}")
        self.sync_tools = sync_tools
        self.client = client
        self.model = model
        self.system_prompt = system_prompt
        self.sampling = dict(sampling or {})
        self.tools = list(tools or []) + [
            _schema(n, f) for n, f in (tool_fns or {}).items()
            if not any(t.get("function", {}).get("name") == n for t in tools or [])]
        self.tool_fns = dict(tool_fns or {})
        self.max_tool_rounds = max_tool_rounds
        self.tool_timeout = tool_timeout
        self.max_attempts = max_attempts
        self.agent_id = agent_id
        self.history: list[Message] = []
        self.last_report: TokenizationReport | None = None
        self._gateway: Gateway | RemoteGateway | None = None
        self._policy = model
        self._metadata: dict[str, Any] = {}
        self._session_key: str | None = None
        self._keep_sessions = False
        self.last_session: Session | None = None

    @classmethod
    def for_gateway(cls, gateway: Gateway | RemoteGateway, policy: str, *,
                    metadata: Mapping[str, Any] | None = None, keep_sessions: bool = False,
                    **kwargs: Any) -> LLMAgent:
        """An agent that opens a fresh recorded session of ``gateway`` for each episode.

        ``gateway`` is an in-process ``Gateway`` or a ``RemoteGateway`` (a served one).

        ``end_episode(return)`` ends that session and returns its samples (tokenization
        contract) with the return as reward; ``last_report`` holds the split report and
        ``last_session`` the ended ``Session``. The gateway forgets ended sessions unless
        ``keep_sessions`` (so long runs do not accumulate them).
        """
        agent = cls(None, policy, **kwargs)
        agent._gateway = gateway
        agent._metadata = dict(metadata or {})
        agent._keep_sessions = keep_sessions
        return agent

    def reset(self) -> None:
        self.history = []
        self.last_report = None
        if self._gateway is not None:
            self._session_key = None
            self.client = None

    def _has_client(self) -> bool:
        """Whether a request can be sent (a subclass may build its client on first use)."""
        return self.client is not None

    async def act(self, observation: Any) -> Message:
        """Append ``observation`` (message(s) or text) to the history and answer it.

        Returns:
            The assistant message dict (``content`` and, if any, ``tool_calls``).

        Raises:
            openai.APIError: a non-retryable API error, or a retryable one after
                ``max_attempts`` attempts.
        """
        if self._gateway is not None and self._session_key is None:
            self._session_key = await self._gateway.create_session(
                self._policy, {**self._metadata, "agent": self.agent_id})
            self.client = self._gateway.async_client(self._session_key)
        if not self._has_client():
            raise RuntimeError("LLMAgent has no client; pass one or use LLMAgent.for_gateway")
        if not self.history and self.system_prompt is not None:
            self.history.append({"role": "system", "content": self.system_prompt})
        self.history.extend(as_messages(observation))
        for _ in range(self.max_tool_rounds + 1):
            reply = await self._complete()
            self.history.append(reply)
            calls = reply.get("tool_calls") or []
            if not calls or not all(c["function"]["name"] in self.tool_fns for c in calls):
                return reply
            results = await asyncio.gather(*(self._run_tool(c) for c in calls))
            self.history.extend(results)
        return reply

    async def _complete(self) -> Message:
        kwargs = dict(self.sampling)
        if self.tools:
            kwargs["tools"] = self.tools
        response = await call_with_retries(
            lambda: self.client.chat.completions.create(  # type: ignore[union-attr]
                model=self.model, messages=list(self.history), **kwargs),
            attempts=self.max_attempts, retryable=lambda e: isinstance(e, RETRYABLE),
            logger=log, what="the chat completion")
        message = response.choices[0].message
        out: dict[str, Any] = {"role": "assistant", "content": message.content}
        if message.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": c.function.arguments}}
                for c in message.tool_calls]
        return out  # type: ignore[return-value]

    async def _run_tool(self, call: dict[str, Any]) -> Message:
        fn = self.tool_fns[call["function"]["name"]]
        try:
            args = json.loads(call["function"]["arguments"] or "{}")
            if not isinstance(args, dict):
                raise TypeError("arguments must be a JSON object")
            if inspect.iscoroutinefunction(fn):
                text = result_text(await asyncio.wait_for(fn(**args), self.tool_timeout))
            elif self.sync_tools == "process":
                text = await call_in_process(fn, args, self.tool_timeout)
            else:
                text = result_text(await asyncio.wait_for(asyncio.to_thread(fn, **args),
                                                          self.tool_timeout))
        except TimeoutError:
            text = f"error: tool {call['function']['name']!r} timed out after {self.tool_timeout}s"
        except ToolFailed as exc:  # raised in the tool's process: "<Type>: <message>"
            text = f"error: {exc}"
        except Exception as exc:  # the model should see its mistake, not crash the episode
            text = f"error: {type(exc).__name__}: {exc}"
        return {"role": "tool", "tool_call_id": call["id"], "content": text}

    async def end_episode(self, episode_return: float) -> list[Sample]:
        """End the gateway session (if any) and return its samples with ``episode_return``."""
        if self._gateway is None or self._session_key is None:
            return []
        session = self._gateway.end_session(self._session_key, drop=not self._keep_sessions)
        if inspect.isawaitable(session):  # a RemoteGateway answers over HTTP
            session = await session
        self.last_session = session
        if self.client is not None:  # the per-episode client this agent opened
            await self.client.close()
        self.client, self._session_key = None, None
        samples, self.last_report = session.to_samples(
            reward=episode_return, agent=self.agent_id,
            group=str(self._metadata.get("group", "")))
        if self.last_report.num_splits:
            log.info("LLMAgent %s: %d tokenization split(s): %s", self.agent_id,
                     self.last_report.num_splits, self.last_report.splits)
        return samples


def _schema(name: str, fn: Callable[..., Any]) -> dict[str, Any]:
    """A minimal OpenAI function schema for a local tool from its signature and docstring."""
    params = {p: {"type": "string"} for p in inspect.signature(fn).parameters}
    return {"type": "function", "function": {
        "name": name, "description": (fn.__doc__ or "").strip().split("\n")[0],
        "parameters": {"type": "object", "properties": params, "required": list(params)}}}
