"""Benchmark stain normalisation: speed vs torchstain / StainTools, chunk latency, quality.

Prints one JSON document on stdout (and writes it to ``--out`` when given)::

    python benchmarks/bench_stain.py                      # everything (a few minutes)
    python benchmarks/bench_stain.py --quick              # 2048 px only, fewer images
    STAINTOOLS_PATH=/tmp/staintools_env python benchmarks/bench_stain.py

Sections
--------
speed
    Fit and transform timed separately (best of ``--repeat``) on the same 2048² and
    4096² H&E mosaics (MoNuSeg images tiled), for our Macenko / Vahadane / Reinhard,
    torchstain's Macenko (numpy and torch back ends) and, when it imports, StainTools
    (Macenko, Vahadane; it needs ``spams``). "transform" includes estimating the image's
    own stains (what torchstain's ``normalize`` does); "apply" maps through the colour
    table with the slide's stains already known (whole-slide use); "table" is building
    the 256³ colour table. MPix/s of "apply" is compared with a plain memory copy of the
    same array (the bandwidth limit of any per-pixel operation).
chunk_latency
    Milliseconds to compute a 256 x 256 region of the lazily normalised pyramid of the
    bundled CMU-1-Small-Region.svs (including the slide read), and of the raw pyramid.
write
    ``pathoseg normalize`` (JPEG pyramidal TIFF) on synthetic 12000² and 24000² slides
    (real H&E pixels, :func:`napari_pathoseg.wsi.synth.make_large_slide`): MPix/s and the
    child process's peak resident memory, which must not grow with the slide.
quality
    On MoNuSeg (30 images, 7 organs), Kather 2016 texture tiles (163, not normalised)
    and NCT-CRC-HE-100K samples (18, Macenko-normalised by their authors): SSIM of each
    normalised image to its source (grey levels), distance of its stain statistics to
    the target's (stain-vector angle and Lab tissue mean) before / after, and the
    coefficient of variation across images of the median tissue intensity before / after.
    The target of each set is its most typical image (stain vectors closest to the
    set's median). Images a method refuses (too little tissue, not H&E) are counted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("PATHOSEG_SHARED_DATA", REPO.parent / "shared" / "data"))


def _best(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _mosaic(size: int) -> np.ndarray:
    files = sorted((DATA / "monuseg_train" / "images").glob("*.png"))
    tiles = [_read_rgb(f) for f in files[: max(1, (size // 1000 + 1) ** 2)]]
    n = size // 1000 + 1
    rows = [np.concatenate([tiles[(i * n + j) % len(tiles)] for j in range(n)], axis=1) for i in range(n)]
    return np.ascontiguousarray(np.concatenate(rows, axis=0)[:size, :size])


# ---------------------------------------------------------------------- speed


def _import_staintools() -> tuple[Any, str]:
    extra = os.environ.get("STAINTOOLS_PATH")
    if extra and extra not in sys.path:
        sys.path.append(extra)
    try:
        import staintools  # noqa: F401

        return staintools, "ok"
    except Exception as exc:  # noqa: BLE001 - report why it is missing
        return None, f"{type(exc).__name__}: {exc}"


def bench_speed(sizes: list[int], repeat: int, slow_repeat: int) -> dict[str, Any]:
    from napari_pathoseg.stain import get_normalizer

    out: dict[str, Any] = {}
    target = _read_rgb(sorted((DATA / "monuseg_train" / "images").glob("*.png"))[0])
    staintools, st_status = _import_staintools()
    out["staintools"] = st_status
    try:
        import torchstain

        ts_status = f"torchstain {getattr(torchstain, '__version__', '?')}"
    except ImportError as exc:
        torchstain, ts_status = None, f"not installed ({exc})"
    out["torchstain"] = ts_status
    for size in sizes:
        img = _mosaic(size)
        mpix = img.shape[0] * img.shape[1] / 1e6
        res: dict[str, Any] = {"megapixels": round(mpix, 2)}
        t_copy, _ = _best(lambda: img.copy(), repeat * 3)
        res["memory_copy"] = {"seconds": t_copy, "mpix_per_s": mpix / t_copy}
        for method in ("macenko", "vahadane", "reinhard"):
            norm = get_normalizer(method)
            t_fit, _ = _best(lambda: norm.fit(img), repeat)
            norm.fit(target)
            t_tr, _ = _best(lambda: norm.transform(img), repeat)
            src = norm.estimate(img)
            t_est, _ = _best(lambda: norm.estimate(img), repeat)

            def table() -> None:
                norm._maps.clear()
                norm.colour_map(src).build_lut()

            t_lut, _ = _best(table, repeat)
            cmap = norm.colour_map(src)
            cmap.build_lut()
            t_apply, _ = _best(lambda: cmap(img), repeat * 2)
            res[f"ours_{method}"] = {
                "fit_s": t_fit,
                "transform_s": t_tr,
                "estimate_s": t_est,
                "table_s": t_lut,
                "apply_s": t_apply,
                "apply_mpix_per_s": mpix / t_apply,
                "transform_mpix_per_s": mpix / t_tr,
                "apply_vs_memcpy": t_apply / t_copy,
            }
        if torchstain is not None:
            import torch

            ts = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
            t_fit, _ = _best(lambda: ts.fit(img), slow_repeat)
            ts.fit(target)
            t_tr, _ = _best(lambda: ts.normalize(img, stains=False), slow_repeat)
            res["torchstain_numpy_macenko"] = {"fit_s": t_fit, "transform_s": t_tr, "transform_mpix_per_s": mpix / t_tr}
            tt = torchstain.normalizers.MacenkoNormalizer(backend="torch")
            timg = torch.from_numpy(img).permute(2, 0, 1).contiguous()
            t_fit, _ = _best(lambda: tt.fit(timg), slow_repeat)
            tt.fit(torch.from_numpy(target.copy()).permute(2, 0, 1).contiguous())
            t_tr, _ = _best(lambda: tt.normalize(timg, stains=False), slow_repeat)
            res["torchstain_torch_macenko"] = {
                "fit_s": t_fit,
                "transform_s": t_tr,
                "transform_mpix_per_s": mpix / t_tr,
                "torch_threads": torch.get_num_threads(),
            }
            ours = res["ours_macenko"]
            for key in ("torchstain_numpy_macenko", "torchstain_torch_macenko"):
                res[key]["ours_transform_speedup"] = res[key]["transform_s"] / ours["transform_s"]
                res[key]["ours_apply_speedup"] = res[key]["transform_s"] / ours["apply_s"]
        if staintools is not None:
            for method in ("macenko", "vahadane"):
                if method == "vahadane" and size > 2048:
                    res[f"staintools_{method}"] = "skipped above 2048 px (spams lasso on every pixel takes minutes)"
                    continue
                st = staintools.StainNormalizer(method=method)
                # StainTools writes into its input (and fails on read-only arrays): copies
                t_fit, _ = _best(lambda: st.fit(img.copy()), 1)
                st.fit(target.copy())
                t_tr, _ = _best(lambda: st.transform(img.copy()), 1)
                res[f"staintools_{method}"] = {"fit_s": t_fit, "transform_s": t_tr, "transform_mpix_per_s": mpix / t_tr}
        out[f"{size}x{size}"] = res
        print(f"speed {size}: done", file=sys.stderr)
    return out


# ---------------------------------------------------------------------- chunk latency


def bench_chunks(n: int = 40) -> dict[str, Any]:
    from napari_pathoseg.wsi.slide import open_slide, sample_slide_path
    from napari_pathoseg.stain import estimate_slide_stain, get_normalizer, normalized_pyramid

    target = _read_rgb(sorted((DATA / "monuseg_train" / "images").glob("*.png"))[0])
    out: dict[str, Any] = {}
    rng = np.random.default_rng(0)
    with open_slide(sample_slide_path()) as slide:
        for method in ("macenko", "vahadane", "reinhard"):
            norm = get_normalizer(method).fit(target)
            t0 = time.perf_counter()
            src = estimate_slide_stain(slide, norm)
            t_est = time.perf_counter() - t0
            t0 = time.perf_counter()
            levels = normalized_pyramid(slide, norm, source=src)
            t_pyr = time.perf_counter() - t0
            rows, cols = slide.pyramid[0].shape[:2]
            pos = [(int(rng.integers(0, rows - 256)), int(rng.integers(0, cols - 256))) for _ in range(n)]
            raw, normed = [], []
            for r, c in pos:
                t0 = time.perf_counter()
                np.asarray(slide.pyramid[0][r : r + 256, c : c + 256])
                raw.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                np.asarray(levels[0][r : r + 256, c : c + 256])
                normed.append(time.perf_counter() - t0)
            block = np.asarray(slide.pyramid[0][:256, :256])
            cmap = norm.colour_map(src)
            t_map, _ = _best(lambda: cmap(block), 20)
            out[method] = {
                "estimate_slide_s": t_est,
                "pyramid_incl_table_s": t_pyr,
                "raw_ms_median": 1e3 * float(np.median(raw)),
                "normalised_ms_median": 1e3 * float(np.median(normed)),
                "normalised_ms_p95": 1e3 * float(np.percentile(normed, 95)),
                "mapping_only_ms": 1e3 * t_map,
            }
    out["note"] = "256 x 256 regions of level 0 at random positions (the svs is JPEG-tiled 240 px; chunks are 480 px)"
    return out


# ---------------------------------------------------------------------- streaming write


def bench_write(sizes: list[int]) -> dict[str, Any]:
    """``pathoseg normalize`` on synthetic slides of growing size: time and peak memory.

    Each run is a child process whose peak resident memory (``VmHWM``, Linux) is its own.
    """
    import subprocess
    import tempfile

    from napari_pathoseg.wsi.synth import make_large_slide

    target = sorted((DATA / "monuseg_train" / "images").glob("*.png"))[9]
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-stain-") as tmp:
        for size in sizes:
            src = make_large_slide(Path(tmp) / f"slide{size}.tif", size=size)
            dst = Path(tmp) / f"norm{size}.tif"
            # VmHWM is this process's own peak (ru_maxrss would inherit the parent's over exec)
            code = (
                "import sys; from napari_pathoseg.cli.main import main; "
                f"rc = main(['normalize', {str(src)!r}, '--target', {str(target)!r}, '--out', {str(dst)!r}]); "
                "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]; "
                "print('MAXRSS', hwm, file=sys.stderr); sys.exit(rc)"
            )
            t0 = time.perf_counter()
            run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            seconds = time.perf_counter() - t0
            summary = json.loads(run.stdout)
            maxrss = int(run.stderr.rsplit("MAXRSS", 1)[1].split()[0])
            out[f"{size}x{size}"] = {
                "megapixels": size * size / 1e6,
                "levels": len(summary["out"]["levels"]),
                "tiles": summary["out"]["tiles"],
                "write_s": summary["out"]["seconds"],
                "total_s": seconds,
                "mpix_per_s": size * size / 1e6 / summary["out"]["seconds"],
                "peak_rss_mb": maxrss / 1024,
                "output_mb": dst.stat().st_size / 2**20,
            }
            src.unlink()
            dst.unlink()
            print(f"write {size}: done", file=sys.stderr)
    return out


# ---------------------------------------------------------------------- quality


def _dataset(name: str, limit: int | None) -> list[tuple[str, np.ndarray]]:
    root = DATA / name
    if name == "monuseg_train":
        files = sorted((root / "images").glob("*.png"))
    else:
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".tif", ".png") and p.is_file())
    if limit:
        files = files[:: max(1, len(files) // limit)][:limit]
    return [(str(f.relative_to(root)), _read_rgb(f)) for f in files]


def _tissue_median(img: np.ndarray) -> np.ndarray:
    od = -np.log((img.reshape(-1, 3).astype(np.float64) + 1) / 256)
    keep = (od >= 0.15).any(axis=1)
    px = img.reshape(-1, 3)[keep] if keep.sum() > 100 else img.reshape(-1, 3)
    return np.median(px, axis=0)


def _cv(values: np.ndarray) -> list[float]:
    v = np.asarray(values, float)
    return (v.std(axis=0) / v.mean(axis=0)).round(4).tolist()


def _angle_sum(a: np.ndarray, b: np.ndarray) -> float:
    tot = 0.0
    for k in range(2):
        c = float(np.clip(a[:, k] @ b[:, k] / (np.linalg.norm(a[:, k]) * np.linalg.norm(b[:, k])), -1, 1))
        tot += float(np.degrees(np.arccos(c)))
    return tot / 2


def bench_quality(limit: int | None) -> dict[str, Any]:
    from skimage.color import rgb2gray
    from skimage.metrics import structural_similarity

    from napari_pathoseg.errors import StainError
    from napari_pathoseg.stain import get_normalizer

    out: dict[str, Any] = {}
    probe_mac = get_normalizer("macenko")
    probe_lab = get_normalizer("reinhard", check_he=False)
    for name, lim in (("monuseg_train", limit), ("kather2016_texture_tiles", None), ("crc_tissue_patches_samples", None)):
        if not (DATA / name).is_dir():
            out[name] = "missing"
            continue
        images = _dataset(name, lim if name == "monuseg_train" else None)
        # the most typical image: Macenko vectors closest to the set's median
        vecs = {}
        for key, img in images:
            try:
                vecs[key] = probe_mac.estimate(img).stain_matrix
            except StainError:
                pass
        med = np.median(np.stack(list(vecs.values())), axis=0)
        target_key = min(vecs, key=lambda k: np.abs(vecs[k] - med).sum())
        target = dict(images)[target_key]
        res: dict[str, Any] = {"images": len(images), "target": target_key}
        lab_t = probe_lab.estimate(target)
        mac_t = probe_mac.estimate(target)
        before_med = np.array([_tissue_median(img) for _, img in images])
        for method in ("macenko", "vahadane", "reinhard"):
            norm = get_normalizer(method).fit(target)
            ssim, d_lab0, d_lab1, d_ang0, d_ang1, medians, refused, t_sum = [], [], [], [], [], [], [], 0.0
            for key, img in images:
                t0 = time.perf_counter()
                try:
                    out_img = norm.transform(img)
                except StainError as exc:
                    refused.append(f"{key}: {str(exc).split(':', 2)[-1].strip()[:60]}")
                    medians.append(_tissue_median(img))  # left as is
                    continue
                t_sum += time.perf_counter() - t0
                ssim.append(structural_similarity(rgb2gray(img), rgb2gray(out_img), data_range=1.0))
                medians.append(_tissue_median(out_img))
                try:
                    lb, la = probe_lab.estimate(img), probe_lab.estimate(out_img)
                    d_lab0.append(float(np.linalg.norm(lb.lab_mean - lab_t.lab_mean)))
                    d_lab1.append(float(np.linalg.norm(la.lab_mean - lab_t.lab_mean)))
                    mb, ma = probe_mac.estimate(img), probe_mac.estimate(out_img)
                    d_ang0.append(_angle_sum(mb.stain_matrix, mac_t.stain_matrix))
                    d_ang1.append(_angle_sum(ma.stain_matrix, mac_t.stain_matrix))
                except StainError:
                    pass
            ok = len(ssim)
            res[method] = {
                "normalised": ok,
                "refused": len(refused),
                "refused_examples": refused[:3],
                "ssim_mean": float(np.mean(ssim)) if ssim else None,
                "ssim_min": float(np.min(ssim)) if ssim else None,
                "ssim_share_ge_0.90": float(np.mean(np.array(ssim) >= 0.90)) if ssim else None,
                "lab_mean_distance_to_target": {"before": float(np.mean(d_lab0)), "after": float(np.mean(d_lab1))} if d_lab0 else None,
                "stain_vector_angle_to_target_deg": {"before": float(np.mean(d_ang0)), "after": float(np.mean(d_ang1))} if d_ang0 else None,
                "median_intensity_cv_rgb": {"before": _cv(before_med), "after": _cv(np.array(medians))},
                "seconds_per_image": t_sum / max(ok, 1),
            }
            print(f"quality {name} {method}: done", file=sys.stderr)
        out[name] = res
    return out


# ---------------------------------------------------------------------- figures


def _label(img: np.ndarray, text: str) -> np.ndarray:
    from PIL import Image, ImageDraw

    im = Image.fromarray(img)
    draw = ImageDraw.Draw(im)
    w = 7 * len(text) + 8
    draw.rectangle([0, 0, w, 16], fill=(255, 255, 255))
    draw.text((4, 2), text, fill=(0, 0, 0))
    return np.asarray(im)


def _save_png(img: np.ndarray, path: Path) -> dict[str, Any]:
    from PIL import Image

    Image.fromarray(img).quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)
    return {"path": str(path), "bytes": path.stat().st_size, "shape": list(img.shape[:2])}


def make_figures(folder: Path) -> dict[str, Any]:
    """Before/after pictures for docs/stain.md (PNG, 256 colours, < 300 KB each)."""
    from napari_pathoseg.wsi.slide import open_slide, sample_slide_path
    from napari_pathoseg.stain import estimate_slide_stain, get_normalizer, normalized_pyramid

    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {}
    pad = lambda a, n=4: np.pad(a, ((n, n), (n, n), (0, 0)), constant_values=255)  # noqa: E731
    # 1. MoNuSeg: three organs/labs normalised to one target, by each method
    files = sorted((DATA / "monuseg_train" / "images").glob("*.png"))
    by_name = {f.name: f for f in files}
    target = _read_rgb(by_name.get("TCGA-HE-7128-01Z-00-DX1.png", files[0]))
    sources = [_read_rgb(files[i]) for i in (0, 5, 20)]
    def crop(im: np.ndarray) -> np.ndarray:  # 256 px crop shown at 160 px
        from skimage.transform import resize

        c = resize(im[300:556, 300:556], (160, 160), anti_aliasing=True, preserve_range=True)
        return np.clip(c + 0.5, 0, 255).astype(np.uint8)

    norms = {m: get_normalizer(m).fit(target) for m in ("macenko", "vahadane", "reinhard")}
    rows = []
    blank = np.full((160, 160, 3), 255, np.uint8)
    rows.append(np.concatenate([pad(_label(crop(target), "target")), *(pad(blank) for _ in range(3))], axis=1))
    for i, src in enumerate(sources):
        cells = [pad(_label(crop(src), f"source {i + 1}"))]
        for m, norm in norms.items():
            cells.append(pad(_label(crop(norm.transform(src)), m)))
        rows.append(np.concatenate(cells, axis=1))
    out["monuseg"] = _save_png(np.concatenate(rows, axis=0), folder / "stain_methods_monuseg.png")
    # 2. Kather 2016 tiles from different patients, before and after Macenko / Vahadane
    tiles = []
    for cls in ("01_tumor", "02_stroma", "04_lympho", "06_mucosa", "03_complex"):
        tiles.append(_read_rgb(sorted((DATA / "kather2016_texture_tiles" / cls).glob("*.tif"))[1]))
    kt = get_normalizer("macenko").fit(tiles[3])
    kv = get_normalizer("vahadane").fit(tiles[3])
    rows = [
        np.concatenate([pad(_label(t, "source")) for t in tiles], axis=1),
        np.concatenate([pad(_label(kt.transform(t), "macenko")) for t in tiles], axis=1),
        np.concatenate([pad(_label(kv.transform(t), "vahadane")) for t in tiles], axis=1),
    ]
    out["kather"] = _save_png(np.concatenate(rows, axis=0), folder / "stain_kather.png")
    # 3. a whole slide, normalised lazily with one source estimate (no seams)
    with open_slide(sample_slide_path()) as slide:
        norm = get_normalizer("macenko").fit(target)
        src = estimate_slide_stain(slide, norm)
        levels = normalized_pyramid(slide, norm, source=src)
        lvl = min(1, len(levels) - 1)  # the whole slide at 2x down-sampling
        before = np.asarray(slide.pyramid[lvl])
        after = np.asarray(levels[lvl])
    from skimage.transform import resize

    def small(a: np.ndarray) -> np.ndarray:
        return np.clip(resize(a, (400, 300), anti_aliasing=True, preserve_range=True) + 0.5, 0, 255).astype(np.uint8)

    fig = np.concatenate([pad(_label(small(before), "CMU-1 slide")), pad(_label(small(after), "macenko, lazy pyramid"))], axis=1)
    out["slide"] = _save_png(fig, folder / "stain_slide.png")
    return out


def screenshot_dock(folder: Path) -> dict[str, Any]:
    """The Stain dock beside the viewer's canvas: slide and its normalised layer side by side.

    Needs a display (or Xvfb). The dock is fitted to a MoNuSeg reference file.
    """
    import napari
    from qtpy.QtWidgets import QApplication

    import napari_pathoseg._widgets.stain as dock_mod
    from napari_pathoseg._reader import slide_layer_data
    from napari_pathoseg.wsi.slide import open_slide, sample_slide_path

    dock_mod.show_info = lambda msg: None  # no toasts in the picture
    viewer = napari.Viewer(show=True)
    try:
        slide = open_slide(sample_slide_path())
        data, kwargs, _ = slide_layer_data(slide)
        viewer.add_image(data, **kwargs)
        dock = dock_mod.StainWidget(viewer)
        viewer.window.add_dock_widget(dock, name="Stain", area="right")
        dock.method_combo.setCurrentText("vahadane")
        dock.target_combo.setCurrentText(dock_mod.TARGET_FILE)
        dock.path_edit.setText(str(sorted((DATA / "monuseg_train" / "images").glob("*.png"))[12]))
        app = QApplication.instance()
        for step in (dock._on_fit, dock._on_add_normalized):
            step()
            t0 = time.perf_counter()
            while dock._worker is not None and time.perf_counter() - t0 < 120:
                app.processEvents()
                time.sleep(0.05)
        viewer.grid.enabled = True
        viewer.reset_view()
        viewer.camera.center = (1050, 400)
        viewer.camera.zoom = 0.65
        for _ in range(30):
            app.processEvents()
            time.sleep(0.05)
        grab = dock.grab()
        canvas = np.asarray(viewer.screenshot(canvas_only=True, flash=False, size=(grab.height(), 640)))[..., :3]
        qimg = grab.toImage().convertToFormat(grab.toImage().Format.Format_RGB888)
        w, h = qimg.width(), qimg.height()
        ptr = qimg.bits()
        ptr.setsize(qimg.bytesPerLine() * h)
        panel = np.frombuffer(ptr, np.uint8).reshape(h, qimg.bytesPerLine())[:, : 3 * w].reshape(h, w, 3)
        # the canvas may come back with unrendered (black) rows at the bottom: drop them
        rendered = np.flatnonzero(canvas.reshape(canvas.shape[0], -1).max(axis=1) > 0)
        canvas = canvas[: rendered[-1] + 1] if rendered.size else canvas
        height = canvas.shape[0]
        panel = panel[:height]
        fig = np.full((height, canvas.shape[1] + panel.shape[1] + 8, 3), 38, np.uint8)
        fig[: canvas.shape[0], : canvas.shape[1]] = canvas
        fig[: panel.shape[0], canvas.shape[1] + 8 :] = panel
        return {"dock": _save_png(fig, folder / "stain_dock.png")}
    finally:
        viewer.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2048 px only, 10 MoNuSeg images, one repeat")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--skip", nargs="*", default=[], choices=("speed", "chunks", "write", "quality"))
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--figures", default=None, metavar="DIR", help="write the docs pictures into DIR")
    args = p.parse_args(argv)
    if not DATA.is_dir():
        print(json.dumps({"error": f"shared data not found at {DATA}"}))
        return 1
    import dask
    import torch

    result: dict[str, Any] = {
        "benchmark": "stain",
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "numpy": np.__version__,
            "dask": dask.__version__,
            "torch": torch.__version__,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        },
    }
    sizes = [2048] if args.quick else [2048, 4096]
    repeat = 1 if args.quick else args.repeat
    if "speed" not in args.skip:
        result["speed"] = bench_speed(sizes, repeat, 1)
    if "chunks" not in args.skip:
        result["chunk_latency"] = bench_chunks()
    if "write" not in args.skip:
        result["write"] = bench_write([4096] if args.quick else [12000, 24000])
    if "quality" not in args.skip:
        result["quality"] = bench_quality(10 if args.quick else None)
    if args.figures:
        result["figures"] = make_figures(Path(args.figures))
        try:
            result["figures"].update(screenshot_dock(Path(args.figures)))
        except Exception as exc:  # noqa: BLE001 - no display: skip the screenshot
            result["figures"]["dock"] = f"skipped ({type(exc).__name__}: {exc})"
    text = json.dumps(result, indent=2, default=float)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
