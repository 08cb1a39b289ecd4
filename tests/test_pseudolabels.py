"""Tests of pseudo-label generation, scoring and the review project."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.color import rgb2hed
from skimage.filters import threshold_otsu
from skimage.measure import label as cc_label
from skimage.morphology import remove_small_objects

from napari_pathoseg.errors import CancelledError, PathosegError
from napari_pathoseg.review.project import (
    GenerationDone,
    GenerationProgress,
    ReviewProject,
    ReviewProjectError,
    generate_pseudolabels,
    merge_nuclei,
    nucleus_confidences,
    run_pseudolabels,
    split_nucleus,
    tile_score,
)


class OtsuTeacher:
    """A tiny real predictor: Otsu threshold on the haematoxylin channel."""

    mpp = 0.5
    tile_size = 64

    def __init__(self):
        self.calls = 0

    def predict(self, batch):
        self.calls += 1
        batch = np.asarray(batch)
        probs = []
        for img in batch:
            h = rgb2hed(img)[..., 0]
            t = threshold_otsu(h) if np.ptp(h) > 0 else h.mean()
            s = h.std() + 1e-6
            probs.append(1.0 / (1.0 + np.exp(-(h - t) / (0.25 * s))))
        return {"prob": np.stack(probs).astype(np.float32), "normalized": (255 - batch).astype(np.uint8)}

    def to_instances(self, prob):
        fg = remove_small_objects(prob > 0.5, max_size=8)
        return cc_label(fg).astype(np.int32)


def _synthetic_he(rng, shape=(150, 130), n=12):
    """Pink background with dark purple discs (nuclei)."""
    img = np.empty(shape + (3,), np.uint8)
    img[...] = (235, 190, 215)
    rr, cc = np.mgrid[: shape[0], : shape[1]]
    for _ in range(n):
        r, c = rng.integers(6, shape[0] - 6), rng.integers(6, shape[1] - 6)
        rad = rng.integers(3, 6)
        img[(rr - r) ** 2 + (cc - c) ** 2 <= rad**2] = (90, 40, 140)
    noise = rng.integers(-8, 9, size=img.shape)
    return np.clip(img.astype(int) + noise, 0, 255).astype(np.uint8)


@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "tiles"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(_synthetic_he(rng)).save(folder / f"img{i}.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture
def project(tmp_path, image_folder):
    teacher = OtsuTeacher()
    return run_pseudolabels(
        image_folder, tmp_path / "proj", predict=teacher.predict, to_instances=teacher.to_instances,
        model_name="otsu", tile_size=64, batch_size=3,
    )


def test_scores_follow_m2_definition():
    prob = np.array([[0.0, 1.0], [0.5, 0.9]], np.float32)
    assert tile_score(prob) == pytest.approx((1 + 1 + 0.5 + 0.9) / 4)
    labels = np.array([[1, 1], [0, 2]])
    assert nucleus_confidences(prob, labels) == pytest.approx([1.0, 0.9])
    assert nucleus_confidences(prob, np.zeros((2, 2), int)) == []


def test_generate_from_folder_stores_every_tile(project, image_folder, tmp_path):
    # 150x130 images -> 3x3 tiles of 64 (edges padded white), 2 images -> 18 tiles
    assert len(project) == 18
    recs = project.tiles()
    assert [r.score for r in recs] == sorted((r.score for r in recs), reverse=True)
    first = project.tiles(sort_by="tile_id", descending=False)[0]
    assert (first.x, first.y, first.source_name) == (0, 0, "img0.png")
    img = project.read_image(first.tile_id)
    src = np.asarray(Image.open(image_folder / "img0.png"))
    np.testing.assert_array_equal(img, src[:64, :64])
    mask = project.read_mask(first.tile_id)
    assert mask.dtype == np.uint16 and mask.max() == first.n_nuclei == len(first.confidences)
    np.testing.assert_array_equal(project.read_normalized(first.tile_id), 255 - img)
    prob = project.read_prob(first.tile_id)
    assert abs(tile_score(prob) - first.score) < 2 / 255
    assert project.info.source == "../tiles"
    assert project.source_path == image_folder.resolve()
    # an edge tile padded with white
    edge = [r for r in recs if r.x == 128 and r.y == 128 and r.source_name == "img1.png"][0]
    assert (project.read_image(edge.tile_id)[30:, 10:] == 255).all()


def test_threshold_filters_at_generation_and_review(tmp_path, image_folder, project):
    scores = sorted(r.score for r in project.tiles())
    thr = scores[len(scores) // 2]
    teacher = OtsuTeacher()
    kept = run_pseudolabels(
        image_folder, tmp_path / "kept", predict=teacher.predict, to_instances=teacher.to_instances,
        tile_size=64, threshold=thr,
    )
    assert len(kept) == sum(s >= thr for s in scores)
    assert all(r.score >= thr for r in kept.tiles())
    assert kept.threshold == thr
    # in review: the threshold filters the table and the counts
    project.threshold = thr
    assert len(project.tiles(min_score=project.threshold)) == len(kept)
    assert project.counts(min_score=thr)["total"] == len(kept)
    assert ReviewProject.open(project.root).threshold == thr


def test_review_state_edits_and_reopen(project, tmp_path):
    ids = [r.tile_id for r in project.tiles()]
    project.set_state(ids[0], "accepted")
    project.set_state(ids[1], "rejected")
    rec = project.record(ids[2])
    mask = project.read_mask(ids[2]).astype(np.int32)
    mask[5:15, 5:15] = 77  # a painted nucleus
    project.save_mask(ids[2], mask)
    project.set_state(ids[2], "accepted")

    # the folder can be moved: only relative paths inside
    moved = tmp_path / "elsewhere" / "proj"
    moved.parent.mkdir()
    shutil.move(str(project.root), moved)
    again = ReviewProject.open(moved)
    assert again.counts() == {"pending": 15, "accepted": 2, "rejected": 1, "total": 18}
    r2 = again.record(ids[2])
    assert r2.edited and not again.record(ids[0]).edited
    saved = again.read_mask(ids[2])
    assert saved.max() == r2.n_nuclei == len(r2.confidences)
    assert (saved[5:15, 5:15] > 0).all() and len(np.unique(saved[5:15, 5:15])) == 1
    assert again.info == project.info
    assert r2.score == rec.score
    items = list(again.accepted_training_items())
    assert [i.tile_id for i in items] == sorted([ids[0], ids[2]])
    assert items[0].image.shape == (64, 64, 3) and items[0].normalized.dtype == np.uint8
    assert items[0].mask.shape == (64, 64)
    all_kept = list(again.accepted_training_items(include_pending=True))
    assert len(all_kept) == 17  # everything but the rejected tile (threshold 0)


def test_sorting_and_state_filter(project):
    ids = [r.tile_id for r in project.tiles()]
    project.set_state(ids[3], "rejected")
    by_n = project.tiles(sort_by="n_nuclei", descending=False)
    assert [r.n_nuclei for r in by_n] == sorted(r.n_nuclei for r in by_n)
    assert [r.tile_id for r in project.tiles(states=["rejected"])] == [ids[3]]
    with pytest.raises(ReviewProjectError, match="Cannot sort tiles by"):
        project.tiles(sort_by="colour")
    with pytest.raises(ReviewProjectError, match="Unknown tile state"):
        project.set_state(ids[0], "maybe")


def test_crash_between_temp_write_and_replace_keeps_project_intact(project, monkeypatch):
    tid = project.tiles()[0].tile_id
    before_mask = project.read_mask(tid)
    before_review = (project.root / "review.json").read_bytes()

    def crash(src, dst):
        raise KeyboardInterrupt("killed")  # the process dies after the temp write

    monkeypatch.setattr(os, "replace", crash)
    edited = before_mask.astype(np.int32)
    edited[:] = 0
    with pytest.raises(KeyboardInterrupt):
        project.save_mask(tid, edited)
    with pytest.raises(KeyboardInterrupt):
        project.set_state(tid, "accepted")
    monkeypatch.undo()
    assert not list(project.root.rglob("*.tmp-pathoseg"))  # removed on the way out
    # a real crash (kill -9) leaves the temp files behind: simulate it, old and new names
    (project.root / ".tmp-leftover.json").write_text("{half")
    (project.tile_dir(tid) / ".tmp-leftover.png").write_bytes(b"\x89PNG")
    (project.root / ".review.json.k1ll3d.tmp-pathoseg").write_text("{half")
    (project.tile_dir(tid) / ".mask.png.k1ll3d.tmp-pathoseg").write_bytes(b"\x89PNG")
    assert (project.root / "review.json").read_bytes() == before_review
    again = ReviewProject.open(project.root)
    np.testing.assert_array_equal(again.read_mask(tid), before_mask)
    assert again.record(tid).state == "pending" and not again.record(tid).edited
    assert not list(project.root.rglob(".tmp-*")) and not list(project.root.rglob("*.tmp-pathoseg"))  # cleaned on open


def test_other_version_and_damaged_files_raise_clear_errors(project):
    pj = project.root / "project.json"
    meta = json.loads(pj.read_text())
    meta["version"] = 99
    pj.write_text(json.dumps(meta))
    with pytest.raises(ReviewProjectError, match="format version 99.*reads version 1"):
        ReviewProject.open(project.root)
    meta["version"] = 1
    pj.write_text(json.dumps(meta))
    (project.root / "review.json").write_text('{"tiles": [')
    with pytest.raises(ReviewProjectError, match=r"review.json is damaged"):
        ReviewProject.open(project.root)
    pj.write_text("{}")
    with pytest.raises(ReviewProjectError, match="not a napari-pathoseg review project"):
        ReviewProject.open(project.root)
    with pytest.raises(ReviewProjectError, match="is not a folder"):
        ReviewProject.open(project.root / "nope")
    assert issubclass(ReviewProjectError, PathosegError)


def test_damaged_tile_png_and_bad_record(project):
    tid = project.tiles()[0].tile_id
    (project.tile_dir(tid) / "mask.png").write_bytes(b"garbage")
    with pytest.raises(ReviewProjectError, match="mask.png is damaged"):
        project.read_mask(tid)
    data = json.loads((project.root / "review.json").read_text())
    data["tiles"][0]["state"] = "unsure"
    (project.root / "review.json").write_text(json.dumps(data))
    with pytest.raises(ReviewProjectError, match="state 'unsure'"):
        ReviewProject.open(project.root)


def test_create_refuses_existing_project_and_foreign_folder(project, tmp_path):
    with pytest.raises(ReviewProjectError, match="already holds a review project"):
        ReviewProject.create(project.root, source=tmp_path, source_kind="folder", model="m", tile_size=64, mpp=None)
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.txt").write_text("x")
    with pytest.raises(ReviewProjectError, match="not empty"):
        ReviewProject.create(other, source=tmp_path, source_kind="folder", model="m", tile_size=64, mpp=None)
    fresh = ReviewProject.create(project.root, source=tmp_path, source_kind="folder", model="m",
                                 tile_size=64, mpp=None, overwrite=True)
    assert len(fresh) == 0 and len(ReviewProject.open(project.root)) == 0


def test_split_and_merge_nuclei():
    mask = np.zeros((30, 40), np.uint16)
    rr, cc = np.mgrid[:30, :40]
    # two touching discs forming one object (a dumbbell)
    mask[((rr - 15) ** 2 + (cc - 12) ** 2 <= 36) | ((rr - 15) ** 2 + (cc - 23) ** 2 <= 36)] = 1
    mask[2:5, 35:38] = 2
    new, ids = split_nucleus(mask, 1)
    assert ids == [1, 3]
    assert set(np.unique(new)) == {0, 1, 2, 3}
    assert ((new == 1) | (new == 3)).sum() == (mask == 1).sum()
    assert new[15, 12] != new[15, 23]
    assert (new == 2).sum() == 9
    # an ellipse without two distance maxima is still cut along its major axis
    ell = np.zeros((20, 40), np.int32)
    ell[((rr[:20] - 10) / 4.0) ** 2 + ((cc[:20] - 20) / 15.0) ** 2 <= 1] = 5
    new2, ids2 = split_nucleus(ell, 5, min_distance=30)
    assert len(ids2) == 2 and new2[10, 8] != new2[10, 32]
    merged, target = merge_nuclei(new, [3, 1])
    assert target == 1 and set(np.unique(merged)) == {0, 1, 2}
    assert (merged == 1).sum() >= (mask == 1).sum()
    assert (merged == 2).sum() == 9  # other nuclei untouched
    with pytest.raises(ReviewProjectError, match="at least two"):
        merge_nuclei(new, [1])
    with pytest.raises(ReviewProjectError, match="not a nucleus"):
        split_nucleus(mask, 9)


def test_cancel_stops_after_the_current_batch(tmp_path, image_folder):
    teacher = OtsuTeacher()
    cancel = threading.Event()
    gen = generate_pseudolabels(image_folder, tmp_path / "p", predict=teacher.predict,
                                to_instances=teacher.to_instances, tile_size=64, batch_size=4, cancel=cancel)
    first = next(gen)
    assert isinstance(first, GenerationProgress) and first.done == 4 and first.total == 18
    cancel.set()
    last = next(gen)  # the partial result, not an exception (the job contract)
    assert isinstance(last, GenerationDone) and last.cancelled and last.processed == 4
    assert "stopped after 4 tiles" in last.message and str(last.project.root) in last.message
    with pytest.raises(StopIteration):
        next(gen)
    assert len(ReviewProject.open(tmp_path / "p")) == 4
    # the headless runner says so with CancelledError (the tiles stay)
    with pytest.raises(CancelledError, match="stopped after 0 tiles"):
        run_pseudolabels(image_folder, tmp_path / "q", predict=teacher.predict,
                         to_instances=teacher.to_instances, tile_size=64, cancel=cancel)
    assert len(ReviewProject.open(tmp_path / "q")) == 0


def test_max_tiles_and_events(tmp_path, image_folder):
    teacher = OtsuTeacher()
    events = list(generate_pseudolabels(image_folder, tmp_path / "p", predict=teacher.predict,
                                        to_instances=teacher.to_instances, tile_size=64,
                                        batch_size=2, max_tiles=5))
    assert isinstance(events[-1], GenerationDone) and events[-1].processed == 5
    assert [e.done for e in events[:-1]] == [2, 4, 5]
    assert all(e.total == 5 for e in events[:-1])


def test_bad_folder_raises(tmp_path):
    (tmp_path / "empty").mkdir()
    t = OtsuTeacher()
    with pytest.raises(ReviewProjectError, match="holds no images"):
        run_pseudolabels(tmp_path / "empty", tmp_path / "p", predict=t.predict, to_instances=t.to_instances)


def test_slide_source(tmp_path, make_pyramid_tiff):
    rng = np.random.default_rng(1)
    image = _synthetic_he(rng, shape=(300, 260), n=40)
    path = make_pyramid_tiff(tmp_path / "s.tif", image, levels=2, tile=64, mpp=0.25)
    teacher = OtsuTeacher()
    proj = run_pseudolabels(path, tmp_path / "sp", predict=teacher.predict, to_instances=teacher.to_instances,
                            tile_size=64, mpp=0.5, min_tissue=0.05)
    assert proj.info.source_kind == "slide" and proj.info.downsample == pytest.approx(2.0)
    assert len(proj) >= 1
    rec = proj.tiles(sort_by="tile_id", descending=False)[0]
    assert rec.height == rec.width == 128  # 64 px at 0.5 µm/px = 128 level-0 px at 0.25
    assert proj.read_image(rec.tile_id).shape == (64, 64, 3)
    assert proj.source_path == Path(path).resolve()


def test_cli_with_injected_model(tmp_path, image_folder, capsys):
    from napari_pathoseg.cli.review import add_commands, pseudolabel_command

    parser = argparse.ArgumentParser(prog="pathoseg")
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["pseudolabel", str(image_folder), "--out", str(tmp_path / "cp"),
                              "--model", "otsu", "--threshold", "0.6", "--max-tiles", "6"])
    assert args.func is pseudolabel_command
    assert pseudolabel_command(args, model=OtsuTeacher()) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["processed"] == 6 and out["kept"] == out["counts"]["total"]
    assert out["score_min"] is None or out["score_min"] >= 0.6
    assert ReviewProject.open(tmp_path / "cp").info.model == "otsu"
    # an existing project is refused
    with pytest.raises(ReviewProjectError, match="already holds a review project"):
        pseudolabel_command(args, model=OtsuTeacher())


def test_cli_entry_point_reports_errors(tmp_path, capsys):
    from napari_pathoseg.cli.main import main

    (tmp_path / "empty").mkdir()
    code = main(["pseudolabel", str(tmp_path / "empty"), "--out", str(tmp_path / "p")])
    assert code == 2
    assert "pathoseg pseudolabel: error:" in capsys.readouterr().err


def test_training_triples_weights(project):
    ids = [r.tile_id for r in project.tiles()]
    project.set_state(ids[0], "accepted")
    project.set_state(ids[1], "accepted")
    project.save_mask(ids[1], project.read_mask(ids[1]))  # reviewed and saved -> edited
    triples = list(project.training_triples())
    assert len(triples) == 2
    by_id = dict(zip(sorted(ids[:2]), triples))
    img, mask, w = by_id[ids[0]]
    assert img.shape == (64, 64, 3) and mask.shape == (64, 64)
    assert w.shape == (64, 64) and 0.5 <= w.min() and w.max() <= 1.0
    assert by_id[ids[1]][2] == 1.0
    assert all(t[2] == 1.0 for t in project.training_triples(weight="uniform"))
    from napari_pathoseg.methods.nuclei.datasets import PseudoLabelDataset

    ds = PseudoLabelDataset(project.training_triples(), mpp=0.5)
    assert len(ds) == 2


def test_real_monuseg_folder_at_20x(tmp_path, shared_data):
    """Real H&E (MoNuSeg, 40x) rescaled to 0.5 µm/px: scores and masks are sensible."""
    images = shared_data / "monuseg_train" / "images"
    teacher = OtsuTeacher()
    proj = run_pseudolabels(images, tmp_path / "mon", predict=teacher.predict, to_instances=teacher.to_instances,
                            tile_size=128, mpp=0.5, source_mpp=0.25, max_tiles=4)
    assert len(proj) == 4 and proj.info.mpp == 0.5 and proj.info.downsample == pytest.approx(2.0)
    recs = proj.tiles(sort_by="tile_id", descending=False)
    assert [(r.x, r.y) for r in recs] == [(0, 0), (256, 0), (512, 0), (768, 0)]
    assert all(r.height == r.width == 256 for r in recs)
    assert all(0.5 < r.score <= 1.0 and r.n_nuclei > 3 for r in recs)
    first = sorted(p.name for p in images.glob("*.png"))[0]
    assert recs[0].source_name == first


def test_real_sample_slide(tmp_path, sample_svs):
    teacher = OtsuTeacher()
    proj = run_pseudolabels(sample_svs, tmp_path / "svs", predict=teacher.predict,
                            to_instances=teacher.to_instances, tile_size=128, mpp=0.5, max_tiles=3)
    assert len(proj) == 3 and proj.info.source_kind == "slide"
    rec = proj.tiles(sort_by="tile_id", descending=False)[0]
    from napari_pathoseg.wsi.slide import open_slide

    with open_slide(sample_svs) as s:
        region = s.read_region(level=0, row=rec.y, col=rec.x, height=rec.height, width=rec.width)
    # the stored tile is the slide region at 0.5 µm/px (0.499 native: resampled ~1:1)
    stored = proj.read_image(rec.tile_id).astype(float)
    assert abs(stored.mean() - region.astype(float).mean()) < 3


def test_core_modules_do_not_import_qt_or_napari():
    import subprocess
    import sys

    code = (
        "import sys, napari_pathoseg.review.project, napari_pathoseg.cli.review, "
        "napari_pathoseg.methods.nuclei.transcycle; "
        "bad = [m for m in ('napari', 'qtpy', 'PyQt5', 'magicgui') if m in sys.modules]; "
        "sys.exit(1 if bad else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_generation_with_a_real_nucleus_model(tmp_path, image_folder):
    """The registry's NucleusModel (here an untrained TransCycle-lite student) plugs in as is."""
    import torch

    from napari_pathoseg.methods.nuclei import attcycle as m2
    from napari_pathoseg.models.registry import NucleusModel
    from napari_pathoseg.methods.nuclei.transcycle import TransCycleEncoder  # noqa: F401 (registers)

    torch.manual_seed(0)
    cfg = m2.get_preset("transcycle-lite", tile_size=64)
    model = NucleusModel(m2.Generator(cfg), cfg, device=torch.device("cpu"), name="student", path=tmp_path)
    proj = run_pseudolabels(image_folder, tmp_path / "nm", predict=model.predict, to_instances=model.to_instances,
                            model_name=model.name, tile_size=model.tile_size, max_tiles=3, batch_size=2)
    assert len(proj) == 3
    rec = proj.tiles()[0]
    assert 0.5 <= rec.score <= 1.0
    assert proj.read_normalized(rec.tile_id).shape == (64, 64, 3)
    assert proj.read_mask(rec.tile_id).max() == rec.n_nuclei


def test_cli_refuses_a_project_folder_that_holds_its_input(tmp_path, image_folder, capsys):
    """Pseudo-labelling a project's own tiles back into it with --overwrite used to delete the
    tiles being read (``ReviewProject.create`` removes ``tiles/``); now it is refused first."""
    from napari_pathoseg.cli.main import main
    from napari_pathoseg.cli.review import add_commands, pseudolabel_command
    from napari_pathoseg.wsi.slide import open_slide

    teacher = OtsuTeacher()
    proj = run_pseudolabels(image_folder, tmp_path / "proj", predict=teacher.predict,
                            to_instances=teacher.to_instances, tile_size=64, max_tiles=2)
    tile_dir = proj.tile_dir(proj.tiles()[0].tile_id)
    before = {p.name: p.read_bytes() for p in tile_dir.iterdir()}
    parser = argparse.ArgumentParser(prog="pathoseg")
    add_commands(parser.add_subparsers(dest="command"))
    for source in (tile_dir, tile_dir / "image.png", proj.root):
        args = parser.parse_args(["pseudolabel", str(source), "--out", str(proj.root), "--overwrite", "--max-tiles", "2"])
        with pytest.raises(ReviewProjectError, match="inside the project folder"):
            pseudolabel_command(args, model=teacher)
    assert {p.name: p.read_bytes() for p in tile_dir.iterdir()} == before
    assert len(ReviewProject.open(proj.root)) == 2
    # the entry point: refused before the model is loaded, one line, exit 2
    code = main(["pseudolabel", str(tile_dir), "--out", str(proj.root), "--overwrite", "--model", "no-such-model"])
    err = capsys.readouterr().err
    assert code == 2 and "inside the project folder" in err and "Traceback" not in err, err
    # the library refuses an open slide too (the Review dock passes one)
    with open_slide(tile_dir / "image.png") as slide, pytest.raises(ReviewProjectError, match="inside the project"):
        run_pseudolabels(slide, proj.root, predict=teacher.predict, to_instances=teacher.to_instances, overwrite=True)


def test_cli_ctrl_c_keeps_the_finished_tiles(tmp_path, image_folder, capsys):
    """A real SIGINT during the first batch: the batch finishes, its tiles are kept, and the
    driver's JobCancelled (exit 130 at the entry point) says where they are."""
    import signal

    from napari_pathoseg.cli._driver import JobCancelled, call_command
    from napari_pathoseg.cli.review import add_commands, pseudolabel_command

    class CtrlCTeacher(OtsuTeacher):
        def predict(self, batch):
            if self.calls == 0:
                signal.raise_signal(signal.SIGINT)
            return super().predict(batch)

    parser = argparse.ArgumentParser(prog="pathoseg")
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["pseudolabel", str(image_folder), "--out", str(tmp_path / "p"), "--batch-size", "4"])
    with pytest.raises(JobCancelled, match=r"stopped after 4 tiles; the \d+ tiles kept so far are in .*p"):
        pseudolabel_command(args, model=CtrlCTeacher())
    assert 0 < len(ReviewProject.open(tmp_path / "p")) <= 4
    args.out, args.overwrite = str(tmp_path / "p2"), False
    assert call_command(lambda a: pseudolabel_command(a, model=CtrlCTeacher()), args) == 130
    err = capsys.readouterr()
    assert "kept so far" in err.err and len(err.err.strip().splitlines()) == 1 and err.out == ""
