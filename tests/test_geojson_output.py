"""What an export may write: the table beside it, atomic outputs, cancellation through a token."""

from __future__ import annotations

import numpy as np
import pytest

from napari_pathoseg._atomic import TMP_SUFFIX, OutputError
from napari_pathoseg.errors import CancelledError
from napari_pathoseg.events import CancelToken
from napari_pathoseg.export import ExportError, iter_export_labels, run_export_labels, run_export_shapes, write_labels_tiff
from napari_pathoseg.export._output import ExportOutputError, is_export_table
from napari_pathoseg.export.geojson import iter_export_shapes

NUCLEI_TABLE = "id,x,y,area_um2,confidence\n1,1251.03,1654.74,55.5,0.8163\n"  # as `pathoseg nuclei --table` writes it
SQUARE = np.array([[0, 0], [0, 10], [10, 10], [10, 0]], float)


@pytest.fixture
def lab():
    lab = np.zeros((40, 40), np.int32)
    lab[2:8, 2:9] = 1
    lab[15:25, 12:20] = 2
    return lab


def test_the_implied_table_never_replaces_a_file_the_export_did_not_write(tmp_path, lab):
    (tmp_path / "a.csv").write_text(NUCLEI_TABLE, encoding="utf-8")
    (tmp_path / "s.csv").write_text("my notes\n", encoding="utf-8")
    with pytest.raises(ExportOutputError, match="a.csv exists and is not a measurement table") as info:
        run_export_labels(tmp_path / "a.geojson", lab, measure=["area"])
    assert isinstance(info.value, ExportError) and isinstance(info.value, OutputError)
    with pytest.raises(ExportOutputError, match="s.csv exists"):
        run_export_shapes(tmp_path / "s.geojson", [SQUARE])
    assert (tmp_path / "a.csv").read_text(encoding="utf-8") == NUCLEI_TABLE
    assert (tmp_path / "s.csv").read_text(encoding="utf-8") == "my notes\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "s.csv"]
    # nothing measured: no table, so nothing to refuse; asked for by path: written as asked
    assert run_export_labels(tmp_path / "a.geojson", lab, measure=[]).measurements_path is None
    res = run_export_labels(tmp_path / "a.geojson", lab, measure=["area"], measurements_path=tmp_path / "a.csv")
    assert res.measurements_path == tmp_path / "a.csv" and is_export_table(tmp_path / "a.csv")


def test_a_table_an_export_wrote_is_replaced_and_recognised(tmp_path, lab):
    first = run_export_labels(tmp_path / "b.geojson", lab, measure=["area"]).measurements_path
    assert is_export_table(first)
    second = run_export_labels(tmp_path / "b.geojson", lab, measure=["area", "perimeter"]).measurements_path
    assert second == first and first.read_text(encoding="utf-8").splitlines()[0].endswith("Area px^2,Perimeter px")
    assert is_export_table(run_export_shapes(tmp_path / "c.geojson", [SQUARE]).measurements_path)
    (tmp_path / "n.csv").write_text(NUCLEI_TABLE, encoding="utf-8")
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00garbage")
    assert not is_export_table(tmp_path / "n.csv") and not is_export_table(tmp_path / "bin.csv")
    assert not is_export_table(tmp_path / "missing.csv")


def test_the_table_cannot_be_the_geojson(tmp_path, lab):
    with pytest.raises(ExportOutputError, match="would replace the GeoJSON"):
        run_export_labels(tmp_path / "x.csv", lab, measure=["area"])  # OUT.csv beside OUT.csv
    with pytest.raises(ExportOutputError, match="would replace the GeoJSON"):
        run_export_shapes(tmp_path / "y.geojson", [SQUARE], measurements_path=tmp_path / "y.geojson")
    assert list(tmp_path.iterdir()) == []


def test_a_cancel_token_stops_the_export_and_keeps_nothing(tmp_path):
    rng = np.random.default_rng(0)
    lab = (rng.random((256, 256)) > 0.7).astype(np.int32) * np.arange(256 * 256).reshape(256, 256)
    token = CancelToken()
    gen = iter_export_labels(tmp_path / "big.geojson", lab, chunk_size=32, measure=["area"], cancel=token)
    events = [next(gen), next(gen), next(gen)]
    assert events[-1].done > 0
    assert len(list(tmp_path.glob(f"*{TMP_SUFFIX}"))) == 2  # the GeoJSON and the table, both temporary
    token.set()
    with pytest.raises(CancelledError, match="no file was written"):
        list(gen)
    assert list(tmp_path.iterdir()) == []
    squares = [SQUARE + k for k in range(2500)]
    with pytest.raises(CancelledError):
        list(iter_export_shapes(tmp_path / "s.geojson", squares, cancel=token))
    assert list(tmp_path.iterdir()) == []


def test_label_tiff_goes_through_the_atomic_writer(tmp_path):
    import shapely
    import tifffile

    with pytest.raises(ExportOutputError, match="does not exist"):
        write_labels_tiff(tmp_path / "no_such" / "l.tif", [shapely.box(0, 0, 5, 5)], shape=(32, 32), tile=16)
    out = write_labels_tiff(tmp_path / "l.tif", [shapely.box(0, 0, 5, 5)], shape=(32, 32), tile=16)
    assert (tifffile.imread(out) == 1).sum() == 25 and [p.name for p in tmp_path.iterdir()] == ["l.tif"]
