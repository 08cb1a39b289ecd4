"""The ``pathoseg`` command line: everything the widgets do, headless, for batches.

Sub-commands live in one module per command group in this package (``cli/slide.py``,
``cli/nuclei.py``...). Every module whose name does not start with ``_`` and is not ``main``
defines ``add_commands(subparsers)`` and is found here automatically, so a new command group
needs no edit of this file.

Each sub-command prints a JSON result on stdout and returns 0; bad input or a bad argument value
is one line on stderr and exit 2; Ctrl-C (or a cancelled job) is one line and exit 130 (see
:mod:`napari_pathoseg.cli._driver`).
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import sys
from typing import Sequence

from napari_pathoseg.cli._driver import ArgumentParser, call_command

__all__ = ["main", "build_parser", "command_modules"]

logger = logging.getLogger(__name__)

#: Command groups listed first in ``pathoseg --help``; the others follow by name.
_FIRST = ("slide",)


def command_modules() -> list[str]:
    """Names of the modules of this package that add sub-commands, in ``--help`` order."""
    import napari_pathoseg.cli as pkg

    names = [m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_") and m.name != "main"]
    names.sort(key=lambda n: (n not in _FIRST, _FIRST.index(n) if n in _FIRST else 0, n))
    return [f"{pkg.__name__}.{n}" for n in names]


def build_parser() -> ArgumentParser:
    """The argument parser with every sub-command registered."""
    p = ArgumentParser(prog="pathoseg", description="napari-pathoseg, headless.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod_name in command_modules():
        module = importlib.import_module(mod_name)
        add = getattr(module, "add_commands", None)
        if not callable(add):
            raise RuntimeError(f"{mod_name} is a pathoseg command module without add_commands(subparsers)")
        add(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pathoseg``; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a bad argument (one line already printed)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr)
    if not args.verbose:  # a damaged file is reported once, as the command's one error line
        logging.getLogger("tifffile").setLevel(logging.CRITICAL)
    return call_command(args.func, args, prog=f"pathoseg {args.command}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
