"""The ``lrpkit`` command line: ``lrpkit demo``, ``lrpkit explain``, ``lrpkit evaluate``, ``lrpkit concepts``.

Each subcommand lives in its own module under :mod:`lrpkit.commands`. Errors the user can fix (a missing file,
a folder that cannot be written, an unknown model name, weights that do not fit) are printed as one line,
``lrpkit <command>: error: ...``, with exit status 2, instead of a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("demo", "explain", "evaluate", "concepts")


class UsageError(Exception):
    """An error in what the user asked for (file, name, option); printed without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lrpkit", description="Layer-wise Relevance Propagation for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"lrpkit.app.commands.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, OSError, ValueError) as err:  # OSError: a file that cannot be read or written
        print(f"lrpkit {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
