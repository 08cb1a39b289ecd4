"""Ship an M5 run as a registry model: ``<name>.safetensors`` (stage 2's best, card in its header) + ``<name>.json``.

The scores come from the run's result (the JSON ``pathoseg tissue-train`` printed): validation
(best epoch of stage 2), held-out test by M5's sliding windows and by the fast fully
convolutional pass, and the stage-1 pseudo masks' own test mIoU.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from napari_pathoseg._atomic import check_output, write_json
from napari_pathoseg.errors import PathosegError

__all__ = ["release_tissue_model"]


def _seconds(folder: Path) -> float:
    try:
        return float(sum(h.get("seconds", 0.0) for h in json.loads((folder / "history.json").read_text())))
    except (OSError, ValueError, TypeError):
        return 0.0


def release_tissue_model(run_dir: str | os.PathLike, result_json: str | os.PathLike, *, name: str,
                         out_dir: str | os.PathLike, description: str, data: str) -> Path:
    """Copy stage 2's best checkpoint of ``run_dir`` to ``out_dir/<name>.safetensors`` with its card."""
    from napari_pathoseg.models.checkpoint import load_checkpoint, save_checkpoint

    run = Path(run_dir)
    try:
        res = json.loads(Path(result_json).read_text())
    except (OSError, ValueError) as exc:
        raise PathosegError(f"{result_json}: not the JSON result of pathoseg tissue-train ({exc}).") from None
    best = Path(res["best_checkpoint"])
    tensors, config, meta = load_checkpoint(best, expected_kind="m5")
    out = Path(out_dir)
    ckpt = check_output(out / f"{name}.safetensors", inputs=[best], what="released model")
    test = res.get("test") or {}
    win = test.get("window", {})
    scores = {k: win[k] for k in ("miou", "miou_tumour_stroma", "pixel_accuracy") if isinstance(win.get(k), float)}
    card: dict[str, Any] = {
        "name": name, "task": "tissue", "classes": list(config["classes"]), "kind": "m5", "preset": config["preset"],
        "mpp": config["mpp"], "tile_size": config["tile_size"], "description": description, "data": data,
        "command": meta.get("command", ""), "scores": scores,
        "val": (res.get("stage2") or {}).get("best_metrics", {}),
        "test": test, "stage1": res.get("stage1", {}), "best_epoch": (res.get("stage2") or {}).get("best_epoch"),
        "train_seconds": round(_seconds(run / "stage1") + _seconds(run / "stage2") + _seconds(run / "supervised"), 1),
        "split": (meta.get("split") or {}),
    }
    meta = dict(meta, card={k: v for k, v in card.items() if k not in ("split",)}, task="tissue",
                classes=list(config["classes"]))
    save_checkpoint(ckpt, tensors, config, meta, kind="m5")
    write_json(out / f"{name}.json", {k: v for k, v in card.items() if k != "split"})
    return ckpt
