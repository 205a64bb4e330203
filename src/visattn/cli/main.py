"""``visattn`` entry point. Each subcommand is one module in this folder with ``add_parser(sub)``
returning its parser (whose ``func`` default runs it); they are listed in ``_COMMANDS``."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

# subcommand -> module in visattn.cli; the one place to add a command.
_COMMANDS = {
    "info": "info",
    "bench": "bench",
    "show": "show",
    "train": "train",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visattn", description="Fast, exact local attention for vision.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _COMMANDS.values():
        importlib.import_module(f"{__package__}.{module}").add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
