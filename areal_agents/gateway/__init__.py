"""The OpenAI-compatible gateway: policies, sessions, exact token capture.

In-process API (what trainers and agents call)::

    gw = Gateway(admin_key=None)            # None: a random secret (read gw.admin_key);
                                            # also max_body_bytes=, session_sink=
    gw.add_policy(name, engines, tokenizer, max_n=8)
    gw.app                                  # the ASGI app (uvicorn, or in process)
    key = await gw.create_session(policy, metadata=None)   # == POST /rl/sessions
    gw.session(key_or_id) -> Session        # .turns, .rewards, .ended
    samples, report = gw.session(key).to_samples(reward=..., agent=..., group=...)
    gw.end_session(key, drop=False)         # HTTP /end drops by default ({"drop": false})
    gw.ledger                               # opened / ended / abandoned counts
    gw.async_client(api_key) / gw.client(api_key)   # openai.AsyncOpenAI / OpenAI, no sockets
    await gw.pause(policy) / gw.resume(policy) / gw.update_weights(policy, WeightUpdate)

HTTP: ``/v1/chat/completions`` (SSE streaming, tools, n, logprobs), ``/v1/completions``,
``/v1/responses`` (minimal: text and function tools, no stream; ``responses.py``),
``/v1/models``, ``/health``; ``/rl/sessions`` (admin key) and ``/rl/sessions/{id}``,
``/reward``, ``/end``, ``/refresh`` (admin or that session's key); ``/admin/pause``,
``/admin/resume``,
``/admin/update_weights`` (admin key); ``/openapi.json``. Responses add vLLM-named
``prompt_token_ids`` (response) and ``token_ids`` (each choice). Calls with a session key are
recorded once delivered (a request its client gave up on is counted as abandoned instead);
admin-key calls are not recorded. Errors are OpenAI-format JSON, 4xx for client mistakes.

Streaming chat completions leave token by token where the engine streams
(``streaming.ChatStream``; ``LocalEngine``), whole-then-chunked with tool parsing or other engines.
Limits: ``tool_choice`` other than ``"none"`` is not enforced (no constrained decoding);
``/v1/completions`` takes one prompt per request and does not stream.
"""

from .app import Gateway, ServedPolicy
from .errors import GatewayError
from .sessions import Session, Turn
from .tokenization import Split, TokenizationReport, turns_to_samples

__all__ = ["Gateway", "GatewayError", "ServedPolicy", "Session", "Split", "TokenizationReport",
           "Turn", "turns_to_samples"]
