"""Command line: ``skipit-compress MODEL OUT`` and ``skipit {compress,analyze,export,validate}``.

Only this package knows about terminals: progress bars and tables are fed by the library's callbacks
(:mod:`skipit.cli.runner`). Each command lives in its own module and calls the same library
functions a Python user would.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from skipit.cli.compress import add_analyze_parser, add_compress_args, compress_command
from skipit.cli.export import add_export_parser
from skipit.cli.runner import version_text
from skipit.cli.validate import add_validate_parser

__all__ = ["build_parser", "main", "compress_main"]


def _version(p: argparse.ArgumentParser) -> None:
    p.add_argument("--version", action="version", version=version_text())


def build_parser() -> argparse.ArgumentParser:
    """The ``skipit`` parser with its four subcommands."""
    parser = argparse.ArgumentParser(prog="skipit", description="Remove decoder layers that measurably do nothing, "
                                     "with a verified certificate; export and gate the result.")
    _version(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("compress", help="certify, remove and save (same as skipit-compress)")
    add_compress_args(p)
    p.set_defaults(func=compress_command)
    add_analyze_parser(sub)
    add_export_parser(sub)
    add_validate_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``skipit``."""
    args = build_parser().parse_args(argv)
    return args.func(args)


def compress_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``skipit-compress`` (``skipit compress``)."""
    parser = argparse.ArgumentParser(prog="skipit-compress", description="Certify, remove and save decoder layers.")
    _version(parser)
    add_compress_args(parser)
    return compress_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
