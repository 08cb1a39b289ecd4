"""The hostile inputs and cases of ``scripts/hostile_inputs.py`` (see its docstring).

:func:`make_inputs` writes the inputs (real pixels of the bundled sample slide, a valid GeoJSON,
a saved normaliser, a finished run folder...) and the hostile files into ``ROOT/in``;
:data:`CASES` lists ``(name, expect, fn)``: ``fn(ctx)`` returns a CLI exit code or a value and
``expect`` is ``"refuse"`` (it must fail with a clean error) or ``"either"`` (working is fine too).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np

Case = tuple[str, str, Callable[[dict[str, Any]], Any]]
CASES: list[Case] = []


def case(name: str, expect: str = "refuse") -> Callable:
    def deco(fn: Callable) -> Callable:
        CASES.append((name, expect, fn))
        return fn

    return deco


def cli(*argv: Any) -> int:
    from napari_pathoseg.cli.main import main

    return main([str(a) for a in argv])


# ----------------------------------------------------------------------------- inputs


def _png_with_header(path: Path, width: int, height: int) -> None:
    """A PNG whose IHDR claims ``width`` x ``height`` (valid CRC) over a tiny data stream."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _polygon(n: int, *, cx: float, cy: float, r: float) -> list[list[float]]:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    rr = r * (1 + 0.05 * np.sin(7 * t))
    pts = np.stack([cx + rr * np.cos(t), cy + rr * np.sin(t)], axis=1).round(3).tolist()
    return pts + [pts[0]]


def _feature(coords: Any, kind: str = "Polygon", **props: Any) -> dict[str, Any]:
    return {"type": "Feature", "geometry": {"type": kind, "coordinates": coords},
            "properties": {"objectType": "annotation", **props}}


def _fc(*features: dict[str, Any]) -> dict[str, Any]:
    return {"type": "FeatureCollection", "features": list(features)}


def make_inputs(root: Path) -> dict[str, Any]:
    """Write every input file into ``root/in``; returns the context the cases read."""
    import tifffile
    from PIL import Image

    from napari_pathoseg.models.registry import get_card
    from napari_pathoseg.stain.normalizers import get_normalizer
    from napari_pathoseg.wsi.slide import open_slide, sample_slide_path
    from napari_pathoseg.wsi.synth import write_pyramid_tiff

    d = root / "in"
    d.mkdir(parents=True)
    (root / "out").mkdir()
    ctx: dict[str, Any] = {"root": root, "in": d}
    sample = sample_slide_path()
    shutil.copy(sample, d / "s.svs")
    with open_slide(sample) as s:
        crop = s.read_region(level=0, row=1600, col=600, height=1024, width=1024)
    write_pyramid_tiff(d / "g.tif", crop, levels=3, tile=256, mpp=0.5)
    Image.fromarray(crop[:256, :256]).save(d / "small.png")
    Image.fromarray(crop[256:512, 256:512]).save(d / "target.png")
    lab = np.zeros((1024, 1024), np.uint16)
    for k in range(6):
        lab[100 + 120 * k : 160 + 120 * k, 200:260] = k + 1
    tifffile.imwrite(d / "lab.tif", lab, tile=(256, 256))
    np.save(d / "lab.npy", lab)
    np.save(d / "objprob.npy", np.array([[object()] * 4] * 4, dtype=object), allow_pickle=True)
    (d / "x.geojson").write_text(json.dumps(_fc(_feature([_polygon(40, cx=300, cy=300, r=80)]),
                                                 _feature([_polygon(40, cx=700, cy=600, r=120)]))))
    os.link(d / "g.tif", d / "g_hardlink.tif")
    os.symlink(d / "g.tif", d / "g_symlink.tif")
    norm = get_normalizer("macenko")
    norm.fit(crop[256:512, 256:512])
    norm.save(d / "norm.json")
    # a finished training run (its last checkpoint records the end)
    run = d / "run"
    run.mkdir()
    card = get_card("nuclei-lite")
    shutil.copy(card.path, run / "last.safetensors")
    (run / "history.json").write_text(json.dumps([{"epoch": 1, "loss": 1.0}]))
    # ---- hostile slides
    _png_with_header(d / "bomb.png", 100_000, 100_000)
    _png_with_header(d / "big60k.png", 60_000, 60_000)
    (d / "empty.svs").write_bytes(b"")
    (d / "random.svs").write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    (d / "text.tif").write_text("this is not a TIFF\n" * 100)
    raw = (d / "g.tif").read_bytes()
    (d / "trunc.tif").write_bytes(raw[: int(len(raw) * 0.6)])
    generic = Path(__file__).resolve().parents[2] / "shared" / "data" / "wsi_samples" / "OS-1-detail_pyramid_generic.tif"
    if generic.is_file():
        graw = generic.read_bytes()
        (d / "trunc_generic.tif").write_bytes(graw[: int(len(graw) * 0.5)])
    cmyk = np.zeros((64, 64, 4), np.uint8)
    cmyk[..., 0] = 200  # cyan ink only
    tifffile.imwrite(d / "cmyk.tif", cmyk, photometric="separated")
    tifffile.imwrite(d / "four.tif", np.full((64, 64, 4), 100, np.uint8), photometric="rgb", extrasamples=[0])
    tifffile.imwrite(d / "u16.tif", np.zeros((64, 64, 3), np.uint16), photometric="rgb")
    jpg = io_bytes(crop[:256, :256], "JPEG")
    (d / "trunc.jpg").write_bytes(jpg[: len(jpg) // 2])
    # ---- hostile GeoJSON
    (d / "deep.geojson").write_text("[" * 100_000 + "]" * 100_000)
    (d / "latin1.geojson").write_bytes(json.dumps(_fc(_feature([_polygon(8, cx=50, cy=50, r=20)], name="é"))).encode("utf-8").replace("\\u00e9".encode(), b"\xe9\xe9"))
    (d / "digits.geojson").write_text('{"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[' + "9" * 5000 + ', 0], [10, 0], [10, 10], [0, 0]]]}, "properties": {}}]}')
    (d / "xyz.geojson").write_text(json.dumps(_fc(_feature([[[0, 0, 1], [100, 0, 1], [100, 100, 1], [0, 0, 1]]]))))
    (d / "far.geojson").write_text(json.dumps(_fc(_feature([[[0, 0], [1e300, 0], [1e300, 1e300], [0, 0]]]))))
    (d / "nan.geojson").write_text('{"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [NaN, 0], [10, 10], [0, 0]]]}, "properties": {}}]}')
    (d / "v1e4.geojson").write_text(json.dumps(_fc(_feature([_polygon(10_000, cx=500, cy=500, r=400)]))))
    (d / "v1e6.geojson").write_text(json.dumps(_fc(_feature([_polygon(1_000_000, cx=500, cy=500, r=450)]))))
    (d / "trunc.geojson").write_text(json.dumps(_fc(_feature([_polygon(50, cx=300, cy=300, r=80)])))[:-40])
    (d / "null.geojson").write_text("null")
    (d / "numbers.geojson").write_text("[1, 2, 3]")
    (d / "empty.geojson").write_text("")
    (d / "geomstr.geojson").write_text(json.dumps(_fc({"type": "Feature", "geometry": "POLYGON", "properties": {}})))
    (d / "badring.geojson").write_text(json.dumps(_fc(_feature([[[0, 0], [10, 0]]]))))
    (d / "hugeint.geojson").write_text(json.dumps(_fc(_feature([[[0, 0], [10**40, 0], [10, 10], [0, 0]]]))))
    # ---- hostile normaliser JSON
    (d / "deep.json").write_text('{"format": ' + "[" * 50_000 + "]" * 50_000 + "}")
    (d / "list.json").write_text("[1, 2]")
    nd = json.loads((d / "norm.json").read_text())
    (d / "norm_nan.json").write_text(json.dumps(_nanify(nd)))
    (d / "norm_bin.json").write_bytes(b"\xff\xfe\x00garbage")
    # ---- hostile checkpoints
    header = json.loads(json.dumps(card_header(card.path)))
    base_cfg = header["config"]
    ck = d / "ckpt"
    ck.mkdir()
    (ck / "pickle.safetensors").write_bytes(pickle.dumps({"a": 1}, protocol=4))
    (ck / "random.safetensors").write_bytes(os.urandom(4096))
    (ck / "empty.safetensors").write_bytes(b"")
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(ck / "nometa.safetensors"))
    tiny = {"net": {"w": torch.zeros(2)}}
    for name, change in {
        "huge": {"widths": [65536, 131072, 262144, 524288]},
        "negative": {"widths": [-16, 32, 64, 128]},
        "textwidth": {"widths": ["wide", 32, 64, 128]},
        "nanmpp": {"mpp": float("nan")},
        "unknown": {"surprise": 1},
        "tile0": {"tile_size": 0},
    }.items():
        cfg = dict(base_cfg, **change)
        _raw_checkpoint(ck / f"{name}.safetensors", tiny, cfg)
    from safetensors.torch import load_file

    flat = load_file(str(card.path))
    bad = dict(flat)
    k = next(k for k, v in flat.items() if v.is_floating_point() and v.numel() > 4)
    bad[k] = flat[k].clone()
    bad[k].view(-1)[0] = float("nan")
    save_file(bad, str(ck / "nanweights.safetensors"), metadata=_md(header))
    i8 = {k2: (v.to(torch.int8) if v.is_floating_point() else v) for k2, v in flat.items()}
    save_file(i8, str(ck / "int8.safetensors"), metadata=_md(header))
    ctx.update(base_cfg=base_cfg)
    return ctx


def io_bytes(arr: np.ndarray, fmt: str) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _nanify(obj: Any) -> Any:
    if isinstance(obj, float):
        return float("nan")
    if isinstance(obj, list):
        return [_nanify(v) for v in obj]
    if isinstance(obj, dict):
        return {k: (v if k in ("format", "version", "method") else _nanify(v)) for k, v in obj.items()}
    return obj


def card_header(path: Path) -> dict[str, Any]:
    from napari_pathoseg.models.checkpoint import read_header

    return read_header(path)


def _md(header: dict[str, Any]) -> dict[str, str]:
    return {"format": "napari-pathoseg", "format_version": "1", "kind": header["kind"],
            "config": json.dumps(header["config"], allow_nan=True), "meta": json.dumps(header["meta"], default=str)}


def _raw_checkpoint(path: Path, state: dict[str, dict[str, Any]], config: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    flat = {f"{m}.{k}": v for m, sd in state.items() for k, v in sd.items()}
    save_file(flat, str(path), metadata={"format": "napari-pathoseg", "format_version": "1", "kind": "m2",
                                         "config": json.dumps(config, allow_nan=True), "meta": "{}"})


# ----------------------------------------------------------------------------- output = input


def _i(ctx: dict[str, Any], name: str) -> Path:
    return ctx["in"] / name


@case("same/normalize-save-normalizer-is-slide")
def _(c): return cli("normalize", _i(c, "s.svs"), "--target", _i(c, "target.png"), "--save-normalizer", _i(c, "s.svs"))
@case("same/normalize-out-is-slide")
def _(c): return cli("normalize", _i(c, "g.tif"), "--target", _i(c, "target.png"), "--out", _i(c, "g.tif"))
@case("same/normalize-out-is-target")
def _(c): return cli("normalize", _i(c, "small.png"), "--target", _i(c, "g.tif"), "--out", _i(c, "g.tif"))
@case("same/normalize-out-is-slide-hardlink")
def _(c): return cli("normalize", _i(c, "g.tif"), "--target", _i(c, "target.png"), "--out", _i(c, "g_hardlink.tif"))
@case("same/import-out-is-slide")
def _(c): return cli("import", _i(c, "x.geojson"), "--slide", _i(c, "g.tif"), "--out", _i(c, "g.tif"))
@case("same/import-out-is-slide-symlink")
def _(c): return cli("import", _i(c, "x.geojson"), "--slide", _i(c, "g.tif"), "--out", _i(c, "g_symlink.tif"))
@case("same/import-out-is-geojson")
def _(c): return cli("import", _i(c, "x.geojson"), "--slide", _i(c, "g.tif"), "--out", _i(c, "x.geojson"))
@case("same/export-out-is-slide")
def _(c): return cli("export", _i(c, "lab.tif"), "--slide", _i(c, "s.svs"), "--out", _i(c, "s.svs"), "--origin", "0,0")
@case("same/export-out-is-labels")
def _(c): return cli("export", _i(c, "lab.tif"), "--slide", _i(c, "g.tif"), "--out", _i(c, "lab.tif"))
@case("same/export-table-is-slide")
def _(c): return cli("export", _i(c, "lab.tif"), "--slide", _i(c, "g.tif"), "--out", c["out"] / "o.geojson", "--table", _i(c, "g.tif"))
@case("same/nuclei-out-is-input")
def _(c): return cli("nuclei", _i(c, "small.png"), "--out", _i(c, "small.png"), "--mpp", "0.5")
@case("same/nuclei-table-is-input")
def _(c): return cli("nuclei", _i(c, "small.png"), "--out", c["out"] / "l.tif", "--table", _i(c, "small.png"), "--mpp", "0.5")
@case("same/nuclei-overlay-is-input")
def _(c): return cli("nuclei", _i(c, "small.png"), "--out", c["out"] / "l.tif", "--overlay", _i(c, "small.png"), "--mpp", "0.5")
@case("same/nuclei-normalized-is-input")
def _(c): return cli("nuclei", _i(c, "small.png"), "--out", c["out"] / "l.tif", "--normalized", _i(c, "small.png"), "--mpp", "0.5")
@case("same/tiles-csv-is-slide")
def _(c): return cli("tiles", _i(c, "s.svs"), "--csv", _i(c, "s.svs"))
@case("same/pseudolabel-out-is-input-folder")
def _(c): return cli("pseudolabel", c["in"], "--out", c["in"], "--max-tiles", "1")


# ----------------------------------------------------------------------------- other kinds, runs


@case("kind/tiles-csv-over-a-tiff")
def _(c):
    victim = c["out"] / "other.tif"
    shutil.copy(_i(c, "g.tif"), victim)
    return cli("tiles", _i(c, "g.tif"), "--csv", victim)
@case("kind/normalizer-json-over-a-slide")
def _(c):
    victim = c["out"] / "other.svs"
    shutil.copy(_i(c, "s.svs"), victim)
    return cli("normalize", _i(c, "small.png"), "--target", _i(c, "target.png"), "--save-normalizer", victim)
@case("kind/export-geojson-over-a-png")
def _(c):
    victim = c["out"] / "o.geojson"
    shutil.copy(_i(c, "small.png"), victim)
    return cli("export", _i(c, "lab.tif"), "--slide", _i(c, "g.tif"), "--out", victim, "--no-table")
@case("kind/import-tiff-over-a-geojson")
def _(c):
    victim = c["out"] / "o.tif"
    shutil.copy(_i(c, "x.geojson"), victim)
    return cli("import", _i(c, "x.geojson"), "--slide", _i(c, "g.tif"), "--out", victim)
@case("run/train-over-finished-run")
def _(c): return cli("train", "--out", _i(c, "run"), "--epochs", "1", "--steps-per-epoch", "1", "--threads", "1")


# ----------------------------------------------------------------------------- missing folders (create or refuse)


@case("folder/tiles-csv-missing-folder", "either")
def _(c): return cli("tiles", _i(c, "g.tif"), "--csv", c["out"] / "no" / "such" / "g.csv")
@case("folder/import-missing-folder", "either")
def _(c): return cli("import", _i(c, "x.geojson"), "--slide", _i(c, "g.tif"), "--out", c["out"] / "no" / "x.tif")
@case("folder/export-missing-folder", "either")
def _(c): return cli("export", _i(c, "lab.tif"), "--slide", _i(c, "g.tif"), "--out", c["out"] / "no" / "x.geojson")
@case("folder/nuclei-missing-folder", "either")
def _(c): return cli("nuclei", _i(c, "small.png"), "--out", c["out"] / "no" / "l.tif", "--mpp", "0.5")
@case("folder/normalize-missing-folder", "either")
def _(c): return cli("normalize", _i(c, "small.png"), "--target", _i(c, "norm.json"), "--out", c["out"] / "no" / "n.tif")
@case("folder/save-normalizer-missing-folder", "either")
def _(c): return cli("normalize", _i(c, "small.png"), "--target", _i(c, "target.png"), "--save-normalizer", c["out"] / "no" / "n.json")


# ----------------------------------------------------------------------------- argument values


for _v in ("nan", "inf", "1e6", "1e-4", "-1", "abc"):
    case(f"args/nuclei-mpp-{_v}")(lambda c, v=_v: cli("nuclei", _i(c, "small.png"), "--out", c["out"] / "l.tif", "--mpp", v))
case("args/nuclei-batch-0")(lambda c: cli("nuclei", _i(c, "small.png"), "--out", c["out"] / "l.tif", "--batch", "0"))
case("args/nuclei-region-nan")(lambda c: cli("nuclei", _i(c, "small.png"), "--out", c["out"] / "l.tif", "--region", "nan,0,10,10"))
case("args/nuclei-region-huge")(lambda c: cli("nuclei", _i(c, "small.png"), "--out", c["out"] / "l.tif", "--region", "0,0,1e12,1e12"))
case("args/nuclei-model-missing")(lambda c: cli("nuclei", _i(c, "small.png"), "--out", c["out"] / "l.tif", "--model", "nope"))
case("args/train-threads-abc")(lambda c: cli("train", "--out", c["out"] / "r", "--threads", "abc"))
case("args/train-device-quantum")(lambda c: cli("train", "--out", c["out"] / "r", "--device", "quantum"))
case("args/train-epochs-0")(lambda c: cli("train", "--out", c["out"] / "r", "--epochs", "0"))
case("args/train-lr-nan")(lambda c: cli("train", "--out", c["out"] / "r", "--lr", "nan"))
case("args/export-origin-nan")(lambda c: cli("export", _i(c, "lab.tif"), "--slide", _i(c, "g.tif"), "--out", c["out"] / "o.geojson", "--origin", "nan", "nan"))
case("args/export-origin-1e12")(lambda c: cli("export", _i(c, "lab.tif"), "--slide", _i(c, "g.tif"), "--out", c["out"] / "o.geojson", "--origin", "1e12,1e12"))
case("args/export-level-99")(lambda c: cli("export", _i(c, "lab.tif"), "--slide", _i(c, "g.tif"), "--out", c["out"] / "o.geojson", "--level", "99"))
case("args/export-level-negative")(lambda c: cli("export", _i(c, "lab.tif"), "--slide", _i(c, "g.tif"), "--out", c["out"] / "o.geojson", "--level", "-1"))
case("args/export-object-probability")(lambda c: cli("export", _i(c, "lab.tif"), "--slide", _i(c, "g.tif"), "--out", c["out"] / "o.geojson", "--probability", _i(c, "objprob.npy")))
case("args/export-labels-are-a-slide")(lambda c: cli("export", _i(c, "s.svs"), "--slide", _i(c, "g.tif"), "--out", c["out"] / "o.geojson"))
case("args/import-level-99")(lambda c: cli("import", _i(c, "x.geojson"), "--slide", _i(c, "g.tif"), "--out", c["out"] / "o.tif", "--level", "99"))
case("args/demo-out-is-a-file")(lambda c: cli("demo", "--headless", "--out", _i(c, "x.geojson")))
case("args/normalize-target-deep-json")(lambda c: cli("normalize", _i(c, "small.png"), "--target", _i(c, "deep.json"), "--out", c["out"] / "n.tif"))
case("args/normalize-target-list-json")(lambda c: cli("normalize", _i(c, "small.png"), "--target", _i(c, "list.json"), "--out", c["out"] / "n.tif"))
case("args/normalize-target-nan-json")(lambda c: cli("normalize", _i(c, "small.png"), "--target", _i(c, "norm_nan.json"), "--out", c["out"] / "n.tif"))
case("args/normalize-target-binary-json")(lambda c: cli("normalize", _i(c, "small.png"), "--target", _i(c, "norm_bin.json"), "--out", c["out"] / "n.tif"))
case("args/normalize-quality-999")(lambda c: cli("normalize", _i(c, "small.png"), "--target", _i(c, "norm.json"), "--out", c["out"] / "n.tif", "--quality", "999"))
case("args/normalize-level-99")(lambda c: cli("normalize", _i(c, "small.png"), "--target", _i(c, "norm.json"), "--out", c["out"] / "n.tif", "--level", "99"))
case("args/tiles-mpp-1e-6")(lambda c: cli("tiles", _i(c, "g.tif"), "--mpp", "1e-6"))
case("args/tiles-min-tissue-2")(lambda c: cli("tiles", _i(c, "g.tif"), "--min-tissue", "2"))
case("args/tiles-level-99")(lambda c: cli("tiles", _i(c, "g.tif"), "--level", "99"))
case("args/tiles-size-1e9")(lambda c: cli("tiles", _i(c, "g.tif"), "--size", "1000000000"))
case("args/evaluate-missing-folders")(lambda c: cli("evaluate", "nuclei", "--images", c["out"] / "none", "--masks", c["out"] / "none"))
case("args/finetune-nothing-to-train")(lambda c: cli("finetune", "--out", c["out"] / "r", "--name", "x", "--epochs", "1"))


# ----------------------------------------------------------------------------- slides


for _f in ("bomb.png", "big60k.png", "empty.svs", "random.svs", "text.tif", "trunc.tif", "trunc_generic.tif",
           "u16.tif", "trunc.jpg", "four.tif", "lab.npy"):
    case(f"slide/info-{_f}")(lambda c, f=_f: cli("info", _i(c, f)))


@case("slide/cmyk-converted-not-alpha", "either")
def _(c):
    from napari_pathoseg.wsi.slide import open_slide

    with open_slide(_i(c, "cmyk.tif")) as s:
        px = s.read_region(level=0, row=0, col=0, height=4, width=4)[0, 0]
    # 200/255 cyan ink on white paper is about (55, 255, 255); K read as alpha would be white
    if not (px[0] < 120 and px[1] > 200 and px[2] > 200):
        raise AssertionError(f"CMYK pixel read as {px.tolist()}, expected about (55, 255, 255)")
    return px.tolist()


def _region(c: dict[str, Any], **kw: Any) -> Any:
    from napari_pathoseg.wsi.slide import open_slide

    with open_slide(_i(c, "g.tif")) as s:
        return s.read_region(**kw).shape


case("slide/read-region-uint8-wrap", "either")(lambda c: _check_region(c, row=np.uint8(250), col=np.uint8(250), height=np.uint8(100), width=np.uint8(100)))
case("slide/read-region-float")(lambda c: _region(c, level=0, row=1.5, col=0, height=10, width=10))
case("slide/read-region-huge")(lambda c: _region(c, level=0, row=0, col=0, height=10**6, width=10**6))
case("slide/read-region-level-99")(lambda c: _region(c, level=99, row=0, col=0, height=10, width=10))
case("slide/from-array-0x0")(lambda c: __import__("napari_pathoseg.wsi.slide", fromlist=["Slide"]).Slide.from_array(np.zeros((0, 0, 3), np.uint8)))
case("slide/from-array-nan")(lambda c: __import__("napari_pathoseg.wsi.slide", fromlist=["Slide"]).Slide.from_array(np.full((8, 8, 3), np.nan)))


def _check_region(c: dict[str, Any], **kw: Any) -> Any:
    from napari_pathoseg.wsi.slide import open_slide

    with open_slide(_i(c, "g.tif")) as s:
        out = s.read_region(level=0, **kw)
        ref = s.read_region(level=0, row=250, col=250, height=100, width=100)
    if out.shape != (100, 100, 3) or not np.array_equal(out, ref):
        raise AssertionError("numpy uint8 coordinates wrapped around")
    return out.shape


# ----------------------------------------------------------------------------- GeoJSON


_GJ = ("deep", "latin1", "digits", "xyz", "far", "nan", "trunc", "null", "numbers", "empty", "geomstr", "badring", "hugeint")
for _g in _GJ:
    case(f"geojson/import-{_g}", "either" if _g == "xyz" else "refuse")(lambda c, g=_g: cli("import", _i(c, f"{g}.geojson"), "--slide", _i(c, "g.tif"), "--out", c["out"] / "o.tif"))
    case(f"geojson/reader-{_g}", "either" if _g == "xyz" else "refuse")(lambda c, g=_g: _napari_read(c, f"{g}.geojson"))


def _napari_read(c: dict[str, Any], name: str) -> Any:
    from napari_pathoseg.export.napari_io import get_geojson_reader

    reader = get_geojson_reader(str(_i(c, name)))
    if reader is None:
        raise AssertionError("the GeoJSON reader declined a .geojson file")
    return f"{len(reader(str(_i(c, name))))} layers"


def _import_timed(c: dict[str, Any], name: str, limit: float) -> Any:
    import time

    t0 = time.perf_counter()
    code = cli("import", _i(c, name), "--slide", _i(c, "g.tif"), "--out", c["out"] / "o.tif")
    if code != 0:
        return code
    took = time.perf_counter() - t0
    if took > limit:
        raise AssertionError(f"import of {name} took {took:.1f} s (limit {limit} s)")
    return code


case("geojson/import-1e4-vertices", "either")(lambda c: _import_timed(c, "v1e4.geojson", 10))
case("geojson/import-1e6-vertices", "either")(lambda c: _import_timed(c, "v1e6.geojson", 45))
case("geojson/reader-1e4-vertices", "either")(lambda c: _napari_read(c, "v1e4.geojson"))


# ----------------------------------------------------------------------------- checkpoints


for _ck in ("pickle", "random", "empty", "nometa", "huge", "negative", "textwidth", "nanmpp", "unknown", "tile0",
            "nanweights", "int8"):
    case(f"checkpoint/nuclei-{_ck}")(lambda c, k=_ck: cli("nuclei", _i(c, "small.png"), "--out", c["out"] / "l.tif", "--mpp", "0.5",
                                                         "--model", _i(c, f"ckpt/{k}.safetensors")))


# ----------------------------------------------------------------------------- registry


def _with_registry(c: dict[str, Any], content: str, argv: list[Any]) -> int:
    home = c["out"] / "home"
    home.mkdir(exist_ok=True)
    (home / "models.json").write_text(content)
    old = os.environ.get("PATHOSEG_HOME")
    os.environ["PATHOSEG_HOME"] = str(home)
    try:
        return cli(*argv)
    finally:
        if old is None:
            os.environ.pop("PATHOSEG_HOME", None)
        else:
            os.environ["PATHOSEG_HOME"] = old


for _name, _content in {"list": "[1, 2]", "nopath": '{"models": [{"name": "m"}]}', "nullpath": '{"models": [{"name": "m", "path": null}]}',
                        "garbage": "\x00\x01{{{"}.items():
    case(f"registry/models-{_name}", "either")(lambda c, t=_content: _with_registry(c, t, ["models"]))
    case(f"registry/nuclei-{_name}", "either")(lambda c, t=_content: _with_registry(
        c, t, ["nuclei", _i(c, "small.png"), "--out", c["out"] / "l.tif", "--mpp", "0.5"]))


# ----------------------------------------------------------------------------- full disk (a 1 MB tmpfs, root only)


def full_disk(ctx: dict[str, Any]) -> Path | None:
    """A folder on a full 1 MB tmpfs (mounted once, as root; None where mounting is not allowed)."""
    import subprocess

    if "full" in ctx:
        return ctx["full"]
    mnt = ctx["root"] / "full"
    mnt.mkdir(exist_ok=True)
    ok = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                                              capture_output=True).returncode == 0
    ctx["full"] = mnt if ok else None
    if ok:
        for name, block in ((".filler", 4096), (".filler2", 1)):  # fill it to the last byte
            fd = os.open(mnt / name, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                while True:
                    os.write(fd, b"\0" * block)
            except OSError:
                pass
            finally:
                os.close(fd)
    return ctx["full"]


def unmount_full(ctx: dict[str, Any]) -> None:
    """Unmount the full-disk tmpfs of :func:`full_disk`, if mounted."""
    import subprocess

    if ctx.get("full") is not None:
        subprocess.run(["umount", str(ctx["full"])], capture_output=True)
        ctx["full"] = None


def _on_full(argv_of: Callable[[dict[str, Any], Path], list[Any]]) -> Callable[[dict[str, Any]], Any]:
    def run(c: dict[str, Any]) -> Any:
        full = c.get("full")
        if full is None:
            return "skipped: no tmpfs"
        sub = full / c["out"].name.replace("/", "_")
        before = set(os.listdir(full))
        code = cli(*argv_of(c, sub))
        left = sorted(n for n in set(os.listdir(full)) - before if not ((full / n).is_dir() and not any((full / n).iterdir())))
        if left:
            raise AssertionError(f"exit {code}; files left on the full disk: {left}")
        return code
    return run


_FULL = {
    "nuclei": lambda c, d: ["nuclei", _i(c, "small.png"), "--out", d.parent / "l.tif", "--mpp", "0.5"],
    "import": lambda c, d: ["import", _i(c, "x.geojson"), "--slide", _i(c, "g.tif"), "--out", d.parent / "o.tif"],
    "export": lambda c, d: ["export", _i(c, "lab.tif"), "--slide", _i(c, "g.tif"), "--out", d.parent / "o.geojson"],
    "tiles": lambda c, d: ["tiles", _i(c, "g.tif"), "--all", "--size", "16", "--csv", d.parent / "t.csv"],
    "normalize": lambda c, d: ["normalize", _i(c, "g.tif"), "--target", _i(c, "norm.json"), "--out", d.parent / "n.tif"],
    "save-normalizer": lambda c, d: ["normalize", _i(c, "g.tif"), "--target", _i(c, "target.png"), "--save-normalizer", d.parent / "n.json"],
    "train": lambda c, d: ["train", "--out", d.parent / "run", "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "1", "--threads", "1"],
    "demo": lambda c, d: ["demo", "--headless", "--no-nuclei", "--out", d.parent / "demo"],
}
for _name, _argv in _FULL.items():
    case(f"diskfull/{_name}")(_on_full(_argv))


# ----------------------------------------------------------------------------- Ctrl-C, umask


def _ctrl_c_after(seconds: float, argv: list[Any]) -> int:
    """Run a command and press Ctrl-C (SIGINT to this process) after ``seconds``."""
    import signal
    import threading

    pressed = threading.Event()

    def press() -> None:
        pressed.set()
        os.kill(os.getpid(), signal.SIGINT)

    timer = threading.Timer(seconds, press)
    timer.start()
    try:
        code = cli(*argv)
    finally:
        timer.cancel()
    return code if pressed.is_set() else -1  # -1: it finished before the key was pressed


def _expect_130(code: int) -> Any:
    if code == -1:
        return "finished before Ctrl-C"
    if code != 130:
        raise AssertionError(f"Ctrl-C ended with exit {code}, expected 130")
    return code


case("ctrlc/normalize", "either")(lambda c: _expect_130(_ctrl_c_after(4.0, ["normalize", _i(c, "s.svs"), "--target", _i(c, "norm.json"),
                                                                  "--out", c["out"] / "n.tif", "--tile-size", "128", "--compression", "zlib"])))
case("ctrlc/train", "either")(lambda c: _expect_130(_ctrl_c_after(8.0, ["train", "--out", c["out"] / "run", "--epochs", "2", "--steps-per-epoch", "200",
                                                              "--batch-size", "1", "--threads", "1"])))
case("ctrlc/nuclei", "either")(lambda c: _expect_130(_ctrl_c_after(5.0, ["nuclei", _i(c, "s.svs"), "--out", c["out"] / "l.tif", "--all-tiles"])))


@case("umask/outputs-follow-umask", "either")
def _(c):
    old = os.umask(0o027)
    try:
        code = cli("import", _i(c, "x.geojson"), "--slide", _i(c, "g.tif"), "--out", c["out"] / "o.tif")
        code2 = cli("tiles", _i(c, "g.tif"), "--csv", c["out"] / "t.csv")
    finally:
        os.umask(old)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (c["out"] / "o.tif", c["out"] / "t.csv")}
    if code or code2 or set(modes.values()) != {"0o640"}:
        raise AssertionError(f"exit {code}/{code2}, modes {modes} (umask 027 -> 0o640)")
    return "modes 0o640"


@case("registry/register-on-read-only-home")
def _(c):
    """Registering into a read-only registry folder (a read-only tmpfs) is one clear error."""
    import subprocess

    from napari_pathoseg.models.registry import get_card, register_model

    ro = c["out"] / "ro"
    ro.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)],
                                           capture_output=True).returncode:
        return "skipped: cannot mount"
    old = os.environ.get("PATHOSEG_HOME")
    os.environ["PATHOSEG_HOME"] = str(ro)
    try:
        return register_model(get_card("nuclei-lite").path, name="copy", task="nuclei")
    finally:
        os.environ["PATHOSEG_HOME"] = old or ""
        subprocess.run(["umount", str(ro)], capture_output=True)
