"""The ``areal-agents`` command line: subcommands are registered in ``_COMMANDS``.

Each entry maps a subcommand name to ``"module:function"``; the function takes the argparse
subparsers object, adds its parser and sets ``func`` (``func(args) -> int`` exit code) via
``set_defaults``. Modules are imported only when their command table entry is built, so a
missing optional backend never breaks other subcommands.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# subcommand name -> "module:add_parser"; one line per command
_COMMANDS: dict[str, str] = {
    "envs": "areal_agents.cli_envs:add_envs_parser",
    "check-env": "areal_agents.cli_envs:add_check_env_parser",
    "serve": "areal_agents.cli_serve:add_serve_parser",
    "train": "areal_agents.cli_train:add_train_parser",
    "eval": "areal_agents.cli_train:add_eval_parser",
    "plot": "areal_agents.cli_train:add_plot_parser",
    "train-rm": "areal_agents.cli_train_rm:add_train_rm_parser",
    "view": "areal_agents.cli_view:add_view_parser",
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand of ``_COMMANDS``."""
    parser = argparse.ArgumentParser(
        prog="areal-agents", description="Train and evaluate LLM agents with RL."
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of a configuration error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, target in _COMMANDS.items():
        module_name, _, attr = target.partition(":")
        try:
            add_parser = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            sub.add_parser(name, help=f"(unavailable: {exc})")
            continue
        add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code.

    A configuration mistake (``ConfigError``, an unknown env id, a missing file) prints
    ``error: <message>`` on stderr and exits 2; with ``--debug`` (before or after the
    subcommand) it raises, showing the full traceback.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 0 if args.command is None else 2
    from .errors import ConfigError, RegistryError

    try:
        return int(func(args) or 0)
    except (ConfigError, RegistryError, FileNotFoundError) as exc:
        if getattr(args, "debug", False):  # `--debug`: the whole traceback
            raise
        print(f"error: {exc}", file=sys.stderr)  # a user's mistake: the message names the fix
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
