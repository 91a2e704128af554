"""A `v2d run` output directory written from a synthetic sequence's ground truth (for evaluation and
visualisation tests that must not run SLAM)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from v2d.data.synthetic import SyntheticSequence
from v2d.geometry.lie import se3_inv
from v2d.io.results import keyframe_name
from v2d.io.writers import write_depth_png, write_image_jpg, write_json, write_npy, write_tum


def write_fake_run(root: Path, seq: SyntheticSequence, keyframes: list[int],
                   depths: dict[int, np.ndarray] | None = None, config: dict | None = None) -> Path:
    """Outputs as slam.run writes them: the ground-truth trajectory and keyframe depth (or `depths`);
    `config` is the summary's run configuration (`v2d.config.to_dict`; none when not given)."""
    for sub in ("depth", "images"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    n = len(seq.timestamps)
    write_tum(root / "trajectory.txt", np.asarray(seq.timestamps, dtype=np.float64), se3_inv(seq.poses_cw).numpy())
    for f in keyframes:
        d = np.asarray(seq.depths[f], dtype=np.float32) if depths is None or f not in depths else depths[f]
        write_npy(root / "depth" / f"{keyframe_name(f)}.npy", d)
        write_depth_png(root / "depth" / f"{keyframe_name(f)}.png", d)
        write_image_jpg(root / "images" / f"{keyframe_name(f)}.jpg", np.asarray(seq.images[f]))
    H, W = np.asarray(seq.depths[0]).shape
    fx, fy, cx, cy = seq.intrinsics.tolist()
    write_json(root / "summary.json", {
        "frames": n, "keyframes": len(keyframes), "keyframe_frames": keyframes,
        "keyframe_files": [keyframe_name(f) for f in keyframes], "image_size": [H, W],
        "intrinsics": {"fx": fx, "fy": fy, "cx": cx, "cy": cy, "calibrated": True},
        **({"config": config} if config is not None else {}),
    })
    return root
