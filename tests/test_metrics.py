"""Metrics against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from napari_pathoseg import metrics as M
from napari_pathoseg.metrics import MetricError


@pytest.fixture
def pair():
    """Two GT nuclei; prediction: one 3x4 box over GT 1 (IoU 9/12) and a 2x3 box in GT 2 (6/9)."""
    gt = np.zeros((10, 10), np.int32)
    gt[1:4, 1:4] = 1  # 9 px
    gt[6:9, 6:9] = 2  # 9 px
    pred = np.zeros((10, 10), np.int32)
    pred[1:4, 1:5] = 5  # 12 px, covers GT 1
    pred[6:8, 6:9] = 3  # 6 px, inside GT 2
    return gt, pred


def test_pairwise_overlap(pair):
    inter, ag, ap, iou = M.pairwise_overlap(*pair)
    assert ag.tolist() == [9, 9]
    assert ap.tolist() == [6, 12]  # pred ids sorted: 3, 5
    assert inter.tolist() == [[0, 9], [6, 0]]
    assert iou[0, 1] == pytest.approx(0.75)
    assert iou[1, 0] == pytest.approx(6 / 9)


def test_aji_and_plus(pair):
    # C = 9 + 6, U = 12 + 9
    assert M.aji(*pair) == pytest.approx(15 / 21)
    assert M.aji_plus(*pair) == pytest.approx(15 / 21)


def test_aji_counts_unmatched_prediction_and_double_use():
    gt = np.zeros((6, 12), np.int32)
    gt[1:5, 1:5] = 1  # 16
    gt[1:5, 5:9] = 2  # 16 (touching GT 1)
    pred = np.zeros_like(gt)
    pred[1:5, 1:9] = 1  # 32: merges both GT nuclei
    pred[0, 10:12] = 2  # 2 px false positive
    # AJI: both GT pick pred 1 (IoU 0.5 each): C = 16 + 16, U = 32 + 32, + 2 unused
    assert M.aji(gt, pred) == pytest.approx(32 / 66)
    # AJI+: pred 1 pairs with one GT only: C = 16, U = 32 + 16 (other GT) + 2
    assert M.aji_plus(gt, pred) == pytest.approx(16 / 50)


def test_f1_pq(pair):
    gt, pred = pair
    # both pairs have IoU > 0.5 -> TP 2
    assert M.object_f1(gt, pred) == 1.0
    r = M.pq(gt, pred)
    assert r["dq"] == 1.0
    assert r["sq"] == pytest.approx((0.75 + 6 / 9) / 2)
    assert r["pq"] == pytest.approx(r["dq"] * r["sq"])
    # at a stricter threshold only the first pair survives: TP 1, FP 1, FN 1
    assert M.object_f1(gt, pred, iou=0.7) == pytest.approx(0.5)


def test_pq_with_misses():
    gt = np.zeros((8, 8), np.int32)
    gt[0:2, 0:2] = 1
    gt[4:6, 4:6] = 2
    pred = np.zeros_like(gt)
    pred[0:2, 0:2] = 7  # exact
    pred[6:8, 0:2] = 8  # false positive
    r = M.pq(gt, pred)
    # TP 1, FP 1, FN 1 -> DQ = 1 / (1 + 0.5 + 0.5)
    assert r["dq"] == pytest.approx(0.5)
    assert r["sq"] == pytest.approx(1.0)
    assert r["pq"] == pytest.approx(0.5)


def test_dice_miou(pair):
    gt, pred = pair
    # |G| = 18, |P| = 18, |G & P| = 15
    assert M.dice(gt, pred) == pytest.approx(30 / 36)
    # nucleus IoU 15 / 21; background: 100 - 21 = 79 shared of 100 - 15 = 85 union
    assert M.miou(gt, pred) == pytest.approx((15 / 21 + 79 / 85) / 2)


def test_empty_cases():
    z = np.zeros((4, 4), np.int32)
    one = z.copy()
    one[1:3, 1:3] = 1
    assert M.aji(z, z) == 1.0
    assert M.aji(one, z) == 0.0
    assert M.aji(z, one) == 0.0
    assert M.dice(z, z) == 1.0
    assert M.object_f1(z, z) == 1.0
    assert M.pq(one, z)["pq"] == 0.0


def test_label_values_irrelevant(pair):
    gt, pred = pair
    shuffled = np.where(pred == 5, 99, np.where(pred == 3, 42, 0))
    assert M.instance_metrics(gt, pred) == M.instance_metrics(gt, shuffled)


def test_image_metrics():
    a = np.zeros((8, 8, 3), np.uint8)
    b = np.full((8, 8, 3), 51, np.uint8)  # 51 / 255 = 0.2
    assert M.mae(a, b) == pytest.approx(0.2)
    assert M.rmse(a, b) == pytest.approx(0.2)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert M.ssim(img, img) == pytest.approx(1.0)
    assert M.ssim(img, 255 - img) < 0.5


def test_shape_mismatch_refused():
    with pytest.raises(MetricError, match="differ in shape"):
        M.aji(np.zeros((3, 3), int), np.zeros((4, 4), int))
    with pytest.raises(MetricError, match="2-D"):
        M.dice(np.zeros((3, 3, 3), int), np.zeros((3, 3, 3), int))
