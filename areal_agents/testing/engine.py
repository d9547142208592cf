"""``ScriptedEngine``: a fake ``InferenceEngine`` that replays scripted completions.

Example:
    >>> import asyncio
    >>> from areal_agents.engines.base import GenerateRequest, SamplingParams
    >>> eng = ScriptedEngine([[5, 6, 7]])
    >>> out = asyncio.run(eng.generate(GenerateRequest([1, 2], SamplingParams(max_tokens=2))))
    >>> out.outputs[0].token_ids, out.outputs[0].finish_reason
    ([5, 6], 'length')
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from ..engines.base import (
    CompletionOutput,
    GenerateRequest,
    GenerateResult,
    InferenceEngine,
    WeightUpdate,
)
from ..errors import ContextLengthExceeded

Script = str | list[int]


def fake_logprob(token_id: int, position: int) -> float:
    """The deterministic fake log-prob ScriptedEngine reports for a token at a position."""
    return -((token_id * 7 + position * 3) % 17 + 1) / 10.0


class ScriptedEngine(InferenceEngine):
    """Replays scripted completions in order (cycling), one per sample.

    Args:
        script: completions to replay: token-id lists, or strings encoded with ``tokenizer``
            with ``eos_id`` appended; or a callable ``(request, sample_index) -> str | ids``.
        tokenizer: needed for string scripts.
        eos_id: appended to string completions (default: the tokenizer's EOS).
        latency: seconds each ``generate`` sleeps (simulated decode time).
        max_context: prompt + max_tokens beyond this raises ``ContextLengthExceeded``.

    Sampling honoured: ``max_tokens`` (truncates, finish "length"), ``stop_token_ids``
    (truncates after the first, finish "stop"), ``n``, ``top_logprobs`` (fake alternatives).
    ``requests`` records every request seen. Log-probs come from ``fake_logprob``.
    """

    def __init__(
        self,
        script: Sequence[Script] | Callable[[GenerateRequest, int], Script] = ((1,),),
        tokenizer: Any = None,
        eos_id: int | None = None,
        latency: float = 0.0,
        max_context: int = 4096,
    ) -> None:
        self.script = script
        self.tokenizer = tokenizer
        self.eos_id = eos_id if eos_id is not None else getattr(tokenizer, "eos_token_id", None)
        self.latency = latency
        self.max_context = max_context
        self.version = 0
        self.requests: list[GenerateRequest] = []
        self._cursor = 0
        self._pending = 0
        self._running = asyncio.Event()
        self._running.set()

    def _next(self, request: GenerateRequest, index: int) -> list[int]:
        if callable(self.script):
            item = self.script(request, index)
        else:
            item = self.script[self._cursor % len(self.script)]
            self._cursor += 1
        if isinstance(item, str):
            if self.tokenizer is None:
                raise ValueError("string scripts need ScriptedEngine(tokenizer=...)")
            ids = list(self.tokenizer(item, add_special_tokens=False)["input_ids"])
            return ids + ([self.eos_id] if self.eos_id is not None else [])
        return list(item)

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        sp = request.sampling
        if len(request.prompt_ids) + sp.max_tokens > self.max_context:
            raise ContextLengthExceeded(
                f"prompt of {len(request.prompt_ids)} tokens + max_tokens {sp.max_tokens} "
                f"exceeds the context of {self.max_context}"
            )
        self._pending += 1
        try:
            self.requests.append(request)
            if self.latency:
                await asyncio.sleep(self.latency)
            await self._running.wait()
            outputs = [self._output(request, i) for i in range(sp.n)]
        finally:
            self._pending -= 1
        return GenerateResult(request.request_id, list(request.prompt_ids), outputs)

    def _output(self, request: GenerateRequest, index: int) -> CompletionOutput:
        sp = request.sampling
        ids, finish = self._next(request, index), "length"
        stops = set(sp.stop_token_ids)
        for k, tok in enumerate(ids):
            if tok in stops:
                ids, finish = ids[: k + 1], "stop"
                break
        if len(ids) > sp.max_tokens:
            ids, finish = ids[: sp.max_tokens], "length"
        elif finish == "length" and len(ids) < sp.max_tokens:
            finish = "stop"
        start = len(request.prompt_ids)
        lps = [fake_logprob(t, start + k) for k, t in enumerate(ids)]
        tops = None
        if sp.top_logprobs:
            tops = [
                [(t, lp)] + [(t + j, lp - j) for j in range(1, sp.top_logprobs)]
                for t, lp in zip(ids, lps, strict=True)
            ]
        return CompletionOutput(ids, lps, [self.version] * len(ids), finish, tops)  # type: ignore[arg-type]

    async def pause(self) -> None:
        self._running.clear()

    async def resume(self) -> None:
        self._running.set()

    async def update_weights(self, update: WeightUpdate) -> None:
        if update.named_tensors is not None:
            for _ in update.named_tensors:
                pass
        self.version = update.version if update.version is not None else self.version + 1

    @property
    def num_pending(self) -> int:
        return self._pending
