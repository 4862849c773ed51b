"""The `moesae` command: one module per verb in this package; every failure a user can cause
ends in one sentence and exit code 2 (a traceback only with --debug)."""

from __future__ import annotations

import argparse
import sys

from ..errors import UserError
from ..runtime import keep_freed_memory
from . import (
    analyze,
    build,
    demo,
    eval,
    explain,
    export_sae,
    harvest,
    import_sae,
    serve,
    steer,
    train,
)

VERBS = (harvest, train, eval, analyze, build, serve, demo, steer, explain, import_sae, export_sae)
"""In the order `moesae --help` lists them."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag ends like every other user error: one sentence, exit 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message[:1].upper()}{message[1:]}; see `{self.prog} --help`.\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="moesae",
        description="Train, evaluate and explore Mixture-of-Experts sparse autoencoders.",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb in VERBS:
        verb.add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    keep_freed_memory()
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except UserError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume.", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: say so plainly, full traceback only with --debug
        if debug:
            raise
        print(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for details)",
              file=sys.stderr)
        return 1
