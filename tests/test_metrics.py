"""Depth metrics against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from v2d.errors import NumericalError, ShapeError
from v2d.metrics import crop_mask, depth_metrics


def test_depth_metrics_by_hand():
    gt = np.array([[1.0, 2.0], [4.0, 0.0]])  # one pixel without ground truth
    pred = np.array([[1.0, 2.5], [2.0, 7.0]])
    m = depth_metrics(pred, gt, median_scale=False)
    assert m["pixels"] == 3 and m["scale"] == 1.0
    assert m["abs_rel"] == pytest.approx((0 + 0.25 + 0.5) / 3)
    assert m["sq_rel"] == pytest.approx((0 + 0.25 / 2 + 4 / 4) / 3)
    assert m["rmse"] == pytest.approx(np.sqrt((0 + 0.25 + 4) / 3))
    assert m["rmse_log"] == pytest.approx(np.sqrt((0 + np.log(1.25) ** 2 + np.log(2) ** 2) / 3))
    # ratios 1, 1.25, 2 against thresholds 1.25, 1.5625, 1.953: strict inequalities
    assert (m["delta1"], m["delta2"], m["delta3"]) == pytest.approx((1 / 3, 2 / 3, 2 / 3))


def test_median_scaling_removes_a_global_scale():
    gt = np.random.default_rng(0).uniform(0.5, 5, (8, 8))
    m = depth_metrics(3.7 * gt, gt)
    assert m["abs_rel"] == pytest.approx(0, abs=1e-12) and m["delta1"] == 1.0
    assert m["scale"] == pytest.approx(1 / 3.7)


def test_no_valid_pixels_and_bad_shapes():
    assert np.isnan(depth_metrics(np.ones((2, 2)), np.zeros((2, 2)))["abs_rel"])
    with pytest.raises(ShapeError):
        depth_metrics(np.ones((2, 3)), np.ones((2, 2)))


def test_log10_and_si_log_by_hand():
    gt = np.array([1.0, 10.0, 2.0, 4.0])
    pred = np.array([10.0, 10.0, 1.0, 4.0])
    m = depth_metrics(pred, gt, median_scale=False)
    # |log10 p - log10 g| = 1, 0, log10 2, 0
    assert m["log10"] == pytest.approx((1 + np.log10(2)) / 4)
    # d = (ln 10, 0, -ln 2, 0): mean(d^2) = 1.4455879, mean(d) = 0.4023595
    assert m["si_log"] == pytest.approx(113.30025, abs=1e-4)
    assert m["rmse_log"] == pytest.approx(np.sqrt((np.log(10) ** 2 + np.log(2) ** 2) / 4))


def test_si_log_ignores_a_global_scale_but_abs_rel_does_not():
    gt = np.random.default_rng(1).uniform(0.5, 5, (6, 6))
    pred = gt * np.random.default_rng(2).uniform(0.9, 1.1, (6, 6))
    a = depth_metrics(pred, gt, median_scale=False)
    b = depth_metrics(2.5 * pred, gt, median_scale=False)
    assert b["si_log"] == pytest.approx(a["si_log"]) and a["si_log"] > 0
    assert b["abs_rel"] > a["abs_rel"] + 1


def test_given_scale_mask_and_depth_range():
    gt = np.array([[1.0, 2.0], [3.0, 50.0]])
    pred = np.array([[2.0, 4.0], [9.0, 1.0]])
    m = depth_metrics(pred, gt, scale=0.5, max_depth=10.0, mask=np.array([[True, True], [False, True]]))
    # used: (1, 2) -> 1, (2, 4) -> 2 after the scale; (3, 9) is masked out, (50, 1) beyond max_depth
    assert m["pixels"] == 2 and m["scale"] == 0.5 and m["abs_rel"] == pytest.approx(0.0)
    with pytest.raises(NumericalError, match="scale"):
        depth_metrics(pred, gt, scale=-1.0)
    with pytest.raises(ShapeError, match="mask"):
        depth_metrics(pred, gt, mask=np.ones((3, 3), bool))


def test_crops_follow_the_published_pixel_ranges():
    nyu = crop_mask("eigen_nyu", 480, 640)
    rows, cols = np.nonzero(nyu)
    assert (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1) == (45, 471, 41, 601)
    kitti = crop_mask("garg_kitti", 375, 1242)
    rows, cols = np.nonzero(kitti)
    assert (rows.min(), rows.max() + 1) == (153, 371) and (cols.min(), cols.max() + 1) == (44, 1197)
    assert crop_mask("none", 4, 4) is None
    with pytest.raises(ShapeError, match="crop"):
        crop_mask("nyu", 4, 4)
