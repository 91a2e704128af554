"""Depth accuracy metrics (the standard set used by DeepV2D and the depth literature).

Per frame, on pixels with ground truth inside [min_depth, max_depth]; with `median_scale` the
prediction is first multiplied by median(gt) / median(pred) (monocular methods recover depth up
to scale).
"""

from __future__ import annotations

import numpy as np

from v2d.errors import ShapeError

__all__ = ["depth_metrics", "DEPTH_METRICS"]

DEPTH_METRICS = ("abs_rel", "sq_rel", "rmse", "rmse_log", "delta1", "delta2", "delta3")


def depth_metrics(pred: np.ndarray, gt: np.ndarray, median_scale: bool = True, min_depth: float = 1e-3,
                  max_depth: float = np.inf) -> dict[str, float]:
    """AbsRel, SqRel, RMSE, RMSE log, delta < 1.25^k (k = 1, 2, 3) of one depth map, and the scale used.

    Shapes: pred, gt (H, W) in metres; gt <= 0 or non-finite means no ground truth.
    """
    pred, gt = np.asarray(pred, dtype=np.float64), np.asarray(gt, dtype=np.float64)
    if pred.shape != gt.shape:
        raise ShapeError(f"pred: expected the ground truth's shape {gt.shape}, got {pred.shape}")
    valid = np.isfinite(gt) & (gt > min_depth) & (gt < max_depth) & np.isfinite(pred) & (pred > 0)
    if not valid.any():
        return {k: float("nan") for k in (*DEPTH_METRICS, "scale")} | {"pixels": 0}
    p, g = pred[valid], gt[valid]
    scale = float(np.median(g) / np.median(p)) if median_scale else 1.0
    p = p * scale
    ratio = np.maximum(p / g, g / p)
    return {
        "abs_rel": float(np.mean(np.abs(p - g) / g)),
        "sq_rel": float(np.mean((p - g) ** 2 / g)),
        "rmse": float(np.sqrt(np.mean((p - g) ** 2))),
        "rmse_log": float(np.sqrt(np.mean((np.log(p) - np.log(g)) ** 2))),
        "delta1": float(np.mean(ratio < 1.25)),
        "delta2": float(np.mean(ratio < 1.25**2)),
        "delta3": float(np.mean(ratio < 1.25**3)),
        "scale": scale,
        "pixels": int(valid.sum()),
    }
