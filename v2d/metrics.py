"""Accuracy metrics: depth (the standard set used by DeepV2D and the depth literature) and
trajectories (absolute trajectory error through evo, the field's standard tool).

Depth, per frame, on pixels with ground truth inside [min_depth, max_depth]; with `median_scale` the
prediction is first multiplied by median(gt) / median(pred) (monocular methods recover depth up
to scale).
"""

from __future__ import annotations

import numpy as np

from v2d.errors import NumericalError, ShapeError

__all__ = ["depth_metrics", "DEPTH_METRICS", "trajectory_ate"]

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


def trajectory_ate(timestamps_est: np.ndarray, poses_wc_est: np.ndarray, timestamps_gt: np.ndarray,
                   poses_wc_gt: np.ndarray, align: str = "sim3", max_diff: float = 0.01) -> dict[str, float]:
    """Absolute trajectory error of camera positions after alignment, computed with evo.

    evo associates the timestamps (within `max_diff` seconds), aligns the estimate to the ground
    truth (Umeyama: "sim3" = rotation, translation and scale, the monocular default; "se3"; or
    "none") and reports the translation error statistics, as `evo_ape tum GT EST -as` does.

    Shapes: timestamps (N,), (M,); poses_wc (N, 7), (M, 7) camera->world in lietorch layout
    [tx, ty, tz, qx, qy, qz, qw] (TUM order). Returns ate_rmse, ate_mean, ate_median, ate_max,
    scale (of the alignment), pairs, path_length (of the associated ground truth).
    """
    from evo.core import metrics, sync
    from evo.core.trajectory import PoseTrajectory3D

    if align not in ("sim3", "se3", "none"):
        raise ShapeError(f"align: expected 'sim3', 'se3' or 'none', got {align!r}")

    def traj(t: np.ndarray, p: np.ndarray, name: str) -> PoseTrajectory3D:
        t, p = np.asarray(t, dtype=np.float64), np.asarray(p, dtype=np.float64)
        if p.ndim != 2 or p.shape[1] != 7 or t.shape != (p.shape[0],):
            raise ShapeError(f"{name}: expected timestamps (N,) and poses (N, 7), got {t.shape} and {p.shape}")
        if not np.isfinite(p).all():
            raise ShapeError(f"{name}: NaN or Inf in the poses")
        # evo's names: positions_xyz, orientations_quat_wxyz (w first)
        return PoseTrajectory3D(positions_xyz=p[:, :3], orientations_quat_wxyz=p[:, [6, 3, 4, 5]], timestamps=t)

    ref, est = traj(timestamps_gt, poses_wc_gt, "ground truth"), traj(timestamps_est, poses_wc_est, "estimate")
    try:
        ref, est = sync.associate_trajectories(ref, est, max_diff=max_diff)
    except sync.SyncException as exc:
        raise ShapeError(f"trajectories: {exc}") from None
    if ref.num_poses < 3:
        raise ShapeError(f"trajectories: expected at least 3 associated poses, got {ref.num_poses}")
    scale = 1.0
    if align != "none":
        from evo.core.geometry import GeometryException

        try:
            _, _, scale = est.align(ref, correct_scale=align == "sim3")
        except GeometryException:
            raise NumericalError(f"trajectories: {align} alignment is not possible: the estimated or ground-truth "
                                 "positions are degenerate (static or collinear)") from None
    ape = metrics.APE(metrics.PoseRelation.translation_part)
    ape.process_data((ref, est))
    stats = ape.get_all_statistics()
    return {"ate_rmse": float(stats["rmse"]), "ate_mean": float(stats["mean"]), "ate_median": float(stats["median"]),
            "ate_max": float(stats["max"]), "scale": float(scale), "pairs": int(ref.num_poses),
            "path_length": float(ref.path_length), "alignment": align}
