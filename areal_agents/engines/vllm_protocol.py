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
from .base import CompletionOutput, FinishReason, GenerateRequest, SamplingParams

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
    return CompletionOutput(
        token_ids=token_ids, logprobs=[float(e["logprob"]) for e in content],
        versions=versions_from_spans(choice.get("weight_versions"), len(token_ids),
                                     default_version),
        finish_reason=finish_reason(choice), top_logprobs=top)


def parse_completions_choice(choice: dict[str, Any], version: int) -> CompletionOutput:
    """One ``/v1/completions`` choice; every token gets ``version`` (no labels there).

    Raises:
        EngineError: token and log-prob counts differ, or an unknown finish reason.
    """
    token_ids = [int(t) for t in choice.get("token_ids") or []]
    logprobs = (choice.get("logprobs") or {}).get("token_logprobs") or []
    if len(logprobs) != len(token_ids):
        raise EngineError(f"vLLM returned {len(token_ids)} tokens but {len(logprobs)} "
                          "log-probs; was return_token_ids ignored (vLLM < 0.10)?")
    return CompletionOutput(token_ids=token_ids, logprobs=[float(x) for x in logprobs],
                            versions=[version] * len(token_ids),
                            finish_reason=finish_reason(choice))


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
