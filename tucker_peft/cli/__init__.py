"""The ``tucker-peft`` command line.

::

    tucker-peft ranks MODEL_OR_CHECKPOINT (--budget N | --match lora:8) [--kinds tucker,cp] [--json]
    tucker-peft extract BASE TUNED --kind tucker (--budget N | --match lora:8 | --energy 0.9) -o ADAPTER_DIR

Exit codes: 0 success, 1 a failure while working, 2 a bad argument (one line
``tucker-peft: error: ...`` on stderr), 130 interrupted.

Adding a subcommand: write a module in this package defining ``NAME`` (str),
``HELP`` (one line), ``configure(parser)`` (adds its arguments to an
``argparse.ArgumentParser``) and ``run(args) -> int``, and add its module name
to :data:`SUBCOMMANDS`. ``run`` raises :class:`UsageError` for a bad argument
it finds itself (exit 2); a :class:`~tucker_peft.TuckerPeftError` or
``OSError`` raised later is reported on one line with exit 1. Keep heavy
imports (torch) inside ``run``: ``--help`` imports every subcommand module.
Importing :mod:`tucker_peft` never imports this package.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any, NoReturn, Sequence

__all__ = ["main", "build_parser", "UsageError", "SUBCOMMANDS", "PROG", "printable"]

PROG = "tucker-peft"

#: Subcommand modules of this package, in ``--help`` order.
SUBCOMMANDS: list[str] = [
    "_ranks",
    "_extract",
    "_compare",
]


class UsageError(Exception):
    """A bad command-line argument: reported on one line, exit code 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def printable(text: object) -> str:
    """``text`` safe for a terminal: control characters (ANSI escapes, newlines...) as ``\\x1b``-style escapes.

    Every tensor name or other string read from a file goes through this before it is printed.
    """
    t = str(text)
    if t.isprintable():
        return t
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in t)


def _one_line(text: str) -> str:
    return printable(" ".join(str(text).split()))


def build_parser() -> ArgumentParser:
    from .._version import __version__

    parser = ArgumentParser(
        prog=PROG, allow_abbrev=False,
        description="Parameter-efficient fine-tuning with Tucker/CP/LoRA tensor deltas: "
                    "rank planning and adapter extraction from safetensors checkpoints.",
        epilog=f"Run '{PROG} COMMAND --help' for the options of a command.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=ArgumentParser)
    for modname in SUBCOMMANDS:
        mod = importlib.import_module(f"{__name__}.{modname}")
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP),
                           formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
        mod.configure(p)
        p.set_defaults(_run=mod.run)
    return parser


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: error: {_one_line(message)}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    from .._errors import TuckerPeftError

    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        return int(args._run(args) or 0)
    except UsageError as exc:
        return _fail(str(exc), 2)
    except SystemExit as exc:  # --help, --version
        code: Any = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (TuckerPeftError, OSError, MemoryError) as exc:
        what = "out of memory" if isinstance(exc, MemoryError) else str(exc) or type(exc).__name__
        return _fail(what, 1)
    except Exception as exc:
        # safetensors reports its I/O failures (a full disk...) as its own SafetensorError.
        if type(exc).__module__.split(".", 1)[0] == "safetensors":
            return _fail(f"safetensors: {exc}", 1)
        raise
