"""The demo on the embedded synthetic sequence (`v2d demo`, `make demo`).

The project renders its own sequence (`v2d.data.synthetic`: a textured room, a hand-held
trajectory), runs the SLAM front end on it with the shipped weights and the rendered intrinsics,
and scores the result against the synthetic ground truth: ATE RMSE after Sim3 alignment (evo),
the ground-truth path length, and the keyframes' depth AbsRel after per-frame median scaling.
The outputs are those of `v2d run` (trajectory.txt, depth/, images/, cloud.ply, summary.json)
plus trajectory_gt.txt and demo.png (`slam.vis_render.render_headless`: cloud, keyframe cameras, both
trajectories).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from slam.config import RunConfig
from slam.run import track_frames, write_outputs
from v2d.data.synthetic import render_sequence
from v2d.geometry.lie import se3_inv
from v2d.io.writers import staged_output, write_tum
from v2d.metrics import depth_metrics, trajectory_ate

__all__ = ["run_demo"]

_log = logging.getLogger(__name__)


def run_demo(cfg: RunConfig, out_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Run the demo and write its outputs to `out_dir`; returns the summary written to summary.json."""
    dc = cfg.demo
    size = (dc.height, dc.width)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, height=dc.height, width=dc.width))
    with staged_output(out_dir) as stage:
        t0 = time.perf_counter()
        seq = render_sequence(seed=dc.seed, num_frames=(dc.num_frames - 1) * dc.stride + 1,
                              height=dc.height, width=dc.width)
        idx = list(range(0, len(seq.timestamps), dc.stride))
        t_render = time.perf_counter() - t0
        images = np.asarray(seq.images)
        gt_depths = np.asarray(seq.depths)
        scores: list[dict[str, float]] = []

        def score(f: int, depth: np.ndarray) -> None:
            scores.append(depth_metrics(depth, gt_depths[idx[f]]) | {"frame": idx[f]})

        result, facts = track_frames((images[i] for i in idx), len(idx), cfg, size, seq.intrinsics.numpy(),
                                     stage, names=idx, progress=progress, on_keyframe=score)
        timestamps = np.asarray(seq.timestamps, dtype=np.float64)[idx]
        gt_wc = se3_inv(seq.poses_cw[idx]).numpy()
        write_tum(stage / "trajectory_gt.txt", timestamps, gt_wc)
        ate = trajectory_ate(timestamps, se3_inv(result.poses_cw).numpy(), timestamps, gt_wc, align="sim3")
        extra = {
            "ate_rmse": ate["ate_rmse"],
            "path_length": ate["path_length"],
            "ate_percent_of_path": 100 * ate["ate_rmse"] / ate["path_length"] if ate["path_length"] > 0 else None,
            "trajectory": ate,
            "depth": {"abs_rel": float(np.mean([s["abs_rel"] for s in scores])),
                      "rmse": float(np.mean([s["rmse"] for s in scores])),
                      "delta1": float(np.mean([s["delta1"] for s in scores])),
                      "per_keyframe": scores, "method": "keyframe depth, per-frame median scaling"},
            "input": {"synthetic_seed": dc.seed, "rendered_frames": len(seq.timestamps), "stride": dc.stride,
                      "render_seconds": t_render},
        }
        summary = write_outputs(stage, result, timestamps, cfg, facts, extra, names=idx)
        # A picture of the result (`v2d vis --headless`). The scores do not depend on it, so a machine
        # where Open3D cannot render (no EGL, no libusb) still gets the demo's outputs.
        from slam.vis_render import render_headless
        from v2d.errors import V2DError
        from v2d.io.results import load_run

        try:
            render_headless(load_run(stage), stage / "demo.png", 640, 480, gt=stage / "trajectory_gt.txt")
        except (V2DError, ImportError, RuntimeError) as exc:
            _log.warning("demo.png not written: rendering with Open3D failed (%s: %s)", type(exc).__name__, exc)
    _log.info("ATE %.4f (%.2f%% of the %.2f path), keyframe depth AbsRel %.3f, %.1f frames/s",
              summary["ate_rmse"], summary["ate_percent_of_path"], summary["path_length"],
              summary["depth"]["abs_rel"], summary["fps"])
    return summary
