"""The inference-engine contract: token ids in; token ids, log-probs and versions out."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..ids import new_id

FinishReason = Literal["stop", "length", "abort"]


@dataclass
class SamplingParams:
    """How to sample one request.

    Attributes:
        max_tokens: completion tokens at most (>= 1).
        temperature: 0 means greedy; logits are divided by it otherwise.
        top_p: nucleus mass in (0, 1]; 1 disables it.
        top_k: keep the k most likely tokens; 0 disables it.
        stop: strings that end the completion (the tokens that produced them are kept in
            ``token_ids``; the gateway trims the text).
        stop_token_ids: ids that end the completion (kept in ``token_ids``); the tokenizer's
            EOS is always one.
        seed: per-request seed; the same seed and prompt give the same completion.
        n: number of independent completions.
        top_logprobs: also return the k most likely alternatives per position (0 = off).
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    n: int = 1
    top_logprobs: int = 0

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")


@dataclass
class GenerateRequest:
    """One generation request.

    Attributes:
        prompt_ids: the prompt's token ids (already chat-templated).
        sampling: sampling parameters.
        request_id: unique id (generated when omitted).
        session_id: sticky-routing key (same session -> same replica for prefix reuse).
        adapter: the LoRA adapter of the served base model to generate with (None: the base;
            engines that serve adapters: ``LocalEngine.add_adapter``).
        last_turn: the caller's promise that no later request of this session continues this
            one (a single-turn episode): an engine need not keep its keys/values for prefix
            reuse (``LocalEngine`` then skips its prefix-cache copy). Never changes a token or
            log-prob; a later request of the session still works, only without reuse.
    """

    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=new_id)
    session_id: str | None = None
    adapter: str | None = None
    last_turn: bool = False


@dataclass
class CompletionOutput:
    """One sampled completion.

    ``logprobs[i]`` is the log-prob of ``token_ids[i]`` under the distribution it was sampled
    from (after temperature, top-k and top-p; greedy reports the temperature-1 log-prob), and
    ``versions[i]`` the weight version that produced it. All three lists have equal length.
    ``top_logprobs[i]`` lists ``(token_id, logprob)`` pairs when requested.
    """

    token_ids: list[int]
    logprobs: list[float]
    versions: list[int]
    finish_reason: FinishReason
    top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass
class GenerateResult:
    """The result of a ``GenerateRequest``: ``outputs`` holds ``sampling.n`` completions."""

    request_id: str
    prompt_ids: list[int]
    outputs: list[CompletionOutput]


@dataclass
class TokenDelta:
    """New tokens of one completion of a request being generated (``generate_streaming``).

    Attributes:
        index: which of the request's ``sampling.n`` completions they extend.
        token_ids: the tokens produced since the previous delta of this completion.
        logprobs: their log-probs (the ``CompletionOutput.logprobs`` definition).
        versions: the weight version of each token.
        top_logprobs: their ``(token_id, logprob)`` alternatives when requested, else None.
    """

    index: int
    token_ids: list[int]
    logprobs: list[float]
    versions: list[int]
    top_logprobs: list[list[tuple[int, float]]] | None = None


OnTokens = Callable[[TokenDelta], None]
"""Receives ``TokenDelta``s on the event loop, in order per completion; must not block."""


@dataclass
class WeightUpdate:
    """New weights for an engine: exactly one of ``named_tensors`` or ``path``.

    Attributes:
        named_tensors: HF-named full tensors (in process), consumed once.
        path: a directory of ``*.safetensors`` files with HF names.
        version: the version the engine takes after the update (None: current + 1).
        adapter: the LoRA adapter these tensors belong to (PEFT names, ``lora_A``/``lora_B``
            only); its version changes, the base's and other adapters' do not. None: the base.
    """

    named_tensors: Iterable[tuple[str, torch.Tensor]] | None = None
    path: str | None = None
    version: int | None = None
    adapter: str | None = None

    def __post_init__(self) -> None:
        if (self.named_tensors is None) == (self.path is None):
            raise ValueError("WeightUpdate needs exactly one of named_tensors= or path=")


class InferenceEngine:
    """An inference engine: ``LocalEngine`` (embedded), vLLM or SGLang servers, fakes in tests.

    Contract:
        * ``generate`` returns token ids, per-token log-probs and versions; it never mixes two
          weight versions in one completion without ``versions`` recording it.
        * ``pause`` stops scheduling new tokens (in-flight requests wait, none fail);
          ``resume`` continues. Both are idempotent.
        * ``update_weights`` loads new weights and sets ``version`` (to ``update.version`` or
          ``version + 1``).
        * ``num_pending`` is the load used for least-loaded routing.
        * ``exact_logprobs`` declares that its log-probs are float32 computations of the
          ``SamplingDistribution`` definition, equal to a float32 train engine's up to rounding
          (then the trainer may skip the proximal recompute; ``trainers/proximal.py``). False
          unless an engine knows it (bf16 weights, unknown servers: False).

    Raises (from ``generate``):
        ContextLengthExceeded: prompt + max_tokens beyond the context window.
        EngineError: any other failure (the message names the cause).
    """

    version: int = 0
    max_context: int = 2048
    exact_logprobs: bool = False

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        raise NotImplementedError

    async def generate_streaming(self, request: GenerateRequest,
                                 on_tokens: OnTokens) -> GenerateResult:
        """``generate``, calling ``on_tokens`` with each completion's tokens as they exist.

        Contract: per completion, the deltas' ``token_ids`` (and log-probs, versions)
        concatenate to exactly the returned ``CompletionOutput``'s; every delta is delivered
        before this returns. This default delivers each completion as one delta once the
        whole request is done (an engine that cannot stream stays correct, not incremental);
        ``LocalEngine`` delivers the tokens of every decode step as it runs.
        """
        result = await self.generate(request)
        for index, out in enumerate(result.outputs):
            on_tokens(TokenDelta(index, list(out.token_ids), list(out.logprobs),
                                 list(out.versions), out.top_logprobs))
        return result

    async def pause(self) -> None:
        raise NotImplementedError

    async def resume(self) -> None:
        raise NotImplementedError

    async def update_weights(self, update: WeightUpdate) -> None:
        raise NotImplementedError

    @property
    def num_pending(self) -> int:
        """Requests queued or running."""
        return 0

    async def close(self) -> None:
        """Stop background work. Idempotent."""

    async def __aenter__(self) -> InferenceEngine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
