"""``pathoseg models``: list the shipped and registered models with their cards."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from napari_pathoseg.models.tasks import TASKS

__all__ = ["add_commands", "format_table", "card_summary"]

#: Headline metrics shown in the table, in this order (others follow when these are absent).
_METRICS = ("aji", "dice", "f1", "pq", "auc", "accuracy", "miou")


def card_summary(card: Any) -> dict[str, Any]:
    """The JSON record of one card printed by ``pathoseg models --json``."""
    d = card.to_dict(extra=False)
    keys = ("name", "task", "classes", "mpp", "tile_size", "preset", "kind", "scores", "path", "shipped",
            "description", "data", "base", "created", "command")
    return {k: d[k] for k in keys}


def _scores_text(scores: dict[str, float], *, n: int = 3) -> str:
    keys = [k for k in _METRICS if k in scores] or sorted(scores)
    return " ".join(f"{k} {scores[k]:.3f}" for k in keys[:n]) or "-"


def format_table(cards: Sequence[Any]) -> str:
    """A plain-text table: name, task, classes, µm/px, input size, scores, path."""
    header = ("NAME", "TASK", "CLASSES", "MPP", "INPUT", "SCORES", "PATH")
    rows = [header]
    for c in cards:
        name = c.name + ("" if c.shipped else " (user)")
        rows.append((name, c.task, ",".join(c.classes), f"{c.mpp:g}", f"{c.tile_size}px",
                     _scores_text(c.scores), str(c.path)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    lines = ["  ".join([*(cell.ljust(w) for cell, w in zip(r[:-1], widths)), r[-1]]) for r in rows]
    return "\n".join(lines)


def _cmd_models(args: argparse.Namespace) -> int:
    from napari_pathoseg.models.registry import list_models

    cards = list_models(task=args.task)
    if args.json:
        sys.stdout.write(json.dumps([card_summary(c) for c in cards], indent=1) + "\n")
    elif cards:
        sys.stdout.write(format_table(cards) + "\n")
    else:
        what = f"{args.task} models" if args.task else "models"
        sys.stdout.write(f"no {what} registered\n")
    return 0


def add_commands(subparsers: Any) -> None:
    """Register ``pathoseg models``."""
    p = subparsers.add_parser(
        "models",
        help="list the shipped and registered models (name, task, classes, µm/px, input size, scores, path)",
    )
    p.add_argument("--json", action="store_true", help="print the model cards as JSON")
    p.add_argument("--task", choices=sorted(TASKS), default=None, help="only models of this task")
    p.set_defaults(func=_cmd_models)
