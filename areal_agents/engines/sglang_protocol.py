"""SGLang's native ``/generate`` shapes: request bodies in, ``CompletionOutput`` out (pure).

Shapes, from sgl-project/sglang (``python/sglang/srt/managers/io_struct.py``:
``GenerateReqInput``; ``python/sglang/srt/sampling/sampling_params.py``; the ``meta_info`` built
in ``python/sglang/srt/managers/tokenizer_manager.py``):

* request: ``{"input_ids": [...], "sampling_params": {...}, "return_logprob": true,
  "logprob_start_len": -1, "top_logprobs_num": K, "rid": id, "stream": false}``;
  ``sampling_params``: ``max_new_tokens``, ``temperature``, ``top_p``, ``top_k`` (-1 = off),
  ``stop``, ``stop_token_ids``, ``n``, ``sampling_seed``;
* response: one ``{"text", "output_ids", "meta_info"}`` object, or a list of ``n`` of them
  when ``n > 1``; ``meta_info``: ``finish_reason`` (``{"type": "stop"|"length"|"abort", ...}``),
  ``output_token_logprobs`` (``[[logprob, token_id, text|null], ...]``),
  ``output_top_logprobs`` (per position, such triples), ``weight_version`` (the server's label
  when the answer was built), ``completion_tokens``; some builds add ``weight_versions``
  spans (``[{version, start, end}]``).

Log-probs. SGLang reports ``log softmax(logits / temperature)`` of the sampled token, before
top-k / top-p filtering (``python/sglang/srt/layers/sampler.py``; greedy rows report
temperature-1 log-probs, as here). This project's definition (``engines/sampling.py``) is the
log-prob under the *filtered* distribution, so ``processed_logprob`` renormalises over the
top-k set and then over the top-p nucleus, from the top log-probs SGLang returns with each
token (``top_logprobs_num`` = top-k, or ``window`` entries for top-p alone).

Example:
    >>> from areal_agents.engines import SamplingParams
    >>> sampling_params(SamplingParams(max_tokens=4, temperature=0, top_k=5))["top_k"]
    -1
    >>> round(processed_logprob(-1.0, 7, [(7, -1.0), (8, -1.0), (9, -3.0)], top_k=2,
    ...                         top_p=1.0), 4)
    -0.6931
"""

from __future__ import annotations

import math
from typing import Any

from ..errors import EngineError
from .base import CompletionOutput, FinishReason, GenerateRequest, SamplingParams, TokenDelta

_FINISH: dict[str, FinishReason] = {"stop": "stop", "length": "length", "abort": "abort"}


def filters(sp: SamplingParams) -> tuple[int, float]:
    """The ``(top_k, top_p)`` that shape the sampling distribution (greedy: none)."""
    return (0, 1.0) if sp.temperature == 0 else (sp.top_k, sp.top_p)


def sampling_params(sp: SamplingParams) -> dict[str, Any]:
    """SGLang ``sampling_params`` for ``sp`` (greedy switches top-k/top-p off, as our greedy
    reports temperature-1 log-probs; ``sampling_seed`` only when a seed is set)."""
    top_k, top_p = filters(sp)
    body: dict[str, Any] = {
        "n": sp.n, "max_new_tokens": sp.max_tokens, "temperature": sp.temperature,
        "top_p": top_p, "top_k": top_k if top_k > 0 else -1, "stop": list(sp.stop),
        "stop_token_ids": list(sp.stop_token_ids)}
    if sp.seed is not None:
        body["sampling_seed"] = sp.seed
    return body


def num_top_needed(sp: SamplingParams, window: int) -> int:
    """``top_logprobs_num`` to ask for: the requested alternatives, and the top-k set (or
    ``window`` entries for top-p alone) that ``processed_logprob`` renormalises over."""
    top_k, top_p = filters(sp)
    needed = top_k if top_k > 0 else (window if top_p < 1 else 0)
    return max(needed, sp.top_logprobs)


def generate_body(request: GenerateRequest, window: int, stream: bool = False
                  ) -> dict[str, Any]:
    """The ``POST /generate`` body for ``request`` (``stream``: see ``StreamedOutputs``)."""
    return {"input_ids": list(request.prompt_ids), "rid": request.request_id,
            "sampling_params": sampling_params(request.sampling), "return_logprob": True,
            "logprob_start_len": -1, "top_logprobs_num": num_top_needed(request.sampling, window),
            "stream": stream}


def outputs(data: Any, n: int) -> list[dict[str, Any]]:
    """The ``n`` completion objects of a response (a single object when ``n == 1``).

    Raises:
        EngineError: not ``n`` of them.
    """
    items = data if isinstance(data, list) else [data]
    if len(items) != n or not all(isinstance(i, dict) and "meta_info" in i for i in items):
        raise EngineError(f"SGLang answered /generate with {len(items)} completion(s) for n={n}"
                          f" (or without meta_info); is it an SGLang server? Got "
                          f"{str(data)[:200]!r}")
    return items


def filtered_logprobs(top: list[tuple[int, float]], *, top_k: int,
                      top_p: float) -> dict[int, float]:
    """The tokens kept by top-k, then top-p within the renormalised top-k set
    (``engines/sampling.py``'s rule), with their log-probs under the filtered distribution.

    Args:
        top: the best ``(token_id, logprob)`` pairs at one position (SGLang's log-probs: after
            temperature, before filtering), in any order.
        top_k, top_p: the filters (0 / 1 disable them; at least one is on).

    Raises:
        EngineError: top-p alone, and the nucleus reaches beyond ``top`` (ask for a larger
            window).
    """
    ranked = sorted(top, key=lambda e: -e[1])
    if top_k > 0:
        ranked = ranked[:top_k]
        shift = _logsumexp([lp for _, lp in ranked])  # renormalise over the top-k set
        ranked = [(t, lp - shift) for t, lp in ranked]
    if top_p < 1:
        nucleus, mass = [], 0.0
        for t, lp in ranked:
            if mass >= top_p:
                break
            nucleus.append((t, lp))
            mass += math.exp(lp)
        if mass < top_p and top_k <= 0:
            raise EngineError(f"the top-p nucleus (top_p={top_p}) reaches beyond the "
                              f"{len(top)} log-probs SGLang returned per token; raise "
                              "SGLangEngine(top_p_window=...) or set top_k")
        ranked = nucleus
    shift = _logsumexp([lp for _, lp in ranked])
    return {t: lp - shift for t, lp in ranked}


def processed_logprob(logprob: float, token_id: int, top: list[tuple[int, float]], *,
                      top_k: int, top_p: float) -> float:
    """The log-prob of ``token_id`` after top-k and top-p (SGLang's ``logprob`` as is when
    neither is on); ``filtered_logprobs`` states the rule.

    Raises:
        EngineError: the nucleus reaches beyond ``top``, or the token lies outside the
            filtered set.
    """
    if top_k <= 0 and top_p >= 1:
        return logprob
    kept = filtered_logprobs(top, top_k=top_k, top_p=top_p)
    if token_id not in kept:
        raise EngineError(f"SGLang sampled token {token_id}, outside the top_k={top_k} / "
                          f"top_p={top_p} set its own log-probs give; log-probs would not match")
    return kept[token_id]


def parse_output(item: dict[str, Any], sp: SamplingParams, version: int) -> CompletionOutput:
    """One completion object as a ``CompletionOutput``.

    Args:
        item: ``{"output_ids", "meta_info"}`` from ``/generate``.
        sp: the request's sampling parameters (filters and ``top_logprobs``).
        version: every token's version when the answer has no ``weight_versions`` spans.

    Raises:
        EngineError: missing log-probs, counts that disagree, an unknown finish reason, or
            version labels that are not integers.
    """
    meta = item["meta_info"]
    triples = _triples(meta)
    completion_tokens = meta.get("completion_tokens", len(triples))
    if completion_tokens != len(triples):
        raise EngineError(f"SGLang returned {completion_tokens} tokens but {len(triples)} "
                          "log-probs")
    token_ids, logprobs, top = _tokens(triples, meta.get("output_top_logprobs"), sp)
    return CompletionOutput(token_ids=token_ids, logprobs=logprobs,
                            versions=versions(meta, len(token_ids), version),
                            finish_reason=finish_reason(meta), top_logprobs=top)


def _triples(meta: dict[str, Any]) -> list[Any]:
    triples = meta.get("output_token_logprobs")
    if triples is None:
        raise EngineError("SGLang returned no output_token_logprobs; was return_logprob "
                          "dropped by a proxy in between?")
    return list(triples)


def _tokens(triples: list[Any], top_rows: list[Any] | None, sp: SamplingParams
            ) -> tuple[list[int], list[float], list[list[tuple[int, float]]] | None]:
    """Token ids, processed log-probs and requested alternatives of ``[logprob, id, text]``
    triples and their top rows (``output_top_logprobs``; None: not sent)."""
    token_ids = [int(t[1]) for t in triples]
    tops = [[(int(e[1]), float(e[0])) for e in row or []]
            for row in (top_rows if top_rows is not None else [[]] * len(token_ids))]
    top_k, top_p = filters(sp)
    logprobs, top = [], [] if sp.top_logprobs else None
    for (logprob, token_id, *_), row in zip(triples, tops, strict=True):
        if top_k <= 0 and top_p >= 1:
            kept = dict(row)
            logprobs.append(float(logprob))
        else:
            kept = filtered_logprobs(row, top_k=top_k, top_p=top_p)
            logprobs.append(processed_logprob(float(logprob), int(token_id), row, top_k=top_k,
                                              top_p=top_p))
        if top is not None:
            ranked = sorted(row, key=lambda e: -e[1])[:sp.top_logprobs]
            top.append([(t, kept.get(t, -math.inf)) for t, _ in ranked])
    return token_ids, logprobs, top


class StreamedOutputs:
    """The completions of one streamed ``/generate`` request (``"stream": true``), built
    chunk by chunk.

    SGLang streams ``data: {"text", "output_ids", "meta_info", "index"?}`` events (``index``:
    which of the ``n`` completions; absent for ``n == 1``), then ``data: [DONE]``; an error is
    ``data: {"error": {"message"}}``. By default each event carries the completion so far
    (cumulative ``output_token_logprobs`` / ``output_top_logprobs``); a server started with
    ``--incremental-streaming-output`` sends only the new entries. ``meta_info.completion_tokens``
    (the count so far, in both modes) tells them apart. ``finish_reason`` is null until the
    last event of a completion.

    Args:
        sp: the request's sampling parameters (``n``, filters, ``top_logprobs``).
        version: every token's version (the engine's at send time), unless the last event
            carries ``weight_versions`` spans.
    """

    def __init__(self, sp: SamplingParams, version: int) -> None:
        self.sp, self.version = sp, version
        self.so_far = [CompletionOutput([], [], [], "length", [] if sp.top_logprobs else None)
                       for _ in range(sp.n)]
        self.last: list[dict[str, Any] | None] = [None] * sp.n

    def add(self, item: dict[str, Any]) -> TokenDelta | None:
        """The new tokens of one streamed event (None when it has none).

        Raises:
            EngineError: an index beyond ``n``, counts that fit neither mode, or as
                ``parse_output``.
        """
        index = int(item.get("index", 0)) if isinstance(item, dict) else -1
        if not 0 <= index < self.sp.n or "meta_info" not in item:
            raise EngineError(f"SGLang streamed {str(item)[:200]!r} for a request of "
                              f"n={self.sp.n}; is it an SGLang server?")
        meta, out = item["meta_info"], self.so_far[index]
        triples, rows = _triples(meta), meta.get("output_top_logprobs")
        have = len(out.token_ids)
        total = meta.get("completion_tokens", len(triples))
        if len(triples) == total and total >= have:  # cumulative (the default)
            triples, rows = triples[have:], rows[have:] if rows is not None else None
        elif len(triples) != total - have:
            raise EngineError(f"SGLang streamed {len(triples)} log-probs for completion "
                              f"{index} at {total} tokens after {have}")
        if meta.get("finish_reason") is not None:
            out.finish_reason = finish_reason(meta)
            self.last[index] = meta
        if not triples:
            return None
        ids, logprobs, top = _tokens(triples, rows, self.sp)
        delta = TokenDelta(index, ids, logprobs, [self.version] * len(ids), top)
        out.token_ids += ids
        out.logprobs += logprobs
        out.versions += delta.versions
        if out.top_logprobs is not None and top is not None:
            out.top_logprobs += top
        return delta

    def outputs(self) -> list[CompletionOutput]:
        """The finished completions.

        Raises:
            EngineError: the stream ended before a completion finished, or as ``versions``.
        """
        for index, meta in enumerate(self.last):
            if meta is None:
                raise EngineError(f"SGLang's stream ended before completion {index} finished")
            out = self.so_far[index]
            out.versions = versions(meta, len(out.token_ids), self.version)
        return self.so_far


def versions(meta: dict[str, Any], num_tokens: int, default: int) -> list[int]:
    """Per-token versions: from ``weight_versions`` spans when the server sends them, else
    ``default`` for every token (the caller passes the version at send time).

    Raises:
        EngineError: a label that is not an integer, or spans not covering ``num_tokens``.
    """
    spans = meta.get("weight_versions")
    if not spans:
        _label(meta.get("weight_version", str(default)))  # a foreign label is an error
        return [default] * num_tokens
    out: list[int] = []
    for span in spans:
        out += [_label(span["version"])] * (int(span["end"]) - int(span["start"]))
    if len(out) != num_tokens:
        raise EngineError(f"SGLang's weight-version spans cover {len(out)} tokens of "
                          f"{num_tokens}")
    return out


def _label(label: Any) -> int:
    text = str(label)
    if not text.lstrip("-").isdigit():
        raise EngineError(f"SGLang labelled tokens with weight version {text!r}, not an "
                          "integer; only this engine should set the server's label")
    return int(text)


def finish_reason(meta: dict[str, Any]) -> FinishReason:
    """``stop`` / ``length`` / ``abort`` from ``meta_info.finish_reason``.

    Raises:
        EngineError: no finish reason, or one of another type (the message included).
    """
    reason = meta.get("finish_reason") or {}
    kind = reason.get("type") if isinstance(reason, dict) else reason
    if kind not in _FINISH:
        raise EngineError(f"SGLang finished a completion with reason {reason!r}")
    return _FINISH[kind]


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))
