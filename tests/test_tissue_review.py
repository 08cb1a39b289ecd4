"""Review of M5's pseudo masks: export -> Review dock (accept, reject, correct) -> stage 2 on the reviewed ones."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from napari_pathoseg.methods.tissue.data import TissueData, TissueImage, load_rgb
from napari_pathoseg.methods.tissue.network import get_preset

WSSS = "wsss4luad_tissue_masks"
CLASSES = ["tumour epithelium", "stroma", "normal"]
KW = {"epochs1": 1, "steps1": 1, "epochs2": 1, "steps2": 1, "threads": 1}


def _patches(shared_data, names, *, masks, size=80):
    """Real WSSS4LUAD patches cropped to ``size`` px, labels from their cropped masks."""
    from skimage.io import imread

    out = []
    for n in names:
        img = load_rgb(shared_data / WSSS / "images" / f"{n}.png")[:size, :size]
        m = np.asarray(imread(str(shared_data / WSSS / "masks" / f"{n}.png")))[:size, :size].astype(np.uint8)
        vec = tuple(int((m == c).any()) for c in (1, 2, 3))
        out.append(TissueImage(n, img, vec if any(vec) else (0, 1, 0), m if masks else None))
    return out


@pytest.fixture(scope="module")
def m5_run(shared_data, tmp_path_factory):
    """A 1-step M5 run (stage 1, pseudo masks, stage 2) on three cropped WSSS4LUAD patches."""
    import torch

    from napari_pathoseg.events import run_to_end
    from napari_pathoseg.methods.tissue.pipeline import M5Done, iter_m5

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = get_preset("tissue-lite", widths=[4, 8, 8, 8, 8, 8, 8], ppm_channels=4, tile_size=64, batch1=2,
                         batch2=2)
        data = TissueData(CLASSES, _patches(shared_data, ["test_00", "test_05", "test_01"], masks=False),
                          _patches(shared_data, ["test_06"], masks=True), [], source="wsss4luad (cropped)")
        run = tmp_path_factory.mktemp("m5") / "run"
        done = run_to_end(iter_m5(cfg, data, out_dir=run, **KW), M5Done)
        assert not done.cancelled
        yield cfg, data, run
    finally:
        torch.set_num_threads(n)


def test_export_review_in_dock_then_stage2_on_reviewed(m5_run, tmp_path, make_napari_viewer, qtbot, sync_jobs):
    from napari_pathoseg._widgets.review import ReviewWidget
    from napari_pathoseg.events import run_to_end
    from napari_pathoseg.methods.tissue.pipeline import M5Done, iter_m5
    from napari_pathoseg.methods.tissue.review import (
        ExportDone,
        ExportEvent,
        iter_export_review,
        review_summary,
        reviewed_training,
    )
    from napari_pathoseg.review.store import ReviewProject

    cfg, data, run = m5_run
    events = list(iter_export_review(run, data, tmp_path / "proj"))
    assert [e.name for e in events if isinstance(e, ExportEvent)] == [t.name for t in data.train]
    done = events[-1]
    assert isinstance(done, ExportDone) and done.tiles == 3 and not done.cancelled
    proj = ReviewProject.open(done.project)
    assert proj.info.kind == "tissue" and proj.info.classes == CLASSES
    pseudo = {t.name: np.asarray(Image.open(run / "pseudo" / f"{t.name}.png"))
              for t in data.train}
    for rec in proj.tiles():
        np.testing.assert_array_equal(proj.read_mask(rec.tile_id), pseudo[rec.source_name])
        assert 0.0 <= rec.score <= 1.0 and rec.status == "pending"

    # the Review dock: least confident first, class colours and names, split / merge off
    viewer = make_napari_viewer()
    w = ReviewWidget(viewer)
    qtbot.addWidget(w)
    w.save_delay_ms = 10_000  # saved by flush() below, not by the timer
    assert w.open_project(done.project) is not None and w.is_tissue
    order = w.visible_tiles()
    scores = [proj.record(t).score for t in order]
    assert len(order) == 3 and scores == sorted(scores)
    assert w.table.horizontalHeaderItem(2).text() == "classes"
    w.table.selectRow(0)
    assert w.current_tile == order[0]
    layer = viewer.layers["review mask"]
    assert list(layer.features["class"]) == ["no label", *CLASSES]
    assert not w.split_btn.isEnabled() and not w.merge_btn.isEnabled() and w.accept_btn.isEnabled()
    assert w.split_selected(1) == [] and w.merge_selected([1, 2]) is None
    w.set_current_state("accepted")  # -> the next pending tile is shown
    assert w.current_tile == order[1]
    w.set_current_state("rejected")
    assert w.current_tile == order[2]
    # correct the third with the label tools: paint its top-left corner as class 3 (normal)
    edited = np.asarray(layer.data).copy()
    edited[:20, :20] = 3
    layer.data = edited
    w.flush()
    again = ReviewProject.open(done.project)
    assert [again.record(t).status for t in order] == ["accepted", "rejected", "corrected"]
    np.testing.assert_array_equal(again.read_mask(order[2]), edited)
    assert review_summary(again) == {"pending": 0, "accepted": 1, "corrected": 1, "rejected": 1, "total": 3}
    assert "corrected 1" in w.counts_label.text()

    # stage 2 reads exactly the accepted and corrected masks
    items, summary = reviewed_training(done.project, CLASSES)
    names = {t: again.record(t).source_name for t in order}
    assert [t.name for t in items] == sorted([names[order[0]], names[order[2]]])
    by_name = {t.name: t for t in items}
    np.testing.assert_array_equal(by_name[names[order[2]]].mask, edited)
    np.testing.assert_array_equal(by_name[names[order[0]]].mask, pseudo[names[order[0]]])
    res = run_to_end(iter_m5(cfg, data, out_dir=tmp_path / "reviewed", reviewed=done.project, **KW), M5Done)
    assert res.best_checkpoint.is_file() and res.stage1["used"] == summary["used"]
    from napari_pathoseg.models.checkpoint import load_checkpoint

    _, _, meta = load_checkpoint(res.best_checkpoint, expected_kind="m5")
    assert meta["train"] == summary["used"] and "reviewed pseudo masks" in meta["masks"]


def test_bad_review_folders_one_line(m5_run, tmp_path, capsys):
    from napari_pathoseg.cli.main import main
    from napari_pathoseg.errors import PathosegError
    from napari_pathoseg.methods.tissue.review import reviewed_training
    from napari_pathoseg.review.store import ReviewProject

    assert main(["tissue-train", "--reviewed", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a folder" in err[0] and "Traceback" not in err[0]
    # a nuclei project is refused for stage 2, an empty review says what to do
    ReviewProject.create(tmp_path / "nuc", source=tmp_path, source_kind="folder", model="m", tile_size=4, mpp=None)
    assert main(["tissue-train", "--reviewed", str(tmp_path / "nuc"), "--out", str(tmp_path / "o")]) == 2
    assert "nuclei review project" in capsys.readouterr().err
    t = ReviewProject.create(tmp_path / "t", source=tmp_path, source_kind="folder", model="m", tile_size=8,
                             mpp=1.0, kind="tissue", classes=CLASSES)
    rec = t.add_class_tile(np.zeros((8, 8, 3), np.uint8), np.ones((8, 8), np.uint8), score=0.5, name="p")
    with pytest.raises(PathosegError, match="no accepted or corrected"):
        reviewed_training(tmp_path / "t", CLASSES)
    t.set_state(rec.tile_id, "accepted")
    with pytest.raises(PathosegError, match="tissue-train --reviewed"):  # not a nuclei training set
        list(t.accepted_training_items())
    with pytest.raises(PathosegError, match="classes"):
        reviewed_training(tmp_path / "t", ["a", "b", "c"])
    with pytest.raises(PathosegError, match=r"use 0 \(no label\) to 3"):
        t.save_mask(rec.tile_id, np.full((8, 8), 4))
    # export: a folder that is not a run, and a project folder inside the run
    assert main(["tissue-review-export", str(tmp_path), "--out", str(tmp_path / "p")]) == 2
    assert "no stage-1 best checkpoint" in capsys.readouterr().err
    _, data, run = m5_run
    from napari_pathoseg.methods.tissue.review import iter_export_review

    with pytest.raises(PathosegError, match="inside the run folder"):
        list(iter_export_review(run, data, run / "proj"))
