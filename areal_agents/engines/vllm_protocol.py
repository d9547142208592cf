"""vLLM 0.32's generation HTTP shapes: request bodies in, ``CompletionOutput`` out (pure).

Two endpoints take token ids: ``POST /inference/v1/generate`` (``--enable-scale-out``; log-probs
carry token ids and ranks, each choice carries ``weight_versions`` spans) and
``POST /v1/completions`` with a token-id prompt and ``return_token_ids`` (no version labels;
top log-probs keyed by text). ``tests/engines/data/vllm_0.32_responses.json`` holds real ones.

Example:
    >>> from areal_agents.engines import GenerateRequest, SamplingParams
    >>> sampling_params(SamplingParams(max_tokens=4, temperature=0, top_p=0.5))["top_p"]
    1.0
    >>> versions_from_spans([{"version": "3", "start": 0, "end": 2},
    ...                      {"version": "4", "start": 2, "end": 3}], 3, default=0)
    [3, 3, 4]
"""

from __future__ import annotations

from typing import Any

import httpx2

from ..errors import EngineError
from .base import CompletionOutput, FinishReason, GenerateRequest, SamplingParams, TokenDelta

_FINISH: dict[str, FinishReason] = {"stop": "stop", "length": "length", "abort": "abort"}


def sampling_params(sp: SamplingParams) -> dict[str, Any]:
    """vLLM ``SamplingParams`` fields for ``sp``.

    Greedy requests (temperature 0) switch top-k/top-p off: our greedy reports
    temperature-1 log-probs, and vLLM would filter them. ``logprobs`` asks for one more than
    ``top_logprobs``: vLLM lists the sampled token first, then the best others.
    """
    greedy = sp.temperature == 0
    return {
        "n": sp.n, "max_tokens": sp.max_tokens, "temperature": sp.temperature,
        "top_p": 1.0 if greedy else sp.top_p, "top_k": 0 if greedy else sp.top_k,
        "seed": sp.seed, "stop": list(sp.stop), "stop_token_ids": list(sp.stop_token_ids),
        "logprobs": sp.top_logprobs + 1 if sp.top_logprobs else 0,
    }


def generate_body(request: GenerateRequest, model: str,
                  sampling: dict[str, Any]) -> dict[str, Any]:
    """The ``/inference/v1/generate`` body (``sampling``: from ``sampling_params``)."""
    return {"token_ids": list(request.prompt_ids), "request_id": request.request_id,
            "model": model, "sampling_params": sampling}


def completions_body(request: GenerateRequest, model: str,
                     sampling: dict[str, Any]) -> dict[str, Any]:
    """The ``/v1/completions`` body with a token-id prompt."""
    return {"model": model, "prompt": list(request.prompt_ids), "request_id": request.request_id,
            "return_token_ids": True, **sampling}


def streamed(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` (either endpoint) asking for a stream of new tokens (``StreamedChoices``)."""
    return {**body, "stream": True}


def choices(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The response's choices in ``index`` order."""
    return sorted(data.get("choices") or [], key=lambda c: c.get("index", 0))


def parse_generate_choice(choice: dict[str, Any], num_top: int,
                          default_version: int) -> CompletionOutput:
    """One ``/inference/v1/generate`` choice; ``num_top`` best alternatives per position.

    Raises:
        EngineError: token and log-prob counts differ, an unknown finish reason, or labels
            that are not integers.
    """
    token_ids, logprobs, top = generate_tokens(choice, num_top)
    return CompletionOutput(
        token_ids=token_ids, logprobs=logprobs,
        versions=versions_from_spans(choice.get("weight_versions"), len(token_ids),
                                     default_version),
        finish_reason=finish_reason(choice), top_logprobs=top)


def generate_tokens(choice: dict[str, Any], num_top: int
                    ) -> tuple[list[int], list[float], list[list[tuple[int, float]]] | None]:
    """The token ids, log-probs and (``num_top`` > 0) best alternatives of a
    ``/inference/v1/generate`` choice, or of one streamed chunk of it.

    Raises:
        EngineError: token and log-prob counts differ.
    """
    token_ids = [int(t) for t in choice.get("token_ids") or []]
    content = (choice.get("logprobs") or {}).get("content") or []
    if len(content) != len(token_ids):
        raise EngineError(f"vLLM returned {len(token_ids)} tokens but {len(content)} "
                          "log-probs; is the server a vLLM with this API (0.32)?")
    top = None
    if num_top:
        top = [[(int(e["token_id"]), float(e["logprob"])) for e in sorted(
            (e for e in entry.get("top_logprobs") or [] if 1 <= e.get("rank", 0) <= num_top),
            key=lambda e: e["rank"])] for entry in content]
    return token_ids, [float(e["logprob"]) for e in content], top


def parse_completions_choice(choice: dict[str, Any], version: int) -> CompletionOutput:
    """One ``/v1/completions`` choice; every token gets ``version`` (no labels there).

    Raises:
        EngineError: token and log-prob counts differ, or an unknown finish reason.
    """
    token_ids, logprobs = completions_tokens(choice)
    return CompletionOutput(token_ids=token_ids, logprobs=logprobs,
                            versions=[version] * len(token_ids),
                            finish_reason=finish_reason(choice))


def completions_tokens(choice: dict[str, Any]) -> tuple[list[int], list[float]]:
    """The token ids and log-probs of a ``/v1/completions`` choice, or of one streamed chunk.

    Raises:
        EngineError: token and log-prob counts differ.
    """
    token_ids = [int(t) for t in choice.get("token_ids") or []]
    logprobs = (choice.get("logprobs") or {}).get("token_logprobs") or []
    if len(logprobs) != len(token_ids):
        raise EngineError(f"vLLM returned {len(token_ids)} tokens but {len(logprobs)} "
                          "log-probs; was return_token_ids ignored (vLLM < 0.10)?")
    return token_ids, [float(x) for x in logprobs]


class StreamedChoices:
    """The completions of one streamed request (``"stream": true``), built chunk by chunk.

    Both endpoints stream the new tokens of one choice per chunk (``index``, ``token_ids``,
    their log-probs; ``finish_reason`` on the last). ``/inference/v1/generate`` adds the
    whole completion's ``weight_versions`` spans to its last chunk only, so a streamed token
    gets the version its caller passes when its chunk arrives; ``outputs`` then takes the
    spans (exact), which agree unless an update's new label reached the engine before the
    chunk of a token generated under the old one.

    Args:
        n: completions requested.
        endpoint: ``"generate"`` or ``"completions"`` (the chunk shape).
        num_top: best alternatives per token to keep (``generate`` only).
        spans: whether ``outputs`` takes the server's version spans (False: an adapter,
            whose tokens all carry its own version).
    """

    def __init__(self, n: int, endpoint: str, num_top: int = 0, spans: bool = True) -> None:
        self.endpoint, self.num_top, self.spans = endpoint, num_top, spans
        self.outputs_so_far = [CompletionOutput([], [], [], "length",
                                                [] if num_top else None) for _ in range(n)]
        self.finished: list[dict[str, Any] | None] = [None] * n

    def add(self, chunk: dict[str, Any], version: int) -> list[TokenDelta]:
        """The new tokens in ``chunk`` (one delta per choice that has some), tagged
        ``version``.

        Raises:
            EngineError: an index beyond ``n``, mismatched counts, or a finish reason that is
                not stop / length / abort.
        """
        deltas = []
        for choice in chunk.get("choices") or []:
            index = int(choice.get("index", 0))
            if not 0 <= index < len(self.finished):
                raise EngineError(f"vLLM streamed choice {index} of a request for "
                                  f"n={len(self.finished)}")
            if self.endpoint == "generate":
                ids, lps, top = generate_tokens(choice, self.num_top)
            else:
                (ids, lps), top = completions_tokens(choice), None
            out = self.outputs_so_far[index]
            if ids:
                delta = TokenDelta(index, ids, lps, [version] * len(ids), top)
                out.token_ids += ids
                out.logprobs += lps
                out.versions += delta.versions
                if out.top_logprobs is not None:
                    out.top_logprobs += top or [[] for _ in ids]
                deltas.append(delta)
            if choice.get("finish_reason") is not None:
                out.finish_reason = finish_reason(choice)
                self.finished[index] = choice
        return deltas

    def outputs(self) -> list[CompletionOutput]:
        """The finished completions (versions from the server's spans where it sent them).

        Raises:
            EngineError: the stream ended before a completion finished, or spans that do not
                cover its tokens.
        """
        for index, last in enumerate(self.finished):
            if last is None:
                raise EngineError(f"vLLM's stream ended before completion {index} finished")
            out = self.outputs_so_far[index]
            if self.spans and last.get("weight_versions"):
                out.versions = versions_from_spans(last["weight_versions"], len(out.token_ids),
                                                   out.versions[0] if out.versions else 0)
        return self.outputs_so_far


def versions_from_spans(spans: list[dict[str, Any]] | None, num_tokens: int,
                        default: int) -> list[int]:
    """Per-token versions from ``[{version, start, end}]`` label spans (``default`` without).

    Raises:
        EngineError: a label that is not an integer, or spans not covering ``num_tokens``.
    """
    if not spans:
        return [default] * num_tokens
    versions: list[int] = []
    for span in spans:
        label = str(span["version"])
        if not label.lstrip("-").isdigit():
            raise EngineError(f"vLLM labelled tokens with weight version {label!r}, not an "
                              "integer; only this engine should set the server's label")
        versions += [int(label)] * (int(span["end"]) - int(span["start"]))
    if len(versions) != num_tokens:
        raise EngineError(f"vLLM's weight-version spans cover {len(versions)} tokens of "
                          f"{num_tokens}")
    return versions


def finish_reason(choice: dict[str, Any]) -> FinishReason:
    """``stop`` / ``length`` / ``abort``; anything else (``error``...) is an ``EngineError``."""
    reason = choice.get("finish_reason")
    if reason not in _FINISH:
        raise EngineError(f"vLLM finished a completion with reason {reason!r} "
                          f"(stop_reason {choice.get('stop_reason')!r})")
    return _FINISH[reason]


def error_message(response: httpx2.Response) -> str:
    """The message of a vLLM / FastAPI error body (OpenAI shape, dev-endpoint shape, detail)."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase
    error = body.get("error", body.get("detail")) if isinstance(body, dict) else body
    if isinstance(error, dict):
        error = error.get("message", error)
    return str(error)
