"""Fuzz / property suite (issue 11, "keep it so"): hostile bytes and values never escape as a traceback.

Every target is run on generated inputs (hypothesis, derandomised so CI is stable; the
slide and checkpoint harnesses mutate real files with seeded random bytes) and must either
work or raise a :class:`~napari_pathoseg.errors.PathosegError` (CLI: exit 2 with one stderr
line), within a time limit, without touching any file but its output. Budget: about 40 s in
all on a busy 2-core machine; each test's ``max_examples`` is set for that.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import signal
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from napari_pathoseg.errors import PathosegError

_BASE = settings(derandomize=True, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])


def fuzz(n: int) -> settings:
    """Derandomised settings with ``n`` examples."""
    return settings(_BASE, max_examples=n)
#: No single example may run longer than this (s): a hang is a failure.
LIMIT_S = 20.0


class Hang(Exception):
    """An example ran past LIMIT_S."""


@contextlib.contextmanager
def time_limit(seconds: float = LIMIT_S):
    def _alarm(signum, frame):
        raise Hang(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _works_or_project_error(fn, *args, **kwargs):
    """Run ``fn``; a PathosegError is a clean refusal, anything else propagates (the test fails)."""
    with time_limit():
        try:
            return fn(*args, **kwargs)
        except PathosegError:
            return None


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, he_image):
    """Small real inputs (pixels of the bundled sample): pyramid TIFF, PNG, JPEG, GeoJSON, normaliser, checkpoint."""
    from PIL import Image

    from napari_pathoseg.stain.normalizers import get_normalizer
    from napari_pathoseg.wsi.synth import write_pyramid_tiff

    d = tmp_path_factory.mktemp("fuzz-corpus")
    img = he_image[:256, :256]
    write_pyramid_tiff(d / "s.tif", img, levels=2, tile=128, mpp=0.5)
    Image.fromarray(img).save(d / "s.png")
    Image.fromarray(img).save(d / "s.jpg", quality=80)
    feats = [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[10, 10], [90, 12], [80, 70], [10, 10]]]},
              "properties": {"objectType": "detection", "classification": {"name": "Tumor", "color": [200, 0, 0]},
                             "measurements": {"area": 1.0}}}]
    (d / "x.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    norm = get_normalizer("macenko")
    norm.fit(img)
    norm.save(d / "norm.json")
    return d


# ----------------------------------------------------------------------------- slide opener


def _mutate(data: bytes, rng: np.random.Generator, mode: str) -> bytes:
    b = bytearray(data)
    if mode == "truncate":
        return bytes(b[: int(rng.integers(0, len(b)))])
    if mode == "flip":
        head = min(len(b), 4096) if rng.random() < 0.7 else len(b)  # headers and IFDs mostly
        for pos in rng.integers(0, head, int(rng.integers(1, 16))):
            b[pos] = int(rng.integers(0, 256))
        return bytes(b)
    # splice: a random block of bytes written over a random place
    pos = int(rng.integers(0, len(b)))
    n = int(rng.integers(1, 512))
    b[pos : pos + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    return bytes(b)


@fuzz(40)
@given(seed=st.integers(0, 2**32 - 1), source=st.sampled_from(["s.tif", "s.png", "s.jpg"]),
       mode=st.sampled_from(["flip", "truncate", "splice"]), suffix=st.sampled_from([None, ".svs", ".ome.tif"]))
def test_slide_opener_on_damaged_files(corpus, tmp_path, seed, source, mode, suffix):
    from napari_pathoseg.wsi.slide import open_slide

    rng = np.random.default_rng(seed)
    name = "f" + (suffix or Path(source).suffix)
    path = tmp_path / name
    path.write_bytes(_mutate((corpus / source).read_bytes(), rng, mode))

    def use():
        with open_slide(path) as s:
            for lv in range(s.level_count):
                r, c = s.pyramid[lv].shape[:2]
                s.read_region(level=lv, row=max(0, r - 8), col=max(0, c - 8), height=8, width=8)
            s.thumbnail(max_size=32)

    _works_or_project_error(use)


# ----------------------------------------------------------------------------- GeoJSON reader

_numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**30, 10**30), st.sampled_from([0, 1, 1e300, -1e300]))
_json = st.recursive(st.one_of(st.none(), st.booleans(), _numbers, st.text(max_size=8)),
                     lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                     max_leaves=12)
_point = st.lists(st.one_of(st.floats(-1e3, 1e3), _numbers), min_size=0, max_size=4)
_ring = st.lists(_point, min_size=0, max_size=8)
_geometry = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(["Polygon", "LineString", "MultiPoint"]), "coordinates": st.lists(_ring, max_size=3)}),
    st.fixed_dictionaries({"type": st.sampled_from(["Point"]), "coordinates": _point}),
    st.fixed_dictionaries({"type": st.sampled_from(["MultiPolygon"]), "coordinates": st.lists(st.lists(_ring, max_size=2), max_size=2)}),
    _json,
)
_props = st.one_of(_json, st.fixed_dictionaries({
    "objectType": st.one_of(st.sampled_from(["annotation", "detection", "cell", "tile", "root", "bogus"]), _json),
    "classification": st.one_of(st.text(max_size=5), st.fixed_dictionaries({"name": _json, "color": _json}), _json),
    "measurements": _json,
}))
_feature = st.fixed_dictionaries({"type": st.sampled_from(["Feature", "Feature", "Other"]), "geometry": _geometry, "properties": _props})


@fuzz(60)
@given(features=st.lists(_feature, max_size=4), form=st.sampled_from(["collection", "list", "single"]),
       with_slide=st.booleans())
def test_geojson_reader_on_generated_documents(tmp_path, features, form, with_slide):
    from napari_pathoseg.export.raster import rasterize
    from napari_pathoseg.export.reader import read_geojson

    doc = {"collection": {"type": "FeatureCollection", "features": features}, "list": features,
           "single": features[0] if features else {}}[form]
    p = tmp_path / "g.geojson"
    p.write_text(json.dumps(doc, allow_nan=True))
    meta = {"level_dimensions": [[200, 100]], "level_downsamples": [1.0]} if with_slide else None

    def use():
        objs = read_geojson(p, slide_metadata=meta)
        rasterize(objs, shape=(64, 64))

    _works_or_project_error(use)


@fuzz(40)
@given(seed=st.integers(0, 2**32 - 1), mode=st.sampled_from(["flip", "truncate", "splice"]))
def test_geojson_reader_on_damaged_bytes(corpus, tmp_path, seed, mode):
    from napari_pathoseg.export.napari_io import geojson_layer_data

    p = tmp_path / "g.geojson"
    p.write_bytes(_mutate((corpus / "x.geojson").read_bytes(), np.random.default_rng(seed), mode))
    _works_or_project_error(geojson_layer_data, p, find_slide=False)


# ----------------------------------------------------------------------------- checkpoint loader


@pytest.fixture(scope="module")
def m2_config():
    from napari_pathoseg.models.checkpoint import read_header
    from napari_pathoseg.models.registry import get_card

    return read_header(get_card("nuclei-lite").path)["config"]


_value = st.one_of(st.integers(-2**40, 2**40), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
                   st.none(), st.booleans(), st.lists(st.one_of(st.integers(-10, 10**7), st.floats(), st.text(max_size=3)), max_size=6),
                   st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))


@fuzz(60)
@given(changes=st.dictionaries(st.sampled_from(["widths", "decoder_widths", "tile_size", "mpp", "seg_channels", "disc_width",
                                                 "disc_layers", "f_int", "norm", "encoder", "preset", "lambda_seg", "extra", "surprise"]),
                               _value, min_size=1, max_size=3),
       dtype=st.sampled_from(["float32", "float16", "int8", "float64"]), nan=st.booleans())
def test_checkpoint_loader_on_crafted_configs(tmp_path, m2_config, changes, dtype, nan):
    import torch
    from safetensors.torch import save_file

    from napari_pathoseg.models.checkpoint import load_checkpoint

    config = dict(m2_config, **changes)
    t = torch.zeros(4, dtype=getattr(torch, dtype))
    if nan and t.is_floating_point():
        t[0] = float("nan")
    p = tmp_path / "c.safetensors"
    try:
        cfg_text = json.dumps(config, allow_nan=True)
    except (TypeError, ValueError):
        return
    save_file({"G_seg.w": t}, str(p), metadata={"format": "napari-pathoseg", "format_version": "1", "kind": "m2",
                                               "config": cfg_text, "meta": "{}"})
    with time_limit():
        try:
            load_checkpoint(p)
        except PathosegError:
            return
    # a config the schema accepted: building the network from it must be bounded too
    from napari_pathoseg.models.registry import load_model

    _works_or_project_error(load_model, p, task="nuclei", device="cpu")


@fuzz(15)
@given(seed=st.integers(0, 2**32 - 1), mode=st.sampled_from(["flip", "truncate", "splice"]))
def test_checkpoint_loader_on_damaged_bytes(tmp_path, seed, mode):
    from napari_pathoseg.models.checkpoint import load_checkpoint
    from napari_pathoseg.models.registry import get_card

    raw = Path(get_card("nuclei-lite").path).read_bytes()
    rng = np.random.default_rng(seed)
    if mode == "flip":  # the JSON header and the first tensors
        b = bytearray(raw)
        for pos in rng.integers(0, 20_000, int(rng.integers(1, 12))):
            b[pos] = int(rng.integers(0, 256))
        data = bytes(b)
    else:
        data = _mutate(raw, rng, mode)
    p = tmp_path / "c.safetensors"
    p.write_bytes(data)
    _works_or_project_error(load_checkpoint, p)


# ----------------------------------------------------------------------------- normaliser JSON


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


@fuzz(50)
@given(data=st.data())
def test_normaliser_json_mutations(corpus, tmp_path, he_image, data):
    from napari_pathoseg.stain.persistence import load_normalizer

    d = json.loads((corpus / "norm.json").read_text())
    paths = [p for p in _paths(d) if p]
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        node = d
        try:
            for k in path[:-1]:
                node = node[k]
            node[path[-1]] = data.draw(_value | _json)
        except (KeyError, IndexError, TypeError):
            pass
    p = tmp_path / "n.json"
    p.write_text(json.dumps(d, allow_nan=True))

    def use():
        norm = load_normalizer(p)
        out = norm.transform(he_image[:64, :64])
        assert out.shape == (64, 64, 3)

    _works_or_project_error(use)


# ----------------------------------------------------------------------------- CLI arguments

_TOKENS = ["nan", "inf", "-inf", "-1", "0", "1e-9", "1e309", "1e6", "abc", "", "3", "0.5", "1,2", "nan,nan",
           "1e12,1e12", "99", "-0", "0x10", "١", "5" * 40]
_TEMPLATES = {
    "info": ["info", "{slide}"],
    "tiles": ["tiles", "{slide}", "--csv", "{out}/t.csv", "--all"],
    "import": ["import", "{geojson}", "--slide", "{slide}", "--out", "{out}/o.tif"],
    "export": ["export", "{labels}", "--slide", "{slide}", "--out", "{out}/o.geojson", "--no-table"],
    "normalize": ["normalize", "{png}", "--target", "{norm}", "--save-normalizer", "{out}/n.json"],
}
_OPTIONS = {
    "info": [],
    "tiles": ["--mpp", "--level", "--size", "--overlap", "--min-tissue"],
    "import": ["--level"],
    "export": ["--level", "--origin", "--color", "--class", "--measure"],
    "normalize": ["--level", "--tile-size", "--quality", "--n-tiles", "--seed", "--method"],
}


@fuzz(60)
@given(data=st.data())
def test_cli_arguments(corpus, tmp_path, data, capsys):
    from napari_pathoseg.cli.main import main

    command = data.draw(st.sampled_from(sorted(_TEMPLATES)))
    labels = tmp_path / "in" / "lab.npy"
    if not labels.exists():
        labels.parent.mkdir()
        np.save(labels, np.pad(np.ones((40, 40), np.uint16), 20))
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    names = {"slide": corpus / "s.tif", "geojson": corpus / "x.geojson", "png": corpus / "s.png",
             "norm": corpus / "norm.json", "labels": labels, "out": out}
    argv = [a.format(**names) for a in _TEMPLATES[command]]
    for _ in range(data.draw(st.integers(0, 3))):
        if _OPTIONS[command]:
            argv += [data.draw(st.sampled_from(_OPTIONS[command])), data.draw(st.sampled_from(_TOKENS) | st.text(max_size=6))]
    if data.draw(st.booleans()):
        argv.append(data.draw(st.sampled_from(_TOKENS)))  # a stray positional
    before = _snapshot(corpus) | {f"in/{k}": v for k, v in _snapshot(tmp_path / "in").items()}
    capsys.readouterr()
    with time_limit():
        code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    err = [ln for ln in captured.err.splitlines() if ln.strip() and "warning" not in ln.lower()]
    assert code in (0, 2), (argv, code, captured.err)
    if code == 2:
        assert len(err) == 1 and "Traceback" not in captured.err, (argv, captured.err)
    after = _snapshot(corpus) | {f"in/{k}": v for k, v in _snapshot(tmp_path / "in").items()}
    assert after == before, f"{argv} changed an input"
    stray = [p for p in tmp_path.rglob("*") if p.is_file() and not (p.is_relative_to(out) or p.is_relative_to(tmp_path / "in"))]
    assert not stray, f"{argv} wrote outside its output: {stray}"
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp-pathoseg")], argv
