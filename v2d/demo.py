"""The demo on the embedded synthetic sequence (`v2d demo`, `make demo`).

Until the SLAM front end lands, the demo runs the V2D model itself on a clip of the sequence the
project renders: the keyframe and its neighbours go in with no pose and no depth, the model
alternates motion updates (the configured flow source feeding the Gauss-Newton layer) and depth
updates (the shipped depth network), and the results are compared with the synthetic ground truth.
Monocular: depth and translation are compared after one scale (the median depth ratio).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kernels import ops
from v2d import __version__
from v2d.config import V2DConfig, to_dict
from v2d.data.synthetic import render_sequence
from v2d.geometry.lie import se3_inv, se3_log, se3_mul
from v2d.io.writers import ensure_dir, write_depth_png, write_json, write_npy, write_tum
from v2d.metrics import depth_metrics
from v2d.model import load_model

__all__ = ["run_demo"]

_log = logging.getLogger(__name__)


def run_demo(cfg: V2DConfig, out_dir: str | Path) -> dict[str, Any]:
    """Run the demo and write its outputs to `out_dir`; returns the summary written to summary.json."""
    dc = cfg.demo
    model = load_model(cfg)  # first: a missing weights file fails before any output is written
    out = ensure_dir(out_dir)
    ensure_dir(out / "depth")
    t0 = time.perf_counter()
    span = (dc.num_frames - 1) * dc.stride + 1
    seq = render_sequence(seed=dc.seed, num_frames=span, height=dc.height, width=dc.width)
    idx = list(range(0, span, dc.stride))
    images = torch.from_numpy(np.asarray(seq.images)[idx]).permute(0, 3, 1, 2).float() / 255.0
    gt_cw = seq.poses_cw[idx]
    intr = seq.intrinsics.float()
    t_render = time.perf_counter() - t0

    t1 = time.perf_counter()
    with torch.no_grad():
        result = model(images, intr)
    t_model = time.perf_counter() - t1
    est_rel = result.poses[-1].double()  # keyframe (frame 0) at the identity
    depth = result.depths[-1][-1][0].numpy()

    gt_rel = se3_mul(gt_cw, se3_inv(gt_cw[:1]))
    gt_depth = np.asarray(seq.depths[0])
    metrics = depth_metrics(depth, gt_depth)
    scale = metrics["scale"]  # gt / estimate: applies to translations as well
    rot_err = se3_log(se3_mul(est_rel, se3_inv(gt_rel)))[1:, 3:].norm(dim=-1) * 180 / math.pi
    c_est, c_gt = se3_inv(est_rel)[1:, :3] * scale, se3_inv(gt_rel)[1:, :3]
    trans_err = (c_est - c_gt).norm(dim=-1)
    path_length = float(c_gt.diff(dim=0, prepend=torch.zeros(1, 3, dtype=c_gt.dtype)).norm(dim=-1).sum())

    timestamps = np.asarray(seq.timestamps, dtype=np.float64)[idx]
    est_wc = se3_inv(est_rel).clone()
    est_wc[:, :3] *= scale
    write_tum(out / "trajectory.txt", timestamps, est_wc.numpy())
    write_tum(out / "trajectory_gt.txt", timestamps, se3_inv(gt_rel).numpy())
    write_depth_png(out / "depth" / "000000.png", depth * scale)
    write_npy(out / "depth" / "000000.npy", (depth * scale).astype(np.float32))

    summary = {
        "version": __version__,
        "kernels": "extension" if ops.extension_available() else "reference",
        "weights": cfg.model.weights,
        "frames": len(idx),
        "image_size": [dc.height, dc.width],
        "tracking": {
            "flow_source": cfg.motion.flow_source,
            "rotation_error_deg": {"mean": float(rot_err.mean()), "max": float(rot_err.max()),
                                   "true_max": float(se3_log(gt_rel)[:, 3:].norm(dim=-1).max() * 180 / math.pi)},
            "translation_error": {"mean": float(trans_err.mean()), "max": float(trans_err.max()),
                                  "path_length": path_length},
        },
        "depth": {"abs_rel": metrics["abs_rel"], "rmse": metrics["rmse"], "delta1": metrics["delta1"],
                  "scale": scale, "method": "V2D depth module (median scaling)"},
        "seconds": {"render": t_render, "model": t_model, "total": time.perf_counter() - t0},
        "config": to_dict(cfg),
    }
    write_json(out / "summary.json", summary)
    _log.info("poses: rotation error %.3f deg (max %.3f); keyframe depth AbsRel %.3f; %.1f s",
              rot_err.mean(), rot_err.max(), metrics["abs_rel"], t_model)
    return summary
