"""``pathoseg normalize``: the command line of stain normalisation (real slides, real stains)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from napari_pathoseg.errors import PathosegError
from napari_pathoseg.stain import get_normalizer, load_normalizer, write_normalized_tiff
from napari_pathoseg.wsi.slide import open_slide


@pytest.fixture(scope="module")
def reference(shared_data) -> np.ndarray:
    """A 512 x 512 crop of a MoNuSeg H&E image: the stain target."""
    from PIL import Image

    files = sorted((shared_data / "monuseg_train" / "images").glob("*.png"))
    if not files:
        pytest.skip("MoNuSeg images missing")
    with Image.open(files[0]) as im:
        return np.asarray(im.convert("RGB"))[:512, :512]


def test_cli_normalize(tmp_path, make_pyramid_tiff, he_image, reference, capsys):
    from PIL import Image

    from napari_pathoseg.cli.main import main

    slide = make_pyramid_tiff("slide.tif", he_image[:512, :512], levels=2, tile=256)
    ref = tmp_path / "ref.png"
    Image.fromarray(reference).save(ref)
    out, saved = tmp_path / "norm.tif", tmp_path / "ref.json"
    code = main(["normalize", str(slide), "--method", "macenko", "--target", str(ref), "--out", str(out),
                 "--save-normalizer", str(saved), "--tile-size", "256", "--n-tiles", "4"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["method"] == "macenko" and result["out"]["levels"] == [[512, 512]]
    assert out.exists() and load_normalizer(saved).name == "macenko"
    # reuse the saved normaliser
    out2 = tmp_path / "norm2.tif"
    assert main(["normalize", str(slide), "--target", str(saved), "--out", str(out2), "--tile-size", "256", "--n-tiles", "4"]) == 0
    capsys.readouterr()
    with open_slide(out) as a, open_slide(out2) as b:
        np.testing.assert_array_equal(a.read_region(level=0, row=0, col=0, height=512, width=512),
                                      b.read_region(level=0, row=0, col=0, height=512, width=512))
    # errors: exit code 2 with a message, no traceback
    assert main(["normalize", str(slide), "--target", str(saved), "--method", "reinhard", "--out", str(out2)]) == 2
    assert "drop --method" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["normalize", str(slide), "--target", str(bad), "--out", str(out2)]) == 2
    assert "invalid JSON" in capsys.readouterr().err
    assert main(["normalize", str(slide), "--target", str(ref)]) == 2
    assert "nothing to do" in capsys.readouterr().err


def test_cli_normalize_refuses_outputs_that_name_inputs(tmp_path, make_pyramid_tiff, he_image, reference, capsys):
    """``--save-normalizer s.tif`` used to turn the slide into a JSON file, ``--out`` equal to the
    slide or the ``--target`` replaced it with the normalised copy; now each is refused before
    any work, and the inputs are left byte for byte."""
    from napari_pathoseg.cli.main import main

    slide = make_pyramid_tiff("slide.tif", he_image[:256, :256], levels=1, tile=256)
    target = make_pyramid_tiff("target.tif", reference[:256, :256], levels=1, tile=256)
    before = {p: p.read_bytes() for p in (slide, target)}
    common = ["--tile-size", "256", "--n-tiles", "2"]
    cases = [
        (["--target", str(target), "--save-normalizer", str(slide)], "--save-normalizer .* is also an input"),
        (["--target", str(target), "--out", str(slide)], "--out .* is also an input"),
        (["--target", str(target), "--out", str(target)], "--out .* is also an input"),
        (["--target", str(target), "--out", str(tmp_path / "o.tif"), "--save-normalizer", str(tmp_path / "o.tif")], "both name"),
    ]
    for extra, message in cases:
        assert main(["normalize", str(slide), *extra, *common]) == 2, extra
        err = capsys.readouterr().err
        assert re.search(message, err) and "Traceback" not in err, (extra, err)
    assert {p: p.read_bytes() for p in (slide, target)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slide.tif", "target.tif"]
    # the library refuses too (the Stain dock writes through it)
    norm = get_normalizer("macenko").fit(reference)
    with open_slide(slide) as s, pytest.raises(PathosegError, match="also an input"):
        write_normalized_tiff(s, norm, slide, source=norm.target)
    assert slide.read_bytes() == before[slide]


def test_cli_normalize_ctrl_c_stops_the_write_and_leaves_nothing(tmp_path, make_pyramid_tiff, he_image, reference, capsys, monkeypatch):
    """The first Ctrl-C (a real SIGINT, sent once the first tile is written) stops the TIFF
    write at the next tile: exit 130, one line saying the normaliser was kept, no TIFF left."""
    import signal

    import napari_pathoseg.stain.slide as stain_slide
    from napari_pathoseg.cli.main import main

    slide = make_pyramid_tiff("slide.tif", he_image[:512, :512], levels=1, tile=256)
    target = make_pyramid_tiff("target.tif", reference[:512, :512], levels=1, tile=256)
    real = stain_slide.write_tiled_pyramid
    tiles = []

    def write_and_press_ctrl_c(*args, progress=None, **kwargs):
        def progress_then_sigint(p):
            tiles.append(p.done)
            if p.done == 1:
                signal.raise_signal(signal.SIGINT)
            progress(p)

        return real(*args, progress=progress_then_sigint, **kwargs)

    monkeypatch.setattr(stain_slide, "write_tiled_pyramid", write_and_press_ctrl_c)
    out, saved = tmp_path / "o.tif", tmp_path / "n.json"
    code = main(["normalize", str(slide), "--target", str(target), "--out", str(out), "--save-normalizer", str(saved),
                 "--tile-size", "128", "--n-tiles", "2", "--compression", "zlib"])
    err = capsys.readouterr().err.strip()
    assert code == 130 and tiles == [1], (code, tiles, err)
    assert len(err.splitlines()) == 1 and "cancelled" in err and str(saved) in err, err
    assert not out.exists() and load_normalizer(saved).name == "macenko"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n.json", "slide.tif", "target.tif"]
