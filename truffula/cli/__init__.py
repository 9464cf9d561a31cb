"""Command line: ``truffula generate``, ``truffula serve``, ``truffula cluster``,
``truffula inspect``.

Flags map onto ``EngineConfig`` (``args.py``) and ``ServerSettings`` (``serve.py``) here and
nowhere else; their defaults are those dataclasses' defaults.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from truffula.cli import cluster, generate, inspect, serve
from truffula.cli.args import add_engine_args, engine_config, engine_options
from truffula.errors import TruffulaError

__all__ = ["add_engine_args", "build_parser", "engine_config", "engine_options", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="truffula", description=(__doc__ or "").split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (generate, serve, cluster, inspect):
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except (TruffulaError, ValueError) as exc:
        print(f"truffula: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
