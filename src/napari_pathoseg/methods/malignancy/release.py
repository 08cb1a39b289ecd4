"""Write M1 model pairs: the untrained helper (tests, docks), a run's release, the shipped model.

* :func:`build_untrained` writes a valid, randomly initialised ``"m1"`` checkpoint (C and B)
  with its card, for tests and for building on the API before a model is trained.
* :func:`write_pair` writes any classifier + segmenter pair with its config and card.
* :func:`release_run` scores a finished A -> B -> C run on the held-out test part of the
  built-in table (:mod:`napari_pathoseg.methods.malignancy.evaluate`) and writes
  ``models/weights/<name>.{safetensors,json}``.

``python -m napari_pathoseg.methods.malignancy.release RUN_DIR --name malignancy-lite`` does
the last for the shipped model.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from datetime import date
from pathlib import Path
from typing import Any

import torch

from napari_pathoseg._atomic import check_output, write_json
from napari_pathoseg.methods.malignancy.network import (
    M1Config,
    MalignancyClassifier,
    MalignancySegmenter,
    get_preset,
)
from napari_pathoseg.models.checkpoint import save_checkpoint

__all__ = ["WEIGHTS_DIR", "build_untrained", "release_run", "write_pair"]

logger = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "models" / "weights"


def write_pair(path: str | os.PathLike, *, classifier: dict[str, torch.Tensor], segmenter: dict[str, torch.Tensor],
               config: M1Config, card: dict[str, Any], meta: dict[str, Any] | None = None,
               inputs: list[Any] = (), card_json: bool = True) -> Path:
    """Write a released ``"m1"`` pair (C as ``classifier``, B as ``segmenter``) and its card.

    The card goes into the checkpoint's metadata and, with ``card_json``, beside it as
    ``<stem>.json``. ``inputs`` are files the output must not overwrite.
    """
    path = check_output(Path(path), inputs=list(inputs), what="the malignancy model")
    cfg = config.replace(stage="BC")
    save_checkpoint(path, {"classifier": classifier, "segmenter": segmenter}, cfg.to_dict(),
                    dict(meta or {}, card=card), kind="m1")
    if card_json:
        write_json(path.with_suffix(".json"), card)
    return path


def build_untrained(path: str | os.PathLike, *, preset: str = "lite", seed: int = 0,
                    name: str | None = None) -> Path:
    """Write a randomly initialised (untrained) malignancy model pair with a valid card.

    Parameters
    ----------
    path : path
        Target ``.safetensors``; the card is written beside it as ``<stem>.json``.
    preset : str
        ``"lite"`` or ``"m1"``.
    seed : int
        torch seed of the initial weights.
    name : str, optional
        Card name (default: the file's stem).

    Returns
    -------
    pathlib.Path
    """
    cfg = get_preset(preset)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        clf, seg = MalignancyClassifier(cfg), MalignancySegmenter(cfg)
    finally:
        torch.random.set_rng_state(gen_state)
    path = Path(path)
    card = {
        "name": name or path.stem,
        "task": "malignancy",
        "classes": ["benign", "malignant"],
        "kind": "m1",
        "preset": cfg.preset,
        "mpp": cfg.mpp,
        "tile_size": cfg.tile_size,
        "description": f"UNTRAINED M1 pair ({cfg.preset}, seed {seed}): random weights, for tests only",
        "data": "none (untrained)",
        "command": f"build_untrained(preset={preset!r}, seed={seed})",
        "scores": {},
        "created": date.today().isoformat(),
    }
    return write_pair(path, classifier=clf.state_dict(), segmenter=seg.state_dict(), config=cfg, card=card,
                      meta={"untrained": True, "seed": seed})


def release_run(run_dir: str | os.PathLike, *, data_root: str | os.PathLike, name: str = "malignancy-lite",
                out_dir: str | os.PathLike = WEIGHTS_DIR, split_seed: int = 0) -> dict[str, Any]:
    """Score a finished run on the held-out test part and write ``out_dir/<name>.{safetensors,json}``.

    Returns the card.
    """
    from napari_pathoseg.methods.malignancy.data import shared_table
    from napari_pathoseg.methods.malignancy.evaluate import evaluate_model, run_summary
    from napari_pathoseg.methods.malignancy.model import load_malignancy_model

    run_dir = Path(run_dir)
    pair = run_dir / "malignancy.safetensors"
    model = load_malignancy_model(pair, device="cpu")
    table = shared_table(data_root, seed=split_seed)
    test = evaluate_model(model, table.part("test"))
    val = evaluate_model(model, table.part("val"))
    summary = run_summary(run_dir)
    a_best = run_dir / "A" / "best.safetensors"
    a_test = _classifier_scores(a_best, table.part("test")) if a_best.is_file() else None
    cfg = model.config
    from napari_pathoseg.models.checkpoint import load_checkpoint

    tensors, _, meta = load_checkpoint(pair, expected_kind="m1")
    b_negatives = float((meta.get("card") or {}).get("b_negatives", 0.0))
    card: dict[str, Any] = {
        "name": name,
        "task": "malignancy",
        "classes": ["benign", "malignant"],
        "kind": "m1",
        "preset": cfg.preset,
        "mpp": cfg.mpp,
        "tile_size": cfg.tile_size,
        "description": (f"M1 mixed-label transfer ({cfg.preset}: U-Net encoder widths {cfg.widths}); "
                        "C (classifier, encoder from B, B's encoder from A) gives the call, B (U-Net) the "
                        f"malignant region; {cfg.mpp} um/px; random init (no pretrained weights)"
                        + (f"; B also trained on benign images as empty masks ({b_negatives:.0%} of its crops, "
                           "our addition beyond M1)" if b_negatives else "")),
        "b_negatives": b_negatives,
        "data": table.describe(),
        "command": model.meta.get("command"),
        "seed": model.meta.get("seed"),
        "stages": summary,
        "test_classifier_A": a_test,
        "val": val,
        "test": test,
        "scores": {k: test[k] for k in ("auc", "accuracy", "dice") if isinstance(test.get(k), float)},
        "created": date.today().isoformat(),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_pair(out / f"{name}.safetensors", classifier=tensors["classifier"], segmenter=tensors["segmenter"],
               config=cfg, card=card, meta={k: v for k, v in meta.items() if k != "card"}, inputs=[pair])
    return card


def _classifier_scores(best: Path, items: list) -> dict[str, Any]:
    """Test scores of a stage checkpoint's classifier (A: the image-labels-only model, for comparison)."""
    from napari_pathoseg.methods.malignancy.data import load_samples
    from napari_pathoseg.methods.malignancy.evaluate import (
        classify_scores,
        net_classifier,
    )
    from napari_pathoseg.methods.malignancy.model import (
        WHOLE_IMAGE_FACTOR,
        validate_m1_config,
    )
    from napari_pathoseg.models.checkpoint import load_checkpoint, load_state_strict

    tensors, config, _ = load_checkpoint(best, expected_kind="m1")
    cfg = validate_m1_config(config, where=str(best))
    net = MalignancyClassifier(cfg)
    load_state_strict(net, tensors["classifier"], what="classifier", path=best)
    samples = load_samples(items, mpp=cfg.mpp, masks=False)
    return classify_scores(net_classifier(net), samples, side=WHOLE_IMAGE_FACTOR * cfg.tile_size,
                           threshold=cfg.threshold, min_size=cfg.min_size)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m napari_pathoseg.methods.malignancy.release", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--name", default="malignancy-lite")
    ap.add_argument("--data-root", required=True, help="the shared data folder")
    ap.add_argument("--out", default=str(WEIGHTS_DIR))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    card = release_run(args.run_dir, data_root=args.data_root, name=args.name, out_dir=args.out)
    print(json.dumps(card, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
