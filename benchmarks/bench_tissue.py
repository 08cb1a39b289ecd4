"""M5 tissue benchmarks: whole-slide speed (literal vs fast, engine vs bare network) and the ablation table.

Usage::

    python benchmarks/bench_tissue.py speed --model tissue-luad-lite --out bench_tissue_speed.json
    python benchmarks/bench_tissue.py ablation --runs /work/runs --out bench_tissue_ablation.json

``speed`` maps the bundled sample slide (CMU-1-Small-Region.svs, 2220 x 2967 at 0.499 µm/px)
with both modes, times the bare network on the same number of windows, and measures the
agreement of the fast mode with the literal one (fraction of pixels with the same class id).
``ablation`` reads the ``result.json`` of the runs named ``tissue-luad-lite`` (PDA + ONS),
``tissue-abl-*`` (``pda-s1``, ``nopda-s0``, ``ce-s0``...) and ``tissue-luad-supervised`` and
tabulates their held-out test mIoU. ``test CKPT...`` scores stage-2 checkpoints on the held-out
test patches (e.g. the best checkpoint of a run stopped before its own test)::

    python benchmarks/bench_tissue.py test RUN/stage2/best.safetensors --data /work/shared/data
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def speed(args: argparse.Namespace) -> dict:
    import torch

    from napari_pathoseg.events import run_to_end
    from napari_pathoseg.methods.tissue.segment import TissueResult, iter_tissue
    from napari_pathoseg.models.registry import load_model
    from napari_pathoseg.wsi.slide import open_slide, sample_slide_path

    torch.set_num_threads(args.threads)
    model = load_model(args.model, task="tissue")
    out: dict = {"model": args.model, "threads": args.threads, "slide": "CMU-1-Small-Region.svs"}
    ids = {}
    with open_slide(sample_slide_path()) as slide:
        for mode in ("literal", "fast"):
            t = time.perf_counter()
            res = run_to_end(iter_tissue(slide, model, mode=mode, tissue_only=False), TissueResult)
            sec = time.perf_counter() - t
            mpix = res.ids.size / 1e6
            out[mode] = {"seconds": round(sec, 2), "mpix_model_grid": round(mpix, 3), "mpix_per_s": round(mpix / sec, 4),
                         "network_s": round(res.timings.get("network_s", 0.0), 2), "tiles": res.tiles}
            ids[mode] = res.ids
    out["fast_vs_literal_agreement"] = float((ids["fast"] == ids["literal"]).mean())
    tissue = (ids["literal"] > 0) | (ids["fast"] > 0)
    out["fast_vs_literal_agreement_tissue"] = float((ids["fast"] == ids["literal"])[tissue].mean()) if tissue.any() else None
    # bare network on one batch of windows, scaled to the literal run's window count
    x = np.random.default_rng(0).integers(0, 255, (8, model.tile_size, model.tile_size, 3), dtype=np.uint8)
    model.predict(x)
    t = time.perf_counter()
    model.predict(x)
    per_window = (time.perf_counter() - t) / 8
    n_windows = out["literal"]["tiles"] * 16
    out["bare_network_literal_s"] = round(per_window * n_windows, 2)
    out["engine_overhead_literal"] = round(out["literal"]["seconds"] / max(1e-9, per_window * n_windows), 3)
    return out


def ablation(args: argparse.Namespace) -> dict:
    root = Path(args.runs)
    rows = {}
    for d in sorted(root.glob("tissue-*")):
        f = d / "result.json"
        try:
            res = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        t = res.get("test") or {}
        w = t.get("window") or {}
        rows[d.name] = {k: w.get(k) for k in ("miou", "miou_tumour_stroma", "iou_tumour epithelium", "iou_stroma",
                                              "iou_normal", "pixel_accuracy")}
        rows[d.name]["pseudo_masks_test_miou"] = (t.get("pseudo_masks") or {}).get("miou")
        rows[d.name]["val_best"] = (res.get("stage2") or {}).get("best_metrics", {}).get("miou")
        rows[d.name]["wall_seconds"] = res.get("wall_seconds")
    return {"runs": rows}


def test(args: argparse.Namespace) -> dict:
    """Held-out test mIoU of stage-2 checkpoints (``whole``: one pass per patch; ``window``: M5's windows)."""
    import torch

    from napari_pathoseg.methods.tissue.data import load_wsss4luad
    from napari_pathoseg.methods.tissue.evaluate import evaluate_net
    from napari_pathoseg.methods.tissue.network import TissuePSPNet
    from napari_pathoseg.methods.tissue.pipeline import _load_net

    torch.set_num_threads(args.threads)
    data = load_wsss4luad(args.data, parts=("test",))
    out = {}
    for ck in args.checkpoints:
        net, cfg = _load_net(TissuePSPNet, Path(ck), "m5", "cpu")
        out[ck] = evaluate_net(net, data.test, cfg.classes, tile=cfg.tile_size, mode=args.mode)
    return {"mode": args.mode, "test": out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--model", default="tissue-luad-lite")
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--out", default=None)
    a = sub.add_parser("ablation")
    a.add_argument("--runs", required=True)
    a.add_argument("--out", default=None)
    t = sub.add_parser("test")
    t.add_argument("checkpoints", nargs="+")
    t.add_argument("--data", required=True)
    t.add_argument("--mode", choices=("whole", "window"), default="whole")
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--out", default=None)
    args = p.parse_args()
    res = {"speed": speed, "ablation": ablation, "test": test}[args.what](args)
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
