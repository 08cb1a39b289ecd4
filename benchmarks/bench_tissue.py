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

``memory SIZE [SIZE ...]`` maps whole slides of SIZE² level-0 pixels at 0.5 µm/px (the model's
grid at 1 µm/px is SIZE/2 square) in child processes and reports each one's peak resident memory
(``VmHWM``), the time, the engine overhead (engine time / predictor time - 1) and the class
areas; the labels TIFF is written too (as ``pathoseg tissue`` does). The slides hold the
bundled sample's real tissue (2220 x 2967) in one corner and white glass elsewhere
(``--tissue-copies`` more copies along the diagonal), so the literal M5 run stays minutes on one
core while the map, the probabilities and the ids are slide-sized (the part that must not grow
with the slide). ``peak_rss_ratio`` is the largest slide's peak over the smallest's::

    python benchmarks/bench_tissue.py memory 25000 50000 --model tissue-luad-supervised --out mem.json

``seams`` maps the sample slide in the literal mode with the raised-cosine window weights (the
default) and M5's plain mean, and reports the share of class changes between neighbouring
pixels that fall on the 112 px window grid lines (about 1 in 112 when boundaries do not care
about the grid; far more when the map has straight edges there). ``weights --data DIR`` scores
both weightings, with the edge mirrored or white, on the held-out WSSS4LUAD test patches through
the engine (each patch an image at 1 µm/px, literal mode; mIoU over tumour, stroma, normal on the
masks' tissue pixels)::

    python benchmarks/bench_tissue.py weights --data /work/shared/data --out weights.json
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
            tm = res.timings
            out[mode] = {"seconds": round(sec, 2), "mpix_model_grid": round(mpix, 3), "mpix_per_s": round(mpix / sec, 4),
                         "network_s": round(tm.get("network_s", 0.0), 2), "tiles": res.tiles,
                         "engine_overhead": round(tm["total_s"] / tm["network_s"] - 1, 3) if tm.get("network_s") else None}
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


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _sparse_slide(path: Path, size: int, copies: int) -> Path:
    """A SIZE² pyramidal TIFF at 0.5 µm/px: the sample slide's pixels ``copies`` times on the diagonal, white elsewhere."""
    from napari_pathoseg.wsi.slide import open_slide, sample_slide_path
    from napari_pathoseg.wsi.synth import write_pyramid_tiff

    if path.exists():
        return path
    with open_slide(sample_slide_path()) as s:
        src = np.asarray(s.pyramid[0].compute())
    pyr = [src]

    def source(level: int, row: int, col: int, h: int, w: int) -> np.ndarray:
        while len(pyr) <= level:
            prev = pyr[-1]
            r2, c2 = prev.shape[0] // 2 * 2, prev.shape[1] // 2 * 2
            q = prev[:r2, :c2].astype(np.uint16)
            pyr.append(((q[0::2, 0::2] + q[1::2, 0::2] + q[0::2, 1::2] + q[1::2, 1::2] + 2) // 4).astype(np.uint8))
        pat = pyr[level]
        out = np.full((h, w, 3), 242, np.uint8)
        step = max(1, (size >> level) // max(1, copies))
        for k in range(copies):
            r0, c0 = k * step, k * step
            rs, re = max(row, r0), min(row + h, r0 + pat.shape[0])
            cs, ce = max(col, c0), min(col + w, c0 + pat.shape[1])
            if rs < re and cs < ce:
                out[rs - row:re - row, cs - col:ce - col] = pat[rs - r0:re - r0, cs - c0:ce - c0]
        return out

    tmp = path.with_suffix(".part.tif")
    write_pyramid_tiff(tmp, shape=(size, size), source=source, mpp=0.5)
    tmp.replace(path)
    return path


def _memory_child(args: argparse.Namespace) -> dict:
    import tempfile

    import torch

    from napari_pathoseg.events import run_to_end
    from napari_pathoseg.methods.tissue.segment import (
        TissueResult,
        iter_tissue,
        write_labels_tiff,
    )
    from napari_pathoseg.models.registry import load_model
    from napari_pathoseg.wsi.slide import open_slide

    torch.set_num_threads(args.threads)
    model = load_model(args.model, task="tissue")
    slide_path = Path(args.sizes[0])
    with open_slide(slide_path) as slide, tempfile.TemporaryDirectory(prefix="bench-tissue-", dir=slide_path.parent) as wd:
        t = time.perf_counter()
        res = run_to_end(iter_tissue(slide, model, mode=args.mode, work_dir=wd), TissueResult)
        run_s = time.perf_counter() - t
        write_labels_tiff(res, Path(wd) / "labels.tif")
        total = time.perf_counter() - t
        tm = res.timings
        return {"slide": slide_path.name, "level0": list(slide.metadata.level_dimensions[0]), "mode": args.mode,
                "map_shape": list(res.ids.shape), "map_mpix": round(res.ids.size / 1e6, 1), "tiles": res.tiles,
                "tiles_total": res.tiles_total, "run_s": round(run_s, 1), "with_labels_tiff_s": round(total, 1),
                "inference_s": tm.get("total_s"), "network_s": tm.get("network_s"),
                "engine_overhead": round(tm["total_s"] / tm["network_s"] - 1, 3) if tm.get("network_s") else None,
                "tissue_mpix_per_s": round(sum(v["pixels"] for k, v in res.areas.items() if k != "background")
                                           / 1e6 / max(1e-9, tm.get("total_s", run_s)), 4),
                "areas_um2": {k: round(v["area_um2"], 1) for k, v in res.areas.items()},
                "peak_rss_mb": round(_peak_rss_mb(), 1), "threads": args.threads}


def memory(args: argparse.Namespace) -> dict:
    import subprocess
    import sys

    if args.child:
        return _memory_child(args)
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes:
        slide = _sparse_slide(folder / f"sparse_{int(size)}_{args.tissue_copies}.tif", int(size), args.tissue_copies)
        cmd = [sys.executable, __file__, "memory", str(slide), "--child", "--model", args.model, "--mode", args.mode,
               "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout[out.stdout.index("{"):]))
        print(json.dumps(rows[-1]), file=sys.stderr)
    doc: dict = {"model": args.model, "runs": rows}
    if len(rows) > 1:
        doc["peak_rss_ratio"] = round(rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"], 3)
        doc["map_pixels_ratio"] = round(rows[-1]["map_mpix"] / rows[0]["map_mpix"], 3)
    return doc


def seams(args: argparse.Namespace) -> dict:
    import torch

    from napari_pathoseg.events import run_to_end
    from napari_pathoseg.methods.tissue.segment import TissueResult, iter_tissue
    from napari_pathoseg.models.registry import load_model
    from napari_pathoseg.wsi.slide import open_slide, sample_slide_path

    torch.set_num_threads(args.threads)
    model = load_model(args.model, task="tissue")
    out: dict = {"model": args.model, "slide": "CMU-1-Small-Region.svs", "grid_px": model.tile_size // 2}
    with open_slide(sample_slide_path()) as slide:
        for weights in ("hann", "box"):
            ids = run_to_end(iter_tissue(slide, model, mode="literal", weights=weights), TissueResult).ids
            out[weights] = grid_share(np.asarray(ids), model.tile_size // 2)
    return out


def grid_share(ids: np.ndarray, grid: int) -> dict:
    """Class changes between tissue pixels next to each other, and the share of them on the ``grid`` lines."""
    res = {}
    for axis in (0, 1):
        a = np.moveaxis(ids, axis, 0)
        flip = (a[1:] != a[:-1]) & (a[1:] > 0) & (a[:-1] > 0)
        per_line = flip.sum(axis=1)
        on = (np.arange(1, a.shape[0]) % grid) == 0
        res["rows" if axis == 0 else "cols"] = {"changes": int(per_line.sum()),
                                                "share_on_grid": round(float(per_line[on].sum() / max(1, per_line.sum())), 4),
                                                "share_of_lines_on_grid": round(float(on.mean()), 4)}
    return res


def weights(args: argparse.Namespace) -> dict:
    import torch

    from napari_pathoseg.events import run_to_end
    from napari_pathoseg.methods.tissue.data import load_wsss4luad
    from napari_pathoseg.methods.tissue.evaluate import confusion, miou
    from napari_pathoseg.methods.tissue.segment import TissueResult, iter_tissue
    from napari_pathoseg.models.registry import load_model

    torch.set_num_threads(args.threads)
    model = load_model(args.model, task="tissue")
    test = [t for t in load_wsss4luad(args.data, parts=("test",)).test if t.mask is not None]
    n = len(model.classes)
    out: dict = {"model": args.model, "images": len(test)}
    for w in ("hann", "box"):
        for edge in ("reflect", "white"):
            conf = np.zeros((n + 1, n + 1), np.int64)
            for item in test:
                ids = run_to_end(iter_tissue(item.image, model, mode="literal", mpp=model.mpp, weights=w, edge=edge),
                                 TissueResult).ids
                conf += confusion(ids, item.mask, n)
            out[f"{w}_{edge}"] = miou(conf, model.classes)
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
    s.add_argument("--model", default="tissue-luad-supervised")
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--out", default=None)
    a = sub.add_parser("ablation")
    a.add_argument("--runs", required=True)
    a.add_argument("--out", default=None)
    m = sub.add_parser("memory")
    m.add_argument("sizes", nargs="+", help="slide sides in level-0 pixels (e.g. 25000 50000)")
    m.add_argument("--model", default="tissue-luad-supervised")
    m.add_argument("--mode", choices=("literal", "fast"), default="literal")
    m.add_argument("--threads", type=int, default=1)
    m.add_argument("--tissue-copies", type=int, default=1)
    m.add_argument("--folder", default="/tmp/pathoseg-bench", help="where the slides are made (cached)")
    m.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    m.add_argument("--out", default=None)
    e = sub.add_parser("seams")
    e.add_argument("--model", default="tissue-luad-supervised")
    e.add_argument("--threads", type=int, default=1)
    e.add_argument("--out", default=None)
    w = sub.add_parser("weights")
    w.add_argument("--data", required=True)
    w.add_argument("--model", default="tissue-luad-supervised")
    w.add_argument("--threads", type=int, default=1)
    w.add_argument("--out", default=None)
    t = sub.add_parser("test")
    t.add_argument("checkpoints", nargs="+")
    t.add_argument("--data", required=True)
    t.add_argument("--mode", choices=("whole", "window"), default="whole")
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--out", default=None)
    args = p.parse_args()
    res = {"speed": speed, "ablation": ablation, "test": test, "memory": memory, "seams": seams,
           "weights": weights}[args.what](args)
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
