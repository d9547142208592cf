"""``areal-agents serve --train CONFIG``: the gateway on a port plus a trainer whose episodes
are the sessions external agents open (``areal_agents.trainers.external``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

Hook = Callable[[str], Awaitable[None]]
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def serve_train(args: argparse.Namespace, *, before: Hook | None = None,
                after: Hook | None = None) -> int:
    """Build the ``ExternalTrainer`` of ``args.train``, serve its gateway on
    ``args.host:args.port`` and train ``trainer.steps`` steps; print a JSON summary.

    ``before(url)`` is awaited once the gateway serves, before training starts (the served
    weights are the untrained ones); ``after(url)`` once the last step is trained, while the
    gateway still serves its final weights (e.g. a fixed evaluation through the gateway)."""
    from .config import load_config
    from .errors import ConfigError
    from .trainers.external import ExternalTrainer

    admin_key = args.admin_key or os.environ.get("AREAL_AGENTS_ADMIN_KEY") or None
    if args.host not in _LOOPBACK and admin_key is None:
        print(f"error: serving on {args.host} (not loopback) needs a chosen admin key: pass "
              "--admin-key or set $AREAL_AGENTS_ADMIN_KEY", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.train, list(args.overrides or []))
        cfg.logging.progress = False
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        trainer = cfg.build(trainer_cls=ExternalTrainer)
        trainer.external_batch_size = cfg.trainer.external_batch_size  # set: a mixed run
        trainer.external_parts()  # checks the split before anything is loaded
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    trainer.admin_key = admin_key
    trainer.session_idle_timeout_s = cfg.trainer.session_idle_timeout_s
    summary = asyncio.run(_run(trainer, args.host, args.port, cfg.trainer.steps,
                               show_key=admin_key is None, before=before, after=after))
    print(json.dumps(summary), flush=True)
    return 0


async def _run(trainer: Any, host: str, port: int, steps: int, show_key: bool,
               before: Hook | None = None, after: Hook | None = None) -> dict[str, Any]:
    import uvicorn

    from .cli_serve import banner

    await trainer.setup()
    server = uvicorn.Server(uvicorn.Config(trainer.gateway.app, host=host, port=port,
                                           log_level="warning"))
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if serving.done():
                await serving  # the bind failed: its error propagates
                raise RuntimeError(f"the gateway stopped before serving on {host}:{port}")
            await asyncio.sleep(0.05)
        print(banner(trainer.gateway, host, port, show_key), file=sys.stderr)
        mixed = (f" plus env episodes ({trainer.external_batch_size} external per batch)"
                 if trainer.external_batch_size is not None else "")
        print(f"training: {steps} steps of {sorted(trainer.trainable)} on sessions ended by "
              f"external agents (open them with \"task_id\" to group them){mixed}",
              file=sys.stderr, flush=True)
        url = f"http://{host}:{port}"
        if before is not None:
            await before(url)
        sweeper = asyncio.create_task(_expire_idle(trainer.gateway))
        history = await trainer.afit(steps)
        if after is not None:
            await after(url)
    finally:
        if "sweeper" in locals():
            sweeper.cancel()
        server.should_exit = True
        await serving
        await trainer.aclose()
    return {"steps": len(history), "counts": trainer.controller.counts(),
            "ledger": {p: dict(c) for p, c in trainer.controller.ledger.items()},
            "sessions": trainer.gateway.ledger.to_dict()}


async def _expire_idle(gateway: Any) -> None:
    """End idle sessions even while no request comes (every agent gone): requests also check,
    this catches the silent case so the trainer does not wait forever on their groups."""
    while gateway.session_idle_timeout_s is not None:
        gateway.expire_idle_sessions()
        await asyncio.sleep(min(5.0, gateway.session_idle_timeout_s / 2))
