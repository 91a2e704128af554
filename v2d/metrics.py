"""Accuracy metrics: depth (the standard set used by DeepV2D and the depth literature) and
trajectories (absolute and relative trajectory error through evo, the field's standard tool).

Depth, per frame, on pixels with ground truth inside (min_depth, max_depth) and inside an optional
mask (a crop); the prediction is first multiplied by a scale: per frame median(gt) / median(pred)
with `median_scale` (monocular methods recover depth up to scale), or the `scale` given (one
global scale, or 1 for metric depth).

Definitions (p = scaled prediction, g = ground truth, means over the valid pixels):
    abs_rel  mean(|p - g| / g)              sq_rel  mean((p - g)^2 / g)
    rmse     sqrt(mean((p - g)^2))          rmse_log  sqrt(mean((log p - log g)^2))
    log10    mean(|log10 p - log10 g|)      deltaK  fraction with max(p / g, g / p) < 1.25^K
    si_log   100 * sqrt(mean(d^2) - mean(d)^2), d = log p - log g (the scale-invariant log error
             of Eigen et al. 2014 with lambda = 1, scaled by 100 as the KITTI depth benchmark reports it)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from v2d.errors import NumericalError, ShapeError

__all__ = ["ALIGNMENTS", "CROPS", "DEPTH_METRICS", "crop_mask", "depth_metrics", "depth_valid", "evaluate_trajectory",
           "evo_trajectory", "trajectory_ate"]

DEPTH_METRICS = ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "si_log", "delta1", "delta2", "delta3")

# The usual evaluation crops as fractions of the image (top, bottom, left, right), so that they
# apply at any resolution: Eigen et al.'s NYU crop is rows 45:471, columns 41:601 of 480x640
# (as in the BTS/Monodepth evaluation code); Garg et al.'s KITTI crop is rows 0.40810811 H to
# 0.99189189 H, columns 0.03594771 W to 0.96405229 W.
CROPS = {
    "eigen_nyu": (45 / 480, 471 / 480, 41 / 640, 601 / 640),
    "garg_kitti": (0.40810811, 0.99189189, 0.03594771, 0.96405229),
}


def crop_mask(name: str, height: int, width: int) -> np.ndarray | None:
    """Boolean mask of the named crop ("none" gives None); ShapeError for unknown names.

    Shapes: -> (H, W) bool, H = height, W = width
    """
    if name == "none":
        return None
    if name not in CROPS:
        raise ShapeError(f"crop: expected one of none, {', '.join(CROPS)}, got {name!r}")
    top, bottom, left, right = CROPS[name]
    mask = np.zeros((height, width), dtype=bool)
    def px(f: float, n: int) -> int:  # truncation, as the published evaluation code does (+ float slack)
        return int(f * n + 1e-6)

    mask[px(top, height):px(bottom, height), px(left, width):px(right, width)] = True
    return mask


def depth_valid(pred: np.ndarray, gt: np.ndarray, min_depth: float = 1e-3, max_depth: float = np.inf,
                mask: np.ndarray | None = None) -> np.ndarray:
    """(H, W) bool: pixels a depth metric uses (ground truth in range, prediction positive, in the mask)."""
    valid = np.isfinite(gt) & (gt > min_depth) & (gt < max_depth) & np.isfinite(pred) & (pred > 0)
    return valid if mask is None else valid & mask


def depth_metrics(pred: np.ndarray, gt: np.ndarray, median_scale: bool = True, min_depth: float = 1e-3,
                  max_depth: float = np.inf, *, scale: float | None = None,
                  mask: np.ndarray | None = None) -> dict[str, float]:
    """The metrics of DEPTH_METRICS for one depth map, with the scale used and the pixel count.

    `scale` (when given) replaces the per-frame median scaling. `mask` (H, W) bool restricts the
    evaluation (e.g. `crop_mask`). Without valid pixels every metric is NaN and pixels is 0.

    Shapes: pred, gt (H, W); gt <= 0 or non-finite means no ground truth.
    """
    pred, gt = np.asarray(pred, dtype=np.float64), np.asarray(gt, dtype=np.float64)
    if pred.shape != gt.shape:
        raise ShapeError(f"pred: expected the ground truth's shape {gt.shape}, got {pred.shape}")
    if mask is not None and mask.shape != gt.shape:
        raise ShapeError(f"mask: expected the ground truth's shape {gt.shape}, got {mask.shape}")
    valid = depth_valid(pred, gt, min_depth, max_depth, mask)
    if not valid.any():
        return {k: float("nan") for k in (*DEPTH_METRICS, "scale")} | {"pixels": 0}
    p, g = pred[valid], gt[valid]
    if scale is None:
        scale = float(np.median(g) / np.median(p)) if median_scale else 1.0
    if not (np.isfinite(scale) and scale > 0):
        raise NumericalError(f"scale: expected a positive finite number, got {scale}")
    p = p * scale
    ratio = np.maximum(p / g, g / p)
    d = np.log(p) - np.log(g)
    return {
        "abs_rel": float(np.mean(np.abs(p - g) / g)),
        "sq_rel": float(np.mean((p - g) ** 2 / g)),
        "rmse": float(np.sqrt(np.mean((p - g) ** 2))),
        "rmse_log": float(np.sqrt(np.mean(d**2))),
        "log10": float(np.mean(np.abs(np.log10(p) - np.log10(g)))),
        "si_log": float(100 * np.sqrt(max(np.mean(d**2) - np.mean(d) ** 2, 0.0))),
        "delta1": float(np.mean(ratio < 1.25)),
        "delta2": float(np.mean(ratio < 1.25**2)),
        "delta3": float(np.mean(ratio < 1.25**3)),
        "scale": float(scale),
        "pixels": int(valid.sum()),
    }


ALIGNMENTS = ("sim3", "se3", "scale", "none")


def evo_trajectory(t: np.ndarray, p: np.ndarray, name: str):  # -> evo PoseTrajectory3D
    """evo's trajectory of timestamps (N,) and poses (N, 7) [t, qx, qy, qz, qw]; ShapeError (naming it) if bad."""
    from evo.core.trajectory import PoseTrajectory3D

    t, p = np.asarray(t, dtype=np.float64), np.asarray(p, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 7 or t.shape != (p.shape[0],):
        raise ShapeError(f"{name}: expected timestamps (N,) and poses (N, 7), got {t.shape} and {p.shape}")
    if not np.isfinite(p).all() or not np.isfinite(t).all():
        raise NumericalError(f"{name}: NaN or Inf in the poses or timestamps")
    # evo's names: positions_xyz, orientations_quat_wxyz (w first); our layout is [t, qx, qy, qz, qw]
    return PoseTrajectory3D(positions_xyz=p[:, :3], orientations_quat_wxyz=p[:, [6, 3, 4, 5]], timestamps=t)


def _rpe(ref, est, delta: float, unit: str) -> dict[str, Any]:
    """RPE translation (m) and rotation (deg) RMSE over pose pairs `delta` frames or metres apart."""
    from evo.core import metrics
    from evo.core.filters import FilterException

    out: dict[str, Any] = {"delta": delta, "unit": unit}
    for key, relation in (("trans", metrics.PoseRelation.translation_part),
                          ("rot_deg", metrics.PoseRelation.rotation_angle_deg)):
        # pairs 1 frame / 1 m apart along the ground truth (evo's default measures along the estimate,
        # whose scale is arbitrary before alignment)
        rpe = metrics.RPE(relation, delta=delta, delta_unit=metrics.Unit(unit), all_pairs=False,
                          pairs_from_reference=True)
        try:
            rpe.process_data((ref, est))
        except (FilterException, metrics.MetricsException) as exc:  # e.g. a path shorter than 1 m
            return out | {"trans_rmse": None, "rot_deg_rmse": None, "pairs": 0, "note": str(exc).splitlines()[0]}
        stats = rpe.get_all_statistics()
        out[f"{key}_rmse"], out[f"{key}_mean"] = float(stats["rmse"]), float(stats["mean"])
        out["pairs"] = len(rpe.error)
    return out


def evaluate_trajectory(timestamps_est: np.ndarray, poses_wc_est: np.ndarray, timestamps_gt: np.ndarray,
                        poses_wc_gt: np.ndarray, align: str = "sim3", max_diff: float = 0.01,
                        rpe: bool = True) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """ATE (and RPE) of an estimated trajectory against ground truth, computed with evo.

    evo associates the timestamps (within `max_diff` seconds) and aligns the estimate to the ground
    truth with Umeyama's method: "sim3" (rotation, translation and scale; the monocular default),
    "se3" (rotation and translation), "scale" (scale only) or "none". ATE is the translation error
    of the aligned positions, as `evo_ape tum GT EST -as` reports it. RPE (on the aligned estimate)
    is given per frame (consecutive associated poses) and per metre of ground-truth path.

    Shapes: timestamps (N,), (M,); poses_wc (N, 7), (M, 7) camera->world in lietorch layout
    [tx, ty, tz, qx, qy, qz, qw] (TUM order). Returns the results (ate_rmse, ate_mean, ate_median,
    ate_max, ate_std, alignment, scale, pairs, path_length, rpe_frame, rpe_metre) and per-pair arrays
    for plots: timestamps (P,), gt_xyz (P, 3), est_xyz (P, 3) aligned, ate_errors (P,).
    """
    from evo.core import metrics, sync
    from evo.core.geometry import GeometryException

    if align not in ALIGNMENTS:
        raise ShapeError(f"align: expected one of {', '.join(ALIGNMENTS)}, got {align!r}")
    ref = evo_trajectory(timestamps_gt, poses_wc_gt, "ground truth")
    est = evo_trajectory(timestamps_est, poses_wc_est, "estimate")
    try:
        ref, est = sync.associate_trajectories(ref, est, max_diff=max_diff)
    except sync.SyncException as exc:
        raise ShapeError(f"trajectories: {str(exc).strip()} (timestamps matched within {max_diff} s)") from None
    if ref.num_poses < 3:
        raise ShapeError(f"trajectories: expected at least 3 poses with matching timestamps (within {max_diff} s), "
                         f"got {ref.num_poses}")
    scale = 1.0
    if align != "none":
        try:
            _, _, scale = est.align(ref, correct_scale=align == "sim3", correct_only_scale=align == "scale")
        except GeometryException:
            raise NumericalError(f"trajectories: {align} alignment is not possible: the estimated or ground-truth "
                                 "positions are degenerate (static or collinear)") from None
    ape = metrics.APE(metrics.PoseRelation.translation_part)
    ape.process_data((ref, est))
    stats = ape.get_all_statistics()
    results: dict[str, Any] = {
        "ate_rmse": float(stats["rmse"]), "ate_mean": float(stats["mean"]), "ate_median": float(stats["median"]),
        "ate_max": float(stats["max"]), "ate_std": float(stats["std"]), "alignment": align, "scale": float(scale),
        "pairs": int(ref.num_poses), "path_length": float(ref.path_length),
    }
    if rpe:
        results["rpe_frame"] = _rpe(ref, est, 1, "frames")
        results["rpe_metre"] = _rpe(ref, est, 1.0, "m")
    arrays = {"timestamps": np.asarray(ref.timestamps, dtype=np.float64),
              "gt_xyz": np.asarray(ref.positions_xyz, dtype=np.float64),
              "est_xyz": np.asarray(est.positions_xyz, dtype=np.float64),
              "ate_errors": np.asarray(ape.error, dtype=np.float64)}
    return results, arrays


def trajectory_ate(timestamps_est: np.ndarray, poses_wc_est: np.ndarray, timestamps_gt: np.ndarray,
                   poses_wc_gt: np.ndarray, align: str = "sim3", max_diff: float = 0.01) -> dict[str, Any]:
    """ATE only (see `evaluate_trajectory`): ate_rmse, ate_mean, ate_median, ate_max, ate_std,
    alignment, scale, pairs, path_length."""
    results, _ = evaluate_trajectory(timestamps_est, poses_wc_est, timestamps_gt, poses_wc_gt, align, max_diff,
                                     rpe=False)
    return results
