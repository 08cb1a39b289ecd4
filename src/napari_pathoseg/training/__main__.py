"""``python -m napari_pathoseg.training train|evaluate ...`` (same as ``pathoseg train|evaluate``)."""

from __future__ import annotations

import argparse
import logging
import sys

from napari_pathoseg.training._cli import add_commands


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m napari_pathoseg.training")
    sub = parser.add_subparsers(dest="command", required=True)
    add_commands(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
