"""Entry point: ``cytoken <command> ...``. The only module that reads argv and the environment."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from typing import NoReturn

from cytoken.types import CytokenError

__all__ = ["main"]

COMMANDS = ("segment", "evaluate", "models", "train", "classifier", "label_from_if")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"cytoken: warning: {message}", file=sys.stderr)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line, like every other cytoken error.

    argparse's own ``error`` prints the whole usage block before the message; cytoken prints only
    ``cytoken: error: <command>: <message> (see '<command> --help')`` and exits with status 2. Sub-parsers inherit
    this class (``add_subparsers`` uses the parent's class).
    """

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("cytoken").strip()
        where = f"{command}: " if command else ""
        self.exit(2, f"cytoken: error: {where}{message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (each command module adds its sub-parser)."""
    import importlib

    parser = _Parser(
        prog="cytoken",
        description="Cell-level digital pathology on any machine: segment, classify and embed every nucleus.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"cytoken.cli.{name}").add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit status (0 ok, 2 user error, 1 internal error, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.showwarning = _show_warning
    debug = args.debug or bool(os.environ.get("CYTOKEN_DEBUG"))
    try:
        return int(args.func(args) or 0)
    except CytokenError as exc:
        if debug:
            raise
        print(f"cytoken: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cytoken: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # an unexpected failure: one line, full traceback only with --debug
        if debug:
            raise
        print(
            f"cytoken: internal error: {type(exc).__name__}: {exc} (rerun with --debug for details)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
