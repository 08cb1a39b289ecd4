"""Turn a training run's best checkpoint into a shipped / registered model.

``python -m napari_pathoseg.methods.nuclei.release RUN_DIR [--name nuclei-lite]``:

1. loads ``RUN_DIR/best.safetensors``;
2. scores both instance methods with a small grid of thresholds
   (:data:`GRID`) on the validation images of the split at the model's
   resolution, and keeps the best (``instance_method``, ``instance_params``);
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
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from napari_pathoseg._atomic import check_output, write_json
from napari_pathoseg.models.checkpoint import load_checkpoint, save_checkpoint
from napari_pathoseg.models.registry import WEIGHTS_DIR, load_model
from napari_pathoseg.training.augment import hed_perturb
from napari_pathoseg.methods.nuclei.datasets import load_nuclei_originals, load_nuclei_sources
from napari_pathoseg.methods.nuclei.evaluate import evaluate_items

__all__ = ["release_model", "strong_perturb", "tune_instances", "GRID"]

logger = logging.getLogger(__name__)


def strong_perturb(image: np.ndarray, *, alpha: float = 0.3, beta: float = 0.03) -> np.ndarray:
    """Strong HED stain perturbation, seeded by the image content (repeatable)."""
    seed = zlib.crc32(np.ascontiguousarray(image[:8, :8]).tobytes())
    return hed_perturb(image, rng=np.random.default_rng(seed), alpha=alpha, beta=beta)


#: Instance post-processing settings tried on the validation images.
GRID = {
    "distance": [dict(threshold=t, min_distance_um=d) for t in (0.4, 0.5) for d in (1.5, 2.0, 2.5, 3.0)],
    "boundary": [dict(threshold=t, boundary_threshold=b) for t in (0.4, 0.5) for b in (0.2, 0.3, 0.4, 0.5)],
}


def tune_instances(model, items) -> dict[str, Any]:
    """Pick the instance method and thresholds with the best mean AJI on ``items``.

    ``items`` are validation images at the model's resolution; the network
    runs once per image and every setting of :data:`GRID` is scored.

    Returns
    -------
    dict
        ``method``, ``params``, ``aji`` of the winner, ``best_per_method``
        (metrics of each method's best setting) and ``grid`` (all AJIs).
    """
    from napari_pathoseg.methods.nuclei.instances import to_instances
    from napari_pathoseg.metrics import instance_metrics
    from napari_pathoseg.methods.nuclei.train import predict_image

    mult = 2 ** (len(model.generator.encoder.out_channels) - 1)
    probs = [predict_image(model.generator, it.image, multiple=mult) for it in items]
    grid: list[dict[str, Any]] = []
    best_per_method: dict[str, dict[str, float]] = {}
    for method, settings in GRID.items():
        if method == "boundary" and probs[0].shape[0] < 2:
            continue
        for params in settings:
            rows = [
                instance_metrics(it.labels, to_instances(p[0], p[1:] if len(p) > 1 else None,
                                                         method=method, mpp=model.mpp, **params))
                for it, p in zip(items, probs)
            ]
            mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
            grid.append({"method": method, "params": params, "aji": mean["aji"]})
            if method not in best_per_method or mean["aji"] > best_per_method[method]["aji"]:
                best_per_method[method] = dict(mean, params=params)
            logger.info("%s %s: AJI %.4f", method, params, mean["aji"])
    win = max(grid, key=lambda g: g["aji"])
    return {"method": win["method"], "params": win["params"], "aji": win["aji"],
            "best_per_method": best_per_method, "grid": grid}


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
    tuning = tune_instances(model, load_nuclei_sources(data_root, mpp=model.mpp, names=split["val"]))
    method, params = tuning["method"], tuning["params"]
    model.instance_method, model.instance_params = method, dict(params)
    val_scores = tuning["best_per_method"]
    card: dict[str, Any] = {
        "name": name,
        "description": "M2 AttCycle teacher (lite): nucleus instances + stain normalisation at 0.5 um/px",
        "preset": config["preset"],
        "mpp": config["mpp"],
        "tile_size": config["tile_size"],
        "instance_method": method,
        "instance_params": params,
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
    target = check_output(out / f"{name}.safetensors", inputs=[best], what="the released model")
    new_meta = dict(meta, instance_method=method, instance_params=params, card=card)
    save_checkpoint(target, tensors, config, new_meta)
    write_json(out / f"{name}.json", card)
    return card


def main(argv: list[str] | None = None) -> int:
    from napari_pathoseg.cli.train import DEFAULT_DATA

    ap = argparse.ArgumentParser(prog="python -m napari_pathoseg.methods.nuclei.release", description=__doc__,
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
