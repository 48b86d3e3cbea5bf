"""The ``capdec`` command line: one parser, one module per subcommand.

Each subcommand module in this package defines ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``, and imports its heavy dependencies inside ``run`` so that ``capdec --help``
stays fast. A module may also define ``prepare(parser, argv)``, called before the full parse to set the
parser's defaults from files its command line names (``capdec train --config``). ``main(argv)`` is what tests call; ``entry()`` is the console script.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from capdec import __version__
from capdec.errors import CapdecError

# In data-flow order: corpus tools, corpus -> embeddings -> training -> captions -> metrics, then experiments.
COMMANDS = ["corpus", "embed", "train", "caption", "evaluate", "calibrate", "import", "sweep", "experiment", "demo", "toyworld",
            "serve", "push"]
_MODULES = {"import": "import_"}  # a command whose module name is a Python keyword

logger = logging.getLogger("capdec")


def _module(name: str):
    return importlib.import_module(f"capdec.cli.{_MODULES.get(name, name)}")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless it is None/False or the help text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = getattr(action.default, "value", action.default)  # a default marked with its source (Sourced)
        if default in (None, False, argparse.SUPPRESS) or "default" in text.lower():
            return text
        return super()._get_help_string(action)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with ``command``, only that subcommand's options are built (the others are
    listed by name and help only, so ``capdec train ...`` does not import what ``demo`` needs)."""
    parser = argparse.ArgumentParser(
        prog="capdec",
        description="Text-only image captioning (CapDec): train a captioner from sentences alone, "
                    "then caption images.",
        epilog="Run 'capdec COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"capdec {__version__}")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors, no progress bars")
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            mod = _module(name)
        except ModuleNotFoundError as e:  # a subcommand whose optional module is absent
            if e.name != f"capdec.cli.{_MODULES.get(name, name)}":
                raise
            continue
        p = sub.add_parser(name, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP),
                           formatter_class=HelpFormatter)
        if command is None or name == command:
            mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def setup_logging(quiet: bool = False, verbose: bool = False) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)
    if quiet:
        os.environ["CAPDEC_QUIET"] = "1"  # progress bars follow this (capdec.utils.progress)
    else:
        os.environ.pop("CAPDEC_QUIET", None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # options before the command are flags without values (-q, -v, --version), so the command is the
    # first other word; "capdec --help" then builds no subcommand's options (demo/sweep import torch)
    command = next((a for a in argv if not a.startswith("-")), "")
    parser = build_parser(command if command in COMMANDS else "")
    if command in COMMANDS and hasattr(_module(command), "prepare"):
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
        try:
            _module(command).prepare(sub, argv[argv.index(command) + 1:])
        except CapdecError as e:
            print(f"capdec {command}: error: {e}", file=sys.stderr)
            return 2
    args = parser.parse_args(argv)
    setup_logging(args.quiet, args.verbose)
    try:
        return int(args._run(args) or 0)
    except CapdecError as e:
        logger.debug("error details", exc_info=True)
        message = str(e).replace("\r", "\\r").replace("\n", "\\n")  # one line, whatever a file put in it
        print(f"capdec {args.command}: error: {message}", file=sys.stderr)
        return 2
    except OSError as e:  # what the system refused (a full disk, a permission, a vanished file): one line too
        logger.debug("error details", exc_info=True)
        where = f"{e.filename}: " if e.filename else ""
        print(f"capdec {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"capdec {args.command}: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    sys.exit(main())
