"""``/v1/chat/completions`` and ``/v1/completions``: run the engine, answer in OpenAI format.

Responses carry vLLM-named extras the SDK keeps as extra fields: ``prompt_token_ids`` on the
response and ``token_ids`` on each choice. Streaming chat completions are served by
``streaming.ChatStream`` (tokens as the engine produces them); ``chat_chunks`` replays a
finished response as SSE chunks (tool calls, the Responses API).

Chat templates are rendered and prompts tokenized on ``offload`` (the gateway's tokenizer
threads), never on the event loop. Nothing is recorded here: each function returns the turns
of a session request, which the caller records once the response was delivered.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from ..engines.base import CompletionOutput, GenerateRequest, OnTokens, SamplingParams
from ..errors import ContextLengthExceeded, EngineError, EngineUnavailable
from ..ids import new_id
from ..samples import SamplingDistribution
from .chat import decode_completion, encode, render
from .errors import GatewayError, bad_request
from .params import check_messages, check_tools, sampling_fields
from .sessions import Session, Turn
from .tokenization import prompt_ids_for

if TYPE_CHECKING:
    from .app import ServedPolicy

DEFAULT_MAX_TOKENS = 512

T = TypeVar("T")
Offload = Callable[[Callable[[], T]], Awaitable[T]]
"""Runs a blocking call off the event loop (``Gateway``: its tokenizer threads)."""


async def inline(fn: Callable[[], T]) -> T:
    """An ``Offload`` that runs ``fn`` right here (for callers without threads)."""
    return fn()


async def generate(policy: ServedPolicy, prompt_ids: list[int], fields: dict[str, Any],
                   session: Session | None, on_tokens: OnTokens | None = None
                   ) -> tuple[list[CompletionOutput], dict[str, float]]:
    """Run one request on a replica of ``policy``; map engine errors to HTTP errors.

    With ``on_tokens``, the engine's ``generate_streaming`` hands it the tokens as they are
    produced (the returned outputs are the same).
    """
    room = policy.max_context - len(prompt_ids)
    max_tokens = fields["max_tokens"] or min(DEFAULT_MAX_TOKENS, room)
    if room < 1 or max_tokens > room:
        raise bad_request(
            f"this request needs {len(prompt_ids)} prompt + {max(max_tokens, 1)} completion "
            f"tokens, but the model's context is {policy.max_context}; shorten the messages "
            "or lower max_tokens", param="messages", code="context_length_exceeded")
    sampling = SamplingParams(
        max_tokens=max_tokens, temperature=fields["temperature"], top_p=fields["top_p"],
        top_k=fields["top_k"], stop=fields["stop"], stop_token_ids=sorted(policy.stop_ids),
        seed=fields["seed"], n=fields["n"], top_logprobs=fields["top_logprobs"])
    session_id = session.session_id if session else None
    try:
        index, engine = policy.router.acquire(session_id)
    except EngineUnavailable as exc:  # every replica is dead
        raise GatewayError(503, str(exc), code="engine_unavailable") from exc
    start = time.time()
    try:
        request = GenerateRequest(prompt_ids, sampling, session_id=session_id,
                                  last_turn=session is not None and session.single_turn)
        result = await (engine.generate(request) if on_tokens is None
                        else engine.generate_streaming(request, on_tokens))
    except ContextLengthExceeded as exc:
        raise bad_request(str(exc), param="messages", code="context_length_exceeded") from exc
    except EngineUnavailable as exc:  # the replica is gone: route around it from now on
        policy.replica_failed(index, exc)
        raise GatewayError(503, f"engine replica unavailable: {exc}",
                           code="engine_unavailable") from exc
    except EngineError as exc:
        raise GatewayError(500, f"engine error: {exc}", code="engine_error") from exc
    finally:
        policy.router.release(index)
    end = time.time()
    return result.outputs, {"start": start, "end": end, "latency": end - start}


def _distribution(fields: dict[str, Any]) -> SamplingDistribution:
    """The sampling parameters that define a completion's recorded log-probs."""
    return SamplingDistribution(fields["temperature"], fields["top_k"], fields["top_p"])


def logprob_entries(policy: ServedPolicy, out: CompletionOutput,
                    upto: int) -> list[dict[str, Any]]:
    """The chat ``logprobs.content`` entries of ``out``'s first ``upto`` tokens."""
    entries = []
    for i, (tok, lp) in enumerate(zip(out.token_ids[:upto], out.logprobs[:upto], strict=True)):
        text = policy.token_text(tok)
        tops = [{"token": policy.token_text(t), "logprob": v,
                 "bytes": list(policy.token_text(t).encode())}
                for t, v in (out.top_logprobs[i] if out.top_logprobs else [])]
        entries.append({"token": text, "logprob": lp, "bytes": list(text.encode()),
                        "top_logprobs": tops})
    return entries


def _chat_prompt(policy: ServedPolicy, messages: list[dict[str, Any]],
                 tools: list[dict] | None, session: Session | None
                 ) -> Callable[[], tuple[list[int], int | None]]:
    """A blocking call (for a tokenizer thread) computing the prompt ids and prefix turn of a
    chat request. It reads snapshots of the session's turns and index, taken here on the
    event loop: the loop records new turns while the thread works."""
    if session is None:
        return lambda: (encode(policy.tokenizer, render(policy.tokenizer, messages, tools,
                                                         True)), None)
    turns, index = list(session.turns), {k: list(v) for k, v in session.index.items()}
    return lambda: prompt_ids_for(policy.tokenizer, turns, messages, tools, policy.eos_id,
                                  index)


@dataclass
class ChatCall:
    """A validated chat request with its prompt's token ids (``prepare_chat``)."""

    messages: list[dict[str, Any]]
    tools: list[dict] | None
    parse_calls: bool  # tool calls are parsed out of the completion's text
    fields: dict[str, Any]  # params.sampling_fields
    prompt_ids: list[int]
    prefix: int | None  # the session turn the prompt extends (tokenization.prompt_ids_for)
    response_id: str = field(default_factory=lambda: f"chatcmpl-{new_id()}")


async def prepare_chat(policy: ServedPolicy, body: dict[str, Any], session: Session | None,
                       offload: Offload = inline) -> ChatCall:
    """Validate a chat body and compute its prompt ids (on ``offload``).

    Raises:
        GatewayError: 400 for bad fields or messages the chat template cannot render.
    """
    messages = check_messages(body.get("messages"))
    tools, parse_calls = check_tools(body)
    fields = sampling_fields(body, policy.max_n)
    try:
        prompt_ids, prefix = await offload(_chat_prompt(policy, messages, tools, session))
    except ValueError as exc:
        raise bad_request(str(exc), param="messages") from exc
    return ChatCall(messages, tools, parse_calls, fields, prompt_ids, prefix)


async def chat_completion(policy: ServedPolicy, body: dict[str, Any], session: Session | None,
                          offload: Offload = inline) -> tuple[dict[str, Any], list[Turn]]:
    """Serve a chat completion.

    Returns:
        ``(response, turns)``: the OpenAI ``chat.completion`` object as a dict, and one
        ``Turn`` per choice to record in ``session`` once delivered (``[]`` without one).

    Raises:
        GatewayError: 400 for bad fields or a too-long prompt, 500 for engine failures.
    """
    call = await prepare_chat(policy, body, session, offload)
    outputs, timing = await generate(policy, call.prompt_ids, call.fields, session)
    return chat_response(policy, call, outputs, timing, session)


def chat_response(policy: ServedPolicy, call: ChatCall, outputs: list[CompletionOutput],
                  timing: dict[str, float], session: Session | None
                  ) -> tuple[dict[str, Any], list[Turn]]:
    """The ``chat.completion`` answer to ``call`` and the turns to record (see
    ``chat_completion``)."""
    messages, tools, fields, prompt_ids = call.messages, call.tools, call.fields, call.prompt_ids
    turns = []
    response_id = call.response_id
    choices = []
    for i, out in enumerate(outputs):
        text = decode_completion(policy.tokenizer, out.token_ids, fields["stop"],
                                 policy.stop_ids)
        content, calls = policy.tool_parser(text) if call.parse_calls else (text, [])
        reply: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            reply["tool_calls"] = calls
        finish = "tool_calls" if calls else ("length" if out.finish_reason == "length"
                                             else "stop")
        choices.append({
            "index": i, "message": reply, "finish_reason": finish,
            "logprobs": ({"content": logprob_entries(policy, out, len(out.token_ids))}
                         if fields["logprobs"] else None),
            "token_ids": list(out.token_ids),
        })
        if session is not None:
            turns.append(Turn(
                prompt_ids=list(prompt_ids), completion_ids=list(out.token_ids),
                logprobs=list(out.logprobs), versions=list(out.versions),
                messages=[dict(m) for m in messages], reply=reply, tools=tools,
                finish_reason=out.finish_reason, request_id=response_id,
                choice=i, prefix_turn=call.prefix, timing=dict(timing),
                sampling=_distribution(fields)))
    num_completion = sum(len(o.token_ids) for o in outputs)
    return {
        "id": response_id, "object": "chat.completion",
        "created": int(timing["end"]), "model": policy.name, "choices": choices,
        "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": num_completion,
                  "total_tokens": len(prompt_ids) + num_completion},
        "prompt_token_ids": list(prompt_ids), "session_id": session.session_id if session
        else None,
    }, turns


def check_prompt_ids(prompt_ids: list[int], vocab_size: int | None) -> list[int]:
    """``prompt_ids`` if non-empty and inside the vocabulary ``[0, vocab_size)`` (None: ids
    the policy's tokenizer produced, in its vocabulary by construction; only emptiness is
    checked).

    Raises:
        GatewayError: 400 naming the problem and the fix.
    """
    if not prompt_ids:
        raise bad_request("'prompt' is empty: it must hold at least one token (a non-empty "
                          "string or list of token ids)", param="prompt", code="empty_prompt")
    if vocab_size is None:
        return prompt_ids
    bad = [t for t in prompt_ids if not 0 <= t < vocab_size]
    if bad:
        raise bad_request(f"'prompt' has {len(bad)} token id(s) outside the vocabulary "
                          f"[0, {vocab_size}), e.g. {bad[0]}; tokenize with this model's "
                          "tokenizer (or send the prompt as a string)", param="prompt",
                          code="invalid_token_ids")
    return prompt_ids


async def text_completion(policy: ServedPolicy, body: dict[str, Any], session: Session | None,
                          offload: Offload = inline) -> tuple[dict[str, Any], list[Turn]]:
    """Serve ``/v1/completions``: ``prompt`` is a string or a list of token ids.

    Returns:
        ``(response, turns)`` as ``chat_completion``.
    """
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        prompt_ids = await offload(lambda: encode(policy.tokenizer, prompt))
        # the tokenizer's own ids are in its vocabulary: only emptiness is left to check
        # (len(tokenizer) asks the backend for its vocabulary size: ~tens of us a request)
        check_prompt_ids(prompt_ids, None)
    elif isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompt_ids = list(prompt)
        check_prompt_ids(prompt_ids, len(policy.tokenizer))
    else:
        raise bad_request("'prompt' must be a string or a non-empty list of token ids "
                          "(batched prompts are not supported; send one request each)",
                          param="prompt")
    fields = sampling_fields(body, policy.max_n)
    outputs, timing = await generate(policy, prompt_ids, fields, session)
    response_id = f"cmpl-{new_id()}"
    choices, turns = [], []
    for i, out in enumerate(outputs):
        text = decode_completion(policy.tokenizer, out.token_ids, fields["stop"], set())
        lp = None
        if fields["logprobs"]:
            toks = [policy.token_text(t) for t in out.token_ids]
            lp = {"tokens": toks, "token_logprobs": list(out.logprobs),
                  "top_logprobs": [{policy.token_text(t): v for t, v in tops}
                                   for tops in (out.top_logprobs or [[]] * len(toks))],
                  "text_offset": [sum(len(x) for x in toks[:j]) for j in range(len(toks))]}
        choices.append({"index": i, "text": text, "logprobs": lp,
                        "finish_reason": "length" if out.finish_reason == "length" else "stop",
                        "token_ids": list(out.token_ids)})
        if session is not None:
            turns.append(Turn(
                prompt_ids=list(prompt_ids), completion_ids=list(out.token_ids),
                logprobs=list(out.logprobs), versions=list(out.versions), messages=None,
                reply=None, tools=None, finish_reason=out.finish_reason,
                request_id=response_id, choice=i, timing=dict(timing),
                sampling=_distribution(fields)))
    num_completion = sum(len(o.token_ids) for o in outputs)
    return {
        "id": response_id, "object": "text_completion",
        "created": int(timing["end"]), "model": policy.name, "choices": choices,
        "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": num_completion,
                  "total_tokens": len(prompt_ids) + num_completion},
        "prompt_token_ids": list(prompt_ids),
    }, turns


def chat_chunks(policy: ServedPolicy, response: dict[str, Any], include_usage: bool
                ) -> Iterator[str]:
    """SSE events (``data: {...}\\n\\n`` ... ``data: [DONE]\\n\\n``) for a finished response."""
    base = {"id": response["id"], "object": "chat.completion.chunk",
            "created": response["created"], "model": response["model"]}

    def event(choices: list[dict[str, Any]], **extra: Any) -> str:
        return f"data: {json.dumps({**base, 'choices': choices, **extra})}\n\n"

    for ch in response["choices"]:
        i, msg = ch["index"], ch["message"]
        yield event([{"index": i, "delta": {"role": "assistant", "content": ""},
                      "logprobs": None, "finish_reason": None}],
                    prompt_token_ids=response["prompt_token_ids"] if i == 0 else None)
        entries = (ch["logprobs"] or {}).get("content") or []
        if msg.get("tool_calls"):
            if msg.get("content"):
                yield event([{"index": i, "delta": {"content": msg["content"]},
                              "logprobs": None, "finish_reason": None}])
            calls = [{"index": k, **c} for k, c in enumerate(msg["tool_calls"])]
            yield event([{"index": i, "delta": {"tool_calls": calls},
                          "logprobs": {"content": entries} if entries else None,
                          "finish_reason": None}])
        else:
            text, sent = msg.get("content") or "", 0
            ids = ch["token_ids"]
            for k in range(len(ids)):
                upto = min(len(policy.tokenizer.decode(ids[:k + 1], skip_special_tokens=False)),
                           len(text)) if k + 1 < len(ids) else len(text)
                piece, sent = text[sent:upto], max(sent, upto)
                lp = {"content": entries[k:k + 1]} if entries else None
                if piece or lp:
                    yield event([{"index": i, "delta": {"content": piece}, "logprobs": lp,
                                  "finish_reason": None}])
        yield event([{"index": i, "delta": {}, "logprobs": None,
                      "finish_reason": ch["finish_reason"], "token_ids": ch["token_ids"]}])
    if include_usage:
        yield event([], usage=response["usage"])
    yield "data: [DONE]\n\n"
