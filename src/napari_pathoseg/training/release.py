"""Turn a training run's best checkpoint into a shipped / registered model.

``python -m napari_pathoseg.training.release RUN_DIR [--name nuclei-lite]``:

1. loads ``RUN_DIR/best.safetensors``;
2. scores both instance methods on the validation images of the split, at
   their own resolution, and keeps the better one (``instance_method``);
3. scores the held-out test images, clean and after a strong HED stain
   perturbation;
4. writes ``<name>.safetensors`` (same tensors, metadata extended with the
   method, the scores and the run's wall time) and a ``<name>.json`` card into
   ``models/weights/`` (or ``--out``), atomically.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from napari_pathoseg.models.checkpoint import load_checkpoint, save_checkpoint
from napari_pathoseg.models.registry import WEIGHTS_DIR, load_model
from napari_pathoseg.training.augment import hed_perturb
from napari_pathoseg.training.datasets import load_nuclei_originals
from napari_pathoseg.training.evaluate import evaluate_items

__all__ = ["release_model", "strong_perturb"]

logger = logging.getLogger(__name__)


def strong_perturb(image: np.ndarray, *, alpha: float = 0.3, beta: float = 0.03) -> np.ndarray:
    """Strong HED stain perturbation, seeded by the image content (repeatable)."""
    seed = zlib.crc32(np.ascontiguousarray(image[:8, :8]).tobytes())
    return hed_perturb(image, rng=np.random.default_rng(seed), alpha=alpha, beta=beta)


def _history_seconds(run_dir: Path) -> float | None:
    hist = run_dir / "history.json"
    if not hist.is_file():
        return None
    return float(sum(h.get("seconds", 0.0) for h in json.loads(hist.read_text())))


def release_model(
    run_dir: str | os.PathLike,
    *,
    data_root: str | os.PathLike,
    name: str = "nuclei-lite",
    out_dir: str | os.PathLike = WEIGHTS_DIR,
    test: bool = True,
) -> dict[str, Any]:
    """Evaluate and export ``run_dir/best.safetensors`` as model ``name``.

    Returns
    -------
    dict
        The model card written to ``out_dir/<name>.json``.
    """
    run_dir = Path(run_dir)
    best = run_dir / "best.safetensors"
    tensors, config, meta = load_checkpoint(best, expected_kind="m2")
    split = meta["split"]
    model = load_model(best)
    val = load_nuclei_originals(data_root, names=split["val"])
    val_scores = {m: evaluate_items(model, val, method=m)["metrics"] for m in ("boundary", "distance")}
    method = max(val_scores, key=lambda m: val_scores[m]["aji"])
    model.instance_method = method
    card: dict[str, Any] = {
        "name": name,
        "description": "M2 AttCycle teacher (lite): nucleus instances + stain normalisation at 0.5 um/px",
        "preset": config["preset"],
        "mpp": config["mpp"],
        "tile_size": config["tile_size"],
        "instance_method": method,
        "best_epoch": meta.get("epoch"),
        "epochs_trained": len(json.loads((run_dir / "history.json").read_text())) if (run_dir / "history.json").is_file() else None,
        "train_seconds": _history_seconds(run_dir),
        "command": meta.get("command"),
        "seed": meta.get("seed"),
        "data": "monuseg_train + cpm15_nuclei (split: nuclei-lite.split.json)",
        "val": val_scores,
    }
    if test:
        items = load_nuclei_originals(data_root, names=split["test"])
        clean = evaluate_items(model, items, per_image=True)
        pert = evaluate_items(model, items, perturb=strong_perturb, per_image=True)
        card["test"] = clean["metrics"]
        card["test_stain_perturbed"] = pert["metrics"]
        card["test_aji_drop"] = clean["metrics"]["aji"] - pert["metrics"]["aji"]
        card["test_per_image"] = {k: {"aji": v["aji"], "dice": v["dice"]} for k, v in clean["per_image"].items()}
    card["scores"] = card.get("test", {})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    new_meta = dict(meta, instance_method=method, card=card)
    save_checkpoint(out / f"{name}.safetensors", tensors, config, new_meta)
    fd, tmp = tempfile.mkstemp(dir=out, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(card, fh, indent=1)
    os.chmod(tmp, 0o644)
    os.replace(tmp, out / f"{name}.json")
    return card


def main(argv: list[str] | None = None) -> int:
    from napari_pathoseg.training._cli import DEFAULT_DATA

    ap = argparse.ArgumentParser(prog="python -m napari_pathoseg.training.release", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--name", default="nuclei-lite")
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--out", default=str(WEIGHTS_DIR))
    ap.add_argument("--no-test", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    card = release_model(args.run_dir, data_root=args.data, name=args.name, out_dir=args.out, test=not args.no_test)
    print(json.dumps(card, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
