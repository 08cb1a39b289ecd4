"""Write M4 slide-classifier checkpoints with their cards: untrained (for wiring) and released.

* :func:`build_untrained` writes a valid ``"m4"`` checkpoint of randomly initialised weights
  and its card, so slide, CLI and dock code can be built and tested before a model is trained
  (its card says it is untrained; its scores are empty).
* :func:`release_model` scores a training run's ``best.safetensors`` on held-out mosaic slides
  (:mod:`.evaluate`; pooling and call threshold chosen on the validation slides) and writes
  ``models/weights/<name>.{safetensors,json}``::

    python -m napari_pathoseg.methods.mil.release RUN_DIR --val VAL.csv --test TEST.csv --name slidecls-crc-lite

It refuses to overwrite its input.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch

from napari_pathoseg._atomic import check_output, write_json
from napari_pathoseg.methods.mil.network import MilNet, get_preset
from napari_pathoseg.models.checkpoint import load_checkpoint, save_checkpoint

__all__ = ["WEIGHTS_DIR", "build_untrained", "card_for", "release_model"]

logger = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "models" / "weights"


def card_for(name: str, config: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """A ``slide`` task card for an ``"m4"`` config (``fields`` added or overriding)."""
    card = {
        "name": name, "task": "slide", "classes": ["negative", "positive"], "kind": "m4",
        "preset": config["preset"], "mpp": config["mpp"], "tile_size": config["tile_size"],
        "entropy_threshold": config["entropy_threshold"], "pooling": config["pooling"],
        "pooling_k": config["pooling_k"], "threshold": config["threshold"],
    }
    card.update(fields)
    return card


def build_untrained(path: str | os.PathLike, *, preset: str = "lite", seed: int = 0, name: str | None = None,
                    **overrides: Any) -> dict[str, Any]:
    """Write an untrained (random) ``"m4"`` checkpoint at ``path`` and its card beside it (``.json``).

    Parameters
    ----------
    path : path-like
        The ``.safetensors`` to write.
    preset : {"lite", "m4"}
    seed : int
        torch seed of the random initialisation.
    name : str, optional
        Card name (default: the file's stem).
    **overrides
        Config values replacing the preset's (``pooling="max"``...).

    Returns
    -------
    dict
        The card (also written to ``path`` with the suffix ``.json``).
    """
    path = Path(path)
    cfg = get_preset(preset, **overrides)
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        net = MilNet(cfg)
    finally:
        torch.random.set_rng_state(gen_state)
    config = cfg.to_dict()
    card = card_for(name or path.stem, config, description=(
        f"UNTRAINED M4 slide classifier ({preset} preset, random weights, seed {seed}): for wiring and tests only"),
        data="none (untrained)", scores={})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, {"net": net.state_dict()}, config, {"seed": seed, "untrained": True, "card": card}, kind="m4")
    write_json(path.with_suffix(".json"), card)
    return card


def _history(run_dir: Path) -> list[dict[str, Any]]:
    hist = run_dir / "history.json"
    return json.loads(hist.read_text()) if hist.is_file() else []


def _choose_pooling(poolings: list[dict[str, Any]]) -> dict[str, Any]:
    """Best validation slide AUC, then accuracy at its best threshold; ties keep the grid order."""
    return max(poolings, key=lambda p: ((p["slide_auc"] or 0.0), p["accuracy_at_best"]))


def release_model(run_dir: str | os.PathLike, *, test_csv: str | os.PathLike, val_csv: str | os.PathLike,
                  name: str = "slidecls-crc-lite", out_dir: str | os.PathLike = WEIGHTS_DIR,
                  pooling: str | None = None, pooling_k: float | None = None, data: str = "",
                  threads: int | None = None) -> dict[str, Any]:
    """Score ``run_dir/best.safetensors`` on held-out slides and write ``out_dir/<name>.{safetensors,json}``.

    The pooling and the call threshold are chosen on the **validation** slides
    (:func:`.evaluate.compare_poolings`: best slide AUC, then accuracy; the threshold with the best
    validation accuracy), unless ``pooling`` / ``pooling_k`` are given; then the model is scored
    on the **test** slides with that pooling and threshold. Returns the card.
    """
    from napari_pathoseg.methods.mil.evaluate import (
        compare_poolings,
        evaluate_checkpoint,
        scores_by_group,
    )

    run_dir = Path(run_dir)
    best = run_dir / "best.safetensors"
    tensors, config, meta = load_checkpoint(best, expected_kind="m4")
    config = dict(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = check_output(out / f"{name}.safetensors", inputs=[best], what="the released model")
    tmp = out / f".{name}.scoring.safetensors"
    try:
        save_checkpoint(tmp, {"net": tensors["net"]}, config, dict(meta), kind="m4")
        val = evaluate_checkpoint(tmp, val_csv, threads=threads)
        val_poolings = compare_poolings(val["slides"])
        if pooling is None:
            chosen = _choose_pooling(val_poolings)
        else:
            k = float(pooling_k if pooling_k is not None else config["pooling_k"])
            chosen = next((p for p in val_poolings if p["pooling"] == pooling and float(p["k"]) == k), None)
            if chosen is None:
                chosen = compare_poolings(val["slides"], grid=((pooling, k),))[0]
        config.update(pooling=chosen["pooling"], pooling_k=float(chosen["k"]), threshold=float(chosen["best_threshold"]))
        save_checkpoint(tmp, {"net": tensors["net"]}, config, dict(meta), kind="m4")
        val = evaluate_checkpoint(tmp, val_csv, threads=threads)
        test = evaluate_checkpoint(tmp, test_csv, threads=threads)
    finally:
        tmp.unlink(missing_ok=True)
    hist = _history(run_dir)
    test_slides = test.pop("slides")
    val_slides = val.pop("slides")
    card = card_for(
        name, config,
        description=(f"M4 NegGuide MIL slide classifier ({config['preset']}: ResNet-18 structure "
                     f"{config['widths']} + linear head, student of a momentum teacher with a Sinkhorn prediction "
                     f"bank and negative guidance, variant {config['variant']}); {config['tile_size']}-px tiles at "
                     f"{config['mpp']} um/px; random init (no pretrained weights reachable)"),
        best_epoch=meta.get("epoch"), epochs_trained=len(hist),
        train_seconds=round(sum(h.get("seconds", 0.0) for h in hist), 1),
        command=meta.get("command"), seed=meta.get("seed"), data=data or meta.get("cohort", ""),
        k=config["k"],
        pooling_choice="chosen on the validation slides (best slide AUC, then accuracy; threshold with the best "
                       "validation accuracy)" if pooling is None else "given",
        val=val, val_by_source=scores_by_group(val_slides), pooling_comparison_val=val_poolings,
        test=test, test_by_source=scores_by_group(test_slides), pooling_comparison_test=compare_poolings(test_slides),
        scores={k: test[k] for k in ("slide_auc", "slide_accuracy", "tile_auc") if test.get(k) is not None},
    )
    save_checkpoint(target, {"net": tensors["net"]}, config, dict(meta, card=card), kind="m4")
    write_json(out / f"{name}.json", card)
    return card


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m napari_pathoseg.methods.mil.release", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--test", required=True, help="held-out cohort CSV (with per-tile truth beside the slides)")
    ap.add_argument("--val", required=True, help="validation cohort CSV (chooses the pooling and threshold)")
    ap.add_argument("--name", default="slidecls-crc-lite")
    ap.add_argument("--out", default=str(WEIGHTS_DIR))
    ap.add_argument("--pooling", default=None)
    ap.add_argument("--pooling-k", type=float, default=None)
    ap.add_argument("--data", default="")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    card = release_model(args.run_dir, test_csv=args.test, val_csv=args.val, name=args.name, out_dir=args.out,
                         pooling=args.pooling, pooling_k=args.pooling_k, data=args.data, threads=args.threads)
    print(json.dumps(card, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
