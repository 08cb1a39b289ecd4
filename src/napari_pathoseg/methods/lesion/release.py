"""Score an M3 run on held-out data and release it as a shipped model with its card.

``python -m napari_pathoseg.methods.lesion.release RUN_DIR --name lesion-lite`` evaluates
``RUN_DIR/best.safetensors`` on the validation and **test** parts of the split (pooled pixel
ROC AUC and Dice at 0.5, overall and per data set, at the model's µm/px, each image normalised
to the model's stored stain reference) and writes ``models/weights/<name>.safetensors`` (the
checkpoint with its card in the metadata) and ``<name>.json`` (the card). It refuses to
overwrite its input.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from napari_pathoseg._atomic import check_output, write_json
from napari_pathoseg.methods.lesion.data import load_lesion_data, load_split
from napari_pathoseg.methods.lesion.model import load_lesion_model
from napari_pathoseg.methods.lesion.train import evaluate_images
from napari_pathoseg.models.checkpoint import load_checkpoint, save_checkpoint

__all__ = ["evaluate_checkpoint", "release_model", "WEIGHTS_DIR"]

logger = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "models" / "weights"


def evaluate_checkpoint(path: str | os.PathLike, *, data_dir: str | os.PathLike, split: dict[str, Any],
                        parts: tuple[str, ...] = ("val", "test")) -> dict[str, Any]:
    """Pooled pixel AUC / Dice of a lesion checkpoint on parts of ``split`` (overall and per data set)."""
    model = load_lesion_model(path, device="cpu")
    cfg = model.config
    data = load_lesion_data(data_dir, split=split, mpp=cfg.mpp, hires_factor=cfg.hires_factor,
                            normalizer=model.normalizer, parts=parts)
    out: dict[str, Any] = {}
    for part in parts:
        res = evaluate_images(model.net, getattr(data, part), factor=cfg.hires_factor, per_dataset=True)
        res["images"] = len(getattr(data, part))
        out[part] = res
    out["stain_failures"] = data.stain_failures
    return out


def _history(run_dir: Path) -> list[dict[str, Any]]:
    hist = run_dir / "history.json"
    return json.loads(hist.read_text()) if hist.is_file() else []


def release_model(run_dir: str | os.PathLike, *, data_dir: str | os.PathLike, split_path: str | os.PathLike,
                  name: str = "lesion-lite", out_dir: str | os.PathLike = WEIGHTS_DIR) -> dict[str, Any]:
    """Evaluate ``run_dir/best.safetensors`` and write ``out_dir/<name>.{safetensors,json}``; returns the card."""
    run_dir = Path(run_dir)
    best = run_dir / "best.safetensors"
    tensors, config, meta = load_checkpoint(best, expected_kind="m3")
    split = load_split(split_path)
    scores = evaluate_checkpoint(best, data_dir=data_dir, split=split)
    hist = _history(run_dir)
    test = scores["test"]
    card: dict[str, Any] = {
        "name": name,
        "task": "lesion",
        "classes": ["lesion"],
        "description": (f"M3 FPN lesion detector ({config['preset']}: bottleneck ResNet C2-C5 + FPN, focal loss, "
                        f"{'multi-scale' if config['multiscale'] else 'single-scale'} training), "
                        f"lesion probability at {config['mpp']} um/px, Vahadane reference stored; random init "
                        "(no pretrained weights reachable)"),
        "preset": config["preset"],
        "kind": "m3",
        "mpp": config["mpp"],
        "tile_size": config["tile_size"],
        "best_epoch": meta.get("epoch"),
        "epochs_trained": len(hist),
        "train_seconds": round(sum(h.get("seconds", 0.0) for h in hist), 1),
        "command": meta.get("command"),
        "seed": meta.get("seed"),
        "data": (f"ebhi_seg_crc + glas_subset + ocdc_oral_scc_tumour_subset + wsss4luad_tissue_masks "
                 f"(split: {Path(split_path).name}; grouped by specimen / patient / tile / patch)"),
        "val": {k: v for k, v in scores["val"].items() if k != "per_dataset"},
        "val_per_dataset": scores["val"]["per_dataset"],
        "test": {k: v for k, v in test.items() if k != "per_dataset"},
        "test_per_dataset": test["per_dataset"],
        "scores": {"test_pixel_auc": test["auc"], "test_dice": test["dice"]},
        "stain_reference": (config.get("stain") or {}).get("reference"),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = check_output(out / f"{name}.safetensors", inputs=[best], what="the released model")
    save_checkpoint(target, tensors, config, dict(meta, card=card), kind="m3")
    write_json(out / f"{name}.json", card)
    return card


def main(argv: list[str] | None = None) -> int:
    from napari_pathoseg.cli.lesion_train import SHIPPED_SPLIT
    from napari_pathoseg.cli.train import DEFAULT_DATA

    ap = argparse.ArgumentParser(prog="python -m napari_pathoseg.methods.lesion.release", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--name", default="lesion-lite")
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--split", default=str(SHIPPED_SPLIT))
    ap.add_argument("--out", default=str(WEIGHTS_DIR))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    card = release_model(args.run_dir, data_dir=args.data, split_path=args.split, name=args.name, out_dir=args.out)
    print(json.dumps(card, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
