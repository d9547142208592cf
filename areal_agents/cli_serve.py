"""``areal-agents serve``: an OpenAI-compatible gateway over LocalEngine(s) on a local port."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any


def add_serve_parser(sub: Any) -> None:
    """Register ``serve`` on the CLI's subparsers."""
    p = sub.add_parser("serve", help="serve a model behind the OpenAI-compatible gateway",
                       description=__doc__)
    p.add_argument("--model", required=True,
                   help="checkpoint directory or tiny spec ('tiny', 'tiny:s:seed=3')")
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
    p.set_defaults(func=serve)


def build_gateway(model: str, policy: str | None = None, replicas: int = 1,
                  max_batch_size: int = 32, admin_key: str | None = None,
                  tool_parser: str = "auto") -> Any:
    """A ``Gateway`` serving ``replicas`` LocalEngines of ``model`` as ``policy``, reading
    tool calls with ``tool_parser`` (``areal_agents.gateway.tool_parsing``)."""
    from .engines.local import LocalEngine
    from .gateway import Gateway
    from .gateway.tool_parsing import check_tool_parser
    from .models import load

    if replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {replicas}")
    check_tool_parser(tool_parser, "--tool-parser")
    gw = Gateway(admin_key=admin_key)
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

    admin_key = args.admin_key or os.environ.get("AREAL_AGENTS_ADMIN_KEY") or None
    try:
        gw = build_gateway(args.model, args.policy, args.replicas, args.max_batch_size,
                           admin_key, args.tool_parser)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if admin_key is None:
        print(f"admin key: {gw.admin_key}", file=sys.stderr, flush=True)
    print(f"serving policy {next(iter(gw.policies))!r} on http://{args.host}:{args.port}/v1",
          file=sys.stderr, flush=True)
    uvicorn.run(gw.app, host=args.host, port=args.port, log_level="warning")
    return 0
