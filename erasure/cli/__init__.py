"""Command line: ``erasure <command> ...``. Wiring only; the work lives in the library modules.

Each command is an ``_add_<command>(subparsers)`` function (in :mod:`erasure.cli.erase`, :mod:`~erasure.cli.evaluate`
and :mod:`~erasure.cli.outputs`) that declares its arguments and sets ``handler`` to a ``_run_<command>(args) -> int``
function; :mod:`erasure.cli.options` holds the parser class, the checked number types and the shared options.
``COMMANDS`` lists the commands in the order ``--help`` shows.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from erasure import __version__
from erasure.cli.erase import _add_erase, _add_list
from erasure.cli.evaluate import _add_evaluate, _default_clip
from erasure.cli.options import COMMAND_HELP, Parser
from erasure.cli.outputs import _add_demo, _add_export, _add_grid, _add_report
from erasure.cli.probe import _add_attack, _add_probe

__all__ = ["COMMANDS", "COMMAND_HELP", "build_parser", "main", "requested_command"]
_ = _default_clip  # re-exported for tests of the evaluate command's CLIP default

# --- command table ----------------------------------------------------------------------------------------------

COMMANDS = {
    "demo": _add_demo,
    "erase": _add_erase,
    "evaluate": _add_evaluate,
    "export": _add_export,
    "list": _add_list,
    "grid": _add_grid,
    "report": _add_report,
    "probe": _add_probe,
    "attack": _add_attack,
}


def requested_command(argv: list[str]) -> str | None:
    """The command named on the command line (the first word that is not an option), or ``None``."""
    for token in argv:
        if token == "--":
            return None
        if not token.startswith("-"):
            return token if token in COMMANDS else None
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``erasure`` argument parser.

    Only the command that ``argv`` names is built in full; the others get a one-line entry, so ``erasure --help``
    and a command that needs no model never import torch, diffusers, transformers or open_clip (building the
    ``erase`` options reads every method's config, which imports the methods). ``argv=None`` builds every command.
    """
    parser = Parser(
        prog="erasure",
        description="Concept erasure for text-to-image diffusion models: erase, evaluate, compare.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"erasure {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    command = requested_command(argv) if argv is not None else None
    for name, add in COMMANDS.items():
        if argv is None or name == command:
            add(subparsers)
        else:
            subparsers.add_parser(name, help=COMMAND_HELP[name])
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (Slurm's time limit, ``docker stop``, ``kill``), raised where the program is, like Ctrl-C."""


def _terminate_like_interrupt() -> object:
    """Make SIGTERM unwind the stack like Ctrl-C, so every ``finally`` removes its temporaries; the old handler."""

    def handler(signum: int, frame: object) -> None:
        raise Terminated()

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (an embedding application): leave signals alone
        return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``erasure`` command; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:  # Ctrl-C while the parser is built (method imports take seconds) is an interrupt like any other
        parser = build_parser(argv)
        args = parser.parse_args(argv)
    except KeyboardInterrupt:
        print("interrupted before any work started; nothing was written", file=sys.stderr)
        return 130
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if not hasattr(args, "handler"):
        parser.print_help()
        return 0
    previous = _terminate_like_interrupt()
    try:
        return args.handler(args)
    except Terminated:
        print("terminated (SIGTERM); nothing half-written was left behind", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("interrupted; nothing half-written was left behind", file=sys.stderr)
        return 130
    except Exception as error:  # one line for the user; --verbose shows the traceback
        if args.verbose:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
