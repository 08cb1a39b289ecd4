"""Kill test (issue 11): SIGKILL a writer at random points; no half-written final file, no input changed.

A child process writes the same output again and again through :mod:`napari_pathoseg._atomic`
(a tiled, compressed label TIFF from a real label image, the way ``pathoseg import`` and
``pathoseg nuclei`` write theirs); the test kills it at seeded random moments. After every kill
the destination is either absent (killed before the first rename) or byte-identical to a
complete write, the input is unchanged, and the temporary files a kill leaves behind are
removed by the next write of the same output.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    import tifffile
    from napari_pathoseg._atomic import atomic_path

    src, out = sys.argv[1], sys.argv[2]
    labels = np.load(src)
    print("ready", flush=True)
    for k in range(1000):
        with atomic_path(out) as tmp:
            with tifffile.TiffWriter(tmp) as tw:
                tw.write(labels, tile=(256, 256), compression="zlib")
        print("done", k, flush=True)
    """
)


def _sha(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


@pytest.fixture
def labels_file(tmp_path, shared_data):
    """A real instance mask (MoNuSeg), tiled up to 2000 x 2000 so one write takes a while."""
    from PIL import Image

    mon = shared_data / "monuseg_train"
    mask = next(iter(sorted((mon / "instance_masks").glob("*.png"))))
    lab = np.asarray(Image.open(mask)).astype(np.uint32)
    big = np.tile(lab, (2, 2))
    path = tmp_path / "in" / "labels.npy"
    path.parent.mkdir()
    np.save(path, big)
    return path


def _reference(labels_file: Path, tmp_path: Path) -> str:
    import tifffile

    ref = tmp_path / "ref.tif"
    with tifffile.TiffWriter(ref) as tw:
        tw.write(np.load(labels_file), tile=(256, 256), compression="zlib")
    return _sha(ref)


def test_sigkill_during_atomic_writes(tmp_path, labels_file):
    import tifffile

    from napari_pathoseg._atomic import TMP_SUFFIX, write_bytes

    want = _reference(labels_file, tmp_path)
    src_sha = _sha(labels_file)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "labels.tif"
    rng = np.random.default_rng(11)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    kills, complete_seen = 0, 0
    for delay in rng.uniform(0.0, 1.2, size=6):
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(labels_file), str(out)],
                                stdout=subprocess.PIPE, text=True, env=env)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(float(delay))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        kills += 1
        if out.exists():  # a rename happened at some point: the file is whole
            assert _sha(out) == want
            with tifffile.TiffFile(out) as tf:
                assert tf.pages[0].shape == np.load(labels_file, mmap_mode="r").shape
            complete_seen += 1
        assert _sha(labels_file) == src_sha
        assert sorted(p.name for p in out_dir.iterdir() if not p.name.endswith(TMP_SUFFIX)) in ([], ["labels.tif"])
    assert kills == 6
    # temporary files left by the kills go away on the next write of the same output
    for p in out_dir.glob(f"*{TMP_SUFFIX}"):
        os.utime(p, (time.time() - 3600, time.time() - 3600))
    write_bytes(out, b"replaced")
    assert not list(out_dir.glob(f"*{TMP_SUFFIX}"))
    assert out.read_bytes() == b"replaced"


@pytest.mark.slow
def test_sigkill_of_pathoseg_import_keeps_the_earlier_output(tmp_path, make_pyramid_tiff, he_image):
    """The real command: killed mid-run, the earlier output stays whole and the inputs unchanged."""
    import json

    slide = make_pyramid_tiff("s.tif", he_image, levels=2)
    t = np.linspace(0, 2 * np.pi, 200_000, endpoint=False)
    ring = np.stack([500 + 400 * np.cos(t), 500 + 400 * np.sin(t)], 1).round(2).tolist()
    gj = tmp_path / "x.geojson"
    gj.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring + [ring[0]]]}, "properties": {}}]}))
    out = tmp_path / "out" / "o.tif"
    out.parent.mkdir()
    argv = [sys.executable, "-m", "napari_pathoseg.cli.main", "import", str(gj), "--slide", str(slide), "--out", str(out)]
    assert subprocess.run(argv, capture_output=True, timeout=300).returncode == 0
    first = _sha(out)
    inputs = {p: _sha(p) for p in (slide, gj)}
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(float(np.random.default_rng(3).uniform(1.0, 4.0)))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert _sha(out) == first
    assert {p: _sha(p) for p in inputs} == inputs
