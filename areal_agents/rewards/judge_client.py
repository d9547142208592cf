"""``JudgeClient``: how a judge reaches its model — concurrency limit, cache, timeout, retries.

A judge's model is either a policy of the run, named by ``policy=`` and served by the
Trainer's gateway (the Trainer calls ``bind`` with its in-process client, whose admin key
means judge calls are never recorded as training samples), or any ``openai.AsyncOpenAI``
client given as ``client=`` (a vLLM/SGLang server, a hosted API, a test mock).

Every request passes, in order: the cache (``JudgeCache``, keyed by the judge id and the
rendered prompt), a semaphore of ``max_concurrency`` requests, then up to ``1 + max_retries``
attempts of at most ``timeout_s`` seconds each, ``backoff_s * 2**k`` seconds apart. A request
that still fails raises ``JudgeFailed`` with its cause (``"timeout"`` or ``"error"``).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any, Literal

from areal_agents.errors import AgentsError, ConfigError

from .judge_cache import JudgeCache

__all__ = ["JudgeClient", "JudgeFailed"]

Cause = Literal["timeout", "error", "parse", "out_of_range"]


class JudgeFailed(AgentsError):
    """A judge could not score an episode (its model kept failing, or its replies could not be
    read and the judge has no fallback). The trainer counts the episode as failed.

    Attributes:
        cause: ``"timeout"``, ``"error"``, ``"parse"`` or ``"out_of_range"``.
    """

    def __init__(self, message: str, cause: Cause) -> None:
        super().__init__(message)
        self.cause = cause


class JudgeClient:
    """Send rendered prompts to a judge model; count calls, hits, timeouts, errors and tokens.

    Args:
        policy: a policy of the run (served by the Trainer, which calls ``bind``); the
            request's ``model`` field.
        client: an ``openai.AsyncOpenAI`` to use instead (``model`` names the served model).
        model: the ``model`` field with ``client`` (default: ``policy``).
        api: ``"chat"`` (one user message) or ``"completions"`` (the raw prompt; small
            models warm-started on raw text read it far better).
        sampling: request arguments (default greedy, ``max_tokens=16``).
        max_concurrency: judge requests in flight at most (the engine batches them).
        timeout_s: seconds per attempt; retries: attempts after the first; backoff_s: the
            first pause between attempts (doubling).
        cache: a ``JudgeCache`` (shared between judges if given), or its size.

    Raises:
        ConfigError: neither or both of ``policy`` and ``client``, or bad limits.
    """

    def __init__(self, *, policy: str | None = None, client: Any = None,
                 model: str | None = None, api: Literal["chat", "completions"] = "chat",
                 sampling: dict[str, Any] | None = None, max_concurrency: int = 8,
                 timeout_s: float = 60.0, retries: int = 2, backoff_s: float = 0.5,
                 cache: JudgeCache | int = 4096) -> None:
        if (policy is None) == (client is None):
            raise ConfigError("a judge needs exactly one of policy= (a policy of the run, served "
                              "by the Trainer) or client= (an openai.AsyncOpenAI)")
        if api not in ("chat", "completions"):
            raise ConfigError(f"judge api={api!r}; choose 'chat' or 'completions'")
        if max_concurrency < 1 or timeout_s <= 0 or retries < 0 or backoff_s < 0:
            raise ConfigError(f"judge limits must be max_concurrency >= 1, timeout_s > 0, "
                              f"retries >= 0, backoff_s >= 0; got {max_concurrency}, "
                              f"{timeout_s}, {retries}, {backoff_s}")
        self.policy, self.client = policy, client
        self.model = model if model is not None else (policy or "default")
        self.api = api
        self.sampling = {"temperature": 0.0, "max_tokens": 16, **(sampling or {})}
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.cache = cache if isinstance(cache, JudgeCache) else JudgeCache(cache)
        self.max_concurrency = max_concurrency
        self._semaphore: asyncio.Semaphore | None = None
        self.counts: Counter[str] = Counter()  # calls, attempts, timeouts, errors, tokens...

    def bind(self, client: Any, model: str | None = None) -> None:
        """Use ``client`` (the Trainer's gateway client, or an endpoint policy's own client
        with its served ``model`` name) for a ``policy=`` judge."""
        self.client = client
        if model is not None:
            self.model = model

    async def complete(self, judge_id: str, prompt: str) -> str:
        """The judge model's reply to ``prompt`` (from the cache when it was asked before).

        Raises:
            JudgeFailed: every attempt timed out or failed (cause ``timeout`` / ``error``).
            RuntimeError: a ``policy=`` judge used before the Trainer bound a client.
        """
        cached = self.cache.get(judge_id, prompt)
        if cached is not None:
            self.counts["cache_hits"] += 1
            return cached
        if self.client is None:
            raise RuntimeError(f"judge on policy {self.policy!r} has no client: pass it in the "
                               "Trainer's reward_fns (the Trainer binds it) or give client=")
        if self._semaphore is None:  # made lazily: bound to the running event loop
            self._semaphore = asyncio.Semaphore(self.max_concurrency)
        async with self._semaphore:
            reply = await self._with_retries(prompt)
        self.cache.put(judge_id, prompt, reply)
        return reply

    async def _with_retries(self, prompt: str) -> str:
        self.counts["calls"] += 1
        last: BaseException | None = None
        timed_out = False
        for attempt in range(1 + self.retries):
            if attempt:
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
            self.counts["attempts"] += 1
            try:
                return await asyncio.wait_for(self._request(prompt), self.timeout_s)
            except TimeoutError as e:
                self.counts["timeouts"] += 1
                last, timed_out = e, True
            except Exception as e:  # the SDK's APIError, a connection error...
                self.counts["errors"] += 1
                last, timed_out = e, False
        cause: Cause = "timeout" if timed_out else "error"
        detail = f"timed out after {self.timeout_s:g} s" if timed_out else repr(last)
        raise JudgeFailed(f"judge model {self.model!r} failed {1 + self.retries} attempts "
                          f"(last: {detail})", cause) from last

    async def _request(self, prompt: str) -> str:
        assert self.client is not None
        if self.api == "completions":
            reply = await self.client.completions.create(model=self.model, prompt=prompt,
                                                         **self.sampling)
            text = reply.choices[0].text
        else:
            reply = await self.client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": prompt}],
                **self.sampling)
            text = reply.choices[0].message.content
        usage = getattr(reply, "usage", None)
        if usage is not None:
            self.counts["prompt_tokens"] += int(usage.prompt_tokens or 0)
            self.counts["completion_tokens"] += int(usage.completion_tokens or 0)
        return text or ""
