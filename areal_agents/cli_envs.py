"""``areal-agents envs`` (list registered envs) and ``areal-agents check-env ID``."""

from __future__ import annotations

import argparse
import asyncio

from rich.console import Console
from rich.table import Table


def add_envs_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``envs``: a table of registered env ids and one-line descriptions."""
    p = sub.add_parser("envs", help="list the registered environments")
    p.set_defaults(func=run_envs)


def add_check_env_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``check-env ID``: run ``check_env`` and print its report (exit 1 on failure)."""
    p = sub.add_parser("check-env", help="check a registered env against the env contract")
    p.add_argument("env_id", metavar="ID", help="a registered env id, e.g. TicTacToe-v0")
    p.add_argument("--seed", type=int, default=0, help="seed of the checker's rollouts")
    p.set_defaults(func=run_check_env)


def run_envs(args: argparse.Namespace, console: Console | None = None) -> int:
    from .registration import registry

    console = console or Console()
    table = Table(title="areal_agents environments")
    table.add_column("id", style="bold")
    table.add_column("kind")
    table.add_column("description")
    for env_id in sorted(registry):
        spec = registry[env_id]
        try:
            kind = "multi-agent" if spec.multi_agent else "single-agent"
        except Exception as exc:  # a broken entry point is listed, not fatal
            kind = f"unloadable ({type(exc).__name__})"
        table.add_row(env_id, kind, spec.description)
    console.print(table)
    return 0


def run_check_env(args: argparse.Namespace, console: Console | None = None) -> int:
    from .checker import check_env
    from .errors import RegistryError

    console = console or Console()
    try:
        report = asyncio.run(check_env(args.env_id, seed=args.seed, raise_on_failure=False))
    except RegistryError as exc:
        console.print(f"[red]error:[/red] {exc}", soft_wrap=True, highlight=False)
        return 2
    console.print(str(report), markup=False, highlight=False, soft_wrap=True)
    return 0 if report.ok else 1
