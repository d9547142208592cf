"""``areal-agents serve``: an OpenAI-compatible gateway over LocalEngine(s) on a local port.

Every completion made with a *session key* is recorded token by token for RL; calls with the
admin key are served but not recorded. Keys: the admin key (--admin-key, else
$AREAL_AGENTS_ADMIN_KEY, else a random one printed at start) opens sessions and drives
/admin; a session key (one per episode) is what the agent uses as its OpenAI API key.

The proxy flow, one episode (BASE is http://HOST:PORT):
  1. open a session (admin key):
       curl -s BASE/rl/sessions -H "Authorization: Bearer $ADMIN" \\
         -d '{"policy": "POLICY", "metadata": {"task": "t1"}}'
       -> {"session_id": "sess_...", "api_key": "aa-sess-..."}
  2. chat with the session key as the API key (any OpenAI client, base_url BASE/v1):
       curl -s BASE/v1/chat/completions -H "Authorization: Bearer $SESSION_KEY" \\
         -d '{"model": "POLICY", "messages": [{"role": "user", "content": "hi"}]}'
  3. post a finite reward (to the session; or to one turn: "turn": i / "completion_id": id):
       curl -s BASE/rl/sessions/$SESSION_ID/reward -H "Authorization: Bearer $SESSION_KEY" \\
         -d '{"reward": 1.0}'
  4. end it; the gateway then forgets it (its key answers 409 "ended"):
       curl -s -X POST BASE/rl/sessions/$SESSION_ID/end \\
         -H "Authorization: Bearer $SESSION_KEY"
  Long-lived agents keep one key across episodes: POST BASE/rl/sessions/$SESSION_ID/refresh
  ends the episode (as /end) and opens the next under the same key -> {"session_id": ...}.
Only completions delivered to the client are recorded; GET BASE/openapi.json lists every
route, GET BASE/health the policies and session counts.

Clients: any OpenAI client with base_url BASE/v1 and the session key as its API key. Served:
/v1/chat/completions (streaming too), /v1/completions and /v1/responses (the Responses API
that OpenAI's Agents SDK calls by default: text, function tools, streaming).

Training on these sessions: `serve --train CONFIG` serves CONFIG's policies and trains them on
the sessions agents end (add "task_id" when opening to group them; a policy without capacity
answers 429 + Retry-After). Python agents can use areal_agents.proxy.episode; see
docs/proxy_mode.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any


def add_serve_parser(sub: Any) -> None:
    """Register ``serve`` on the CLI's subparsers."""
    p = sub.add_parser("serve", help="serve a model behind the OpenAI-compatible gateway "
                       "(sessions record episodes for RL)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="checkpoint directory or tiny spec ('tiny', 'tiny:s:seed=3'); "
                        "required unless --train")
    p.add_argument("--train", default=None, metavar="CONFIG",
                   help="also train: the YAML run config's policies are served and trained on "
                        "the sessions external agents end (open them with \"task_id\" to "
                        "group them); opening answers 429 + Retry-After while a policy has "
                        "no capacity (docs/proxy_mode.md)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides of --train's config")
    p.add_argument("--policy", default=None, help="model name clients use (default: --model)")
    p.add_argument("--host", default="127.0.0.1",
                   help="bind address; 127.0.0.1 unless you mean to expose the server")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replicas", type=int, default=1, help="LocalEngine replicas of the model")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--tool-parser", default="auto",
                   help="how tool calls are read from replies: auto, hermes, llama3_json, "
                        "mistral, gpt_oss or response_template (docs/custom_env.md#tool-calls)")
    p.add_argument("--admin-key", default=None,
                   help="admin secret (default: $AREAL_AGENTS_ADMIN_KEY, else a random one "
                        "printed at start)")
    p.add_argument("--max-body-bytes", type=int, default=4 << 20,
                   help="largest request body accepted; larger ones answer 413 (default 4 MiB)")
    p.set_defaults(func=serve)


def banner(gw: Any, host: str, port: int, show_key: bool) -> str:
    """The startup text: where the gateway serves, the keys and the proxy flow."""
    base = f"http://{host}:{port}"
    policies = ", ".join(repr(p) for p in gw.policies)
    lines = [f"areal-agents gateway: policy {policies} on {base}/v1 (OpenAI-compatible)"]
    if show_key:
        lines.append(f"admin key: {gw.admin_key}")
    lines += [
        "keys: the admin key opens sessions and drives /admin (its calls are not recorded);",
        "      each session key is one episode's OpenAI API key (its calls are recorded)",
        f"flow: POST {base}/rl/sessions {{\"policy\": ...}} (admin key) -> session_id, api_key",
        f"      -> POST {base}/v1/chat/completions (or /v1/responses) with the session key",
        f"      -> POST {base}/rl/sessions/<session_id>/reward {{\"reward\": 1.0}}",
        f"      -> POST {base}/rl/sessions/<session_id>/end (the gateway then forgets it)",
        f"      or POST {base}/rl/sessions/<session_id>/refresh: end it and open the next "
        "episode under the same key",
        f"routes: GET {base}/openapi.json; `areal-agents serve --help` shows curl examples",
    ]
    return "\n".join(lines)


def build_gateway(model: str, policy: str | None = None, replicas: int = 1,
                  max_batch_size: int = 32, admin_key: str | None = None,
                  tool_parser: str = "auto", max_body_bytes: int = 4 << 20) -> Any:
    """A ``Gateway`` serving ``replicas`` LocalEngines of ``model`` as ``policy``, reading
    tool calls with ``tool_parser`` (``areal_agents.gateway.tool_parsing``)."""
    from .engines.local import LocalEngine
    from .errors import ConfigError
    from .gateway import Gateway
    from .gateway.tool_parsing import check_tool_parser
    from .models import load

    if replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {replicas}")
    check_tool_parser(tool_parser, "--tool-parser")
    if max_body_bytes < 1:
        raise ConfigError(f"--max-body-bytes must be >= 1, got {max_body_bytes}")
    gw = Gateway(admin_key=admin_key, max_body_bytes=max_body_bytes)
    engines, tokenizer = [], None
    for _ in range(replicas):
        m, tokenizer = load(model)
        engines.append(LocalEngine(m, tokenizer, max_batch_size=max_batch_size))
    gw.add_policy(policy or model, engines, tokenizer, tool_parser=tool_parser)
    return gw


def serve(args: argparse.Namespace) -> int:
    """Build the gateway and run uvicorn until interrupted."""
    import uvicorn

    from .errors import ConfigError

    if args.train is not None:
        from .cli_serve_train import serve_train

        return serve_train(args)
    if args.model is None:
        print("error: serve needs --model (or --train CONFIG)", file=sys.stderr)
        return 2
    admin_key = args.admin_key or os.environ.get("AREAL_AGENTS_ADMIN_KEY") or None
    try:
        gw = build_gateway(args.model, args.policy, args.replicas, args.max_batch_size,
                           admin_key, args.tool_parser, args.max_body_bytes)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(banner(gw, args.host, args.port, show_key=admin_key is None), file=sys.stderr,
          flush=True)
    uvicorn.run(gw.app, host=args.host, port=args.port, log_level="warning")
    return 0
