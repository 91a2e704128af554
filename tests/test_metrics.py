"""Depth metrics against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from v2d.errors import ShapeError
from v2d.metrics import depth_metrics


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
