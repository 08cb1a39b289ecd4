"""Issue 11 defects, one test each: hostile slides, GeoJSON, outputs, arguments (see docs/reliability.md)."""

from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from napari_pathoseg._atomic import OutputError, check_output, file_kind
from napari_pathoseg.cli.main import main
from napari_pathoseg.errors import GeoJSONError, PathosegError, SlideError


def _png_claiming(path: Path, width: int, height: int) -> Path:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


def _one_error_line(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


# ----------------------------------------------------------------------------- slides


@pytest.mark.parametrize("side", [100_000, 60_000])
def test_png_claiming_huge_size_is_refused_with_its_size(tmp_path, side):
    from napari_pathoseg.wsi.slide import open_slide

    with pytest.raises(SlideError, match=f"{side} x {side}"):
        open_slide(_png_claiming(tmp_path / "big.png", side, side))


def test_cmyk_tiff_is_converted_not_read_as_alpha(tmp_path):
    import tifffile

    from napari_pathoseg.wsi.slide import open_slide

    cmyk = np.zeros((32, 32, 4), np.uint8)
    cmyk[..., 0] = 200  # cyan ink
    cmyk[16:, :, 3] = 255  # black ink below
    tifffile.imwrite(tmp_path / "c.tif", cmyk, photometric="separated")
    with open_slide(tmp_path / "c.tif") as s:
        img = s.read_region(level=0, row=0, col=0, height=32, width=32)
    assert np.allclose(img[0, 0], (55, 255, 255), atol=2)
    assert img[20, 0].max() <= 1


def test_extra_channel_of_unknown_meaning_is_refused(tmp_path):
    import tifffile

    from napari_pathoseg.wsi.slide import open_slide

    tifffile.imwrite(tmp_path / "f.tif", np.full((32, 32, 4), 90, np.uint8), photometric="rgb", extrasamples=[0])
    with pytest.raises(SlideError, match="not marked as alpha"):
        open_slide(tmp_path / "f.tif")


def test_truncated_pyramid_is_refused_at_open(make_pyramid_tiff, tmp_path, he_image):
    from napari_pathoseg.wsi.slide import open_slide

    path = make_pyramid_tiff("p.tif", he_image, levels=3, tile=256)
    raw = path.read_bytes()
    bad = tmp_path / "cut.tif"
    bad.write_bytes(raw[: int(len(raw) * 0.6)])
    with pytest.raises(SlideError):
        with open_slide(bad) as s:
            for lv in range(s.level_count):
                np.asarray(s.pyramid[lv].compute())


def test_read_region_coordinates_are_checked(make_pyramid_tiff, he_image):
    from napari_pathoseg.wsi.slide import open_slide

    with open_slide(make_pyramid_tiff("p.tif", he_image[:512, :512], levels=2)) as s:
        ref = s.read_region(level=0, row=250, col=250, height=100, width=100)
        u8 = s.read_region(level=0, row=np.uint8(250), col=np.uint8(250), height=np.uint8(100), width=np.uint8(100))
        assert np.array_equal(u8, ref)  # uint8 sums would have wrapped past 255
        with pytest.raises(SlideError, match="whole number"):
            s.read_region(level=0, row=1.5, col=0, height=8, width=8)
        with pytest.raises(SlideError, match="too large"):
            s.read_region(level=0, row=0, col=0, height=10**6, width=10**6)


def test_from_array_refuses_empty():
    from napari_pathoseg.wsi.slide import Slide

    with pytest.raises(SlideError, match="1 x 1"):
        Slide.from_array(np.zeros((0, 0, 3), np.uint8))


# ----------------------------------------------------------------------------- GeoJSON


def _polygon(n: int, cx: float, cy: float, r: float) -> list:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    pts = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1).round(3).tolist()
    return pts + [pts[0]]


def _fc(coords, kind="Polygon") -> str:
    return json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": kind, "coordinates": coords}, "properties": {"objectType": "annotation"}}]})


HOSTILE_GEOJSON = {
    "deep": "[" * 50_000 + "]" * 50_000,
    "digits": '[{"type": "Feature", "geometry": {"type": "Point", "coordinates": [' + "9" * 5000 + ", 1]}}]",
    "far": _fc([[[0, 0], [1e300, 0], [1e300, 1e300], [0, 0]]]),
    "hugeint": _fc([[[0, 0], [10**40, 0], [10, 10], [0, 0]]]),
    "nan": _fc([[[0, 0], [float("nan"), 0], [10, 10], [0, 0]]]),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_GEOJSON) + ["latin1"])
def test_hostile_geojson_is_a_geojson_error(tmp_path, name):
    from napari_pathoseg.export.reader import read_geojson

    p = tmp_path / f"{name}.geojson"
    if name == "latin1":
        p.write_bytes(_fc([_polygon(8, 50, 50, 20)]).encode()[:-2] + b', "name": "\xe9t\xe9"}]}')
    else:
        p.write_text(HOSTILE_GEOJSON[name])
    with pytest.raises(GeoJSONError):
        read_geojson(p)


def test_geojson_3d_coordinates_are_read_as_2d(tmp_path):
    from napari_pathoseg.export.napari_io import geojson_layer_data
    from napari_pathoseg.export.reader import read_geojson

    p = tmp_path / "z.geojson"
    p.write_text(_fc([[[0, 0, 1], [100, 0, 1], [100, 100, 1], [0, 0, 1]]]))
    (obj,) = read_geojson(p)
    assert not obj.geometry.has_z and obj.geometry.area == 5000
    assert geojson_layer_data(p, find_slide=False)


def test_polygon_of_many_vertices_rasterises_in_linear_time():
    import shapely
    from skimage.draw import polygon as draw_polygon

    from napari_pathoseg.export.raster import rasterize

    t0 = time.perf_counter()
    big = shapely.Polygon(_polygon(200_000, 500, 500, 400))
    lab = rasterize([big], shape=(1000, 1000))
    assert time.perf_counter() - t0 < 10  # skimage.draw.polygon: minutes (vertices x pixels)
    assert abs(lab.sum() - np.pi * 400**2) < 0.001 * np.pi * 400**2
    # small polygons: the same pixels as skimage.draw.polygon, holes kept
    ring = np.array([[3.2, 4.0], [30.0, 6.5], [27.0, 33.0], [8.0, 25.0], [3.2, 4.0]])
    hole = np.array([[12.0, 12.0], [20.0, 12.0], [20.0, 20.0], [12.0, 12.0]])
    poly = shapely.Polygon(ring[:, ::-1] + 0.5, holes=[hole[:, ::-1] + 0.5])
    got = rasterize([poly], shape=(40, 40)) > 0
    want = np.zeros((40, 40), bool)
    want[draw_polygon(ring[:, 0], ring[:, 1], shape=want.shape)] = True
    want[draw_polygon(hole[:, 0], hole[:, 1], shape=want.shape)] = False
    assert np.array_equal(got, want)


# ----------------------------------------------------------------------------- outputs


def test_check_output_refuses_a_file_of_another_kind(tmp_path, sample_svs):
    csv = tmp_path / "a.csv"
    csv.write_text("x,y\n1,2\n")
    assert check_output(csv, kind="csv") == csv  # an earlier table may be replaced
    png = tmp_path / "a.geojson"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 32)
    with pytest.raises(OutputError, match="PNG file"):
        check_output(png, kind="json")
    with pytest.raises(OutputError, match="slide"):
        check_output(sample_svs, kind="tiff")
    assert file_kind(sample_svs) == "tiff"


def test_cli_refuses_to_overwrite_other_kinds(tmp_path, make_pyramid_tiff, he_image, capsys):
    slide = make_pyramid_tiff("s.tif", he_image[:256, :256], levels=1)
    victim = tmp_path / "victim.tif"
    victim.write_bytes(slide.read_bytes())
    assert main(["tiles", str(slide), "--csv", str(victim)]) == 2
    assert "not an earlier CSV output" in _one_error_line(capsys)
    assert victim.read_bytes() == slide.read_bytes()


@pytest.mark.parametrize("argv, expect", [
    (["tiles", "{slide}", "--mpp", "1e-6"], "--mpp"),
    (["tiles", "{slide}", "--mpp", "0.02"], "finer than"),
    (["tiles", "{slide}", "--size", "1000000000"], "--size"),
    (["nuclei", "{slide}", "--out", "{tmp}/l.tif", "--mpp", "1e-4"], "--mpp"),
    (["export", "{tmp}/obj.npy", "--slide", "{slide}", "--out", "{tmp}/o.geojson"], "obj.npy"),
    (["export", "{tmp}/lab.npy", "--slide", "{slide}", "--out", "{tmp}/o.geojson", "--probability", "{tmp}/obj.npy"], "probability"),
    (["demo", "--headless", "--out", "{slide}"], "is a file"),
    (["normalize", "{slide}", "--target", "{tmp}/deep.json", "--out", "{tmp}/n.tif"], "nested"),
])
def test_cli_absurd_values_are_one_line(tmp_path, make_pyramid_tiff, he_image, capsys, argv, expect):
    slide = make_pyramid_tiff("s.tif", he_image[:256, :256], levels=1)
    np.save(tmp_path / "obj.npy", np.array([[object()] * 4] * 4, dtype=object), allow_pickle=True)
    np.save(tmp_path / "lab.npy", np.ones((256, 256), np.uint16))
    (tmp_path / "deep.json").write_text('{"format": ' + "[" * 50_000 + "]" * 50_000 + "}")
    before = slide.read_bytes()
    args = [a.format(slide=slide, tmp=tmp_path) for a in argv]
    assert main(args) == 2
    assert expect in _one_error_line(capsys)
    assert slide.read_bytes() == before


def test_hostile_probe_script_cases_are_all_listed():
    """The committed probe (scripts/hostile_inputs.py) covers every group of the issue."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    try:
        from hostile_cases import CASES
    finally:
        sys.path.pop(0)
    groups = {name.split("/")[0] for name, _, _ in CASES}
    assert {"same", "kind", "run", "folder", "args", "slide", "geojson", "checkpoint", "registry", "diskfull"} <= groups
    assert len(CASES) > 100
    assert all(expect in ("refuse", "either") for _, expect, _ in CASES)
    assert issubclass(GeoJSONError, PathosegError)


@pytest.mark.parametrize("command", ["lesion", "tissue"])
def test_lesion_and_tissue_follow_the_output_rule(command, sample_svs, tmp_path, capsys):
    """One rule for every command: a missing output folder and a file of another kind are refused
    before any work (lesion and tissue used to create the folder and replace any file)."""
    from napari_pathoseg.cli.main import main

    assert main([command, str(sample_svs), "--out", str(tmp_path / "nodir" / "x.tif")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "nodir").exists()
    notes = tmp_path / "notes.tif"
    notes.write_text("a user's notes, not a TIFF")
    assert main([command, str(sample_svs), "--out", str(notes)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not replaced" in err[0]
    assert notes.read_text() == "a user's notes, not a TIFF"
