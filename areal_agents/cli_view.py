"""``areal-agents view RUN_DIR``: the trajectory viewer page of a run (``areal_agents.viewer``)."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_view_parser(sub: Any) -> None:
    """Add ``view RUN_DIR [--out FILE] [--steps 1,3,5-7]``."""
    p = sub.add_parser("view", help="static HTML page of a run's recorded trained samples")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", help="output HTML (default RUN_DIR/view.html)")
    p.add_argument("--steps", help="only these steps, e.g. 1,3,5-7 (default: all recorded)")
    p.set_defaults(func=view)


def view(args: argparse.Namespace) -> int:
    from .viewer import parse_steps, write_view

    try:
        steps = parse_steps(args.steps) if args.steps else None
        path = write_view(args.run_dir, args.out, steps)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0
