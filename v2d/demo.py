"""The demo on the embedded synthetic sequence (`v2d demo`, `make demo`).

Until the SLAM front end lands this exercises the geometry engine end to end on a sequence the
project renders itself: every frame is tracked against the first (the keyframe) by the
Gauss-Newton layer, with targets from OpenCV DIS flow and the keyframe's depth, starting from
perturbed poses; the keyframe depth is then estimated by a plane sweep over the cost-volume
kernel with the recovered poses. Results are compared with the synthetic ground truth.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from kernels import ops
from v2d import __version__
from v2d.config import V2DConfig, to_dict
from v2d.data.synthetic import render_sequence
from v2d.flow import dis_targets
from v2d.geometry.camera import pose_to_rt, relative_pose, scale_intrinsics
from v2d.geometry.gauss_newton import gauss_newton
from v2d.geometry.lie import se3_inv, se3_log, se3_mul, se3_random
from v2d.io.writers import ensure_dir, write_depth_png, write_json, write_npy, write_tum
from v2d.planesweep import inverse_depth_hypotheses, plane_sweep_depth

__all__ = ["run_demo"]

_log = logging.getLogger(__name__)


def _pose_errors(est_cw: torch.Tensor, gt_cw: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame rotation error (degrees) and translation error (scene units) of T_est T_gt^-1."""
    xi = se3_log(se3_mul(est_cw, se3_inv(gt_cw)))
    rot = xi[..., 3:].norm(dim=-1) * 180.0 / math.pi
    trans = (se3_inv(est_cw)[..., :3] - se3_inv(gt_cw)[..., :3]).norm(dim=-1)
    return rot.numpy(), trans.numpy()


def _abs_rel(pred: np.ndarray, gt: np.ndarray) -> float:
    ok = np.isfinite(pred) & (gt > 0)
    return float(np.mean(np.abs(pred[ok] - gt[ok]) / gt[ok]))


def run_demo(cfg: V2DConfig, out_dir: str | Path) -> dict[str, Any]:
    """Run the demo and write its outputs to `out_dir`; returns the summary written to summary.json."""
    dc = cfg.demo
    out = ensure_dir(out_dir)
    ensure_dir(out / "depth")
    t0 = time.perf_counter()
    seq = render_sequence(seed=dc.seed, num_frames=dc.num_frames, height=dc.height, width=dc.width)
    t_render = time.perf_counter() - t0

    images = np.asarray(seq.images)
    gt_cw = torch.as_tensor(seq.poses_cw, dtype=torch.float64)
    intr = torch.as_tensor(seq.intrinsics, dtype=torch.float64)
    key_depth = torch.as_tensor(np.asarray(seq.depths[0]), dtype=torch.float64)
    N = gt_cw.shape[0]

    # Start every non-key frame from its true pose perturbed by a random rigid motion.
    g = torch.Generator().manual_seed(dc.seed + 1)
    noise = se3_random(N, rot_scale=dc.pose_noise_rotation, trans_scale=dc.pose_noise_translation,
                       generator=g, dtype=torch.float64)
    noise[0] = torch.tensor([0, 0, 0, 0, 0, 0, 1.0], dtype=torch.float64)
    init_cw = se3_mul(noise, gt_cw)

    t1 = time.perf_counter()
    est_cw = init_cw.clone()
    inv_depth = (1.0 / key_depth).float()
    opts = dataclasses.replace(cfg.gn, iterations=dc.tracking_iterations)
    for j in tqdm(range(1, N), desc="tracking", unit="frame", leave=False):
        targets, weights = dis_targets(images[0], images[j])
        poses = torch.stack([gt_cw[0], est_cw[j]]).float()
        ii, jj = torch.tensor([0]), torch.tensor([1])
        poses, _ = gauss_newton(poses, inv_depth[None], intr.float(), targets[None], weights[None], ii, jj, opts)
        est_cw[j] = poses[1].double()
    t_track = time.perf_counter() - t1

    rot_init, trans_init = _pose_errors(init_cw[1:], gt_cw[1:])
    rot_err, trans_err = _pose_errors(est_cw[1:], gt_cw[1:])

    # Plane sweep of the keyframe at 1/feature_scale resolution with the recovered poses.
    t2 = time.perf_counter()
    s = dc.feature_scale
    h, w = dc.height // s, dc.width // s
    imgs = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    imgs = torch.nn.functional.interpolate(imgs, size=(h, w), mode="area")
    intr_s = scale_intrinsics(intr, w / dc.width, h / dc.height).float()
    rel = pose_to_rt(relative_pose(est_cw[:1].expand(N - 1, 7), est_cw[1:])).float()
    depths = inverse_depth_hypotheses(dc.min_depth, dc.max_depth, dc.depth_hypotheses, imgs)
    depth, _ = plane_sweep_depth(imgs[0], imgs[1:], rel, intr_s, depths)
    t_depth = time.perf_counter() - t2
    gt_small = torch.nn.functional.interpolate(key_depth[None, None].float(), size=(h, w), mode="nearest")[0, 0]
    depth_np = depth.numpy()
    abs_rel = _abs_rel(depth_np, gt_small.numpy())

    timestamps = np.asarray(seq.timestamps, dtype=np.float64)
    write_tum(out / "trajectory.txt", timestamps, se3_inv(est_cw).numpy())
    write_tum(out / "trajectory_gt.txt", timestamps, se3_inv(gt_cw).numpy())
    write_depth_png(out / "depth" / "000000.png", depth_np)
    write_npy(out / "depth" / "000000.npy", depth_np.astype(np.float32))

    summary = {
        "version": __version__,
        "kernels": "extension" if ops.extension_available() else "reference",
        "frames": N,
        "image_size": [dc.height, dc.width],
        "tracking": {
            "rotation_error_deg": {"initial_mean": float(rot_init.mean()), "mean": float(rot_err.mean()),
                                   "max": float(rot_err.max())},
            "translation_error": {"initial_mean": float(trans_init.mean()), "mean": float(trans_err.mean()),
                                  "max": float(trans_err.max())},
            "flow_source": "dis",
        },
        "depth": {"abs_rel": abs_rel, "resolution": [h, w], "hypotheses": dc.depth_hypotheses,
                  "method": "plane sweep (backproject_volume) with the tracked poses"},
        "seconds": {"render": t_render, "tracking": t_track, "depth": t_depth,
                    "total": time.perf_counter() - t0},
        "config": to_dict(cfg),
    }
    write_json(out / "summary.json", summary)
    _log.info("tracking: rotation error %.3f deg (from %.3f), translation %.4f (from %.4f); depth AbsRel %.3f",
              rot_err.mean(), rot_init.mean(), trans_err.mean(), trans_init.mean(), abs_rel)
    return summary
